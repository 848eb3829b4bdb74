"""A small decoder-only (causal) transformer language model built from standard Flax layers.

Every linear map is a stock ``flax.linen`` layer (``nn.Embed``, the ``nn.DenseGeneral`` query / key /
value / out projections inside ``nn.MultiHeadDotProductAttention``, ``nn.Dense``), so layer capture
sees them without model changes. Two parameters deliberately are not Kronecker-factorable layers:
the learned positional table ``pos_embedding`` (a plain parameter added to the token embeddings) and
the LayerNorm scales and biases.

Parameter tree of ``TransformerLM(num_layers=2)`` (``variables["params"]``)::

    embed/embedding                 [vocab_size, d_model]
    pos_embedding                   [max_len, d_model]
    block_{i}/ln_attn/{scale,bias}  [d_model]
    block_{i}/attn/{query,key,value}/{kernel [d_model, heads, d_head], bias [heads, d_head]}
    block_{i}/attn/out/{kernel [heads, d_head, d_model], bias [d_model]}
    block_{i}/ln_mlp/{scale,bias}   [d_model]
    block_{i}/mlp/fc1/{kernel [d_model, d_mlp], bias}
    block_{i}/mlp/fc2/{kernel [d_mlp, d_model], bias}
    ln_final/{scale,bias}           [d_model]
    head/{kernel [d_model, vocab_size], bias}   (absent with tie_embeddings=True)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class FeedForward(nn.Module):
    """Position-wise MLP ``fc2(gelu(fc1(x)))`` of a transformer block."""

    d_model: int
    d_mlp: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, T, d_model]`` to ``[B, T, d_model]``."""
        h = nn.gelu(nn.Dense(self.d_mlp, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.d_model, dtype=self.dtype, name="fc2")(h)


class DecoderBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_attn(x))`` then ``x + mlp(ln_mlp(x))``."""

    d_model: int
    num_heads: int
    d_mlp: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Maps ``[B, T, d_model]`` to ``[B, T, d_model]``; ``mask`` ``[B, 1, T, T]`` (causal)."""
        h = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.d_model, out_features=self.d_model,
            dtype=self.dtype, deterministic=True, name="attn")(h, mask=mask)
        x = x + h
        h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
        return x + FeedForward(self.d_model, self.d_mlp, dtype=self.dtype, name="mlp")(h)


class TransformerLM(nn.Module):
    """Decoder-only transformer: token ids ``[B, T]`` to next-token logits ``[B, T, vocab_size]``.

    Logits at position ``t`` depend only on tokens ``0..t`` (causal self-attention), so the model
    is trained with :func:`tda_jax.losses.causal_lm_loss` on targets ``targets[:, t] = tokens[:, t+1]``
    (``-1`` where no loss is taken). Padding belongs at the end of a sequence: position ``t`` never
    sees later positions, so right-padding cannot change the logits of real tokens. No dropout.

    Attributes:
      vocab_size: number of token ids ``V`` (inputs must lie in ``[0, V)``).
      max_len: longest sequence (size of the learned positional table).
      d_model: width of the residual stream.
      num_heads: attention heads (``d_model`` must be divisible by it).
      num_layers: number of decoder blocks ``block_0 .. block_{num_layers-1}``.
      d_mlp: hidden width of each block's MLP.
      tie_embeddings: if true, the output logits are ``x @ embed.embedding.T`` (``nn.Embed.attend``)
        and there is no ``head`` layer.
      dtype: computation dtype (parameters are float32).

    Example::

        model = TransformerLM(vocab_size=32, max_len=16, d_model=32, num_heads=2, num_layers=2,
                              d_mlp=64)
        variables = model.init(key, jnp.zeros((1, 16), jnp.int32))
        logits = model.apply(variables, tokens)  # [B, T, 32]
    """

    vocab_size: int
    max_len: int
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    d_mlp: int = 256
    tie_embeddings: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Maps token ids ``[B, T]`` (integers in ``[0, vocab_size)``) to logits ``[B, T, V]``.

        Raises:
          ValueError: if ``tokens`` is not ``[B, T]`` or ``T > max_len`` (at trace time).
          TypeError: if ``tokens`` is not an integer array.
        """
        if tokens.ndim != 2:
            raise ValueError(f"TransformerLM expects token ids of shape [B, T], got shape "
                             f"{tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"TransformerLM expects integer token ids, got dtype {tokens.dtype}; "
                            "cast the inputs to int32.")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length T={length} (tokens of shape {tokens.shape}) exceeds "
                             f"the model's context max_len={self.max_len}; truncate the sequences "
                             "or build the model with a larger max_len.")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads="
                             f"{self.num_heads}")
        embed = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype, name="embed")
        # A plain parameter table, not an nn.Embed: positions are not looked up by a data-dependent
        # id, and the table is kept outside the Kronecker-factored layers on purpose.
        positions = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                               (self.max_len, self.d_model), jnp.float32)
        x = embed(tokens) + jnp.asarray(positions[:length], self.dtype)[None]
        mask = nn.make_causal_mask(tokens, dtype=jnp.bool_)  # [B, 1, T, T]
        for i in range(self.num_layers):
            x = DecoderBlock(self.d_model, self.num_heads, self.d_mlp, dtype=self.dtype,
                             name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
        if self.tie_embeddings:
            return embed.attend(x)
        return nn.Dense(self.vocab_size, dtype=self.dtype, name="head")(x)
