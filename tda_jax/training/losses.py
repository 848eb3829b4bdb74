"""Per-example losses and masked reductions shared by training and evaluation.

Conventions: losses are computed per example (shape ``[B]``) and reduced with a *masked mean*
``sum_i mask_i * loss_i / sum_i mask_i`` so that padding rows (``mask == 0``) never count.

* ``"cross_entropy"``: softmax cross-entropy with integer labels, ``-log softmax(z)[y]``.
* ``"mse"``: half the squared error summed over outputs, ``0.5 * ||f(x) - y||^2`` (the negative
  log-likelihood of a unit-variance Gaussian up to a constant, so its Fisher equals its GGN).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tda_jax.losses import get_loss, mean_squared_error, softmax_cross_entropy

PerExampleLoss = Callable[[jax.Array, jax.Array], jax.Array]

LOSSES = ("cross_entropy", "mse")


# The per-example losses are the library's own (tda_jax.losses), so training, curvature and scores
# always agree on the definition.
cross_entropy_per_example: PerExampleLoss = softmax_cross_entropy().per_example
squared_error_per_example: PerExampleLoss = mean_squared_error().per_example


def per_example_loss(name: str) -> PerExampleLoss:
    """The per-example loss function called ``name`` (``"cross_entropy"`` or ``"mse"``)."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return get_loss(name).per_example


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(values * mask) / max(sum(mask), 1)`` for ``[B]`` arrays (padding rows have mask 0)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def correct_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``[B]`` float32, 1 where ``argmax(logits) == labels``."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
