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

from experiments.launcher import launch
from experiments.lds.pipeline import run

if __name__ == "__main__":
    launch(run)
