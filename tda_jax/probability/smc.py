"""Generic sequential Monte Carlo (particle filter) with ESS-adaptive resampling.

The model is a Feynman-Kac flow given by two user functions acting on a whole batch of particles
(a pytree whose leaves have a leading particle axis ``[N, ...]``):

* ``proposal_fn(key, previous_particles, t) -> particles``: draws ``x_t ~ q_t(. | x_{t-1})`` for
  every particle;
* ``log_potential_fn(previous_particles, particles, t) -> [N]``: the log incremental weight
  ``log G_t(x_{t-1}, x_t)``. For a target ``gamma_t`` it is
  ``log gamma_t(x_{0:t}) - log gamma_{t-1}(x_{0:t-1}) - log q_t(x_t | x_{t-1})``; for the
  bootstrap filter of a state-space model it is just the observation log-density
  ``log g(y_t | x_t)``.

``t`` is an ``int32`` scalar, the time index of the particles being made (1, 2, ...); time 0 is
the initial state from :func:`init`, whose log-weights are ``log G_0(x_0)``.

One step (``kernel(key, state) -> (state, info)``, in the ``init`` / ``build_kernel`` style of
blackjax) does

1. resample when ``ESS < ess_threshold * N`` (``ess_threshold >= 1``: every step), giving
   ancestors ``a`` and log-weights ``W'`` (uniform after resampling, carried over otherwise);
2. propose ``x_t = proposal_fn(key, x_{t-1}[a], t)``;
3. reweight: ``log_w = W' + log G_t(x_{t-1}[a], x_t)``; the log normalizer increment is
   ``logsumexp(W' + log G_t) - logsumexp(W')`` (``W'`` is normalized, so the second term is 0),
   which is correct whether or not the step resampled.

``log Zhat = log_mean_exp(log G_0) + sum_t increment_t`` is an unbiased estimate of ``Z`` (in
linear space), so ``E[log Zhat] <= log Z``: a stochastic lower bound.

Degenerate weights follow :mod:`tda_jax.probability.weights`: called eagerly, a step or
:func:`run_smc` raises ``ValueError`` on NaN log-potentials or zero total weight; under ``jit`` the
run continues NaN-free with uniform weights after a zero-total-weight step and the log normalizer
becomes ``-inf`` (NaN potentials make it NaN); ``info.log_normalizer_increment`` shows the step.

Sharding. Pass ``mesh`` (from :func:`tda_jax.sharding.make_data_mesh`) to keep the particle axis
split over the ``"data"`` mesh axis: particle leaves and log-weights are constrained to
``NamedSharding(mesh, PartitionSpec("data"))`` after every step. Proposals and potentials act per
particle and stay local; normalization, ESS and the log normalizer are global reductions over N
scalars; resampling builds a *global* CDF of all N weights and then gathers ancestors
``x[a]`` from whichever device holds them, the only communication whose size grows with the
particle dimension. ``jax.random`` is partitionable (``jax_threefry_partitionable``, the default),
so the same key gives the same particles on 1 or many devices, up to floating-point
reassociation in the sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from tda_jax.probability.resampling import (
    AdaptiveResamplingResult,
    ResamplingFn,
    adaptive_resample,
    systematic,
)
from tda_jax.probability.weights import log_mean_exp, normalize_log_weights
from tda_jax.sharding import DATA_AXIS

__all__ = [
    "LogPotentialFn",
    "ProposalFn",
    "SMCInfo",
    "SMCKernel",
    "SMCResult",
    "SMCState",
    "build_kernel",
    "init",
    "num_particles_of",
    "run_smc",
    "smc_step",
]

PyTree = Any
ProposalFn = Callable[[Array, PyTree, Array], PyTree]
"""``proposal_fn(key, previous_particles, t) -> particles`` (leaves ``[N, ...]``)."""
LogPotentialFn = Callable[[PyTree, PyTree, Array], Array]
"""``log_potential_fn(previous_particles, particles, t) -> log incremental weights [N]``."""


class SMCState(NamedTuple):
    """State of an SMC sampler after ``step`` steps.

    Attributes:
      particles: pytree with leaves ``[num_particles, ...]``.
      log_weights: normalized log-weights ``[num_particles]`` (``logsumexp == 0``).
      log_normalizer: running estimate ``log Zhat_t`` ``[]``.
      step: ``int32 []``, the time index of ``particles`` (0 after :func:`init`).
    """

    particles: PyTree
    log_weights: Array
    log_normalizer: Array
    step: Array


class SMCInfo(NamedTuple):
    """Diagnostics of one SMC step (stacked to ``[num_steps, ...]`` by :func:`run_smc`).

    Attributes:
      ancestors: ``int32 [num_particles]``, index of each new particle's parent (identity when
        the step did not resample).
      log_normalizer_increment: ``[]``, ``log Zhat_t - log Zhat_{t-1}``.
      ess: ``[]``, effective sample size of the weights entering the step (the one tested
        against ``ess_threshold * N``).
      resampled: bool ``[]``, whether the step resampled.
    """

    ancestors: Array
    log_normalizer_increment: Array
    ess: Array
    resampled: Array


class SMCResult(NamedTuple):
    """Output of :func:`run_smc`.

    Attributes:
      state: the final :class:`SMCState`.
      infos: :class:`SMCInfo` with a leading ``[num_steps]`` axis.
      log_normalizer: ``[]``, the estimate ``log Zhat`` (same as ``state.log_normalizer``).
    """

    state: SMCState
    infos: SMCInfo
    log_normalizer: Array


SMCKernel = Callable[[Array, SMCState], tuple[SMCState, SMCInfo]]


def _is_concrete(x: Array) -> bool:
    return not isinstance(x, jax.core.Tracer)


def num_particles_of(particles: PyTree) -> int:
    """Number of particles (shared leading axis of every leaf); raises on a mismatch."""
    leaves = jax.tree_util.tree_leaves(particles)
    if not leaves:
        raise ValueError("particles is an empty pytree; pass arrays with a leading particle axis.")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) > 0 else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [np.shape(leaf) for leaf in leaves]
        raise ValueError(
            f"every leaf of particles needs the same leading particle axis, got shapes {shapes}; "
            "stack particles along axis 0 of every leaf."
        )
    n = sizes.pop()
    if n == 0:
        raise ValueError("particles have a leading axis of size 0; pass at least one particle.")
    return n


def _check_like(new: PyTree, old: PyTree, name: str) -> None:
    """Raises unless ``new`` has the tree structure and leaf shapes of ``old``."""
    new_def, old_def = jax.tree_util.tree_structure(new), jax.tree_util.tree_structure(old)
    if new_def != old_def:
        raise ValueError(
            f"{name} returned a pytree of structure {new_def}, expected {old_def} (the structure "
            "of the particles)."
        )
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old), strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{name} returned a leaf of shape {np.shape(a)}, expected {np.shape(b)} (the "
                "particles' leaf shape); a proposal must map [N, ...] to the same [N, ...]."
            )


def _check_log_potential(log_g: Array, n: int) -> Array:
    log_g = jnp.asarray(log_g)
    if log_g.shape != (n,):
        raise ValueError(
            f"log_potential_fn returned shape {log_g.shape}, expected ({n},): one log incremental "
            "weight per particle."
        )
    if not jnp.issubdtype(log_g.dtype, jnp.floating):
        raise TypeError(f"log_potential_fn returned dtype {log_g.dtype}; return floats.")
    return log_g


def _constrain(tree: PyTree, mesh: Mesh | None) -> PyTree:
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def _check_mesh(mesh: Mesh | None, n: int) -> None:
    if mesh is None:
        return
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; it needs a {DATA_AXIS!r} axis.")
    size = mesh.shape[DATA_AXIS]
    if n % size:
        raise ValueError(
            f"num_particles={n} is not divisible by the {size} devices of the mesh's "
            f"{DATA_AXIS!r} axis; use a multiple of {size} particles."
        )


def init(particles: PyTree, log_weights: ArrayLike | None = None) -> SMCState:
    """Builds the time-0 state from initial particles and their log-weights ``log G_0(x_0)``.

    Args:
      particles: pytree with leaves ``[num_particles, ...]``, e.g. draws from the prior.
      log_weights: unnormalized initial log-weights ``[num_particles]``; None means equal weights
        (``log Zhat_0 = 0``).

    Returns:
      An :class:`SMCState` with normalized log-weights, ``log_normalizer =
      log_mean_exp(log_weights)`` and ``step = 0``.

    Raises:
      ValueError: on leaves with different leading axes, a ``log_weights`` of the wrong shape, or
        (eagerly) NaN / all ``-inf`` log-weights.
    """
    n = num_particles_of(particles)
    leaf = jax.tree_util.tree_leaves(particles)[0]
    dtype = leaf.dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else jnp.float32
    if log_weights is None:
        log_weights = jnp.zeros((n,), dtype)
    log_weights = jnp.asarray(log_weights)
    if log_weights.shape != (n,):
        raise ValueError(
            f"log_weights has shape {log_weights.shape} but particles hold {n} particles; pass "
            f"one initial log-weight per particle, shape ({n},)."
        )
    normalized, _ = normalize_log_weights(log_weights)
    return SMCState(
        particles=particles,
        log_weights=normalized,
        log_normalizer=log_mean_exp(log_weights),
        step=jnp.zeros((), jnp.int32),
    )


def _gather(particles: PyTree, ancestors: Array) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jnp.take(x, ancestors, axis=0), particles)


def _step(
    key: Array,
    state: SMCState,
    proposal_fn: ProposalFn,
    log_potential_fn: LogPotentialFn,
    resample: Callable[[Array, Array], AdaptiveResamplingResult],
    mesh: Mesh | None,
    pin: Callable[[PyTree, Array], PyTree] | None = None,
) -> tuple[SMCState, SMCInfo]:
    """Shared SMC step; ``pin(particles, t)`` (conditional SMC) overwrites the reference slot."""
    n = num_particles_of(state.particles)
    _check_mesh(mesh, n)
    if np.shape(state.log_weights) != (n,):
        raise ValueError(
            f"state.log_weights has shape {np.shape(state.log_weights)} but the particles hold "
            f"{n} particles; build the state with init()."
        )
    resample_key, proposal_key = jax.random.split(key)
    t = state.step + 1
    chosen = resample(resample_key, state.log_weights)
    previous = _constrain(_gather(state.particles, chosen.ancestors), mesh)
    particles = proposal_fn(proposal_key, previous, t)
    _check_like(particles, state.particles, "proposal_fn")
    if pin is not None:
        particles = pin(particles, t)
    particles = _constrain(particles, mesh)
    log_g = _check_log_potential(log_potential_fn(previous, particles, t), n)
    unnormalized = chosen.log_weights + log_g
    log_weights, increment = normalize_log_weights(unnormalized)
    # chosen.log_weights is normalized, so logsumexp(W' + log G) is the whole increment.
    new_state = SMCState(
        particles=particles,
        log_weights=_constrain(log_weights, mesh),
        log_normalizer=state.log_normalizer + increment,
        step=t,
    )
    info = SMCInfo(chosen.ancestors, increment, chosen.ess, chosen.resampled)
    return new_state, info


def smc_step(
    key: Array,
    state: SMCState,
    proposal_fn: ProposalFn,
    log_potential_fn: LogPotentialFn,
    resampling_fn: ResamplingFn = systematic,
    ess_threshold: float = 1.0,
    mesh: Mesh | None = None,
) -> tuple[SMCState, SMCInfo]:
    """One SMC step: (adaptive) resample, propose, reweight. Pure and unjitted.

    Args:
      key: PRNG key.
      state: current :class:`SMCState` (particles at time ``state.step``).
      proposal_fn: ``(key, previous_particles, t) -> particles``, batched over particles.
      log_potential_fn: ``(previous_particles, particles, t) -> [N]`` log incremental weights.
      resampling_fn: scheme ``(key, weights [N], num_samples) -> int32 [num_samples]``.
      ess_threshold: resample when ``ESS < ess_threshold * N``; ``>= 1`` resamples every step,
        ``<= 0`` never.
      mesh: optional mesh with a ``"data"`` axis to keep particles sharded (module docstring).

    Returns:
      ``(new_state, info)``: the state at time ``state.step + 1`` and its :class:`SMCInfo`.

    Raises:
      ValueError: on a proposal that changes particle shapes, a potential that is not ``[N]``, a
        particle count not divisible by the mesh, or (eagerly) NaN / zero total weight.
    """

    def resample(k, lw):
        return adaptive_resample(k, lw, resampling_fn, ess_threshold)

    return _step(key, state, proposal_fn, log_potential_fn, resample, mesh)


def build_kernel(
    proposal_fn: ProposalFn,
    log_potential_fn: LogPotentialFn,
    resampling_fn: ResamplingFn = systematic,
    ess_threshold: float = 1.0,
    mesh: Mesh | None = None,
) -> SMCKernel:
    """Binds the model and options of :func:`smc_step` into ``kernel(key, state)``.

    Args:
      proposal_fn: see :func:`smc_step`.
      log_potential_fn: see :func:`smc_step`.
      resampling_fn: see :func:`smc_step`.
      ess_threshold: see :func:`smc_step`.
      mesh: see :func:`smc_step`.

    Returns:
      ``kernel(key, state) -> (SMCState, SMCInfo)``.
    """

    def kernel(key: Array, state: SMCState) -> tuple[SMCState, SMCInfo]:
        return smc_step(
            key, state, proposal_fn, log_potential_fn, resampling_fn, ess_threshold, mesh
        )

    return kernel


def _run(key: Array, state: SMCState, kernel: SMCKernel, num_steps: int) -> SMCResult:
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative Python int, got {num_steps!r}.")
    # Validate the initial state eagerly-shaped before tracing the scan body.
    num_particles_of(state.particles)
    keys = jax.random.split(key, num_steps)
    final, infos = jax.lax.scan(lambda s, k: kernel(k, s), state, keys)
    if _is_concrete(final.log_normalizer):
        _raise_if_degenerate(final.log_normalizer, infos.log_normalizer_increment)
    return SMCResult(final, infos, final.log_normalizer)


def _raise_if_degenerate(log_normalizer: Array, increments: Array) -> None:
    """Eager runs only: the numbers are here, so report NaN or zero total weight clearly."""
    inc = np.asarray(increments)
    if np.isnan(inc).any():
        step = int(np.flatnonzero(np.isnan(inc))[0]) + 1
        raise ValueError(
            f"the log normalizer increment of step {step} is NaN: log_potential_fn returned NaN "
            "(or +inf) for some particle. Fix the potential; under jax.jit the run would return "
            "log_normalizer=NaN instead of raising."
        )
    if np.isneginf(inc).any():
        step = int(np.flatnonzero(np.isneginf(inc))[0]) + 1
        raise ValueError(
            f"at step {step} every particle has zero weight (all log-potentials -inf), so the "
            "estimate is Zhat = 0; use more particles or a better proposal. Under jax.jit the run "
            "returns log_normalizer=-inf and continues with uniform weights instead of raising."
        )
    if np.isnan(np.asarray(log_normalizer)):
        raise ValueError("the initial log normalizer is NaN; check the initial log-weights.")


def run_smc(
    key: Array,
    state: SMCState,
    proposal_fn: ProposalFn,
    log_potential_fn: LogPotentialFn,
    num_steps: int,
    resampling_fn: ResamplingFn = systematic,
    ess_threshold: float = 1.0,
    mesh: Mesh | None = None,
) -> SMCResult:
    """Runs ``num_steps`` SMC steps with ``lax.scan`` from ``state`` (see :func:`smc_step`).

    Args:
      key: PRNG key.
      state: initial state from :func:`init` (time 0 particles and ``log G_0`` weights).
      proposal_fn: ``(key, previous_particles, t) -> particles``; ``t`` runs from
        ``state.step + 1`` to ``state.step + num_steps``.
      log_potential_fn: ``(previous_particles, particles, t) -> [N]``.
      num_steps: number of steps (static Python int).
      resampling_fn: resampling scheme (default :func:`~tda_jax.probability.systematic`).
      ess_threshold: resample when ``ESS < ess_threshold * N`` (default 1: every step).
      mesh: optional mesh with a ``"data"`` axis to shard particles over.

    Returns:
      An :class:`SMCResult`: final state, per-step infos ``[num_steps, ...]`` and ``log Zhat``.

    Raises:
      ValueError: as :func:`smc_step`; when called eagerly (not under ``jit``) also if a step's
        increment is NaN or ``-inf`` (zero total weight), naming the step.

    Example:
      >>> state = init(x0, log_g0)
      >>> result = jax.jit(run_smc, static_argnums=(2, 3, 4))(key, state, propose, log_g, 50)
      >>> result.log_normalizer
    """
    _check_mesh(mesh, num_particles_of(state.particles))
    kernel = build_kernel(proposal_fn, log_potential_fn, resampling_fn, ess_threshold, mesh)
    state = state._replace(particles=_constrain(state.particles, mesh))
    return _run(key, state, kernel, num_steps)

