"""The transformer LM under the step interface: one token per step with a fixed-size KV cache.

:class:`CachedTransformer` evaluates a :class:`tda_jax.models.TransformerLM`'s parameters (same
``variables["params"]`` tree, no model changes) one position at a time. Its carry holds, per
sequence, the keys and values of every layer at every position so far in a fixed-size cache
``[B, num_layers, max_len, heads, d_head]``, the position and the last final-LayerNorm output. A
step computes the new token's query, key and value, writes the key and value at the sequence's
position, and attends over cache entries ``<= position``: ``O(max_len)`` work per token instead of
a forward pass over the whole prefix. The carry lives inside each SMC particle, so the core's
resampling gathers it with the ancestor indices (``x[a]`` on every leaf) and each particle keeps
the cache of its own prefix.

:class:`RecomputedTransformer` is the same step interface without a cache: every step runs the
full model over a ``[B, max_len]`` token buffer (causal, so the padding after the prefix does not
change the logits) and reads position ``t``: the prefix recomputation of the reference
implementation, kept as the benchmark baseline and the oracle of the cache test.

Both read out ``log p0(. | prefix)`` and, as twist features, the final LayerNorm output of the
last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import Array

from tda_jax.models.transformer import TransformerLM

__all__ = ["CachedTransformer", "RecomputedTransformer"]


def _layer_norm(p, x, eps=1e-6):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _check_prompt(model: TransformerLM, prompt: Array) -> Array:
    prompt = jnp.asarray(prompt, jnp.int32).reshape(-1)
    if prompt.shape[0] < 1:
        raise ValueError("the transformer LM needs a prompt of at least one token (e.g. a BOS "
                         "token) to read out the first next-token distribution")
    if prompt.shape[0] > model.max_len:
        raise ValueError(f"prompt of length {prompt.shape[0]} exceeds the model's context "
                         f"max_len={model.max_len}")
    return prompt


@dataclass(frozen=True)
class CachedTransformer:
    """Step interface with a key/value cache (module docstring) for ``model``'s parameters.

    The carry is ``{"k", "v": [B, layers, max_len, heads, d_head], "pos": int32 [B] (next write
    position), "hidden": [B, d_model]}``. Stepping past ``max_len`` tokens is an error at the
    caller's side (:class:`~tda_jax.twisted.smc.TwistedProblem` checks ``prompt + T <= max_len``);
    inside the cache the write position is clipped.
    """

    model: TransformerLM

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def init_carry(self, params, prompt, batch):
        prompt = _check_prompt(self.model, prompt)
        m = self.model
        d_head = m.d_model // m.num_heads
        shape = (batch, m.num_layers, m.max_len, m.num_heads, d_head)
        carry = {"k": jnp.zeros(shape, m.dtype), "v": jnp.zeros(shape, m.dtype),
                 "pos": jnp.zeros((batch,), jnp.int32),
                 "hidden": jnp.zeros((batch, m.d_model), m.dtype)}
        for i in range(prompt.shape[0]):
            carry = self.step(params, carry, jnp.full((batch,), prompt[i]))
        return carry

    def step(self, params, carry, tokens):
        m = self.model
        pos = carry["pos"]
        x = params["embed"]["embedding"][tokens] + params["pos_embedding"][pos].astype(m.dtype)
        valid = jnp.arange(m.max_len)[None, :] <= pos[:, None]  # [B, L]
        write = jax.nn.one_hot(jnp.minimum(pos, m.max_len - 1), m.max_len, dtype=m.dtype)
        ks, vs = [], []
        for i in range(m.num_layers):
            p = params[f"block_{i}"]
            h = _layer_norm(p["ln_attn"], x)
            a = p["attn"]
            q = jnp.einsum("bd,dhk->bhk", h, a["query"]["kernel"]) + a["query"]["bias"]
            k = jnp.einsum("bd,dhk->bhk", h, a["key"]["kernel"]) + a["key"]["bias"]
            v = jnp.einsum("bd,dhk->bhk", h, a["value"]["kernel"]) + a["value"]["bias"]
            w = write[:, :, None, None]
            k_cache = carry["k"][:, i] * (1 - w) + k[:, None] * w
            v_cache = carry["v"][:, i] * (1 - w) + v[:, None] * w
            ks.append(k_cache)
            vs.append(v_cache)
            q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
            logits = jnp.einsum("bhk,blhk->bhl", q, k_cache)
            logits = jnp.where(valid[:, None, :], logits, jnp.finfo(logits.dtype).min)
            weights = jax.nn.softmax(logits, axis=-1)
            out = jnp.einsum("bhl,blhk->bhk", weights, v_cache)
            x = x + jnp.einsum("bhk,hkd->bd", out, a["out"]["kernel"]) + a["out"]["bias"]
            h = _layer_norm(p["ln_mlp"], x)
            h = jax.nn.gelu(_dense(p["mlp"]["fc1"], h))
            x = x + _dense(p["mlp"]["fc2"], h)
        hidden = _layer_norm(params["ln_final"], x)
        return {"k": jnp.stack(ks, axis=1), "v": jnp.stack(vs, axis=1), "pos": pos + 1,
                "hidden": hidden}

    def readout(self, params, carry):
        hidden = carry["hidden"]
        if self.model.tie_embeddings:
            logits = hidden @ params["embed"]["embedding"].T
        else:
            logits = _dense(params["head"], hidden)
        return jax.nn.log_softmax(logits, axis=-1), hidden


@dataclass(frozen=True)
class RecomputedTransformer:
    """Step interface that reruns ``model`` over the whole prefix each step (module docstring).

    The carry is ``{"tokens": int32 [B, max_len], "pos": int32 [B]}``.
    """

    model: TransformerLM

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def init_carry(self, params, prompt, batch):
        prompt = _check_prompt(self.model, prompt)
        buf = jnp.zeros((batch, self.model.max_len), jnp.int32)
        buf = buf.at[:, :prompt.shape[0]].set(prompt[None])
        return {"tokens": buf, "pos": jnp.full((batch,), prompt.shape[0], jnp.int32)}

    def step(self, params, carry, tokens):
        pos = carry["pos"]
        write = jnp.arange(self.model.max_len)[None, :] == pos[:, None]
        return {"tokens": jnp.where(write, tokens[:, None], carry["tokens"]), "pos": pos + 1}

    def readout(self, params, carry):
        logits, state = self.model.apply(
            {"params": params}, carry["tokens"],
            capture_intermediates=lambda mdl, name: mdl.name == "ln_final")
        hidden_all = state["intermediates"]["ln_final"]["__call__"][0]
        last = (carry["pos"] - 1)[:, None, None]
        logits = jnp.take_along_axis(logits, last, axis=1)[:, 0]
        hidden = jnp.take_along_axis(hidden_all, last, axis=1)[:, 0]
        return jax.nn.log_softmax(logits, axis=-1), hidden
