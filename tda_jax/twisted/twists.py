"""Twist functions ``psi_t(s_1:t)`` for twisted SMC, evaluated for every next token at once.

A twist model has the step interface of :mod:`tda_jax.twisted.models` plus one output:

* ``init_carry(params, prompt, batch)`` / ``step(params, carry, tokens)``: its own state (empty
  for heads on the LM's hidden states);
* ``log_psi(params, carry, features [B, D], t, cond) -> [B, V]``: ``log psi_t(s_1:t-1, v)`` for
  every token ``v`` of the vocabulary, from the state after ``s_1:t-1``, the LM's features there,
  the (1-based) time ``t`` of the token being chosen and an optional conditioning input ``cond
  [B, C]`` (the observed suffix for infilling: *conditional twists*).

One evaluation therefore gives the whole twist-induced proposal
``q_t(v | s_<t) = p0(v | s_<t) psi_t(s_<t, v) / sum_u p0(u | s_<t) psi_t(s_<t, u)``.

Models here:

* :class:`UniformTwist`: ``psi = 1`` (the bootstrap proposal ``q = p0``).
* :class:`TableTwist`: a lookup table over all prefixes, e.g. the exact optimal twists
  ``psi*_t(s_1:t) = sum_{s_t+1:T} p0(s_t+1:T | s_1:t) phi(s_1:T)`` from
  :func:`tda_jax.twisted.enumeration.optimal_log_twists`.
* :class:`HeadTwist`: an MLP head ``[h_t ; onehot(t) ; onehot(cond)] -> R^V`` on the LM's hidden
  states (gradients are stopped at the LM: the base model stays fixed).
* :class:`SeparateTwist`: a separate tanh-RNN twist network reading the tokens itself, with the same
  head.

``link`` maps a head's raw output ``r`` to ``log psi``: ``"identity"`` (``log psi = r``) or
``"log_sigmoid"`` (``psi = sigmoid(r)`` in (0, 1), a classifier's probability, used by FUDGE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["HeadTwist", "SeparateTwist", "TableTwist", "UniformTwist", "check_log_psi"]

PyTree = Any
LINKS = ("identity", "log_sigmoid")


def check_log_psi(log_psi: Array, batch: int, vocab_size: int) -> Array:
    """Raises unless a twist output is ``[batch, vocab_size]``."""
    if log_psi.shape != (batch, vocab_size):
        raise ValueError(
            f"the twist returned log psi of shape {log_psi.shape}, expected ({batch}, "
            f"{vocab_size}): one value per particle and vocabulary token (the twist head's "
            f"output width must equal the LM's vocab_size={vocab_size}).")
    return log_psi


def _apply_link(link: str, raw: Array) -> Array:
    if link == "identity":
        return raw
    if link == "log_sigmoid":
        return jax.nn.log_sigmoid(raw)
    raise ValueError(f"unknown twist link {link!r}; use one of {LINKS}")


@dataclass(frozen=True)
class UniformTwist:
    """``psi_t = 1`` for all t: the twist-induced proposal is the base model (bootstrap SMC)."""

    vocab_size: int

    def init(self, key: Array) -> dict:
        return {}

    def init_carry(self, params, prompt, batch):
        return ()

    def step(self, params, carry, tokens):
        return ()

    def log_psi(self, params, carry, features, t, cond=None):
        return jnp.zeros((features.shape[0], self.vocab_size), features.dtype)


@dataclass(frozen=True)
class TableTwist:
    """Lookup-table twists; ``params`` is ``log psi`` ``[T, V^(T-1), V]``.

    Row ``j`` of ``params[t - 1]`` holds ``log psi_t(s_1:t-1, .)`` for the prefix with
    lexicographic index ``j = sum_i s_i V^(t-1-i)`` (rows past ``V^(t-1)`` are unused). The carry
    is that index, so a particle's table row follows it through resampling.
    """

    vocab_size: int
    horizon: int

    def init_carry(self, params, prompt, batch):
        return jnp.zeros((batch,), jnp.int32)

    def step(self, params, carry, tokens):
        return carry * self.vocab_size + tokens.astype(jnp.int32)

    def log_psi(self, params, carry, features, t, cond=None):
        return params[t - 1, carry]


def _dense_init(key, fan_in, fan_out, scale=1.0):
    return {"w": jax.random.normal(key, (fan_in, fan_out)) * (scale / jnp.sqrt(fan_in)),
            "b": jnp.zeros((fan_out,))}


def _mlp_head(params, x):
    h = jax.nn.gelu(x @ params["fc1"]["w"] + params["fc1"]["b"])
    h = jax.nn.gelu(h @ params["fc2"]["w"] + params["fc2"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


@dataclass(frozen=True)
class HeadTwist:
    """All-vocabulary MLP head on the LM's hidden states (module docstring).

    Attributes:
      vocab_size: ``V`` (the output width).
      feature_dim: width ``D`` of the LM features.
      horizon: ``T``; the head sees ``onehot(t - 1, T)``.
      cond_length: length ``C`` of the conditioning tokens (0: unconditional).
      hidden: MLP width.
      link: ``"identity"`` or ``"log_sigmoid"`` (module docstring).
    """

    vocab_size: int
    feature_dim: int
    horizon: int
    cond_length: int = 0
    hidden: int = 64
    link: str = "identity"

    def __post_init__(self):
        _apply_link(self.link, jnp.zeros(()))

    def _in_dim(self):
        return self.feature_dim + self.horizon + self.cond_length * self.vocab_size

    def init(self, key: Array) -> dict:
        """Last layer zero: ``log psi = 0`` (``link="identity"``) at initialization."""
        k = jax.random.split(key, 2)
        out = {"w": jnp.zeros((self.hidden, self.vocab_size)), "b": jnp.zeros((self.vocab_size,))}
        return {"fc1": _dense_init(k[0], self._in_dim(), self.hidden),
                "fc2": _dense_init(k[1], self.hidden, self.hidden), "out": out}

    def init_carry(self, params, prompt, batch):
        return ()

    def step(self, params, carry, tokens):
        return ()

    def _inputs(self, features, t, cond, stop_gradient=True):
        batch = features.shape[0]
        time = jnp.broadcast_to(jax.nn.one_hot(t - 1, self.horizon), (batch, self.horizon))
        if stop_gradient:
            features = jax.lax.stop_gradient(features)
        parts = [features, time.astype(features.dtype)]
        if self.cond_length:
            if cond is None or cond.shape != (batch, self.cond_length):
                raise ValueError(
                    f"this conditional twist needs cond of shape ({batch}, {self.cond_length}), "
                    f"got {None if cond is None else cond.shape}")
            parts.append(jax.nn.one_hot(cond, self.vocab_size).reshape(batch, -1))
        return jnp.concatenate(parts, axis=-1)

    def log_psi(self, params, carry, features, t, cond=None):
        raw = _mlp_head(params, self._inputs(features, t, cond))
        return _apply_link(self.link, raw)


@dataclass(frozen=True)
class SeparateTwist:
    """A separate twist network: its own tanh RNN over the tokens, then :class:`HeadTwist`'s MLP.

    The LM's features are not used (``feature_dim`` of the head is the network's own ``width``).
    """

    vocab_size: int
    horizon: int
    cond_length: int = 0
    width: int = 32
    hidden: int = 64
    link: str = "identity"

    def _head(self):
        return HeadTwist(self.vocab_size, self.width, self.horizon, self.cond_length,
                         self.hidden, self.link)

    def init(self, key: Array) -> dict:
        k = jax.random.split(key, 3)
        return {"head": self._head().init(k[0]),
                "embed": jax.random.normal(k[1], (self.vocab_size, self.width)),
                "recurrent": jax.random.normal(k[2], (self.width, self.width)) / jnp.sqrt(
                    self.width),
                "h0": jnp.zeros((self.width,))}

    def init_carry(self, params, prompt, batch):
        h = jnp.broadcast_to(params["h0"], (batch, self.width))
        prompt = jnp.asarray(prompt, jnp.int32).reshape(-1)
        for i in range(prompt.shape[0]):
            h = self.step(params, h, jnp.full((batch,), prompt[i]))
        return h

    def step(self, params, carry, tokens):
        return jnp.tanh(params["embed"][tokens] + carry @ params["recurrent"])

    def log_psi(self, params, carry, features, t, cond=None):
        head = self._head()
        raw = _mlp_head(params["head"], head._inputs(carry, t, cond, stop_gradient=False))
        return _apply_link(self.link, raw)
