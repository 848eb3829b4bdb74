"""LAFTR on MNIST-1D: FSD accuracy, continual learning, influence (LDS) and mislabel detection.

Command (from the repository root)::

    python -m experiments.laftr.main --config=experiments/laftr/configs/default.py \
        --workdir=workdirs/laftr

Tiny run (< 1 minute; used by tests/test_laftr_experiment.py)::

    python -m experiments.laftr.main --config=experiments/laftr/configs/default.py:tiny \
        --workdir=workdirs/laftr_tiny

Last default run (shared machine, load 12-19; details in experiments/laftr/README.md):

    fsd Spearman: laftr 0.983, laftr_bernoulli 0.987, ewc 0.835, kfac 0.982, coreset 0.992
    continual split: finetune 0.803, ewc 0.809, kfac 0.820, coreset 0.814, laftr 0.817
    continual permuted: finetune 0.373, ewc 0.334, kfac 0.364, coreset 0.390, laftr 0.335
    influence LDS: laftr-PBRF 0.161 +- 0.048 (EK-FAC 0.306 +- 0.045); mislabel AUROC 0.853
"""

from __future__ import annotations

import ml_collections

METHODS = ("finetune", "ewc", "kfac", "coreset", "laftr")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default experiment; ``arg == "tiny"``: a run under a minute."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.fast_compile = arg == "tiny"
    config.parts = ("fsd", "continual", "influence", "mislabel")
    config.data = ml_collections.ConfigDict({"num_train": 4000, "num_test": 1000, "seed": 0})

    # Part 1: FSD accuracy on perturbations of a trained MLP (relative sizes log-uniform in
    # [min_size, max_size] x ||theta0||), in three kinds of directions.
    config.fsd = ml_collections.ConfigDict({
        "hidden_sizes": (64, 64),
        "num_epochs": 30, "batch_size": 128, "learning_rate": 3e-3,
        "distance": "kl", "per_class": False,
        "num_random": 20, "num_gradient": 12, "num_finetune": 8,
        "min_size": 3e-3, "max_size": 1e-1,
        "finetune_epochs": 4,
        "laftr_samples": 1024,
        "bootstrap": 500,
    })

    # Part 2: continual learning (vmapped over seeds). `penalty`: lambda per method; the coreset
    # holds `coreset_size` inputs per task (about LAFTR's per-task memory: see results.json).
    def benchmark(epochs, penalty, per_class):
        return ml_collections.ConfigDict({
            "epochs": epochs, "penalty": dict(zip(METHODS, penalty)),
            "laftr_per_class": per_class})

    config.continual = ml_collections.ConfigDict({
        "benchmarks": ("split", "permuted"),
        "num_tasks": 5, "num_seeds": 3, "hidden_sizes": (64, 64),
        "batch_size": 64, "learning_rate": 1e-3,
        "laftr_variant": "moment", "laftr_samples": 128, "coreset_size": 50,
        "split": benchmark(10, (0.0, 10.0, 10.0, 10.0, 10.0), True),
        "permuted": benchmark(5, (0.0, 3.0, 3.0, 3.0, 3.0), False),
    })

    # Part 3: influence (LDS against retrained models, the experiments/lds machinery) and
    # mislabel detection (self-influence, 10% flipped labels).
    config.influence = ml_collections.ConfigDict({
        "num_train": 2000, "num_test": 500, "num_queries": 50,
        "hidden_sizes": (64, 64),
        "num_epochs": 30, "batch_size": 128, "learning_rate": 3e-3, "weight_decay": 1e-3,
        "num_subsets": 50, "fraction": 0.5, "seeds_per_subset": 2, "models_per_chunk": 50,
        "flip_fraction": 0.1,
        "per_class": False,  # per-class summaries: 10x the Hessian's cost
        "hessian_chunk": 256,
    })

    if arg == "tiny":
        config.data.num_train = 600
        config.data.num_test = 200
        config.fsd.hidden_sizes = (16,)
        config.fsd.num_epochs = 3
        config.fsd.num_random = 4
        config.fsd.num_gradient = 3
        config.fsd.num_finetune = 3
        config.fsd.finetune_epochs = 1
        config.fsd.laftr_samples = 128
        config.fsd.bootstrap = 50
        config.continual.num_tasks = 2
        config.continual.num_seeds = 2
        config.continual.hidden_sizes = (8,)
        config.continual.split.epochs = 1
        config.continual.permuted.epochs = 1
        config.continual.coreset_size = 10
        config.influence.num_train = 300
        config.influence.num_test = 100
        config.influence.num_queries = 10
        config.influence.hidden_sizes = (8,)
        config.influence.num_epochs = 3
        config.influence.num_subsets = 6
        config.influence.seeds_per_subset = 1
        config.influence.models_per_chunk = 6
    elif arg not in (None, ""):
        raise ValueError(f"unknown config argument {arg!r}; use nothing or 'tiny'")
    return config
