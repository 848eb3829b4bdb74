"""Importance log-weights: normalization, effective sample size and log-mean-exp.

Every function here works on log-weights, because importance weights of realistic models under- and
overflow in linear space. A log-weight of ``-inf`` is a particle with zero weight and is always
allowed; ``NaN`` never is.

Zero total weight (every entry ``-inf``) has no normalized form. The convention of this module, used
by the SMC code too:

* Eagerly (concrete input), :func:`normalize_log_weights` raises ``ValueError``: a caller that sees
  the numbers should hear about it.
* Under ``jit``/``vmap``/``scan`` it cannot raise. It then returns *uniform* normalized log-weights
  ``-log N`` (finite, NaN-free, so resampling and later steps keep running) and a log total of
  ``-inf``. The log total is the flag: ``jnp.isneginf(log_total)`` marks the degenerate case, and in
  SMC it turns the log normalizer estimate into ``-inf`` (``Zhat = 0``, which is a legitimate value
  of an unbiased estimator of ``Z``).

``NaN`` entries are raised on eagerly; under a trace they propagate into the log total (and hence
into an SMC log normalizer), which is the flag there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

__all__ = [
    "effective_sample_size",
    "log_mean_exp",
    "log_sum_exp",
    "normalize_log_weights",
]


def _is_concrete(x: Array) -> bool:
    """True when ``x`` holds numbers (not a tracer under jit/vmap/scan)."""
    return not isinstance(x, jax.core.Tracer)


def _check_vector(log_weights: Array, name: str = "log_weights") -> None:
    if log_weights.ndim != 1 or log_weights.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty vector of shape [num_particles], got shape "
            f"{log_weights.shape}; pass one log-weight per particle."
        )
    if not jnp.issubdtype(log_weights.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be floating point, got dtype {log_weights.dtype}; cast it with "
            ".astype(jnp.float32)."
        )


def log_sum_exp(x: ArrayLike, axis: int | tuple[int, ...] | None = None) -> Array:
    """``log(sum(exp(x)))`` that is exact for ``-inf`` entries and has NaN-free gradients.

    An all ``-inf`` slice gives ``-inf`` (not NaN), and its gradient is zero rather than NaN, so
    zero-weight particles are safe inside ``jax.grad``.

    Args:
      x: array of log-values, any shape.
      axis: axis or axes to reduce; None reduces everything.

    Returns:
      The reduced array (shape of ``x`` without ``axis``).
    """
    x = jnp.asarray(x)
    m = jnp.max(x, axis=axis, keepdims=True)
    # A non-finite max (all -inf, or +inf) cannot be subtracted; shift by 0 instead.
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    s = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)
    # Guard the log so that the (unused) branch at s == 0 has a finite gradient; NaN stays NaN.
    empty = s == 0
    out = jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, s))) + m
    # Compiled reductions need not propagate NaN (XLA's max may drop it), so flag it explicitly.
    out = jnp.where(jnp.any(jnp.isnan(x), axis=axis, keepdims=True), jnp.nan, out)
    if axis is None:
        return out.reshape(())
    return jnp.squeeze(out, axis=axis)


def log_mean_exp(x: ArrayLike, axis: int | tuple[int, ...] | None = None) -> Array:
    """``log(mean(exp(x)))``, exact for infinite entries and with NaN-free gradients.

    The one log-mean-exp of the library: SMC, AIS (:mod:`tda_jax.mcmc`) and the MI bounds
    (:mod:`tda_jax.mi`, which re-exports this object) all use it. It is the log of an
    importance-sampling estimate of a normalizing constant from log-weights. Along the reduced
    axes: all ``-inf`` gives ``-inf`` (zero weight, never NaN; its gradient is 0), any ``+inf``
    gives ``+inf`` (even next to ``-inf``), ``-inf`` entries contribute nothing, large finite
    values neither overflow nor underflow, and NaN gives NaN.

    Args:
      x: array of log-values, any shape, e.g. log-weights ``[num_particles]``.
      axis: axis or axes to average over; None averages everything.

    Returns:
      The reduced array (shape of ``x`` without ``axis``).
    """
    x = jnp.asarray(x)
    count = x.size if axis is None else np.prod([x.shape[a] for a in np.atleast_1d(axis)])
    return log_sum_exp(x, axis=axis) - jnp.log(jnp.asarray(count, x.dtype))


def normalize_log_weights(log_weights: ArrayLike) -> tuple[Array, Array]:
    """Normalizes log-weights so that ``sum(exp(out)) == 1`` (a log-softmax that handles ``-inf``).

    Zero-weight particles (``-inf``) stay ``-inf``. See the module docstring for zero total weight:
    eagerly it raises; under a trace it returns uniform weights and ``log_total = -inf``.

    Args:
      log_weights: unnormalized log-weights ``[num_particles]``.

    Returns:
      A pair ``(normalized_log_weights [num_particles], log_total [])`` where
      ``log_total = logsumexp(log_weights)``.

    Raises:
      ValueError: if ``log_weights`` is not a non-empty vector, or (concrete input only) if it
        contains NaN or ``+inf``, or if every entry is ``-inf``.

    Example:
      >>> lw, total = normalize_log_weights(jnp.log(jnp.array([1.0, 3.0])))
      >>> jnp.exp(lw)  # [0.25, 0.75]; total = log 4
    """
    log_weights = jnp.asarray(log_weights)
    _check_vector(log_weights)
    if _is_concrete(log_weights):
        values = np.asarray(log_weights)
        if np.isnan(values).any():
            bad = np.flatnonzero(np.isnan(values))[:5].tolist()
            raise ValueError(
                f"log_weights of shape {values.shape} contain NaN at indices {bad}; check the "
                "log-potential or log-density that produced them."
            )
        if np.isposinf(values).any():
            raise ValueError(
                f"log_weights of shape {values.shape} contain +inf; an infinite weight cannot be "
                "normalized, check the log-potential that produced it."
            )
        if np.isneginf(values).all():
            raise ValueError(
                f"every entry of log_weights (shape {values.shape}) is -inf: the total weight is "
                "zero and cannot be normalized; every particle has zero likelihood, so use more "
                "particles or a better proposal."
            )
    n = log_weights.shape[0]
    log_total = log_sum_exp(log_weights)
    degenerate = jnp.isneginf(log_total)
    uniform = jnp.full_like(log_weights, -jnp.log(jnp.asarray(n, log_weights.dtype)))
    safe_total = jnp.where(degenerate, 0.0, log_total)
    normalized = jnp.where(degenerate, uniform, log_weights - safe_total)
    return normalized, log_total


def effective_sample_size(log_weights: ArrayLike) -> Array:
    """Kish effective sample size ``(sum w)^2 / sum w^2`` computed from (unnormalized) log-weights.

    Lies in ``[1, num_particles]`` for any non-degenerate weights; zero total weight (all ``-inf``)
    gives 0 (no effective samples), NaN entries give NaN.

    Args:
      log_weights: log-weights ``[num_particles]``, normalized or not.

    Returns:
      The effective sample size, a scalar ``[]``.
    """
    log_weights = jnp.asarray(log_weights)
    _check_vector(log_weights)
    all_zero = jnp.all(jnp.isneginf(log_weights))
    # Normalize first: 2 * logsumexp(lw) - logsumexp(2 lw) cancels badly for large offsets.
    total = log_sum_exp(log_weights)
    normalized = log_weights - jnp.where(all_zero, 0.0, total)
    ess = jnp.exp(-log_sum_exp(2.0 * normalized))
    return jnp.where(all_zero, 0.0, ess)
