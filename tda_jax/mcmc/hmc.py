"""Hamiltonian Monte Carlo: leapfrog integration followed by a Metropolis correction.

Single-chain kernel on a position that is any pytree of floating arrays (a flat vector ``[D]`` or,
e.g., a dict of parameter arrays; see :mod:`tda_jax.mcmc.state`). Momentum, the diagonal mass and
the leapfrog updates act leaf-wise; on a pytree the kernel draws the same numbers as on the
flattened vector. Callers ``vmap`` over chains, ``scan`` over steps and ``jit`` as they wish
(nothing here is jitted). ``step_size`` may be a traced scalar, so an annealing driver can change it
per temperature without recompiling.

Non-finite log densities: a proposal whose log density, energy or gradient is not finite is
rejected (acceptance probability 0), so a chain started at a point of finite log density only ever
visits such points. :func:`hmc_init` raises ``ValueError`` when called eagerly on a point of
non-finite density.
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
    broadcast_inverse_mass,
    check_position,
    mcmc_init,
    position_dtype,
    tree_all_finite,
    tree_normal,
    tree_sum,
    tree_where,
    value_and_grad_of,
)

__all__ = [
    "HMCInfo",
    "HMCState",
    "hmc_init",
    "hmc_step",
    "hmc_step_from_value_and_grad",
    "kinetic_energy",
    "leapfrog",
]

HMCState = MCMCState
"""Alias of :class:`tda_jax.mcmc.state.MCMCState` (one state type for HMC and MALA)."""


class HMCInfo(NamedTuple):
    """Diagnostics of one HMC transition.

    Attributes:
      acceptance_probability: ``min(1, exp(-energy_change))``; 0 for non-finite proposals.
      is_accepted: whether the proposal was accepted (bool scalar).
      energy_change: ``H(proposal) - H(current)`` where ``H = -log_density + kinetic energy``.
    """

    acceptance_probability: Array
    is_accepted: Array
    energy_change: Array


def hmc_init(position: PyTree, log_density_fn: LogDensityFn) -> MCMCState:
    """The HMC chain state at ``position``: see :func:`tda_jax.mcmc.state.mcmc_init`."""
    return mcmc_init(position, log_density_fn)


def kinetic_energy(momentum: PyTree, inverse_mass_diag: PyTree) -> Array:
    """``0.5 * sum_i inverse_mass_i * p_i**2`` over all leaves; a scalar."""
    return 0.5 * tree_sum(
        jax.tree_util.tree_map(lambda m, p: m * p**2, inverse_mass_diag, momentum)
    )


def leapfrog(
    value_and_grad_fn: ValueAndGradFn,
    position: PyTree,
    momentum: PyTree,
    log_density: Array,
    grad: PyTree,
    step_size: Array,
    num_integration_steps: int | Array,
    inverse_mass_diag: PyTree | Array | None = None,
) -> tuple[PyTree, PyTree, Array, PyTree]:
    """Velocity-Verlet (leapfrog) integration of Hamilton's equations, leaf-wise on pytrees.

    One gradient evaluation per step: the gradient at the end of a step is carried into the next.

    Args:
      value_and_grad_fn: ``position -> (log_density, grad)``.
      position, momentum, grad: pytrees of the same structure and shapes.
      log_density: scalar log density at ``position``.
      step_size: scalar step size.
      num_integration_steps: number of leapfrog steps.
      inverse_mass_diag: None (identity), a scalar, or a pytree like ``position`` (see
        :func:`tda_jax.mcmc.state.broadcast_inverse_mass`).

    Returns:
      ``(position, momentum, log_density, grad)`` at the end of the trajectory.
    """
    inverse_mass = broadcast_inverse_mass(inverse_mass_diag, position)
    tree_map = jax.tree_util.tree_map

    def one_step(_, carry):
        z, p, _, g = carry
        p = tree_map(lambda pi, gi: pi + 0.5 * step_size * gi, p, g)
        z = tree_map(lambda zi, mi, pi: zi + step_size * mi * pi, z, inverse_mass, p)
        ld, g = value_and_grad_fn(z)
        p = tree_map(lambda pi, gi: pi + 0.5 * step_size * gi, p, g)
        return z, p, ld, g

    return jax.lax.fori_loop(0, num_integration_steps, one_step, (position, momentum, log_density, grad))


def hmc_step_from_value_and_grad(
    key: Array,
    state: MCMCState,
    value_and_grad_fn: ValueAndGradFn,
    step_size: float | Array,
    num_integration_steps: int | Array,
    inverse_mass_diag: PyTree | Array | None = None,
) -> tuple[MCMCState, HMCInfo]:
    """:func:`hmc_step` for a target given as ``position -> (log_density, grad)``."""
    dtype = position_dtype(state.position)
    step_size = jnp.asarray(step_size, dtype)
    inverse_mass = broadcast_inverse_mass(inverse_mass_diag, state.position)
    key_momentum, key_accept = jax.random.split(key)
    # Momentum p ~ N(0, M) with M = diag(1 / inverse_mass_diag), leaf by leaf.
    momentum = jax.tree_util.tree_map(
        lambda n, m: n / jnp.sqrt(m), tree_normal(key_momentum, state.position), inverse_mass
    )
    z, p, ld, g = leapfrog(
        value_and_grad_fn,
        state.position,
        momentum,
        state.log_density,
        state.grad_log_density,
        step_size,
        num_integration_steps,
        inverse_mass,
    )
    energy_change = (-ld + kinetic_energy(p, inverse_mass)) - (
        -state.log_density + kinetic_energy(momentum, inverse_mass)
    )
    # A non-finite proposal (overflow, NaN density or gradient) is rejected, never accepted.
    finite = jnp.isfinite(energy_change) & tree_all_finite(g) & tree_all_finite(z)
    log_accept = jnp.where(finite, jnp.minimum(0.0, -energy_change), -jnp.inf)
    acceptance_probability = jnp.exp(log_accept)
    is_accepted = jax.random.uniform(key_accept, (), dtype) < acceptance_probability
    new_state = MCMCState(
        tree_where(is_accepted, z, state.position),
        jnp.where(is_accepted, ld, state.log_density),
        tree_where(is_accepted, g, state.grad_log_density),
    )
    return new_state, HMCInfo(acceptance_probability, is_accepted, energy_change)


def hmc_step(
    key: Array,
    state: MCMCState,
    log_density_fn: LogDensityFn,
    step_size: float | Array,
    num_integration_steps: int | Array,
    inverse_mass_diag: PyTree | Array | None = None,
) -> tuple[MCMCState, HMCInfo]:
    """One HMC transition: fresh Gaussian momentum, leapfrog trajectory, Metropolis correction.

    Leaves ``exp(log_density_fn)`` invariant for any fixed ``step_size`` and
    ``num_integration_steps``. Pure and unjitted: ``jit``/``vmap``/``scan`` it from outside;
    ``step_size`` may be a traced scalar.

    Args:
      key: PRNG key.
      state: current :class:`MCMCState` (from :func:`hmc_init` with the same ``log_density_fn``).
      log_density_fn: log target density up to a constant, ``position -> scalar``.
      step_size: leapfrog step size (scalar, may be traced).
      num_integration_steps: number of leapfrog steps L (a Python int compiles a fixed-length loop).
      inverse_mass_diag: diagonal of the inverse mass matrix: a pytree like the position (leaves
        of the leaf's shape or scalars), or one scalar; default identity.

    Returns:
      ``(new_state, info)``.

    Example:
      >>> state = hmc_init(jnp.zeros(3), lambda z: -0.5 * jnp.sum(z**2))
      >>> state, info = hmc_step(jax.random.key(0), state, lambda z: -0.5 * jnp.sum(z**2), 0.3, 10)
    """
    check_position(state.position, "state.position")
    return hmc_step_from_value_and_grad(
        key,
        state,
        value_and_grad_of(log_density_fn),
        step_size,
        num_integration_steps,
        inverse_mass_diag,
    )
