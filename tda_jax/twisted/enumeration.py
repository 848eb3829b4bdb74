"""Exact enumeration over all ``V^T`` sequences of a small LM: ``Z``, ``sigma``, ``psi*``, KLs.

Sequences are indexed lexicographically (the first token is the most significant digit), so a
table ``[V^T]`` reshapes to ``[V] * T`` and the prefixes of length ``t`` are its first ``t`` axes.

* :func:`sequence_log_probs`: ``log q(s_1:T)`` of every sequence under the base model or under a
  twist-induced proposal ``q_t(v | s_<t) ∝ p0(v | s_<t) psi_t(s_<t, v)``, by walking the prefix
  tree with the step interface (``sum_{t<T} V^t`` model steps instead of ``T V^T``).
* :func:`exact_target`: ``log p0``, ``log phi``, ``log Z = logsumexp(log p0 + log phi)`` and the
  normalized target ``log sigma``.
* :func:`optimal_log_twists`: ``log psi*_t(s_1:t) = log sum_{s_t+1:T} p0(s_t+1:T | s_1:t) phi(s)``
  (``psi*_T = phi``) as a :class:`~tda_jax.twisted.twists.TableTwist` table; with these twists
  every twisted-SMC weight equals ``Z`` exactly. Prefixes from which ``phi`` is unreachable get
  ``-inf`` (their proposal probability is 0).
* :func:`kl_divergence`: ``KL(a || b) = sum_s a(s) (log a(s) - log b(s))`` (``0 log 0 = 0``;
  ``+inf`` when ``a`` has mass where ``b`` has none, e.g. ``KL(q || sigma)`` for an indicator
  ``phi`` and a proposal of full support).
* :func:`sample_target`: exact draws from ``sigma``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from tda_jax.twisted.potentials import Potential
from tda_jax.twisted.twists import UniformTwist, check_log_psi

__all__ = ["MAX_SEQUENCES", "ExactTarget", "all_sequences", "exact_target", "kl_divergence",
           "optimal_log_twists", "sample_target", "sequence_log_probs", "target_sampler"]

MAX_SEQUENCES = 12 ** 6
PyTree = Any


def _check_size(vocab_size: int, horizon: int) -> None:
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if vocab_size ** horizon > MAX_SEQUENCES:
        raise ValueError(f"enumerating vocab_size={vocab_size} ** horizon={horizon} = "
                         f"{vocab_size ** horizon} sequences exceeds {MAX_SEQUENCES}; use a "
                         "smaller tiny LM (V <= 12, T <= 6)")


def all_sequences(vocab_size: int, horizon: int) -> Array:
    """Every sequence ``[V^T, T]`` (int32) in lexicographic order."""
    _check_size(vocab_size, horizon)
    idx = np.arange(vocab_size ** horizon)
    powers = vocab_size ** np.arange(horizon - 1, -1, -1)
    return jnp.asarray((idx[:, None] // powers[None, :]) % vocab_size, jnp.int32)


def _safe_log_softmax(logits: Array) -> Array:
    """log_softmax that maps an all ``-inf`` row (an unreachable prefix) to ``-inf``, not NaN."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    dead = jnp.isneginf(m)
    shifted = logits - jnp.where(dead, 0.0, m)
    out = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
    return jnp.where(dead, -jnp.inf, out)


def sequence_log_probs(lm, lm_params: PyTree, prompt: Array, horizon: int, twist=None,
                       twist_params: PyTree = None, cond: Array | None = None) -> Array:
    """``log q(s_1:T)`` ``[V^T]`` of the twist-induced proposal (``twist=None``: ``log p0``).

    Args:
      lm: a step model (:mod:`tda_jax.twisted.models`).
      lm_params: its parameters.
      prompt: prompt tokens ``[P]``.
      horizon: ``T``.
      twist: a twist model (:mod:`tda_jax.twisted.twists`) or None.
      twist_params: its parameters.
      cond: conditioning tokens ``[C]`` for conditional twists, or None.
    """
    _check_size(lm.vocab_size, horizon)
    if twist is None:
        twist, twist_params = UniformTwist(lm.vocab_size), {}
    return _sequence_log_probs(lm, lm_params, jnp.asarray(prompt, jnp.int32), horizon, twist,
                               twist_params, cond)


@partial(jax.jit, static_argnums=(0, 3, 4))
def _sequence_log_probs(lm, lm_params, prompt, horizon, twist, twist_params, cond):
    v = lm.vocab_size
    carry = lm.init_carry(lm_params, prompt, 1)
    tcarry = twist.init_carry(twist_params, prompt, 1)
    acc = jnp.zeros((1,))
    for t in range(1, horizon + 1):
        n = acc.shape[0]
        lp, feat = lm.readout(lm_params, carry)
        cond_b = None if cond is None else jnp.broadcast_to(jnp.asarray(cond), (n,) + jnp.shape(
            cond))
        lpsi = check_log_psi(twist.log_psi(twist_params, tcarry, feat, t, cond_b), n, v)
        logq = _safe_log_softmax(lp + lpsi)
        acc = (acc[:, None] + logq).reshape(-1)
        if t < horizon:
            tokens = jnp.tile(jnp.arange(v, dtype=jnp.int32), n)
            rep = lambda x: jnp.repeat(x, v, axis=0)  # noqa: E731
            carry = lm.step(lm_params, jax.tree_util.tree_map(rep, carry), tokens)
            tcarry = twist.step(twist_params, jax.tree_util.tree_map(rep, tcarry), tokens)
    return acc


