"""Inference tasks on a small LM: a rare event, a soft class-conditional target and infilling.

* :func:`rare_event_task` (a toxicity analogue): a small fixed classifier ``c(s)`` over the
  generated tokens and the Boolean potential ``phi(s) = 1[c(s) >= tau]``, with the threshold
  ``tau`` set by enumeration so that ``Z = P_p0(c(s) >= tau)`` is about ``rate``.
* :func:`soft_task` (a sentiment analogue): ``phi(s) = p(y = 1 | s) = sigmoid(scale c(s) + offset)``,
  a soft log-potential.
* :func:`infilling_task`: the target ``sigma(s_1:T | c) ∝ p0(s_1:T) p0(c | s_1:T)`` for an
  observed continuation ``c = s_T+1:T+C``; ``phi(s; c) = p0(c | prompt, s)``. Exact target draws
  for any ``c`` come from ancestral sampling of ``p0(s, c)`` (the draw's own ``c``), which trains
  conditional twists ``psi_t(s_1:t; c)``.

Each task is a :class:`Task`: its potential, the conditioning length and a sampler of exact target
draws ``positives(key, num_groups, per_group) -> (tokens [G, P, T], cond [G, C] or None)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from tda_jax.twisted.enumeration import all_sequences, exact_target, target_sampler
from tda_jax.twisted.models import sample_sequences, teacher_force
from tda_jax.twisted.potentials import Potential, boolean, soft

__all__ = ["Task", "classifier_logits", "infilling_task", "init_classifier", "rare_event_task",
           "soft_task"]


class Task(NamedTuple):
    """A target over ``T`` generated tokens.

    Attributes:
      name: ``"rare_event"``, ``"soft"`` or ``"infilling"``.
      potential: ``phi``.
      cond_length: ``C`` (0: unconditional).
      positives: ``(key, num_groups, per_group) -> (tokens [G, P, T], cond [G, C] or None)``,
        exact target draws (for unconditional tasks the groups share one target).
      eval_conds: conditioning inputs ``[E, C]`` on which to evaluate (None: unconditional).
      info: task constants (threshold, rate, ...).
    """

    name: str
    potential: Potential
    cond_length: int
    positives: Callable[[Array, int, int], tuple[Array, Array | None]]
    eval_conds: Array | None
    info: dict


def init_classifier(key: Array, vocab_size: int, horizon: int, hidden: int = 16) -> dict:
    """A fixed random MLP ``c(s) = w . tanh(W onehot(s) + b)`` (the "small classifier")."""
    k1, k2 = jax.random.split(key)
    fan_in = vocab_size * horizon
    return {"W": jax.random.normal(k1, (fan_in, hidden)) * (2.0 / np.sqrt(fan_in)),
            "b": jnp.zeros((hidden,)), "w": jax.random.normal(k2, (hidden,)) / np.sqrt(hidden)}


def classifier_logits(params: dict, tokens: Array, vocab_size: int) -> Array:
    """``c(s)`` for ``tokens [B, T]`` -> ``[B]``."""
    x = jax.nn.one_hot(tokens, vocab_size).reshape(tokens.shape[0], -1)
    return jnp.tanh(x @ params["W"] + params["b"]) @ params["w"]


def _unconditional_positives(target):
    sampler = target_sampler(target)

    def positives(key, num_groups, per_group):
        toks = sampler(key, num_groups * per_group)
        return toks.reshape(num_groups, per_group, -1), None
    return positives


def rare_event_task(lm, lm_params, key: Array, horizon: int, rate: float = 1e-3,
                    prompt: Array | None = None, hidden: int = 16) -> tuple[Task, Any]:
    """Boolean ``phi = 1[c(s) >= tau]`` with ``P_p0(phi = 1) ≈ rate`` (module docstring).

    Returns:
      ``(task, exact)``: the task and its :class:`~tda_jax.twisted.enumeration.ExactTarget`.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    v = lm.vocab_size
    prompt = jnp.zeros((0,), jnp.int32) if prompt is None else prompt
    clf = init_classifier(key, v, horizon, hidden)
    seqs = all_sequences(v, horizon)
    from tda_jax.twisted.enumeration import sequence_log_probs
    log_p0 = np.asarray(sequence_log_probs(lm, lm_params, prompt, horizon), np.float64)
    scores = np.asarray(classifier_logits(clf, seqs, v))
    order = np.argsort(-scores)
    mass = np.cumsum(np.exp(log_p0[order]))
    cut = int(np.searchsorted(mass, rate))
    tau = float(scores[order[min(cut, len(order) - 1)]])
    potential = boolean(lambda s, c: classifier_logits(clf, s, v) >= tau, "rare_event")
    target = exact_target(lm, lm_params, potential, prompt, horizon)
    info = {"threshold": tau, "rate": float(np.exp(target.log_z)), "requested_rate": rate}
    return Task("rare_event", potential, 0, _unconditional_positives(target), None, info), target


