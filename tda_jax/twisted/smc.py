"""Twisted SMC for language models on the core's SMC and conditional-SMC steps.

Target ``sigma(s_1:T) ∝ p0(s_1:T) phi(s_1:T)`` with intermediate targets
``pi_t(s_1:t) ∝ p0(s_1:t) psi_t(s_1:t)`` (``psi_0 = 1``). The proposal is twist-induced over the
full vocabulary,

    q_t(s_t | s_<t) = p0(s_t | s_<t) psi_t(s_1:t) / Z_t(s_<t),
    Z_t(s_<t) = sum_v p0(v | s_<t) psi_t(s_<t, v),

so the incremental weight ``pi_t / (pi_{t-1} q_t)`` is ``Z_t(s_<t) / psi_{t-1}(s_<t)`` for
``t < T``; at ``t = T`` the final potential replaces the last twist (``phi`` enters *only* the last
weight): ``Z_T(s_<T) phi(s_1:T) / (psi_{T-1}(s_<T) psi_T(s_1:T))``. The product of the averaged
weights is the core's unbiased ``Zhat`` (``E[Zhat] = Z``, ``E[log Zhat] <= log Z``); with the
optimal twists ``psi*`` every weight equals ``Z`` and ``log Zhat = log Z`` exactly. Conditional
SMC with an exact target draw as reference gives ``E[log Zhat] >= log Z`` (an upper bound).

A particle (:class:`TwistedParticles`) carries its tokens, the LM's and the twist's step state
(e.g. a key/value cache) and the next-token tables ``log p0(. | s_1:t)`` and
``log psi_{t+1}(s_1:t, .)``: one model step per particle and time, and resampling reorders all of
it with the ancestor indices (the core's gather).

Degenerate cases. A particle whose prefix is unreachable (``psi = 0``) gets weight 0, never NaN.
When every particle has zero weight (e.g. a Boolean ``phi`` under the bootstrap proposal), eager
runs raise the core's ``ValueError``; under ``jit``/``vmap`` the estimate is ``log Zhat = -inf``
(``Zhat = 0``, a legitimate value of the unbiased estimator); :func:`log_z_estimates` reports the
fraction of such runs.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from tda_jax.probability import (
    SMCResult,
    init,
    pin_reference,
    run_conditional_smc,
    run_smc,
    systematic,
)
from tda_jax.probability.smc import _raise_if_degenerate
from tda_jax.twisted.potentials import Potential
from tda_jax.twisted.twists import check_log_psi

__all__ = ["TwistedParticles", "TwistedProblem", "log_z_estimates", "twisted_csmc",
           "twisted_smc"]

PyTree = Any


class TwistedParticles(NamedTuple):
    """Particle state at time ``t`` (leaves ``[K, ...]``).

    Attributes:
      tokens: ``int32 [K, T]``, ``s_1:t`` then zeros.
      lm_carry: the LM's step state after ``prompt, s_1:t``.
      twist_carry: the twist's step state.
      log_p_next: ``[K, V]``, ``log p0(. | s_1:t)``.
      log_psi_next: ``[K, V]``, ``log psi_{t+1}(s_1:t, .)``.
      log_psi: ``[K]``, ``log psi_t(s_1:t)`` (0 at ``t = 0``).
    """

    tokens: Array
    lm_carry: PyTree
    twist_carry: PyTree
    log_p_next: Array
    log_psi_next: Array
    log_psi: Array


@dataclasses.dataclass(frozen=True)
class TwistedProblem:
    """A twisted-SMC problem (a pytree: parameters, prompt and cond are its array leaves).

    Attributes:
      lm: step model (:mod:`tda_jax.twisted.models`).
      twist: twist model (:mod:`tda_jax.twisted.twists`).
      potential: final potential ``phi`` (:mod:`tda_jax.twisted.potentials`).
      horizon: ``T``, tokens to generate.
      lm_params, twist_params: parameters.
      prompt: ``int32 [P]``.
      cond: ``[C]`` conditioning tokens (twists and potential), ``[K, C]`` one row per particle
        (twist training), or None.
      max_len: the LM's context (prompt + T must fit), or None for no limit.
    """

    lm: Any
    twist: Any
    potential: Potential
    horizon: int
    lm_params: PyTree
    twist_params: PyTree
    prompt: Array
    cond: Array | None = None
    max_len: int | None = None

    def __post_init__(self):
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {self.horizon!r}")
        if self.max_len is not None and not isinstance(self.prompt, jax.core.Tracer):
            length = int(np.shape(self.prompt)[0]) if np.ndim(self.prompt) else 1
            if length + self.horizon > self.max_len:
                raise ValueError(
                    f"prompt of length {length} plus horizon {self.horizon} exceeds the model's "
                    f"context max_len={self.max_len}; shorten the prompt or the horizon")

    def _cond(self, batch: int) -> Array | None:
        if self.cond is None:
            return None
        c = jnp.asarray(self.cond)
        if c.ndim == 2:  # one conditioning row per particle (twist training batches)
            if c.shape[0] != batch:
                raise ValueError(f"cond has {c.shape[0]} rows for {batch} particles; pass cond "
                                 "[C] (shared) or [num_particles, C]")
            return c
        return jnp.broadcast_to(c, (batch,) + c.shape)

    def _next_tables(self, lm_carry, twist_carry, t, batch):
        lp, feat = self.lm.readout(self.lm_params, lm_carry)
        lpsi = self.twist.log_psi(self.twist_params, twist_carry, feat, t, self._cond(batch))
        return lp, check_log_psi(lpsi, batch, self.lm.vocab_size)

    def initial_particles(self, num_particles: int) -> TwistedParticles:
        """``K`` copies of the time-0 state (prompt processed)."""
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        k = num_particles
        lm_carry = self.lm.init_carry(self.lm_params, self.prompt, k)
        twist_carry = self.twist.init_carry(self.twist_params, self.prompt, k)
        lp, lpsi = self._next_tables(lm_carry, twist_carry, 1, k)
        return TwistedParticles(jnp.zeros((k, self.horizon), jnp.int32), lm_carry, twist_carry,
                                lp, lpsi, jnp.zeros((k,), lp.dtype))

    def advance(self, prev: TwistedParticles, tokens: Array, t: Array) -> TwistedParticles:
        """Appends ``tokens [K]`` as ``s_t`` (one LM step and one twist step per particle)."""
        k = tokens.shape[0]
        log_psi = jnp.take_along_axis(prev.log_psi_next, tokens[:, None], axis=1)[:, 0]
        lm_carry = self.lm.step(self.lm_params, prev.lm_carry, tokens)
        twist_carry = self.twist.step(self.twist_params, prev.twist_carry, tokens)
        lp, lpsi = self._next_tables(lm_carry, twist_carry, t + 1, k)
        return TwistedParticles(prev.tokens.at[:, t - 1].set(tokens), lm_carry, twist_carry, lp,
                                lpsi, log_psi)

    def proposal_fn(self, key: Array, prev: TwistedParticles, t: Array) -> TwistedParticles:
        """Draws ``s_t ~ q_t(. | s_<t) ∝ p0 psi_t`` for every particle, then advances."""
        tokens = jax.random.categorical(key, prev.log_p_next + prev.log_psi_next)
        return self.advance(prev, tokens.astype(jnp.int32), t)

    def log_potential_fn(self, prev: TwistedParticles, new: TwistedParticles, t: Array) -> Array:
        """``log Z_t(s_<t) - log psi_{t-1}`` (+ ``log phi - log psi_T`` at ``t = T``)."""
        logits = prev.log_p_next + prev.log_psi_next
        m = jnp.max(logits, axis=-1)
        dead = jnp.isneginf(m) | jnp.isneginf(prev.log_psi)
        safe_m = jnp.where(jnp.isneginf(m), 0.0, m)
        log_zt = safe_m + jnp.log(jnp.sum(jnp.exp(logits - safe_m[:, None]), axis=-1))
        w = jnp.where(dead, -jnp.inf, log_zt - jnp.where(dead, 0.0, prev.log_psi))

        def final(w):
            log_phi = self.potential(new.tokens, self._cond(new.tokens.shape[0]))
            unreachable = jnp.isneginf(new.log_psi)
            return jnp.where(unreachable, -jnp.inf,
                             w + log_phi - jnp.where(unreachable, 0.0, new.log_psi))

        return jax.lax.cond(t == self.horizon, final, lambda w: w, w)

    def reference_trajectory(self, reference_tokens: Array) -> TwistedParticles:
        """The particle states of a given sequence ``[T]`` at times ``0..T`` (leaves ``[T+1, ...]``).

        Raises:
          ValueError: if ``reference_tokens`` is not ``[T]``.
        """
        ref = jnp.asarray(reference_tokens)
        if ref.shape != (self.horizon,):
            raise ValueError(f"the conditional-SMC reference must be one sequence of shape "
                             f"({self.horizon},) (the horizon), got shape {ref.shape}")
        ref = ref.astype(jnp.int32)
        state0 = self.initial_particles(1)

        def body(state, inp):
            tok, t = inp
            new = self.advance(state, tok[None], t)
            return new, new

        ts = jnp.arange(1, self.horizon + 1, dtype=jnp.int32)
        _, states = jax.lax.scan(body, state0, (ref, ts))
        return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b[:, 0]], axis=0),
                                      state0, states)


def _flatten(p: TwistedProblem):
    children = (p.lm_params, p.twist_params, p.prompt, p.cond)
    aux = (p.lm, p.twist, p.potential, p.horizon, p.max_len)
    return children, aux


def _unflatten(aux, children):
    lm, twist, potential, horizon, max_len = aux
    obj = object.__new__(TwistedProblem)
    for name, value in zip(("lm", "twist", "potential", "horizon", "max_len"), aux, strict=True):
        object.__setattr__(obj, name, value)
    for name, value in zip(("lm_params", "twist_params", "prompt", "cond"), children, strict=True):
        object.__setattr__(obj, name, value)
    return obj


jax.tree_util.register_pytree_node(TwistedProblem, _flatten, _unflatten)


def _smc_impl(key, problem, num_particles, ess_threshold, resampling_fn):
    state = init(problem.initial_particles(num_particles))
    return run_smc(key, state, problem.proposal_fn, problem.log_potential_fn, problem.horizon,
                   resampling_fn=resampling_fn, ess_threshold=ess_threshold)


def _csmc_impl(key, problem, reference_tokens, num_particles, ess_threshold):
    reference = problem.reference_trajectory(reference_tokens)
    particles = pin_reference(problem.initial_particles(num_particles), reference, 0)
    return run_conditional_smc(key, init(particles), reference, problem.proposal_fn,
                               problem.log_potential_fn, problem.horizon,
                               ess_threshold=ess_threshold)


_smc_jit = jax.jit(_smc_impl, static_argnums=(2, 3, 4))
_csmc_jit = jax.jit(_csmc_impl, static_argnums=(3, 4))


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_result(result: SMCResult) -> SMCResult:
    if _concrete(result.log_normalizer):
        _raise_if_degenerate(result.log_normalizer, result.infos.log_normalizer_increment)
    return result


def twisted_smc(key: Array, problem: TwistedProblem, num_particles: int,
                ess_threshold: float = 1.0, resampling_fn=systematic) -> SMCResult:
    """Twisted SMC over ``T`` tokens with ``num_particles`` particles (compiled once per shape).

    Args:
      key: PRNG key.
      problem: the :class:`TwistedProblem`.
      num_particles: ``K`` (static).
      ess_threshold: resample when ``ESS < ess_threshold K`` (1: every step, the core's adaptive
        rule otherwise).
      resampling_fn: a core resampling scheme.

    Returns:
      The core's :class:`~tda_jax.probability.SMCResult`; ``log_normalizer`` is ``log Zhat``
      (an unbiased ``Zhat``), ``state.particles.tokens`` the final particles and
      ``state.log_weights`` their normalized weights.

    Raises:
      ValueError: (called outside ``jit``) when a step's increment is NaN (a NaN potential) or
        every particle has zero weight; under ``jit``/``vmap`` the estimate is NaN / ``-inf``.
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
    return _check_result(_smc_jit(key, problem, num_particles, float(ess_threshold),
                                  resampling_fn))


