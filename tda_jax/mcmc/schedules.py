"""Annealing schedules ``0 = beta_0 <= beta_1 <= ... <= beta_T = 1``.

Each schedule returns float32 ``[num_steps + 1]`` with exact endpoints 0 and 1. The intermediate
densities are ``pi_t(z) ∝ prior(z) * likelihood(z) ** beta_t`` (see :mod:`tda_jax.mcmc.ais`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive int, got {num_steps!r}.")


def _finish(betas: np.ndarray) -> Array:
    betas = np.asarray(betas, np.float64)
    betas[0], betas[-1] = 0.0, 1.0
    # Rounding to float32 cannot break monotonicity of a nondecreasing float64 sequence.
    return jnp.asarray(betas.astype(np.float32))


def linear_schedule(num_steps: int) -> Array:
    """Evenly spaced ``beta_t = t / T``.

    Args:
      num_steps: number of annealing steps ``T``.

    Returns:
      betas, float32 ``[T + 1]``.
    """
    _check_num_steps(num_steps)
    return _finish(np.linspace(0.0, 1.0, num_steps + 1))


def geometric_schedule(num_steps: int, start: float = 1e-6) -> Array:
    """``beta_0 = 0`` then ``beta_1 .. beta_T`` evenly spaced in ``log beta`` from ``start`` to 1.

    Spends most steps at small ``beta``, where ``log Z_beta`` changes fastest for peaked
    likelihoods (the usual choice for AIS on high-information targets).

    Args:
      num_steps: number of annealing steps ``T``.
      start: ``beta_1``, in ``(0, 1)``.

    Returns:
      betas, float32 ``[T + 1]``.
    """
    _check_num_steps(num_steps)
    if not 0.0 < start < 1.0:
        raise ValueError(f"`start` must lie in (0, 1), got {start}.")
    betas = np.zeros(num_steps + 1)
    betas[1:] = np.logspace(np.log10(start), 0.0, num_steps)
    return _finish(betas)


def sigmoid_schedule(num_steps: int, scale: float = 4.0) -> Array:
    """Sigmoid schedule of Grosse et al. (2015) / Wu et al. (2017).

    ``beta_t = (s(scale * (2t/T - 1)) - s(-scale)) / (s(scale) - s(-scale))`` with ``s`` the
    logistic sigmoid: denser steps at both ends.

    Args:
      num_steps: number of annealing steps ``T``.
      scale: steepness ``delta`` of the sigmoid (> 0).

    Returns:
      betas, float32 ``[T + 1]``.
    """
    _check_num_steps(num_steps)
    if not scale > 0.0:
        raise ValueError(f"`scale` must be positive, got {scale}.")
    s = 1.0 / (1.0 + np.exp(-scale * np.linspace(-1.0, 1.0, num_steps + 1)))
    return _finish((s - s[0]) / (s[-1] - s[0]))


def check_schedule(betas: Array) -> None:
    """Validates a forward annealing schedule.

    Checks a 1-D array of at least 2 entries, all finite, ``betas[0] == 0``, ``betas[-1] == 1``
    and nondecreasing. Value checks run only when ``betas`` is concrete (not traced under jit).

    Args:
      betas: ``[T + 1]``.

    Raises:
      ValueError: naming the problem.
    """
    shape = jnp.shape(betas)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(
            f"`betas` must be a 1-D schedule [T + 1] with T >= 1, got shape {shape}; "
            "build one with linear_schedule / geometric_schedule / sigmoid_schedule."
        )
    if isinstance(betas, jax.core.Tracer):
        return
    b = np.asarray(betas, np.float64)
    if not np.all(np.isfinite(b)):
        bad = np.flatnonzero(~np.isfinite(b))
        raise ValueError(f"`betas` contains non-finite values (NaN/inf) at indices {bad[:5]}.")
    if b[0] != 0.0:
        raise ValueError(f"`betas` must start at 0 (the prior), got betas[0] = {b[0]}.")
    if b[-1] != 1.0:
        raise ValueError(f"`betas` must end at 1 (the posterior), got betas[-1] = {b[-1]}.")
    decreasing = np.flatnonzero(np.diff(b) < 0)
    if decreasing.size:
        i = int(decreasing[0])
        raise ValueError(
            f"`betas` must be nondecreasing (non-monotone at index {i}: betas[{i}] = {b[i]} > "
            f"betas[{i + 1}] = {b[i + 1]}). To run the reverse chain pass reverse=True instead "
            "of a decreasing schedule."
        )