def soft_task(lm, lm_params, key: Array, horizon: int, scale: float = 4.0,
              offset: float = -2.0, prompt: Array | None = None, hidden: int = 16
              ) -> tuple[Task, Any]:
    """``log phi = log_sigmoid(scale c(s) + offset)`` (module docstring); returns ``(task, exact)``."""
    v = lm.vocab_size
    prompt = jnp.zeros((0,), jnp.int32) if prompt is None else prompt
    clf = init_classifier(key, v, horizon, hidden)
    potential = soft(lambda s, c: jax.nn.log_sigmoid(scale * classifier_logits(clf, s, v) +
                                                     offset), "soft")
    target = exact_target(lm, lm_params, potential, prompt, horizon)
    info = {"scale": scale, "offset": offset, "z": float(np.exp(target.log_z))}
    return Task("soft", potential, 0, _unconditional_positives(target), None, info), target


def infilling_task(lm, lm_params, key: Array, horizon: int, cond_length: int = 2,
                   num_eval: int = 3, prompt: Array | None = None) -> tuple[Task, list]:
    """``phi(s; c) = p0(c | prompt, s)`` (module docstring); returns ``(task, exact_per_cond)``.

    ``eval_conds`` are ``num_eval`` continuations drawn from ``p0``; the second return value holds
    the exact target of each.
    """
    if cond_length < 1:
        raise ValueError(f"cond_length must be >= 1 for infilling, got {cond_length}")
    prompt = jnp.zeros((0,), jnp.int32) if prompt is None else jnp.asarray(prompt, jnp.int32)

    def log_phi(tokens, cond):
        if cond is None or cond.ndim != 2 or cond.shape[1] != cond_length:
            raise ValueError(f"the infilling potential needs cond [B, {cond_length}], got "
                             f"{None if cond is None else cond.shape}")
        full = jnp.concatenate([tokens, cond.astype(jnp.int32)], axis=1)
        lp, _ = teacher_force(lm, lm_params, prompt, full)
        picked = jnp.take_along_axis(lp[:, tokens.shape[1]:], cond[..., None].astype(jnp.int32),
                                     axis=2)[..., 0]
        return jnp.sum(picked, axis=1)

    potential = soft(log_phi, "infilling")
    total = horizon + cond_length

    def positives(key, num_groups, per_group):
        if per_group != 1:
            raise ValueError("infilling draws one exact target sample per conditioning input "
                             f"(per_group=1), got per_group={per_group}")
        seqs = sample_sequences(key, lm, lm_params, prompt, num_groups, total)
        return seqs[:, None, :horizon], seqs[:, horizon:]

    eval_conds = sample_sequences(key, lm, lm_params, prompt, num_eval, total)[:, horizon:]
    exacts = [exact_target(lm, lm_params, potential, prompt, horizon, cond=c) for c in eval_conds]
    info = {"cond_length": cond_length, "eval_conds": np.asarray(eval_conds).tolist(),
            "z": [float(np.exp(e.log_z)) for e in exacts]}
    return Task("infilling", potential, cond_length, positives, eval_conds, info), exacts
