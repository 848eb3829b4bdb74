"""Metropolis-adjusted Langevin algorithm (MALA).

Step-size convention (the Langevin time step ``tau``, as in Roberts & Tweedie 1996)::

    z' = z + tau * grad log p(z) + sqrt(2 tau) * xi,   xi ~ N(0, I)

followed by a Metropolis-Hastings correction with the Gaussian proposal density
``q(z' | z) = N(z'; z + tau grad log p(z), 2 tau I)``. (MALA with ``tau`` equals one-step HMC with
leapfrog step ``sqrt(2 tau)``.) Non-finite proposals are rejected, as in :mod:`tda_jax.mcmc.hmc`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tda_jax.mcmc.hmc import (
    Array,
    LogDensityFn,
    ValueAndGradFn,
    _raise_if_not_finite,
    check_position,
    value_and_grad_of,
)


class MALAState(NamedTuple):
    """State of one MALA chain: position ``[D]``, log density (scalar) and its gradient ``[D]``."""

    position: Array
    log_density: Array
    grad_log_density: Array


class MALAInfo(NamedTuple):
    """Diagnostics of one MALA transition.

    Attributes:
      acceptance_probability: Metropolis-Hastings acceptance probability; 0 for non-finite
        proposals.
      is_accepted: whether the proposal was accepted.
      energy_change: minus the log Metropolis-Hastings ratio (same role as HMC's energy change).
    """

    acceptance_probability: Array
    is_accepted: Array
    energy_change: Array


def mala_init(position: Array, log_density_fn: LogDensityFn) -> MALAState:
    """Builds the MALA state at ``position`` (``[D]``); see :func:`tda_jax.mcmc.hmc_init`."""
    check_position(position)
    log_density, grad = value_and_grad_of(log_density_fn)(position)
    _raise_if_not_finite(log_density, "log_density_fn")
    return MALAState(position, log_density, grad)


def mala_step_from_value_and_grad(
    key: Array,
    state: MALAState,
    value_and_grad_fn: ValueAndGradFn,
    step_size: float | Array,
) -> tuple[MALAState, MALAInfo]:
    """:func:`mala_step` for a target given as ``position -> (log_density, grad)``."""
    dtype = state.position.dtype
    tau = jnp.asarray(step_size, dtype)
    key_noise, key_accept = jax.random.split(key)
    z, g = state.position, state.grad_log_density
    noise = jax.random.normal(key_noise, z.shape, dtype)
    z_new = z + tau * g + jnp.sqrt(2.0 * tau) * noise
    ld_new, g_new = value_and_grad_fn(z_new)

    def log_proposal(to, frm, grad_frm):
        return -jnp.sum((to - frm - tau * grad_frm) ** 2) / (4.0 * tau)

    log_ratio = ld_new - state.log_density + log_proposal(z, z_new, g_new) - log_proposal(z_new, z, g)
    finite = jnp.isfinite(log_ratio) & jnp.all(jnp.isfinite(g_new)) & jnp.all(jnp.isfinite(z_new))
    log_accept = jnp.where(finite, jnp.minimum(0.0, log_ratio), -jnp.inf)
    acceptance_probability = jnp.exp(log_accept)
    is_accepted = jax.random.uniform(key_accept, (), dtype) < acceptance_probability
    new_state = MALAState(
        jnp.where(is_accepted, z_new, z),
        jnp.where(is_accepted, ld_new, state.log_density),
        jnp.where(is_accepted, g_new, g),
    )
    return new_state, MALAInfo(acceptance_probability, is_accepted, -log_ratio)


def mala_step(
    key: Array,
    state: MALAState,
    log_density_fn: LogDensityFn,
    step_size: float | Array,
) -> tuple[MALAState, MALAInfo]:
    """One MALA transition; leaves ``exp(log_density_fn)`` invariant.

    Args:
      key: PRNG key.
      state: current ``MALAState``.
      log_density_fn: log target density up to a constant, ``[D] -> scalar``.
      step_size: Langevin time step ``tau`` (scalar, may be traced); see the module docstring.

    Returns:
      ``(new_state, info)``.
    """
    check_position(state.position, "state.position")
    return mala_step_from_value_and_grad(key, state, value_and_grad_of(log_density_fn), step_size)
