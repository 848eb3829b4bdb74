"""tda_jax: training data attribution and probabilistic inference in JAX.

Attribution half: :mod:`tda_jax.data`, :mod:`tda_jax.models`, :mod:`tda_jax.training`,
:mod:`tda_jax.capture` (per-example layer statistics from unmodified Flax models),
:mod:`tda_jax.curvature` (identity, diagonal, K-FAC, EK-FAC, exact), :mod:`tda_jax.attribution`
(influence scores), :mod:`tda_jax.complexity` (IF-COMP pNML complexity),
:mod:`tda_jax.evaluation` (LDS).

Inference half: :mod:`tda_jax.probability` (log-weights, resampling, SMC, conditional SMC),
:mod:`tda_jax.mcmc` (HMC, MALA, schedules, AIS, BDMC), :mod:`tda_jax.mi` (mutual-information bounds).

Shared: :mod:`tda_jax.io` (stages, saved arguments), :mod:`tda_jax.sharding`, :mod:`tda_jax.progress`,
:mod:`tda_jax.losses`.

The most used entry points are re-exported here::

    import tda_jax
    curvature = tda_jax.fit_curvature(apply_fn, params, train, strategy="ekfac",
                                      loss=tda_jax.softmax_cross_entropy())
    scores = tda_jax.pairwise_scores(apply_fn, params, curvature, queries, train,
                                     loss=tda_jax.softmax_cross_entropy(),
                                     measurement=tda_jax.classification_margin)
"""

from tda_jax import (
    attribution,
    capture,
    complexity,
    curvature,
    data,
    evaluation,
    io,
    losses,
    mcmc,
    mi,
    models,
    probability,
    sharding,
    training,
)
from tda_jax.attribution import pairwise_scores, self_scores
from tda_jax.curvature import Curvature, fit_curvature
from tda_jax.losses import (
    Loss,
    causal_lm_loss,
    classification_margin,
    completion_log_prob,
    mean_squared_error,
    negative_loss,
    softmax_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "Curvature",
    "Loss",
    "attribution",
    "capture",
    "causal_lm_loss",
    "classification_margin",
    "completion_log_prob",
    "complexity",
    "curvature",
    "data",
    "evaluation",
    "fit_curvature",
    "io",
    "losses",
    "mcmc",
    "mean_squared_error",
    "mi",
    "models",
    "negative_loss",
    "pairwise_scores",
    "probability",
    "self_scores",
    "sharding",
    "softmax_cross_entropy",
    "training",
]