class ExactTarget(NamedTuple):
    """The enumerated target: tables ``[V^T]`` over lexicographically ordered sequences.

    Attributes:
      log_p0: ``log p0(s | prompt)``.
      log_phi: ``log phi(s)``.
      log_z: ``log Z`` ``[]``.
      log_sigma: ``log sigma(s) = log p0 + log phi - log Z``.
      vocab_size: ``V``.
      horizon: ``T``.
    """

    log_p0: Array
    log_phi: Array
    log_z: Array
    log_sigma: Array
    vocab_size: int
    horizon: int


def exact_target(lm, lm_params: PyTree, potential: Potential, prompt: Array, horizon: int,
                 cond: Array | None = None, chunk: int = 65536) -> ExactTarget:
    """Enumerates ``p0``, ``phi`` and ``sigma`` (``cond`` ``[C]`` is passed to the potential).

    Raises:
      ValueError: when no sequence has positive ``p0 phi`` (``Z = 0``).
    """
    v = lm.vocab_size
    seqs = all_sequences(v, horizon)
    log_p0 = sequence_log_probs(lm, lm_params, prompt, horizon)
    parts = []
    for i in range(0, seqs.shape[0], chunk):
        block = seqs[i:i + chunk]
        c = None if cond is None else jnp.broadcast_to(jnp.asarray(cond), (block.shape[0],) +
                                                       jnp.shape(cond))
        parts.append(potential(block, c))
    log_phi = jnp.concatenate(parts)
    joint = log_p0 + log_phi
    log_z = jax.scipy.special.logsumexp(joint)
    if not np.isfinite(float(log_z)):
        raise ValueError(f"the potential {potential.name!r} is zero on every sequence (Z = 0); "
                         "the target is undefined")
    return ExactTarget(log_p0, log_phi, log_z, joint - log_z, v, horizon)


def optimal_log_twists(target: ExactTarget) -> Array:
    """``log psi*`` as a :class:`~tda_jax.twisted.twists.TableTwist` table ``[T, V^(T-1), V]``."""
    v, horizon = target.vocab_size, target.horizon
    joint = target.log_p0 + target.log_phi
    rows = v ** (horizon - 1)
    tables = []
    for t in range(1, horizon + 1):
        if t == horizon:
            log_psi = target.log_phi
        else:
            lse = jax.scipy.special.logsumexp
            log_psi = (lse(joint.reshape(v ** t, -1), axis=1)
                       - lse(target.log_p0.reshape(v ** t, -1), axis=1))
        table = log_psi.reshape(v ** (t - 1), v)
        pad = jnp.full((rows - table.shape[0], v), -jnp.inf, table.dtype)
        tables.append(jnp.concatenate([table, pad], axis=0))
    return jnp.stack(tables)


def kl_divergence(log_a: Array, log_b: Array) -> float:
    """``KL(a || b)`` for two normalized log tables (``+inf`` when ``a`` is not ``<< b``)."""
    log_a, log_b = np.asarray(log_a, np.float64), np.asarray(log_b, np.float64)
    support = np.isfinite(log_a)
    if np.any(support & ~np.isfinite(log_b)):
        return float("inf")
    a = np.exp(log_a[support])
    return float(np.sum(a * (log_a[support] - log_b[support])))


def target_sampler(target: ExactTarget):
    """A sampler ``(key, num_samples) -> [num_samples, T]`` of exact draws from ``sigma``.

    The CDF is built once on the host (float64 cumulative sum), so a jitted caller holds it as
    data instead of folding a cumulative sum over ``V^T`` constants at compile time. Inverse-CDF
    draws (one uniform each): ``side="right"`` never returns a zero-probability sequence.
    """
    log_sigma = np.asarray(target.log_sigma, np.float64)
    probs = np.exp(log_sigma - log_sigma.max())
    cdf = np.cumsum(probs)
    cdf = jnp.asarray(cdf / cdf[-1], jnp.float32)
    last_positive = int(np.flatnonzero(probs > 0)[-1])
    v, horizon = target.vocab_size, target.horizon
    powers = jnp.asarray(v ** np.arange(horizon - 1, -1, -1), jnp.int32)

    def sample(key: Array, num_samples: int) -> Array:
        u = jax.random.uniform(key, (num_samples,), jnp.float32)
        idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), last_positive)
        return ((idx[:, None] // powers[None, :]) % v).astype(jnp.int32)

    return sample


def sample_target(key: Array, target: ExactTarget, num_samples: int) -> Array:
    """``num_samples`` exact draws ``[num_samples, T]`` from ``sigma`` (see :func:`target_sampler`)."""
    return target_sampler(target)(key, num_samples)
