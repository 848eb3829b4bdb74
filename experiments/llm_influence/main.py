"""Influence functions on a small transformer language model (sparsity, order flip, query
batching, TF-IDF filtering, LDS).

Usage::

    python -m experiments.llm_influence.main \
        --config=experiments/llm_influence/configs/default.py[:tiny|:lds] --workdir=DIR \
        [--overwrite]

Flags, multi-process runs and reruns: see :mod:`experiments.launcher`.
"""

from experiments.launcher import launch
from experiments.llm_influence.pipeline import run

if __name__ == "__main__":
    launch(run)
