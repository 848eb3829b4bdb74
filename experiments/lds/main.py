"""Linear datamodeling score of influence-function curvature strategies.

Usage::

    python -m experiments.lds.main --config=experiments/lds/configs/default.py[:tiny] --workdir=DIR \
        [--overwrite]

Several processes, one global device mesh (``launch/local.py``; ``launch/slurm.py`` and
``launch/tpu_vm.py`` for clusters)::

    python -m launch.local --num_processes=2 --devices_per_process=2 -- experiments.lds.main \
        --config=experiments/lds/configs/default.py:tiny --workdir=DIR

A rerun reuses finished stages; a stage whose finished work was made with other settings is
refused (naming them) unless ``--overwrite`` is given.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from experiments.lds.pipeline import run
from tda_jax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment configuration file")
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for stages, results.json and figures")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "recompute stages whose finished work was made with other settings (deleting it) instead of "
    "refusing; stages with the same settings are still reused")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value.get("fast_compile"):
        # Tiny runs are dominated by compile time; XLA reads this before its first computation.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        ).strip()
    # Started by launch/local.py, launch/slurm.py or launch/tpu_vm.py: join the other processes
    # (one global device mesh); otherwise a no-op.
    sharding.initialize_from_env()
    run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
    app.run(main)
