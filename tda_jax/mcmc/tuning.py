"""Pilot-run step-size tuning for HMC / MALA and for AIS schedules.

Step sizes are adapted by dual averaging on ``log step_size`` (Nesterov 2009, as used for HMC by
Hoffman & Gelman 2014) toward a target mean acceptance probability, averaging the acceptance
probability over all pilot chains at each iteration (one shared step size). The returned step sizes
must then be FROZEN: adapting during an AIS or MCMC run would make its transitions depend on the
chain's own history, breaking invariance and hence the unbiasedness of AIS weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from tda_jax.mcmc.ais import (
    JITTER,
    _tempered_value_and_grad,
    broadcast_step_sizes,
    check_initial_positions,
    check_kernel,
    mcmc_transition,
)
from tda_jax.mcmc.schedules import check_schedule
from tda_jax.mcmc.state import Array, value_and_grad_of

LogDensityFn = Callable[[Array], Array]
DEFAULT_TARGET_ACCEPTANCE = {"hmc": 0.65, "mala": 0.574}

# Dual-averaging constants of Hoffman & Gelman (2014), Algorithm 5.
_GAMMA, _T0, _KAPPA = 0.05, 10.0, 0.75


class DualAveragingState(NamedTuple):
    """Dual averaging on ``x = log step_size``: current iterate, averaged iterate, mean error."""

    log_step_size: Array
    log_step_size_avg: Array
    error_avg: Array
    iteration: Array


def dual_averaging_init(log_step_size: Array) -> DualAveragingState:
    """Starts dual averaging at ``log_step_size`` (scalar)."""
    x = jnp.asarray(log_step_size, jnp.float32)
    return DualAveragingState(x, x, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def dual_averaging_update(
    state: DualAveragingState, acceptance: Array, target: float, mu: Array
) -> DualAveragingState:
    """One dual-averaging step given the observed mean acceptance probability.

    ``mu`` is the point the iterates shrink toward (``log(10 * initial step size)``).
    """
    t = state.iteration + 1.0
    eta = 1.0 / (t + _T0)
    error_avg = (1.0 - eta) * state.error_avg + eta * (target - acceptance)
    x = mu - jnp.sqrt(t) / _GAMMA * error_avg
    weight = t**-_KAPPA
    x_avg = weight * x + (1.0 - weight) * state.log_step_size_avg
    return DualAveragingState(x, x_avg, error_avg, t)


def _dual_averaging_run(
    key,
    positions,
    value_and_grad_fn,
    log_step_size0,
    target,
    num_pilot_steps,
    num_integration_steps,
    kernel,
    step_size_jitter,
):
    """Runs vmapped chains while adapting one shared step size; returns (log step, positions)."""
    log_density, grads = jax.vmap(value_and_grad_fn)(positions)
    mu = jnp.log(10.0) + log_step_size0

    def step(carry, step_key):
        z, ld, g, da = carry
        keys = jax.random.split(step_key, z.shape[0])
        step_size = jnp.exp(da.log_step_size).astype(z.dtype)

        def transition(k, zi, ldi, gi):
            return mcmc_transition(
                k,
                zi,
                ldi,
                gi,
                value_and_grad_fn,
                step_size,
                num_integration_steps,
                kernel,
                step_size_jitter,
            )

        z, ld, g, acc = jax.vmap(transition)(keys, z, ld, g)
        da = dual_averaging_update(da, jnp.mean(acc).astype(jnp.float32), target, mu)
        return (z, ld, g, da), None

    init = (positions, log_density, grads, dual_averaging_init(log_step_size0))
    (z, _, _, da), _ = jax.lax.scan(step, init, jax.random.split(key, num_pilot_steps))
    return da.log_step_size_avg, z


@functools.partial(
    jax.jit,
    static_argnames=(
        "log_density_fn",
        "kernel",
        "num_integration_steps",
        "num_pilot_steps",
        "step_size_jitter",
    ),
)
def _tune_step_size_jit(
    key,
    init_positions,
    log_step_size0,
    target,
    *,
    log_density_fn,
    kernel,
    num_integration_steps,
    num_pilot_steps,
    step_size_jitter,
):
    return _dual_averaging_run(
        key,
        init_positions,
        value_and_grad_of(log_density_fn),
        log_step_size0,
        target,
        num_pilot_steps,
        num_integration_steps,
        kernel,
        step_size_jitter,
    )[0]


def _zero_log_density(position: Array) -> Array:
    return jnp.zeros((), jnp.result_type(position))


def _resolve_target(kernel: str, target_acceptance: float | None) -> float:
    check_kernel(kernel)
    target = DEFAULT_TARGET_ACCEPTANCE[kernel] if target_acceptance is None else target_acceptance
    if not 0.0 < target < 1.0:
        raise ValueError(f"`target_acceptance` must lie in (0, 1), got {target}.")
    return float(target)


def _check_pilot(num_pilot_steps: int, initial_step_size: float) -> None:
    if not isinstance(num_pilot_steps, (int, np.integer)) or num_pilot_steps < 1:
        raise ValueError(f"`num_pilot_steps` must be a positive int, got {num_pilot_steps!r}.")
    if not initial_step_size > 0:
        raise ValueError(f"`initial_step_size` must be positive, got {initial_step_size}.")


def tune_step_size(
    key: Array,
    init_positions: Array,
    log_density_fn: LogDensityFn,
    kernel: str = "hmc",
    num_integration_steps: int = 10,
    target_acceptance: float | None = None,
    num_pilot_steps: int = 200,
    initial_step_size: float = 0.1,
    step_size_jitter: float = 0.0,
) -> float:
    """Pilot run that adapts one step size so the mean acceptance probability hits a target.

    Runs ``C`` chains for ``num_pilot_steps`` transitions with dual averaging on the log step size
    (acceptance averaged over chains); returns the averaged iterate. Freeze the result afterwards.

    Args:
      key: PRNG key.
      init_positions: ``[C, D]`` starting points of the pilot chains.
      log_density_fn: log target density, ``[D] -> scalar``.
      kernel: ``"hmc"`` or ``"mala"`` (for MALA the step size is the Langevin time step).
      num_integration_steps: leapfrog steps per HMC transition.
      target_acceptance: default 0.65 for HMC, 0.574 for MALA.
      num_pilot_steps: number of adaptation transitions.
      initial_step_size: starting step size (dual averaging shrinks toward 10x this value).
      step_size_jitter: relative jitter used during the pilot (match what the real run uses;
        :func:`tda_jax.mcmc.hmc_step` itself does not jitter).

    Returns:
      The tuned step size (Python float).

    Note:
      On exactly Gaussian targets the HMC acceptance rate at a fixed number of leapfrog steps is
      not monotone in the step size (trajectory resonances), so the target is then met only
      approximately; jitter smooths this.
    """
    target = _resolve_target(kernel, target_acceptance)
    _check_pilot(num_pilot_steps, initial_step_size)
    check_initial_positions(init_positions, log_density_fn, _zero_log_density, "init_positions")
    log_step = _tune_step_size_jit(
        key,
        init_positions,
        jnp.log(jnp.float32(initial_step_size)),
        jnp.float32(target),
        log_density_fn=log_density_fn,
        kernel=kernel,
        num_integration_steps=num_integration_steps,
        num_pilot_steps=num_pilot_steps,
        step_size_jitter=float(step_size_jitter),
    )
    return float(jnp.exp(log_step))


def _as_partial(fn: Callable) -> Partial:
    """``fn`` as a :class:`jax.tree_util.Partial` pytree (its bound arrays become traced inputs)."""
    return fn if isinstance(fn, Partial) else Partial(fn)


@functools.partial(
    jax.jit,
    static_argnames=("kernel", "num_integration_steps", "num_pilot_steps", "step_size_jitter"),
)
def _tune_anchors_jit(
    keys,
    init_positions,
    anchor_betas,
    log_step_size0,
    target,
    log_prior_fn,
    log_likelihood_fn,
    inputs,
    *,
    kernel,
    num_integration_steps,
    num_pilot_steps,
    step_size_jitter,
):
    """Dual-averaged log step sizes ``[M, num_anchors]`` for ``M`` independent tuning problems.

    ``keys [M]``, ``init_positions [M, C, D]``; ``inputs`` is None or a pytree with leaves
    ``[M, ...]`` (problem ``m`` uses ``log_likelihood_fn(inputs[m], z)``). The callables are
    ``Partial`` pytrees, so arrays bound into them are traced: new data or model parameters of the
    same shapes reuse the compiled pilot.
    """

    def per_problem(key, positions, problem_inputs):
        log_lik = (
            log_likelihood_fn
            if problem_inputs is None
            else functools.partial(log_likelihood_fn, problem_inputs)
        )

        def per_anchor(carry, xs):
            positions, log_step = carry
            beta, anchor_key = xs

            def value_and_grad_fn(z):
                (value, _), grad = _tempered_value_and_grad(log_prior_fn, log_lik, beta)(z)
                return value, grad

            # Chains continue from the previous anchor: a coarse annealing pilot whose first
            # iterations act as burn-in at the new temperature.
            log_step, positions = _dual_averaging_run(
                anchor_key,
                positions,
                value_and_grad_fn,
                log_step,
                target,
                num_pilot_steps,
                num_integration_steps,
                kernel,
                step_size_jitter,
            )
            return (positions, log_step), log_step

        anchor_keys = jax.random.split(key, anchor_betas.shape[0])
        _, log_steps = jax.lax.scan(
            per_anchor, (positions, log_step_size0), (anchor_betas, anchor_keys)
        )
        return log_steps

    return jax.vmap(per_problem)(keys, init_positions, inputs)


def _check_batched_positions(initial_positions: Array, inputs) -> int:
    """Checks ``[M, C, D]`` positions against ``inputs`` leaves ``[M, ...]``; returns ``M``."""
    shape = jnp.shape(initial_positions)
    if len(shape) != 3:
        raise ValueError(
            "with `inputs`, `initial_positions` must have shape [num_problems, num_chains, D] "
            f"(pilot chains for each problem), got {shape}."
        )
    if not jnp.issubdtype(jnp.result_type(initial_positions), jnp.floating):
        raise TypeError(
            f"`initial_positions` must have a floating dtype, got "
            f"{jnp.result_type(initial_positions)}."
        )
    for leaf in jax.tree_util.tree_leaves(inputs):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != shape[0]:
            raise ValueError(
                f"every leaf of `inputs` must have a leading axis of size num_problems = {shape[0]} "
                f"(that of `initial_positions` {shape}), got a leaf of shape {jnp.shape(leaf)}."
            )
    return shape[0]


def tune_ais_step_sizes(
    key: Array,
    initial_positions: Array,
    log_prior_fn: LogDensityFn,
    log_likelihood_fn: Callable,
    betas: Array,
    num_anchors: int = 10,
    kernel: str = "hmc",
    num_integration_steps: int = 10,
    target_acceptance: float | None = None,
    num_pilot_steps: int = 100,
    initial_step_size: float = 0.1,
    step_size_jitter: float = JITTER,
    inputs=None,
) -> Array:
    """Pilot-tunes one step size per annealing step; freeze the result for the real AIS run.

    Anchor temperatures are spaced evenly in ``log beta`` between the smallest positive beta of the
    schedule and 1 (where a peaked likelihood changes the posterior scale). Pilot chains start at
    ``initial_positions`` (prior samples) and visit the anchors in increasing order, each anchor
    running ``num_pilot_steps`` dual-averaging transitions (Hoffman & Gelman, 2014) targeting
    ``pi_beta ∝ prior * likelihood ** beta`` from where the previous anchor left them. The tuned
    log step sizes are then interpolated linearly in ``log beta`` onto every ``beta_t``.

    With ``inputs`` (e.g. a few data examples ``x [M, x_dim]``), ``M`` problems are tuned at once,
    independently, problem ``m`` with likelihood ``z -> log_likelihood_fn(inputs[m], z)``, and
    their log step sizes are averaged (the posterior scale may vary with the data). The data and
    the callables are passed to the compiled pilot as traced arguments (a callable may be a
    :class:`jax.tree_util.Partial` with bound arrays, e.g. model parameters), so a sweep over data
    or models of the same shapes compiles once. :func:`tda_jax.mi.tune_mi_step_sizes` uses this.

    Args:
      key: PRNG key.
      initial_positions: ``[C, D]`` prior samples for the pilot chains; with ``inputs``,
        ``[M, C, D]`` (pilot chains of each problem).
      log_prior_fn: normalised log prior, ``[D] -> scalar``.
      log_likelihood_fn: log likelihood, ``[D] -> scalar``; with ``inputs``,
        ``(inputs[m], z [D]) -> scalar``.
      betas: forward schedule ``[T + 1]`` (concrete).
      num_anchors: number of anchor temperatures (>= 2).
      kernel: ``"hmc"`` or ``"mala"``.
      num_integration_steps: leapfrog steps per HMC transition.
      target_acceptance: default 0.65 for HMC, 0.574 for MALA.
      num_pilot_steps: dual-averaging transitions per anchor.
      initial_step_size: step size the first anchor starts from.
      step_size_jitter: relative jitter during the pilot; keep it equal to the AIS run's (default
        the same as :func:`tda_jax.mcmc.ais`).
      inputs: None, or a pytree with leaves ``[M, ...]`` of per-problem data.

    Returns:
      ``step_sizes`` float ``[T]`` where ``step_sizes[t-1]`` is for ``beta_t``, as :func:`ais`
      expects (dtype of ``initial_positions``).

    Raises:
      ValueError: on bad arguments, or when the pilot produced non-finite step sizes (NaN/inf in
        the log densities).
    """
    target = _resolve_target(kernel, target_acceptance)
    _check_pilot(num_pilot_steps, initial_step_size)
    check_schedule(betas)
    if isinstance(betas, jax.core.Tracer):
        raise ValueError("`betas` must be concrete (call tune_ais_step_sizes outside jit).")
    if not isinstance(num_anchors, (int, np.integer)) or num_anchors < 2:
        raise ValueError(f"`num_anchors` must be an int >= 2, got {num_anchors!r}.")
    if inputs is None:
        check_initial_positions(initial_positions, log_prior_fn, log_likelihood_fn)
        keys = key[None]
        batched_positions = initial_positions[None]
    else:
        num_problems = _check_batched_positions(initial_positions, inputs)
        keys = jax.random.split(key, num_problems)
        batched_positions = initial_positions
    b = np.asarray(betas, np.float64)
    smallest_positive = b[b > 0].min()
    anchors = np.geomspace(smallest_positive, 1.0, num_anchors)
    log_steps = _tune_anchors_jit(
        keys,
        batched_positions,
        jnp.asarray(anchors, jnp.float32),
        jnp.log(jnp.float32(initial_step_size)),
        jnp.float32(target),
        _as_partial(log_prior_fn),
        _as_partial(log_likelihood_fn),
        inputs,
        kernel=kernel,
        num_integration_steps=num_integration_steps,
        num_pilot_steps=num_pilot_steps,
        step_size_jitter=float(step_size_jitter),
    )
    log_steps = np.asarray(log_steps, np.float64)
    if not np.all(np.isfinite(log_steps)):
        raise ValueError(
            "step-size tuning produced non-finite values; check `log_prior_fn` and "
            "`log_likelihood_fn` for NaN/inf at the pilot chains' positions."
        )
    log_b = np.log(np.maximum(b[1:], smallest_positive))
    step_sizes = np.exp(np.interp(log_b, np.log(anchors), log_steps.mean(axis=0)))
    dtype = jnp.result_type(initial_positions)
    return broadcast_step_sizes(step_sizes, b.shape[0] - 1, dtype)
