"""Conditional SMC: SMC with one particle pinned to a reference trajectory.

Particle 0 is the reference ``x*_{0:T}``: at every step its ancestor is itself and its new value is
``x*_t``; the other ``N - 1`` particles draw their ancestors independently (multinomially) among
*all* N particles, the reference included, and move with the proposal as in :mod:`.smc`. The log
normalizer estimate is computed exactly as in standard SMC.

When the reference is an exact draw from the target (the smoothing posterior of a state-space
model), the law of ``Zhat`` under conditional SMC is the size-biased law of ``Zhat`` under standard
SMC: ``E_csmc[f(Zhat)] = E_smc[Zhat f(Zhat)] / Z``. Hence ``E_csmc[log Zhat] >= log Z`` (a
stochastic *upper* bound, pairing with the lower bound ``E_smc[log Zhat] <= log Z``) and
``E_csmc[Z / Zhat] = 1``.

That identity needs the conditional resampling to be the exact conditional of the resampling
scheme, which is simple for multinomial resampling (used here, independent *unsorted* draws) and
not for systematic or stratified schemes, so no ``resampling_fn`` is offered. ESS-adaptive
resampling is allowed: the decision is a symmetric function of all weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import Mesh

from tda_jax.probability.resampling import adaptive_resample
from tda_jax.probability.smc import (
    LogPotentialFn,
    ProposalFn,
    PyTree,
    SMCInfo,
    SMCKernel,
    SMCResult,
    SMCState,
    _is_concrete,
    _run,
    _step,
    num_particles_of,
)

__all__ = [
    "build_conditional_kernel",
    "conditional_smc_step",
    "pin_reference",
    "run_conditional_smc",
]

REFERENCE_INDEX = 0


def _check_reference(reference: PyTree, particles: PyTree) -> int:
    """Checks leaves ``[T + 1, ...]`` against particle leaves ``[N, ...]``; returns ``T + 1``."""
    ref_def = jax.tree_util.tree_structure(reference)
    par_def = jax.tree_util.tree_structure(particles)
    if ref_def != par_def:
        raise ValueError(
            f"reference has pytree structure {ref_def}, expected the particles' {par_def}."
        )
    lengths = set()
    for r, p in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(particles),
                    strict=True):
        if np.ndim(r) != np.ndim(p) or np.shape(r)[1:] != np.shape(p)[1:]:
            raise ValueError(
                f"reference leaf has shape {np.shape(r)}, expected [num_times, "
                f"{', '.join(map(str, np.shape(p)[1:]))}] to match particle leaf {np.shape(p)}."
            )
        lengths.add(np.shape(r)[0])
    if len(lengths) != 1:
        raise ValueError(f"reference leaves have different time lengths {sorted(lengths)}.")
    return lengths.pop()


def pin_reference(particles: PyTree, reference: PyTree, t: int | Array = 0) -> PyTree:
    """Puts the reference's time-``t`` value into particle slot 0.

    Use it on the initial particles before :func:`tda_jax.probability.init`, so that the initial
    log-weights include the reference's.

    Args:
      particles: pytree with leaves ``[num_particles, ...]``.
      reference: pytree with leaves ``[num_times, ...]`` (the reference trajectory).
      t: time index into the reference.

    Returns:
      ``particles`` with slot 0 replaced by ``reference[t]``.
    """
    return jax.tree_util.tree_map(
        lambda x, r: x.at[REFERENCE_INDEX].set(r[t].astype(x.dtype)), particles, reference
    )


def _conditional_multinomial(key: Array, weights: Array, num_samples: int) -> Array:
    # Independent unsorted draws: dropping a slot of a *sorted* sample would bias the others.
    logits = jnp.log(weights)
    return jax.random.categorical(key, logits, shape=(num_samples,)).astype(jnp.int32)


def conditional_smc_step(
    key: Array,
    state: SMCState,
    reference: PyTree,
    proposal_fn: ProposalFn,
    log_potential_fn: LogPotentialFn,
    ess_threshold: float = 1.0,
    mesh: Mesh | None = None,
) -> tuple[SMCState, SMCInfo]:
    """One conditional SMC step: particle 0 keeps ancestor 0 and becomes ``reference[t]``.

    Args:
      key: PRNG key.
      state: current :class:`~tda_jax.probability.SMCState` whose particle 0 is
        ``reference[state.step]``.
      reference: pytree with leaves ``[num_times, ...]``; ``num_times > state.step + 1``.
      proposal_fn: ``(key, previous_particles, t) -> particles`` (see :mod:`.smc`).
      log_potential_fn: ``(previous_particles, particles, t) -> [N]``.
      ess_threshold: resample when ``ESS < ess_threshold * N``; ``>= 1`` every step.
      mesh: optional mesh with a ``"data"`` axis.

    Returns:
      ``(new_state, info)`` as :func:`~tda_jax.probability.smc_step`; ``info.ancestors[0] == 0``.
    """
    _check_reference(reference, state.particles)

    def resample(k, lw):
        chosen = adaptive_resample(k, lw, _conditional_multinomial, ess_threshold)
        return chosen._replace(ancestors=chosen.ancestors.at[REFERENCE_INDEX].set(REFERENCE_INDEX))

    def pin(particles, t):
        return pin_reference(particles, reference, t)

    return _step(key, state, proposal_fn, log_potential_fn, resample, mesh, pin)


def build_conditional_kernel(
    reference: PyTree,
    proposal_fn: ProposalFn,
    log_potential_fn: LogPotentialFn,
    ess_threshold: float = 1.0,
    mesh: Mesh | None = None,
) -> SMCKernel:
    """Binds :func:`conditional_smc_step`'s arguments into ``kernel(key, state)``.

    Args:
      reference: pytree with leaves ``[num_times, ...]``.
      proposal_fn: see :func:`conditional_smc_step`.
      log_potential_fn: see :func:`conditional_smc_step`.
      ess_threshold: see :func:`conditional_smc_step`.
      mesh: see :func:`conditional_smc_step`.

    Returns:
      ``kernel(key, state) -> (SMCState, SMCInfo)``.
    """

    def kernel(key: Array, state: SMCState) -> tuple[SMCState, SMCInfo]:
        return conditional_smc_step(
            key, state, reference, proposal_fn, log_potential_fn, ess_threshold, mesh
        )

    return kernel


def run_conditional_smc(
    key: Array,
    state: SMCState,
    reference: PyTree,
    proposal_fn: ProposalFn,
    log_potential_fn: LogPotentialFn,
    num_steps: int,
    ess_threshold: float = 1.0,
    mesh: Mesh | None = None,
) -> SMCResult:
    """Runs ``num_steps`` conditional SMC steps with ``lax.scan``.

    Build ``state`` as ``init(pin_reference(x0, reference), log_g0)`` so that particle 0 is the
    reference at time 0 and the initial log-weights include it.

    Args:
      key: PRNG key.
      state: initial state whose particle 0 equals ``reference[state.step]``.
      reference: pytree with leaves ``[num_times, ...]`` and
        ``num_times >= state.step + num_steps + 1``.
      proposal_fn: ``(key, previous_particles, t) -> particles``.
      log_potential_fn: ``(previous_particles, particles, t) -> [N]``.
      num_steps: number of steps (static Python int).
      ess_threshold: resample when ``ESS < ess_threshold * N`` (default 1: every step).
      mesh: optional mesh with a ``"data"`` axis.

    Returns:
      An :class:`~tda_jax.probability.SMCResult`; ``log_normalizer`` is an estimate whose mean
      upper-bounds ``log Z`` when the reference is an exact target draw.

    Raises:
      ValueError: on a reference of the wrong structure, shape or length, or (concrete input) a
        state whose particle 0 is not the reference; otherwise as
        :func:`~tda_jax.probability.run_smc`.
    """
    n_times = _check_reference(reference, state.particles)
    num_particles_of(state.particles)
    if _is_concrete(state.step):
        start = int(state.step)
        if n_times < start + num_steps + 1:
            raise ValueError(
                f"reference covers {n_times} times but the run needs times {start}.."
                f"{start + num_steps}; pass a reference with leaves [{start + num_steps + 1}, ...]."
            )
        leaves = zip(
            jax.tree_util.tree_leaves(state.particles),
            jax.tree_util.tree_leaves(reference),
            strict=True,
        )
        for x, r in leaves:
            if _is_concrete(x) and _is_concrete(r):
                if not np.array_equal(np.asarray(x[REFERENCE_INDEX]), np.asarray(r[start])):
                    raise ValueError(
                        "state.particles[0] is not reference[state.step]; build the state with "
                        "init(pin_reference(particles, reference), log_weights)."
                    )
    kernel = build_conditional_kernel(
        reference, proposal_fn, log_potential_fn, ess_threshold, mesh
    )
    return _run(key, state, kernel, num_steps)
