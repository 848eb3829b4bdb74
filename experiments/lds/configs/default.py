"""LDS of influence functions with five curvature strategies on MNIST-1D.

Reproduces the linear-datamodeling-score comparison of curvature approximations (gradient dot
products, diagonal, K-FAC, EK-FAC, exact damped GGN and an EK-FAC ensemble), in the spirit of
Grosse et al. (2023), "Studying large language model generalization with influence functions",
and Park et al. (2023), "TRAK", on a small MLP so it runs on a laptop CPU.

Command (from the repository root)::

    python -m experiments.lds.main --config=experiments/lds/configs/default.py \
        --workdir=workdirs/lds

Tiny run (< 1 minute; used by tests/test_lds_experiment.py)::

    python -m experiments.lds.main --config=experiments/lds/configs/default.py:tiny \
        --workdir=workdirs/lds_tiny

Last default run (fresh clone + install + run: 11 min 39 s wall on the 2-core CPU machine with
another job running; details in experiments/lds/README.md), LDS mean +- 95% CI over 100 queries:

    identity 0.135 +- 0.021   diagonal 0.161 +- 0.022   kfac 0.366 +- 0.030
    ekfac 0.363 +- 0.030      exact 0.262 +- 0.025 (damping 1.24e-3; 0.348 at 1.24e-1)
    ekfac_ensemble (5 models) 0.496 +- 0.029           noise ceiling 0.826 +- 0.011
"""

from __future__ import annotations

import ml_collections


def _method(strategy: str, fisher: str = "expected", damping: float | None = None,
            ensemble_size: int = 1) -> ml_collections.ConfigDict:
    """One attribution method: curvature strategy, Fisher type, damping, models averaged."""
    # A typed placeholder (not a bare None) so `--config.methods.<m>.damping=1e-4` works.
    damping_field = ml_collections.config_dict.placeholder(float) if damping is None else damping
    return ml_collections.ConfigDict(
        {"strategy": strategy, "fisher": fisher, "damping": damping_field,
         "ensemble_size": ensemble_size}
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default experiment; ``arg == "tiny"``: a run under a minute; ``"exact"``: the default
    plus the dense exact curvature (slow, see ``exact_max_params``)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Unoptimized XLA backend for the tiny run: it is dominated by compile time (main.py sets the
    # flag before JAX's first computation; about 8x faster compiles of the retraining program).
    config.fast_compile = arg == "tiny"

    config.data = ml_collections.ConfigDict(
        {"name": "mnist1d", "num_train": 4000, "num_test": 1000, "seed": 0}
    )
    config.num_queries = 100  # drawn at random (config.seed) from the test set

    config.model = ml_collections.ConfigDict({"name": "mlp", "hidden_sizes": (128, 128)})
    config.train = ml_collections.ConfigDict(
        {
            "num_epochs": 60,
            "batch_size": 128,
            "learning_rate": 1e-3,
            "weight_decay": 1e-3,
            "optimizer": "adamw",
        }
    )

    # Ground truth: models retrained on random half-size subsets, several seeds each.
    config.lds = ml_collections.ConfigDict(
        {"num_subsets": 100, "fraction": 0.5, "seeds_per_subset": 4, "models_per_chunk": 50}
    )

    # Attribution methods. `fisher`: "expected" (exact expectation over the model's predictive
    # distribution), "sampled" (one label drawn from the model) or "empirical" (true labels);
    # `damping`: a number, or None for 0.1 x the mean eigenvalue per layer; `ensemble_size`: the
    # scores of that many models trained on the full data with different seeds are averaged.
    config.methods = ml_collections.ConfigDict(
        {
            "identity": _method("identity"),
            "diagonal": _method("diagonal"),
            "kfac": _method("kfac"),
            "ekfac": _method("ekfac"),
            "exact": _method("exact"),
            "ekfac_ensemble": _method("ekfac", ensemble_size=5),
        }
    )
    # The exact curvature is a dense [P, P] matrix whose construction costs about
    # num_train x num_classes x P^2 multiply-adds: for the default MLP (P = 23,050) ~4e13, i.e.
    # 4-8 minutes on 2 CPU cores plus a float64 Cholesky (4 GB). Larger models are skipped (and
    # the reason recorded); `get_config("exact")` raises the threshold further.
    config.exact_max_params = 25_000

    config.curvature_batch_size = 256
    config.query_batch_size = 100
    config.train_batch_size = 500

    if arg == "tiny":
        config.data.num_train = 500
        config.data.num_test = 100
        config.num_queries = 20
        config.model.hidden_sizes = (16,)
        config.train.num_epochs = 5
        config.train.batch_size = 64
        config.train.learning_rate = 1e-2
        config.lds.num_subsets = 12
        config.lds.seeds_per_subset = 2
        config.lds.models_per_chunk = 24
        config.methods.ekfac_ensemble.ensemble_size = 2
        config.train_batch_size = 250
        config.query_batch_size = 20
    elif arg == "exact":
        config.exact_max_params = 50_000
    elif arg not in (None, ""):
        raise ValueError(f"unknown config argument {arg!r}; use nothing, 'tiny' or 'exact'")
    return config
