"""Per-example layer statistics: layer inputs ``a`` and output gradients ``g``, and per-example gradients.

For a tracked layer (see :mod:`tda_jax.capture.layers`) and one example, the gradient of a scalar
``s`` (a loss or a measurement) w.r.t. the layer's matrix ``W [in, out]`` is
``sum_t a_t g_t^T`` with ``a_t`` the (bias-augmented) input at position ``t`` and ``g_t = ds/dy_t``.
:func:`layer_statistics` returns ``a`` and ``g`` for every tracked layer in one forward pass and one
(vmapped) vector-Jacobian product; nothing per-example of parameter size is formed.

``g`` is produced from *output-space cotangents*: ``cotangents[k, b]`` is a vector in the model's
output space for example ``b``; back-propagating it gives ``g[k, b]``. With
``cotangents = d loss / d outputs`` this is the loss gradient (``K = 1``); with the columns of the
loss Hessian's square root it gives the GGN / expected Fisher (``K = C``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tda_jax.capture.layers import ApplyFn, LayerSpec, forward_with_capture, output_shapes

Array = jax.Array
Params = Any


def layer_statistics(apply_fn: ApplyFn, params: Params, inputs: Any,
                     cotangent_fn: Callable[[Array], Array]
                     ) -> tuple[Array, dict[str, Array], dict[str, Array], dict[str, LayerSpec]]:
    """Layer inputs and output gradients of every tracked layer for one batch.

    Args:
      apply_fn: ``(params, inputs) -> outputs [B, C]``, an unmodified Flax apply wrapper.
      params: model parameters.
      inputs: a batch with leading example axis ``B``.
      cotangent_fn: ``outputs [B, C] -> cotangents [K, B, C]``; may close over targets, masks, keys.

    Returns:
      ``(outputs, a, g, specs)`` with ``a[name]`` of shape ``[B, T, in_dim]`` and ``g[name]`` of shape
      ``[K, B, T, out_dim]`` (all calls of a shared layer concatenated along ``T``).
    """
    specs, shapes, out_struct = output_shapes(apply_fn, params, inputs)
    dtype = out_struct.dtype if hasattr(out_struct, "dtype") else jnp.float32
    zeros = {key: jnp.zeros(shape, dtype) for key, shape in shapes.items()}

    def forward(perturbations):
        outputs, a, _ = forward_with_capture(apply_fn, params, inputs, perturbations)
        return outputs, a

    outputs, vjp_fn, a = jax.vjp(forward, zeros, has_aux=True)
    cotangents = cotangent_fn(outputs)
    if cotangents.ndim != outputs.ndim + 1 or cotangents.shape[1:] != outputs.shape:
        raise ValueError(f"cotangent_fn must return [K, *outputs.shape] = [K, {outputs.shape}], got "
                         f"{cotangents.shape}.")
    (g_by_call,) = jax.vmap(vjp_fn)(cotangents.astype(outputs.dtype))
    batch = outputs.shape[0]
    g = {}
    for name in specs:
        calls = sorted((k for k in g_by_call if k.rsplit("#", 1)[0] == name),
                       key=lambda k: int(k.rsplit("#", 1)[1]))
        parts = [jnp.reshape(g_by_call[k], (cotangents.shape[0], batch, -1, specs[name].out_dim))
                 for k in calls]
        g[name] = jnp.concatenate(parts, axis=2)
    return outputs, a, g, specs


def layer_gradients(a: Array, g: Array) -> Array:
    """Per-example layer gradients ``sum_t a_t g_t^T``.

    Args:
      a: ``[B, T, in]`` layer inputs.
      g: ``[K, B, T, out]`` output gradients.

    Returns:
      ``[K, B, in, out]``. Use only where a method truly needs materialized gradients.
    """
    return jnp.einsum("bti,kbto->kbio", a, g)


def loss_cotangents(loss_per_example: Callable[[Array, Array], Array], targets: Array,
                    mask: Array | None = None) -> Callable[[Array], Array]:
    """Cotangent function giving ``d loss_b / d outputs_b`` (times ``mask``), shape ``[1, B, C]``."""

    def cotangent_fn(outputs):
        grads = jax.grad(lambda o: jnp.sum(loss_per_example(o, targets)))(outputs)
        if mask is not None:
            grads = grads * jnp.reshape(mask, (-1,) + (1,) * (grads.ndim - 1)).astype(grads.dtype)
        return grads[None]

    return cotangent_fn


def per_example_gradients(loss_fn: Callable[[Params, Any], Array], params: Params,
                          batch: Any) -> Params:
    """Per-example gradients of ``loss_fn(params, example)`` with ``vmap(grad)``.

    Args:
      loss_fn: scalar loss of one example; ``example`` is ``batch`` without its leading axis.
      params: parameters (any pytree).
      batch: pytree of arrays with a shared leading example axis ``B``.

    Returns:
      A pytree like ``params`` with a leading axis ``B``.
    """
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)
