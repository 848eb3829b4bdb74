"""Masked reductions for training and evaluation, and the resolution of loss names.

The losses themselves are :class:`tda_jax.losses.Loss` objects (the one vocabulary shared with
curvature and scores); this module only resolves config names with :func:`tda_jax.losses.get_loss`
and reduces per-example values ``[B]`` with a *masked mean*
``sum_i mask_i * loss_i / sum_i mask_i``, so that padding rows (``mask == 0``) never count.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tda_jax.losses import Loss, check_loss, get_loss, mean_squared_error, softmax_cross_entropy

PerExampleLoss = Callable[[jax.Array, jax.Array], jax.Array]

# Aliases of the library's per-example losses (tda_jax.losses), kept for existing callers.
cross_entropy_per_example: PerExampleLoss = softmax_cross_entropy().per_example
squared_error_per_example: PerExampleLoss = mean_squared_error().per_example


def resolve_loss(loss: Loss | str, argument: str = "loss") -> Loss:
    """``loss`` itself if it is a :class:`tda_jax.losses.Loss`; a config name through ``get_loss``."""
    return get_loss(loss) if isinstance(loss, str) else check_loss(loss, argument)


def per_example_loss(loss: Loss | str) -> PerExampleLoss:
    """The per-example function ``(outputs [B, C], targets) -> [B]`` of ``loss`` (or its name)."""
    return resolve_loss(loss).per_example


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(values * mask) / max(sum(mask), 1)`` for ``[B]`` arrays (padding rows have mask 0)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def correct_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``[B]`` float32, 1 where ``argmax(logits) == labels``."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