def twisted_csmc(key: Array, problem: TwistedProblem, reference_tokens: Array,
                 num_particles: int, ess_threshold: float = 1.0) -> SMCResult:
    """Conditional twisted SMC with particle 0 pinned to ``reference_tokens [T]``.

    With an exact draw from ``sigma`` as reference, ``E[log Zhat] >= log Z`` (the upper bound of
    the bidirectional pair). Errors as :func:`twisted_smc`; a reference that is not ``[T]``
    raises ``ValueError``.
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
    ref = jnp.asarray(reference_tokens)
    if ref.shape != (problem.horizon,):
        raise ValueError(f"the conditional-SMC reference must be one sequence of shape "
                         f"({problem.horizon},) (the horizon), got shape {ref.shape}")
    return _check_result(_csmc_jit(key, problem, ref, num_particles, float(ess_threshold)))


def log_z_estimates(key: Array, problem: TwistedProblem, num_particles: int, num_runs: int,
                    references: Array | None = None, ess_threshold: float = 1.0) -> Array:
    """``log Zhat`` of ``num_runs`` independent runs ``[num_runs]`` (jitted, vmapped over runs).

    With ``references [num_runs, T]`` (exact target draws) the runs are conditional SMC (upper
    bounds); otherwise standard SMC (lower bounds). Runs where every particle died give ``-inf``.
    """
    keys = jax.random.split(key, num_runs)
    if references is None:
        return _many_smc(keys, problem, num_particles, float(ess_threshold))
    references = jnp.asarray(references)
    if references.shape != (num_runs, problem.horizon):
        raise ValueError(f"references must be [num_runs, T] = ({num_runs}, {problem.horizon}), "
                         f"got {references.shape}")
    return _many_csmc(keys, references, problem, num_particles, float(ess_threshold))


@partial(jax.jit, static_argnums=(2, 3))
def _many_smc(keys, problem, num_particles, ess_threshold):
    return jax.vmap(lambda k: _smc_impl(k, problem, num_particles, ess_threshold,
                                        systematic).log_normalizer)(keys)


@partial(jax.jit, static_argnums=(3, 4))
def _many_csmc(keys, references, problem, num_particles, ess_threshold):
    return jax.vmap(lambda k, r: _csmc_impl(k, problem, r, num_particles,
                                            ess_threshold).log_normalizer)(keys, references)
