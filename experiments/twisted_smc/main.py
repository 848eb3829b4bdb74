"""Launches the twisted-SMC experiment: ``--config`` (ml_collections file) and ``--workdir``.

    python -m experiments.twisted_smc.main --config=experiments/twisted_smc/configs/default.py \
        --workdir=workdirs/twisted_smc [--overwrite]
"""

from experiments.launcher import launch
from experiments.twisted_smc.pipeline import run

if __name__ == "__main__":
    launch(run)
