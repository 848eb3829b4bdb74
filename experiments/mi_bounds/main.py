"""Launches the MI-bounds experiment: ``--config`` (ml_collections config file) and ``--workdir``.

    python -m experiments.mi_bounds.main --config=experiments/mi_bounds/configs/default.py \
        --workdir=workdirs/mi_bounds [--overwrite]

A rerun reuses finished stages; a stage whose finished work was made with other settings is
refused (naming them) unless ``--overwrite`` is given.
"""

from experiments.launcher import launch
from experiments.mi_bounds.run import train_and_evaluate

if __name__ == "__main__":
    launch(train_and_evaluate)
