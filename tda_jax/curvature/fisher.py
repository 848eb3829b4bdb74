"""Which output-space vectors are back-propagated to build a curvature estimate.

Three Fisher types, all explicit arguments of :func:`tda_jax.curvature.fit_curvature`:

* ``"expected"`` (default): the exact expectation over the model's predictive distribution,
  ``F = E_x[J^T H_out J]`` with ``H_out = sum_k v_k v_k^T`` from :attr:`Loss.hessian_sqrt`. For
  softmax cross-entropy and squared error this *is* the generalized Gauss-Newton matrix. It costs
  ``C`` backward passes per example (cheap for 10 classes) and has no label-sampling noise.
* ``"sampled"``: the true Fisher estimated with ``num_samples`` labels drawn from the model per
  example (``v = d loss(y_sampled) / d outputs / sqrt(num_samples)``).
* ``"empirical"``: gradients at the true labels (the empirical Fisher).

Every estimate is normalised *per example*: statistics are summed over examples and divided by the
number of (unpadded) examples.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tda_jax.losses import IGNORE, Loss, token_positions

Array = jax.Array

FISHER_TYPES = ("expected", "sampled", "empirical")


def check_fisher_type(fisher: str) -> None:
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher={fisher!r} is not one of {FISHER_TYPES}.")


def fisher_cotangents(loss: Loss, fisher: str, targets: Array, mask: Array,
                      key: Array | None = None, index: Array | None = None,
                      num_samples: int = 1) -> Callable[[Array], Array]:
    """Builds ``outputs [B, C] -> cotangents [K, B, C]`` for one batch (``[K, B, T, V]`` for
    sequence losses, whose positions without a target get zero cotangents).

    Args:
      loss: the training loss.
      fisher: ``"expected"``, ``"sampled"`` or ``"empirical"``.
      targets: ``[B, ...]`` true targets (used by ``"empirical"``).
      mask: ``[B]`` 1 for real examples, 0 for padding (padding contributes nothing).
      key: PRNG key for ``"sampled"``.
      index: ``[B]`` dataset positions; per-example sampling keys are ``fold_in(key, index)`` so
        results do not depend on batch size or device count.
      num_samples: labels drawn per example for ``"sampled"``.

    Returns:
      The cotangent function.
    """
    check_fisher_type(fisher)
    mask = mask.astype(jnp.float32)
    tokens = loss.target_kind == "token"  # sequence outputs [B, T, V]: only target positions count
    if tokens:
        mask = mask[:, None] * token_positions(targets)

    def masked(v: Array) -> Array:  # v: [K, B, C] or [K, B, T, V]
        shape = (1, *mask.shape) + (1,) * (v.ndim - 1 - mask.ndim)
        return v * jnp.reshape(mask, shape).astype(v.dtype)

    def loss_grad(outputs: Array, tgt: Array) -> Array:
        return jax.grad(lambda o: jnp.sum(loss.per_example(o, tgt)))(outputs)

    if fisher == "empirical":
        return lambda outputs: masked(loss_grad(outputs, targets)[None])
    if fisher == "expected":
        return lambda outputs: masked(jnp.moveaxis(loss.hessian_sqrt(outputs), 1, 0))
    if key is None or index is None:
        raise ValueError("fisher='sampled' needs a PRNG key (and example indices).")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")

    def sampled(outputs: Array) -> Array:
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.maximum(index, 0))

        def one_sample(s):
            sample_keys = jax.vmap(lambda k: jax.random.fold_in(k, s))(keys)
            tgt = jax.vmap(lambda k, o: loss.sample_targets(k, o[None])[0])(sample_keys, outputs)
            if tokens:  # keep IGNORE where the data has no target
                tgt = jnp.where(targets >= 0, tgt, IGNORE)
            return loss_grad(outputs, jax.lax.stop_gradient(tgt))

        v = jax.vmap(one_sample)(jnp.arange(num_samples))
        return masked(v / jnp.sqrt(float(num_samples)))

    return sampled
