"""Per-example losses and measurements, with what curvature estimators need from them.

A :class:`Loss` bundles the pure functions that the attribution half asks of a training loss:

* ``per_example(outputs, targets) -> [B]``: the per-example loss (never averaged).
* ``sample_targets(key, outputs) -> targets``: labels drawn from the model's predictive
  distribution, for the *sampled* (true) Fisher.
* ``hessian_sqrt(outputs) -> [B, K, C]``: K output-space vectors ``v_k`` per example with
  ``sum_k v_k v_k^T`` equal to the Hessian of the loss w.r.t. the outputs. Back-propagating them gives
  the *expected* Fisher, i.e. the exact expectation over the predictive distribution, which for these
  losses equals the generalized Gauss-Newton (GGN) matrix.

Measurements (what a query's influence is measured on) share the signature
``measurement(outputs [B, C], targets [B, ...]) -> [B]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
MeasurementFn = Callable[[Array, Array], Array]


class Loss(NamedTuple):
    """A per-example loss and the output-space quantities used by Fisher estimators.

    Attributes:
      name: short name recorded in saved arguments.
      per_example: ``(outputs [B, C], targets) -> [B]`` per-example loss.
      sample_targets: ``(key, outputs [B, C]) -> targets`` drawn from the model's predictive
        distribution.
      hessian_sqrt: ``(outputs [B, C]) -> [B, K, C]`` with ``sum_k v_k v_k^T = d^2 loss / d outputs^2``.
    """

    name: str
    per_example: Callable[[Array, Array], Array]
    sample_targets: Callable[[Array, Array], Array]
    hessian_sqrt: Callable[[Array], Array]


def _ce_per_example(logits: Array, labels: Array) -> Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _ce_sample(key: Array, logits: Array) -> Array:
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _ce_hessian_sqrt(logits: Array) -> Array:
    # Columns sqrt(p_k) (e_k - p): sum_k p_k (e_k - p)(e_k - p)^T = diag(p) - p p^T.
    probs = jax.nn.softmax(logits, axis=-1)
    num_classes = logits.shape[-1]
    eye = jnp.eye(num_classes, dtype=logits.dtype)
    diff = eye[None, :, :] - probs[:, None, :]
    return jnp.sqrt(probs)[:, :, None] * diff


def softmax_cross_entropy() -> Loss:
    """Softmax cross-entropy on logits ``[B, C]`` with integer labels ``[B]`` (summed, not averaged)."""
    return Loss("softmax_cross_entropy", _ce_per_example, _ce_sample, _ce_hessian_sqrt)


def _mse_per_example(outputs: Array, targets: Array) -> Array:
    targets = jnp.reshape(targets, outputs.shape)
    return 0.5 * jnp.sum(jnp.square(outputs - targets), axis=-1)


def _mse_sample(key: Array, outputs: Array) -> Array:
    # 0.5 ||f - y||^2 is the negative log density of N(f, I) up to a constant.
    return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)


def _mse_hessian_sqrt(outputs: Array) -> Array:
    eye = jnp.eye(outputs.shape[-1], dtype=outputs.dtype)
    return jnp.broadcast_to(eye, (outputs.shape[0], *eye.shape))


def mean_squared_error() -> Loss:
    """Squared error ``0.5 * ||outputs - targets||^2`` per example (a unit-variance Gaussian NLL)."""
    return Loss("squared_error", _mse_per_example, _mse_sample, _mse_hessian_sqrt)


def classification_margin(logits: Array, labels: Array) -> Array:
    """Margin ``z_y - logsumexp_{c != y} z_c`` per example, the usual LDS measurement for classifiers.

    Args:
      logits: ``[B, C]``.
      labels: ``[B]`` integer labels.

    Returns:
      ``[B]`` margins (higher means more confidently correct).
    """
    labels = labels.astype(jnp.int32)
    correct = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    masked = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return correct - jax.nn.logsumexp(masked, axis=-1)


def negative_loss(loss: Loss) -> Callable[[Array, Array], Array]:
    """Measurement ``-loss``: higher is better, so a helpful training example scores positive."""

    def measurement(outputs: Array, targets: Array) -> Array:
        return -loss.per_example(outputs, targets)

    return measurement


def get_loss(name: str) -> Loss:
    """Looks a loss up by name: ``"cross_entropy"`` or ``"mse"``."""
    if name in ("cross_entropy", "softmax_cross_entropy"):
        return softmax_cross_entropy()
    if name in ("mse", "squared_error"):
        return mean_squared_error()
    raise ValueError(f"unknown loss {name!r}; expected 'cross_entropy' or 'mse'")
