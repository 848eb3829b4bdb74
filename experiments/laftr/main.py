"""LAFTR function-space distances on MNIST-1D: FSD accuracy, continual learning, influence (LDS)
and mislabel detection.

Usage::

    python -m experiments.laftr.main --config=experiments/laftr/configs/default.py[:tiny] \
        --workdir=DIR [--overwrite]
"""

from experiments.laftr.pipeline import run
from experiments.launcher import launch

if __name__ == "__main__":
    launch(run)
