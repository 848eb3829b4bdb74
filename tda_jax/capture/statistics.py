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

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tda_jax.capture.layers import ApplyFn, LayerSpec, forward_with_capture, output_shapes

Array = jax.Array
Params = Any


def align_mask(input_mask: Array, positions: int, name: str) -> Array:
    """An input mask ``[B, T]`` aligned with a layer call's ``positions`` -> ``[B, positions]``.

    A call over ``T`` positions uses the mask as is; over ``k T`` positions (e.g. heads laid out
    position-major, ``[B, T, H, d] -> [B, T H, d]``) each token's entry is repeated ``k`` times; a
    call with one position (a pooled input) is not masked by tokens.
    """
    batch, length = input_mask.shape
    if positions == length:
        return input_mask
    if positions == 1:
        return jnp.ones((batch, 1), input_mask.dtype)
    if positions % length == 0:
        return jnp.repeat(input_mask, positions // length, axis=1)
    raise ValueError(f"layer {name!r} has {positions} positions per example, which cannot be aligned "
                     f"with the input mask's {length} tokens; leave this layer out (layers=...) or "
                     "give no input_mask.")


class Captured(NamedTuple):
    """What :func:`layer_statistics` returns for one batch (see there)."""

    outputs: Array
    a: dict[str, Array]
    g: dict[str, Array]
    masks: dict[str, Array]
    specs: dict[str, LayerSpec]
    calls: dict[str, tuple[int, ...]]  # positions of each call of a layer, in order


def layer_statistics(apply_fn: ApplyFn, params: Params, inputs: Any,
                     cotangent_fn: Callable[[Array], Array], input_mask: Array | None = None,
                     compute_dtype: Any = None) -> Captured:
    """Layer inputs and output gradients of every tracked layer for one batch.

    Args:
      apply_fn: ``(params, inputs) -> outputs [B, ...]``, an unmodified Flax apply wrapper.
      params: model parameters.
      inputs: a batch with leading example axis ``B``.
      cotangent_fn: ``outputs -> cotangents [K, *outputs.shape]``; may close over targets, masks,
        keys.
      input_mask: optional ``[B, T]`` mask of real input tokens, aligned with each layer call into
        ``masks`` (curvature statistics such as K-FAC's covariances leave masked positions out).
        ``a`` and ``g`` are not changed, so ``sum_t a_t g_t^T`` stays the exact gradient.
      compute_dtype: e.g. ``jnp.bfloat16``: the forward and backward passes (floating parameters,
        inputs, activations and output gradients) run in this dtype; the model's outputs are
        returned and the cotangents computed in float32, and ``a``, ``g`` are returned in float32
        so that every statistic is accumulated in float32. None: the parameters' own dtype.

    Returns:
      ``Captured(outputs, a, g, masks, specs, calls)`` with ``a[name] [B, T, in_dim]``,
      ``g[name] [K, B, T, out_dim]`` and ``masks[name] [B, T]`` (1 for real positions), all calls
      of a shared layer concatenated along ``T``; ``calls[name]`` gives each call's positions.
      For a transposed call (``Embed.attend``) the roles swap: its ``a`` part is the output
      gradient and its ``g`` part the call's input, so such a layer needs ``K = 1`` (one cotangent
      per example: a loss or measurement gradient, or the sampled/empirical Fisher).
    """
    if compute_dtype is not None:
        params, inputs = jax.tree.map(lambda v: _cast_floating(v, compute_dtype), (params, inputs))
    specs, shapes, out_struct = output_shapes(apply_fn, params, inputs)
    dtype = out_struct.dtype if hasattr(out_struct, "dtype") else jnp.float32
    zeros = {key: jnp.zeros(shape, dtype) for key, shape in shapes.items()}

    transposed: dict[str, list[bool]] = {}

    def forward(perturbations):
        outputs, calls, _ = forward_with_capture(apply_fn, params, inputs, perturbations)
        transposed.update({n: [c.transposed for c in cs] for n, cs in calls.items()})
        return outputs, {n: [c.inputs for c in cs] for n, cs in calls.items()}

    outputs, vjp_fn, call_inputs = jax.vjp(forward, zeros, has_aux=True)
    if compute_dtype is not None:  # losses, measurements and cotangents in float32
        outputs = outputs.astype(jnp.float32)
    cotangents = cotangent_fn(outputs)
    if cotangents.ndim != outputs.ndim + 1 or cotangents.shape[1:] != outputs.shape:
        raise ValueError(f"cotangent_fn must return [K, *outputs.shape] = [K, {outputs.shape}], got "
                         f"{cotangents.shape}.")
    (g_by_call,) = jax.vmap(vjp_fn)(cotangents.astype(dtype))
    if compute_dtype is not None:
        _warn_if_not_in(compute_dtype, call_inputs, specs, transposed)
        g_by_call = {k: v.astype(jnp.float32) for k, v in g_by_call.items()}
        call_inputs = jax.tree.map(lambda v: _cast_floating(v, jnp.float32), call_inputs)
    batch, num_k = outputs.shape[0], cotangents.shape[0]
    a, g, masks, call_positions = {}, {}, {}, {}
    for name, spec in specs.items():
        a_parts, g_parts, m_parts = [], [], []
        for number, (x, is_transposed) in enumerate(zip(call_inputs[name], transposed[name])):
            grad = g_by_call[f"{name}#{number}"]
            if is_transposed:
                if num_k != 1:
                    raise ValueError(
                        f"layer {name!r} is also used transposed (Embed.attend: tied embeddings); "
                        f"its statistics need one cotangent per example but got K = {num_k} (the "
                        "expected Fisher); use fisher='sampled' or fisher='empirical'.")
                a_part = jnp.reshape(grad[0], (batch, -1, spec.in_dim))
                g_part = x[None]
            else:
                a_part = x
                g_part = jnp.reshape(grad, (num_k, batch, -1, spec.out_dim))
            m_part = jnp.ones(a_part.shape[:2], a_part.dtype)
            if input_mask is not None:
                m_part = align_mask(input_mask.astype(a_part.dtype), a_part.shape[1], name)
            a_parts.append(a_part)
            g_parts.append(g_part)
            m_parts.append(m_part)
        call_positions[name] = tuple(int(part.shape[1]) for part in a_parts)
        a[name] = jnp.concatenate(a_parts, axis=1)
        g[name] = jnp.concatenate(g_parts, axis=2)
        masks[name] = jnp.concatenate(m_parts, axis=1)
    return Captured(outputs, a, g, masks, specs, call_positions)


COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def _warn_if_not_in(compute_dtype: Any, call_inputs: dict[str, list[Array]],
                    specs: dict[str, LayerSpec], transposed: dict[str, list[bool]]) -> None:
    """Warns (at trace time) about tracked layers whose inputs are not in ``compute_dtype``: the
    model fixes its own computation dtype (e.g. a Flax module built with ``dtype=jnp.float32``
    casts the low-precision parameters back), so ``compute_dtype`` only rounds the parameters.
    An embedding lookup's input (a one-hot row, exact in any dtype) is left out."""
    wanted = jnp.dtype(compute_dtype)
    other = sorted(name for name, xs in call_inputs.items()
                   if any(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != wanted
                          and (specs[name].kind != "embed" or is_transposed)
                          for x, is_transposed in zip(xs, transposed[name])))
    if other:
        warnings.warn(f"compute_dtype={wanted.name}: the inputs of layers {other[:4]}"
                      f"{' ...' if len(other) > 4 else ''} are not {wanted.name}, so the model "
                      "computes them in another dtype (a Flax module built with dtype=jnp.float32 "
                      "casts the parameters back); build the model with dtype=None (or the same "
                      "dtype) for low-precision capture.", stacklevel=3)


def check_compute_dtype(compute_dtype: Any) -> str | None:
    """``None`` or the name of a dtype for the forward and backward passes of capture.

    Accepts ``jnp.bfloat16``, ``"bfloat16"``, ``np.float32``, ... (one of :data:`COMPUTE_DTYPES`).

    Raises:
      TypeError: not a dtype; ValueError: a dtype that is not one of :data:`COMPUTE_DTYPES`.
    """
    if compute_dtype is None:
        return None
    try:
        name = jnp.dtype(compute_dtype).name
    except (TypeError, ValueError):
        raise TypeError(f"compute_dtype must be None or one of {COMPUTE_DTYPES} (e.g. "
                        f"jnp.bfloat16), got {compute_dtype!r}.") from None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None or one of {COMPUTE_DTYPES} (e.g. "
                         f"jnp.bfloat16), got {name}; statistics are accumulated in float32 and "
                         "eigendecompositions use eigh_dtype whatever it is.")
    return name


def _cast_floating(value: Any, dtype: Any) -> Any:
    value = jnp.asarray(value)
    return value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value


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
