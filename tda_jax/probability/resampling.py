"""Resampling schemes and ESS-adaptive resampling for sequential Monte Carlo.

Every scheme has the signature ``fn(key, weights, num_samples) -> ancestors`` with normalized
weights ``[num_particles]`` (non-negative; they are renormalized internally, so a sum slightly off
1 is fine) and returns ``int32`` ancestor indices ``[num_samples]``. All schemes are *unbiased*: the
expected number of offspring of particle ``i`` is ``num_samples * weights[i]``. They differ in
variance (Douc, Cappe and Moulines, 2005):

* :func:`multinomial` draws ancestors independently (highest variance; needed by conditional SMC).
* :func:`stratified` draws one uniform in each of ``num_samples`` equal strata of ``[0, 1)``.
* :func:`systematic` uses a single uniform shifted over the strata; particle ``i`` gets
  ``floor(M w_i)`` or ``ceil(M w_i)`` offspring.
* :func:`residual` keeps ``floor(M w_i)`` copies deterministically and draws the remaining
  ``M - sum floor(M w_i)`` multinomially from the residual weights.

Ancestors come out sorted by index for the inverse-CDF schemes (multinomial, stratified,
systematic) and as "deterministic copies, then residual draws" for residual; SMC does not need them
shuffled because proposals act on each particle independently. A particle of zero weight is never
chosen.

:func:`adaptive_resample` resamples only when the effective sample size falls below a threshold,
using ``lax.cond``, so it works under ``jit``, ``vmap`` and ``scan``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from tda_jax.probability.weights import effective_sample_size, normalize_log_weights

__all__ = [
    "AdaptiveResamplingResult",
    "ResamplingFn",
    "adaptive_resample",
    "multinomial",
    "residual",
    "stratified",
    "systematic",
]

ResamplingFn = Callable[[Array, Array, int], Array]
"""``fn(key, weights [N], num_samples) -> int32 ancestors [num_samples]``."""


def _check_weights(weights: ArrayLike, num_samples: int) -> Array:
    weights = jnp.asarray(weights)
    if weights.ndim != 1 or weights.shape[0] == 0:
        raise ValueError(
            f"weights must be a non-empty vector [num_particles], got shape {weights.shape}; "
            "pass normalized weights, e.g. jnp.exp(normalize_log_weights(log_weights)[0])."
        )
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"num_samples must be a positive Python int (a static shape), got {num_samples!r}."
        )
    return weights


def _inverse_cdf(weights: Array, points: Array) -> Array:
    """Indices ``i`` with ``cdf[i-1] <= p < cdf[i]`` for sorted or unsorted ``points`` in [0, 1).

    ``side="right"`` makes a zero-weight particle (``cdf[i-1] == cdf[i]``) unreachable; the clip
    to the last positive-weight index guards points that round up to 1.
    """
    cdf = jnp.cumsum(weights)
    # Divide by the last entry so that the CDF ends at exactly 1 whatever the rounding.
    cdf = cdf / cdf[-1]
    idx = jnp.searchsorted(cdf, points, side="right")
    n = weights.shape[0]
    last_positive = n - 1 - jnp.argmax(weights[::-1] > 0)
    return jnp.minimum(idx, last_positive).astype(jnp.int32)


def multinomial(key: Array, weights: ArrayLike, num_samples: int) -> Array:
    """Multinomial resampling: ``num_samples`` independent draws from ``Categorical(weights)``.

    Args:
      key: PRNG key.
      weights: normalized weights ``[num_particles]``.
      num_samples: number of ancestors to draw (static).

    Returns:
      Ancestor indices, ``int32 [num_samples]``, sorted.
    """
    weights = _check_weights(weights, num_samples)
    # Sorted uniforms (normalized exponential spacings) keep the output sorted like the others.
    spacings = jax.random.exponential(key, (num_samples + 1,), dtype=weights.dtype)
    points = jnp.cumsum(spacings)
    points = points[:-1] / points[-1]
    return _inverse_cdf(weights, points)


def stratified(key: Array, weights: ArrayLike, num_samples: int) -> Array:
    """Stratified resampling: one uniform in each stratum ``[k/M, (k+1)/M)``.

    Args:
      key: PRNG key.
      weights: normalized weights ``[num_particles]``.
      num_samples: number of ancestors ``M`` (static).

    Returns:
      Ancestor indices, ``int32 [num_samples]``, sorted.
    """
    weights = _check_weights(weights, num_samples)
    u = jax.random.uniform(key, (num_samples,), dtype=weights.dtype)
    points = (jnp.arange(num_samples, dtype=weights.dtype) + u) / num_samples
    return _inverse_cdf(weights, points)


def systematic(key: Array, weights: ArrayLike, num_samples: int) -> Array:
    """Systematic resampling: a single uniform ``u`` and points ``(k + u) / M``.

    Particle ``i`` receives ``floor(M w_i)`` or ``ceil(M w_i)`` offspring.

    Args:
      key: PRNG key.
      weights: normalized weights ``[num_particles]``.
      num_samples: number of ancestors ``M`` (static).

    Returns:
      Ancestor indices, ``int32 [num_samples]``, sorted.
    """
    weights = _check_weights(weights, num_samples)
    u = jax.random.uniform(key, (), dtype=weights.dtype)
    points = (jnp.arange(num_samples, dtype=weights.dtype) + u) / num_samples
    return _inverse_cdf(weights, points)


def residual(key: Array, weights: ArrayLike, num_samples: int) -> Array:
    """Residual resampling: ``floor(M w_i)`` copies, the rest multinomial on the residuals.

    Particle ``i`` receives at least ``floor(M w_i)`` offspring. The output has a static shape:
    position ``k`` holds a deterministic copy when ``k < sum_i floor(M w_i)`` and a residual draw
    otherwise.

    Args:
      key: PRNG key.
      weights: normalized weights ``[num_particles]``.
      num_samples: number of ancestors ``M`` (static).

    Returns:
      Ancestor indices, ``int32 [num_samples]``.
    """
    weights = _check_weights(weights, num_samples)
    weights = weights / jnp.sum(weights)
    scaled = num_samples * weights
    copies = jnp.floor(scaled)
    copy_ends = jnp.cumsum(copies)
    num_copies = copy_ends[-1]
    positions = jnp.arange(num_samples, dtype=weights.dtype)
    # Position k belongs to the particle whose block [end_{i-1}, end_i) contains k.
    deterministic = jnp.searchsorted(copy_ends, positions, side="right").astype(jnp.int32)
    residuals = scaled - copies
    # When M w_i are all integers there are no residual draws; keep the weights well defined.
    has_residual = jnp.sum(residuals) > 0
    residual_weights = jnp.where(has_residual, residuals, weights)
    # Independent, *unsorted* draws: keeping the last positions of a sorted sample would bias the
    # residual part toward high indices.
    points = jax.random.uniform(key, (num_samples,), dtype=weights.dtype)
    drawn = _inverse_cdf(residual_weights, points)
    return jnp.where(positions < num_copies, deterministic, drawn).astype(jnp.int32)


class AdaptiveResamplingResult(NamedTuple):
    """Output of :func:`adaptive_resample`.

    Attributes:
      ancestors: ``int32 [num_particles]``; the identity permutation when not resampled.
      log_weights: normalized log-weights ``[num_particles]`` after the step: uniform ``-log N``
        when resampled, the normalized input otherwise.
      resampled: bool ``[]``, whether resampling happened.
      ess: effective sample size ``[]`` of the input weights (the quantity tested).
    """

    ancestors: Array
    log_weights: Array
    resampled: Array
    ess: Array


def adaptive_resample(
    key: Array,
    log_weights: ArrayLike,
    resampling_fn: ResamplingFn = systematic,
    ess_threshold: float = 0.5,
) -> AdaptiveResamplingResult:
    """Resamples when ``ESS < ess_threshold * N``; traceable (uses ``lax.cond``, no Python branch).

    ``ess_threshold >= 1`` always resamples and ``ess_threshold <= 0`` never does (both decided
    statically, so no ESS comparison is made). Either way the importance-sampling identity is
    kept: after resampling every particle carries weight ``1/N``; without it the weights carry over.

    Args:
      key: PRNG key.
      log_weights: log-weights ``[num_particles]`` (normalized or not).
      resampling_fn: a resampling scheme ``fn(key, weights, num_samples)``.
      ess_threshold: fraction of ``num_particles`` below which to resample.

    Returns:
      An :class:`AdaptiveResamplingResult` (ancestors, new normalized log-weights, resampled flag,
      ESS).
    """
    log_weights = jnp.asarray(log_weights)
    normalized, _ = normalize_log_weights(log_weights)
    n = normalized.shape[0]
    ess = effective_sample_size(normalized)
    uniform = jnp.full_like(normalized, -jnp.log(jnp.asarray(n, normalized.dtype)))
    identity = jnp.arange(n, dtype=jnp.int32)

    def resample(_):
        return resampling_fn(key, jnp.exp(normalized), n).astype(jnp.int32), uniform

    def keep(_):
        return identity, normalized

    if ess_threshold >= 1.0:
        resampled = jnp.asarray(True)
        ancestors, new_log_weights = resample(None)
    elif ess_threshold <= 0.0:
        resampled = jnp.asarray(False)
        ancestors, new_log_weights = keep(None)
    else:
        resampled = ess < ess_threshold * n
        ancestors, new_log_weights = jax.lax.cond(resampled, resample, keep, None)
    return AdaptiveResamplingResult(ancestors, new_log_weights, resampled, ess)
