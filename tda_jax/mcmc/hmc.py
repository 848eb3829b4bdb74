"""Hamiltonian Monte Carlo: leapfrog integration followed by a Metropolis correction.

Single-chain kernel on a flat position ``[D]``; callers ``vmap`` over chains, ``scan`` over steps
and ``jit`` as they wish (nothing here is jitted). ``step_size`` may be a traced scalar, so an
annealing driver can change it per temperature without recompiling.

Non-finite log densities: a proposal whose log density, energy or gradient is not finite is
rejected (acceptance probability 0), so a chain started at a point of finite log density only ever
visits such points. :func:`hmc_init` raises ``ValueError`` when called eagerly on a point of
non-finite density.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
LogDensityFn = Callable[[Array], Array]
# value_and_grad_fn(position [D]) -> (log_density scalar, grad [D])
ValueAndGradFn = Callable[[Array], tuple[Array, Array]]


class HMCState(NamedTuple):
    """State of one HMC chain.

    Attributes:
      position: current point, ``[D]``.
      log_density: log target density (up to a constant) at ``position``, scalar.
      grad_log_density: its gradient at ``position``, ``[D]``.
    """

    position: Array
    log_density: Array
    grad_log_density: Array


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


def check_position(position: Array, name: str = "position") -> None:
    """Raises ``ValueError`` unless ``position`` is a flat floating-point vector ``[D]``."""
    shape = jnp.shape(position)
    if len(shape) != 1:
        raise ValueError(
            f"`{name}` must be a flat vector of shape [D] for a single chain, got shape {shape}. "
            "Flatten the parameters (jax.flatten_util.ravel_pytree) and vmap over chains."
        )
    if not jnp.issubdtype(jnp.result_type(position), jnp.floating):
        raise TypeError(
            f"`{name}` must have a floating dtype, got {jnp.result_type(position)}; "
            "cast it with .astype(jnp.float32)."
        )


def value_and_grad_of(log_density_fn: LogDensityFn) -> ValueAndGradFn:
    """Wraps ``log_density_fn: [D] -> scalar`` into ``position -> (log_density, grad)``.

    Raises ``ValueError`` (at trace time) when the function does not return a scalar.
    """

    def value_and_grad_fn(position: Array) -> tuple[Array, Array]:
        value, grad = jax.value_and_grad(_checked_scalar(log_density_fn))(position)
        return value, grad

    return value_and_grad_fn


def _checked_scalar(log_density_fn: LogDensityFn) -> LogDensityFn:
    def fn(position: Array) -> Array:
        value = log_density_fn(position)
        if jnp.shape(value) != ():
            raise ValueError(
                "`log_density_fn` must map one position [D] to a scalar, got output shape "
                f"{jnp.shape(value)} for input shape {jnp.shape(position)}. Sum over data inside "
                "the function and vmap over chains outside it."
            )
        return value

    return fn


def _raise_if_not_finite(log_density: Array, fn_name: str) -> None:
    if isinstance(log_density, jax.core.Tracer):
        return
    if not bool(jnp.isfinite(log_density)):
        raise ValueError(
            f"`{fn_name}` is {float(log_density)} at the initial position; start the chain at a "
            "point of finite log density."
        )


def hmc_init(position: Array, log_density_fn: LogDensityFn) -> HMCState:
    """Builds the HMC state at ``position``.

    Args:
      position: initial point, ``[D]``.
      log_density_fn: log target density up to a constant, ``[D] -> scalar``.

    Returns:
      ``HMCState`` holding the position, its log density and gradient.

    Raises:
      ValueError: on a non-flat position, a non-scalar log density, or (when called eagerly) a
        non-finite log density at ``position``.
    """
    check_position(position)
    log_density, grad = value_and_grad_of(log_density_fn)(position)
    _raise_if_not_finite(log_density, "log_density_fn")
    return HMCState(position, log_density, grad)


def leapfrog(
    value_and_grad_fn: ValueAndGradFn,
    position: Array,
    momentum: Array,
    log_density: Array,
    grad: Array,
    step_size: Array,
    num_integration_steps: int | Array,
    inverse_mass_diag: Array,
) -> tuple[Array, Array, Array, Array]:
    """Velocity-Verlet (leapfrog) integration of Hamilton's equations.

    One gradient evaluation per step: the gradient at the end of a step is carried into the next.

    Returns:
      ``(position, momentum, log_density, grad)`` at the end of the trajectory.
    """

    def one_step(_, carry):
        z, p, _, g = carry
        p = p + 0.5 * step_size * g
        z = z + step_size * inverse_mass_diag * p
        ld, g = value_and_grad_fn(z)
        p = p + 0.5 * step_size * g
        return z, p, ld, g

    return jax.lax.fori_loop(0, num_integration_steps, one_step, (position, momentum, log_density, grad))


def hmc_step_from_value_and_grad(
    key: Array,
    state: HMCState,
    value_and_grad_fn: ValueAndGradFn,
    step_size: float | Array,
    num_integration_steps: int | Array,
    inverse_mass_diag: Array | None = None,
) -> tuple[HMCState, HMCInfo]:
    """:func:`hmc_step` for a target given as ``position -> (log_density, grad)``."""
    dtype = state.position.dtype
    step_size = jnp.asarray(step_size, dtype)
    if inverse_mass_diag is None:
        inverse_mass_diag = jnp.ones((), dtype)
    else:
        inverse_mass_diag = jnp.asarray(inverse_mass_diag, dtype)
        if inverse_mass_diag.shape not in ((), state.position.shape):
            raise ValueError(
                f"`inverse_mass_diag` must have shape {state.position.shape} (or be a scalar), "
                f"got {inverse_mass_diag.shape}."
            )
    key_momentum, key_accept = jax.random.split(key)
    # Momentum p ~ N(0, M) with M = diag(1 / inverse_mass_diag).
    momentum = jax.random.normal(key_momentum, state.position.shape, dtype) / jnp.sqrt(inverse_mass_diag)
    z, p, ld, g = leapfrog(
        value_and_grad_fn,
        state.position,
        momentum,
        state.log_density,
        state.grad_log_density,
        step_size,
        num_integration_steps,
        inverse_mass_diag,
    )

    def kinetic(m):
        return 0.5 * jnp.sum(inverse_mass_diag * m**2)

    energy_change = (-ld + kinetic(p)) - (-state.log_density + kinetic(momentum))
    # A non-finite proposal (overflow, NaN density or gradient) is rejected, never accepted.
    finite = jnp.isfinite(energy_change) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(z))
    log_accept = jnp.where(finite, jnp.minimum(0.0, -energy_change), -jnp.inf)
    acceptance_probability = jnp.exp(log_accept)
    is_accepted = jax.random.uniform(key_accept, (), dtype) < acceptance_probability
    new_state = HMCState(
        jnp.where(is_accepted, z, state.position),
        jnp.where(is_accepted, ld, state.log_density),
        jnp.where(is_accepted, g, state.grad_log_density),
    )
    return new_state, HMCInfo(acceptance_probability, is_accepted, energy_change)


def hmc_step(
    key: Array,
    state: HMCState,
    log_density_fn: LogDensityFn,
    step_size: float | Array,
    num_integration_steps: int | Array,
    inverse_mass_diag: Array | None = None,
) -> tuple[HMCState, HMCInfo]:
    """One HMC transition: fresh Gaussian momentum, leapfrog trajectory, Metropolis correction.

    Leaves ``exp(log_density_fn)`` invariant for any fixed ``step_size`` and
    ``num_integration_steps``. Pure and unjitted: ``jit``/``vmap``/``scan`` it from outside;
    ``step_size`` may be a traced scalar.

    Args:
      key: PRNG key.
      state: current ``HMCState`` (from :func:`hmc_init` with the same ``log_density_fn``).
      log_density_fn: log target density up to a constant, ``[D] -> scalar``.
      step_size: leapfrog step size (scalar, may be traced).
      num_integration_steps: number of leapfrog steps L (a Python int compiles a fixed-length loop).
      inverse_mass_diag: diagonal of the inverse mass matrix, ``[D]`` or scalar; default identity.

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
