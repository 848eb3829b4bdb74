"""IF-COMP on MNIST-1D: calibration under shift, mislabel and OOD detection, brute-force oracle.

Usage::

    python -m experiments.ifcomp.main --config=experiments/ifcomp/configs/default.py[:tiny] \
        --workdir=DIR [--overwrite]

A rerun reuses finished stages; a stage whose finished work was made with other settings is
refused (naming them) unless ``--overwrite`` is given.
"""

from experiments.ifcomp.pipeline import run
from experiments.launcher import launch

if __name__ == "__main__":
    launch(run)
