"""Influence functions on a small transformer language model (sparsity, order flip, query
batching, TF-IDF filtering, LDS).

Usage::

    python -m experiments.llm_influence.main \
        --config=experiments/llm_influence/configs/default.py[:tiny|:lds] --workdir=DIR
"""

import os

from absl import app, flags
from ml_collections import config_flags

from experiments.llm_influence.pipeline import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment configuration file")
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for stages, results.json and figures")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value.get("fast_compile"):
        # Tiny runs are dominated by compile time; XLA reads this before its first computation.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        ).strip()
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
