"""Launches the MI-bounds experiment: ``--config`` (ml_collections config file) and ``--workdir``.

    python -m experiments.mi_bounds.main --config=experiments/mi_bounds/configs/default.py \
        --workdir=workdirs/mi_bounds [--overwrite]

A rerun reuses finished stages; a stage whose finished work was made with other settings is
refused (naming them) unless ``--overwrite`` is given.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from experiments.mi_bounds.run import train_and_evaluate
from tda_jax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json, figures and stages.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "recompute stages whose finished work was made with other settings (deleting it) instead of "
    "refusing; stages with the same settings are still reused")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value.get("fast_compile"):
        # Tiny runs are dominated by compile time; XLA reads this before its first computation.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        ).strip()
    # Started by launch/local.py, launch/slurm.py or launch/tpu_vm.py: join the other processes
    # (one global device mesh); otherwise a no-op.
    sharding.initialize_from_env()
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
    app.run(main)
