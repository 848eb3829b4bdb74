"""Step-wise sequence models for twisted SMC: a tiny enumerable LM and the step interface.

Twisted SMC advances every particle by one token per step, so a language model is used through
three pure functions (the *step interface*), all batched over a leading axis ``B``:

* ``init_carry(params, prompt [P], batch) -> carry``: the model state after the prompt (leaves
  ``[B, ...]``);
* ``step(params, carry, tokens [B]) -> carry``: append one token to every sequence;
* ``readout(params, carry) -> (log_probs [B, V], features [B, D])``: ``log p0(. | s_1:t)`` for the
  next token and the hidden state used by twist heads.

Any model with these methods (duck typed, :class:`StepModel`) works with the enumeration, the
twisted SMC and the twist learning of this package; the carry is part of each particle, so it is
reordered with the particles when they are resampled (a key/value cache included, see
:mod:`tda_jax.twisted.kv_cache`).

:class:`TinyLM` is a one-layer tanh recurrent LM over a vocabulary of ``V`` tokens,
``h_t = tanh(E[s_t] + W h_{t-1} + b)`` with a learned ``h_0`` and
``log p0(. | s_1:t) = log_softmax(beta (h_t O + c))``; ``beta`` (``sharpness``) makes the
distribution peaked so that constraints become rare events. With ``V <= 12`` and ``T <= 6`` all
``V^T`` sequences can be enumerated (:mod:`tda_jax.twisted.enumeration`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["StepModel", "TinyLM", "teacher_force", "sample_sequences"]

PyTree = Any


class StepModel(Protocol):
    """The step interface (module docstring)."""

    vocab_size: int

    def init_carry(self, params: PyTree, prompt: Array, batch: int) -> PyTree: ...

    def step(self, params: PyTree, carry: PyTree, tokens: Array) -> PyTree: ...

    def readout(self, params: PyTree, carry: PyTree) -> tuple[Array, Array]: ...


@dataclass(frozen=True)
class TinyLM:
    """Tanh-RNN language model (module docstring) with the step interface.

    Attributes:
      vocab_size: ``V``.
      hidden: width ``D`` of the hidden state (the twist heads' features).
      sharpness: ``beta``, the inverse temperature of the next-token softmax.
    """

    vocab_size: int
    hidden: int = 32
    sharpness: float = 2.0

    def __post_init__(self):
        if not 2 <= self.vocab_size:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")

    def init(self, key: Array) -> dict:
        """Random parameters (the "pretrained" base model of the tiny experiments)."""
        k = jax.random.split(key, 5)
        v, d = self.vocab_size, self.hidden
        return {
            "embed": jax.random.normal(k[0], (v, d)),
            "recurrent": jax.random.normal(k[1], (d, d)) * (1.2 / jnp.sqrt(d)),
            "bias": jnp.zeros((d,)),
            "h0": jax.random.normal(k[2], (d,)) * 0.5,
            "out": jax.random.normal(k[3], (d, v)) / jnp.sqrt(d),
            "out_bias": jax.random.normal(k[4], (v,)) * 0.5,
        }

    def init_carry(self, params: dict, prompt: Array, batch: int) -> Array:
        """Hidden state ``[batch, D]`` after the prompt tokens ``[P]`` (``P`` may be 0)."""
        h = jnp.broadcast_to(params["h0"], (batch, self.hidden))
        prompt = jnp.asarray(prompt, jnp.int32).reshape(-1)
        for i in range(prompt.shape[0]):
            h = self.step(params, h, jnp.full((batch,), prompt[i]))
        return h

    def step(self, params: dict, carry: Array, tokens: Array) -> Array:
        """``h_t = tanh(E[s_t] + h_{t-1} W + b)``."""
        return jnp.tanh(params["embed"][tokens] + carry @ params["recurrent"] + params["bias"])

    def readout(self, params: dict, carry: Array) -> tuple[Array, Array]:
        """``(log_softmax(beta (h O + c)) [B, V], h [B, D])``."""
        logits = self.sharpness * (carry @ params["out"] + params["out_bias"])
        return jax.nn.log_softmax(logits, axis=-1), carry


def teacher_force(model: StepModel, params: PyTree, prompt: Array, tokens: Array
                  ) -> tuple[Array, Array]:
    """Runs ``model`` over given sequences ``tokens [B, T]`` after ``prompt``.

    Returns:
      ``(log_probs [B, T, V], features [B, T, D])``: entry ``t`` is the readout *before* token
      ``t`` (``log p0(. | prompt, s_1:t-1)`` and its hidden state).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T] token ids, got shape {tokens.shape}")
    carry = model.init_carry(params, prompt, tokens.shape[0])

    def body(c, tok):
        lp, feat = model.readout(params, c)
        return model.step(params, c, tok), (lp, feat)

    _, (lp, feat) = jax.lax.scan(body, carry, tokens.T)
    return jnp.swapaxes(lp, 0, 1), jnp.swapaxes(feat, 0, 1)


def sample_sequences(key: Array, model: StepModel, params: PyTree, prompt: Array, batch: int,
                     length: int) -> Array:
    """Ancestral samples ``[batch, length]`` from ``p0(. | prompt)``."""
    carry = model.init_carry(params, prompt, batch)

    def body(c, k):
        lp, _ = model.readout(params, c)
        tok = jax.random.categorical(k, lp).astype(jnp.int32)
        return model.step(params, c, tok), tok

    _, toks = jax.lax.scan(body, carry, jax.random.split(key, length))
    return toks.T
