"""IF-COMP (pNML complexity from temperature-scaled Boltzmann influence functions) on MNIST-1D:
calibration under input-noise shift, mislabel detection and OOD detection, plus a brute-force
pNML oracle on a small model.

Command (from the repository root)::

    python -m experiments.ifcomp.main --config=experiments/ifcomp/configs/default.py \
        --workdir=workdirs/ifcomp

Tiny run (< 1 minute on a quiet machine; used by tests/test_ifcomp_experiment.py)::

    python -m experiments.ifcomp.main --config=experiments/ifcomp/configs/default.py:tiny \
        --workdir=workdirs/ifcomp_tiny

Last default run (2026-12-05, fresh work directory, 2-core CPU machine shared with other jobs at
load average 15-19): 4 min 51 s wall, 98 s CPU; stages models 31 s, calibration 29 s, mislabel
32 s, OOD 23 s, oracle 60 s. A second fresh run gave identical numbers. Test accuracy of the
model 0.632. Every +- is the half-width of a 95% bootstrap interval over points (1000 resamples).

ECE (15 bins) / NLL by input-noise std (softmax, temperature, 5-model ensemble, linearized
Laplace, IF-COMP)::

    shift  softmax        temperature    ensemble       laplace        ifcomp
    0.00   0.152 / 1.21   0.038 / 1.01   0.041 / 0.94   0.055 / 1.07   0.030 / 1.11
    0.25   0.214 / 1.47   0.059 / 1.13   0.057 / 1.10   0.051 / 1.17   0.056 / 1.28
    0.50   0.313 / 2.28   0.145 / 1.51   0.136 / 1.59   0.065 / 1.45   0.069 / 1.70
    1.00   0.576 / 6.12   0.431 / 3.29   0.359 / 3.82   0.238 / 2.54   0.089 / 2.78
    1.50   0.692 / 11.0   0.580 / 5.86   0.493 / 7.11   0.348 / 3.60   0.076 / 3.44
    2.00   0.759 / 14.8   0.670 / 8.65   0.553 / 10.3   0.368 / 5.81   0.062 / 3.57

(ECE CIs +-0.018..0.029.) IF-COMP's ECE is below plain softmax at every shift level.

Mislabel detection (20% flipped), AUROC: ifcomp 0.803 +- 0.015, loss 0.789 +- 0.015,
self_influence 0.818 +- 0.015. OOD (train digits 0-4, OOD 5-9), AUROC: ifcomp 0.587 +- 0.031,
msp 0.573 +- 0.032, energy 0.485 +- 0.037, mahalanobis 0.626 +- 0.034. Oracle: Spearman of
IF-COMP's complexity with the brute-force pNML complexity over 20 test points 0.982 (per
(point, label) hindsight probabilities 0.997; refits converged to gradient norm 1.6e-7).
Chosen (T, eps): calibration (2, 3e-5), mislabel (8, 3e-4), OOD (8, 1e-4).

Settings of IF-COMP: the curvature is EK-FAC with the expected Fisher (GGN) and damping
``ifcomp.damping`` (None: 0.1 x the mean eigenvalue of each layer); the Boltzmann temperature ``T``
and the added point's weight ``eps`` are chosen per model from the grids below by the pNML's NLL on
a clean held-out validation split (the labels of the evaluation tasks are never used), as
temperature scaling chooses its temperature.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default experiment; ``arg == "tiny"``: a run under a minute."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.fast_compile = arg == "tiny"

    # MNIST-1D: train / validation (temperature, IF-COMP's T and eps, Laplace scale) / test.
    config.data = ml_collections.ConfigDict(
        {"num_train": 4000, "num_val": 500, "num_test": 1000, "seed": 0})
    config.model = ml_collections.ConfigDict({"hidden_sizes": (128, 128)})
    config.train = ml_collections.ConfigDict(
        {"num_epochs": 60, "batch_size": 128, "learning_rate": 1e-3, "weight_decay": 1e-3,
         "optimizer": "adamw"})

    config.ifcomp = ml_collections.ConfigDict({
        "damping": ml_collections.config_dict.placeholder(float),
        "temperatures": (0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
        "epsilons": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
        "batch_size": 64,
        "curvature_batch_size": 256,
    })

    # Calibration: Gaussian noise of these standard deviations added to the (standardized) test
    # inputs; ECE with `ece_bins` equal-width confidence bins; CIs by bootstrap over test points.
    config.calibration = ml_collections.ConfigDict({
        "shifts": (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
        "ece_bins": 15,
        "ensemble_size": 5,
        "laplace": True,
        "laplace_scales": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
        "laplace_samples": 64,
    })
    # Mislabel detection: a model trained with `fraction` of its training labels flipped.
    config.mislabel = ml_collections.ConfigDict({"fraction": 0.2})
    # OOD: a model trained on digits 0..num_in_classes-1; the test digits above are OOD.
    config.ood = ml_collections.ConfigDict({"num_in_classes": 5})
    # Brute-force pNML oracle: a small model on a subset, every (point, label) refitted. tanh, not
    # relu: the refits of a relu network stall at kinks (gradient norm ~0.1 at the end for some
    # problems), those of a smooth one converge (gradient norm ~1e-7).
    config.oracle = ml_collections.ConfigDict({
        "num_train": 300, "num_points": 20, "hidden_sizes": (16,), "activation": "tanh",
        "num_epochs": 100, "damping": 1.0, "epsilon": 0.05, "temperature": 2.0,
        "num_steps": 600, "learning_rate": 3e-2})
    config.num_bootstrap = 1000

    if arg == "tiny":
        config.data.num_train = 400
        config.data.num_val = 100
        config.data.num_test = 200
        config.model.hidden_sizes = (16,)
        config.train.num_epochs = 10
        config.train.batch_size = 64
        config.train.learning_rate = 1e-2
        config.ifcomp.temperatures = (1.0, 2.0)
        config.ifcomp.epsilons = (1e-3, 1e-2, 1e-1)
        config.calibration.shifts = (0.0, 0.5, 1.0, 1.5, 2.0)
        config.calibration.laplace_scales = (1e-3, 1e-2, 1e-1)
        config.calibration.laplace_samples = 16
        config.oracle.num_train = 40
        config.oracle.num_points = 6
        config.oracle.hidden_sizes = (4,)
        config.oracle.num_epochs = 10
        config.oracle.num_steps = 100
        config.num_bootstrap = 50
    elif arg not in (None, ""):
        raise ValueError(f"unknown config argument {arg!r}; use nothing or 'tiny'")
    return config
