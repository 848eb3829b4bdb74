"""Output-space discrepancies ``rho(f0, f1)`` whose data average is the function-space distance.

* ``"sq"``: ``rho = 0.5 ||f1 - f0||^2`` on the outputs (logits), summed over outputs.
* ``"kl"``: ``rho = KL(softmax(f0) || softmax(f1))``, the Bregman divergence of the softmax
  cross-entropy in logit space; to second order ``0.5 Delta f^T (diag(p0) - p0 p0^T) Delta f``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DISTANCES = ("sq", "kl")


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def discrepancy(distance: str, f0: jax.Array, f1: jax.Array) -> jax.Array:
    """``rho(f0, f1)`` per example: ``[B, C], [B, C] -> [B]``."""
    check_distance(distance)
    if distance == "sq":
        return 0.5 * jnp.sum(jnp.square(f1 - f0), axis=-1)
    log_p0 = jax.nn.log_softmax(f0, axis=-1)
    log_p1 = jax.nn.log_softmax(f1, axis=-1)
    return jnp.sum(jnp.exp(log_p0) * (log_p0 - log_p1), axis=-1)


def softmax_hessian(logits: jax.Array) -> jax.Array:
    """``diag(p) - p p^T`` per example, ``[B, C] -> [B, C, C]`` (the Hessian of the KL at 0)."""
    p = jax.nn.softmax(logits, axis=-1)
    return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
