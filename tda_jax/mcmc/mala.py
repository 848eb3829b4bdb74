"""Metropolis-adjusted Langevin algorithm (MALA).

Step-size convention (the Langevin time step ``tau``, as in Roberts & Tweedie 1996)::

    z' = z + tau * grad log p(z) + sqrt(2 tau) * xi,   xi ~ N(0, I)

followed by a Metropolis-Hastings correction with the Gaussian proposal density
``q(z' | z) = N(z'; z + tau grad log p(z), 2 tau I)``. (MALA with ``tau`` equals one-step HMC with
leapfrog step ``sqrt(2 tau)``.) Positions are pytrees of floating arrays and the proposal acts
leaf-wise (:mod:`tda_jax.mcmc.state`); the state is the shared :class:`MCMCState`. Non-finite
proposals are rejected, as in :mod:`tda_jax.mcmc.hmc`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tda_jax.mcmc.state import (
    Array,
    LogDensityFn,
    MCMCState,
    PyTree,
    ValueAndGradFn,
    check_position,
    mcmc_init,
    position_dtype,
    tree_all_finite,
    tree_normal,
    tree_sum,
    tree_where,
    value_and_grad_of,
)

__all__ = ["MALAInfo", "MALAState", "mala_init", "mala_step", "mala_step_from_value_and_grad"]

MALAState = MCMCState
"""Alias of :class:`tda_jax.mcmc.state.MCMCState` (one state type for HMC and MALA)."""


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


def mala_init(position: PyTree, log_density_fn: LogDensityFn) -> MCMCState:
    """The MALA chain state at ``position``: see :func:`tda_jax.mcmc.state.mcmc_init`."""
    return mcmc_init(position, log_density_fn)


def mala_step_from_value_and_grad(
    key: Array,
    state: MCMCState,
    value_and_grad_fn: ValueAndGradFn,
    step_size: float | Array,
) -> tuple[MCMCState, MALAInfo]:
    """:func:`mala_step` for a target given as ``position -> (log_density, grad)``."""
    dtype = position_dtype(state.position)
    tau = jnp.asarray(step_size, dtype)
    key_noise, key_accept = jax.random.split(key)
    z, g = state.position, state.grad_log_density
    noise = tree_normal(key_noise, z)
    z_new = jax.tree_util.tree_map(
        lambda zi, gi, ni: zi + tau * gi + jnp.sqrt(2.0 * tau) * ni, z, g, noise
    )
    ld_new, g_new = value_and_grad_fn(z_new)

    def log_proposal(to, frm, grad_frm):
        # log N(to; frm + tau grad_frm, 2 tau I) up to a constant, summed over all leaves.
        sq = jax.tree_util.tree_map(lambda t, f, gf: (t - f - tau * gf) ** 2, to, frm, grad_frm)
        return -tree_sum(sq) / (4.0 * tau)

    log_ratio = ld_new - state.log_density + log_proposal(z, z_new, g_new) - log_proposal(z_new, z, g)
    finite = jnp.isfinite(log_ratio) & tree_all_finite(g_new) & tree_all_finite(z_new)
    log_accept = jnp.where(finite, jnp.minimum(0.0, log_ratio), -jnp.inf)
    acceptance_probability = jnp.exp(log_accept)
    is_accepted = jax.random.uniform(key_accept, (), dtype) < acceptance_probability
    new_state = MCMCState(
        tree_where(is_accepted, z_new, z),
        jnp.where(is_accepted, ld_new, state.log_density),
        tree_where(is_accepted, g_new, g),
    )
    return new_state, MALAInfo(acceptance_probability, is_accepted, -log_ratio)


def mala_step(
    key: Array,
    state: MCMCState,
    log_density_fn: LogDensityFn,
    step_size: float | Array,
) -> tuple[MCMCState, MALAInfo]:
    """One MALA transition; leaves ``exp(log_density_fn)`` invariant.

    Args:
      key: PRNG key.
      state: current :class:`MCMCState` (from :func:`mala_init` or :func:`tda_jax.mcmc.hmc_init`).
      log_density_fn: log target density up to a constant, ``position -> scalar``.
      step_size: Langevin time step ``tau`` (scalar, may be traced); see the module docstring.

    Returns:
      ``(new_state, info)``.
    """
    check_position(state.position, "state.position")
    return mala_step_from_value_and_grad(key, state, value_and_grad_of(log_density_fn), step_size)
