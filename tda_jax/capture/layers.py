"""Finding the Kronecker-structured layers of an unmodified Flax model and capturing their inputs.

A *tracked layer* is one whose parameter gradient for one example is ``sum_t a_t g_t^T``: ``a_t`` the
layer's input at position ``t`` (with a trailing 1 when the layer has a bias), ``g_t`` the gradient
w.r.t. its output at that position. ``flax.linen`` ``Dense``, ``DenseGeneral``, ``Conv`` (through
im2col patches) and ``Embed`` (one-hot inputs) are tracked automatically by intercepting their
``__call__``; custom layers opt in with :func:`tag_linear`. Weight sharing (tokens, convolution
positions, a module called several times) is summed per example.

Every layer's parameters are viewed as one matrix ``W`` of shape ``[in_dim (+1 for bias), out_dim]``
(a Flax ``Dense`` kernel with its bias appended as the last row); :class:`LayerSpec` converts between
that matrix and the Flax parameter tree.

Nothing here changes the model: capture runs the user's ``apply_fn`` inside
``flax.linen.intercept_methods`` (and, for Flax NNX models, with the NNX layers' methods wrapped for
the duration of the capture: :mod:`tda_jax.capture.nnx`) and adds zero *perturbations* to layer
outputs so that one vector-Jacobian product yields every ``g``. ``Embed.attend`` (a tied output
embedding) is recorded as a *transposed* call of the embedding table, so both uses of the shared
parameter are summed per example.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Any
ApplyFn = Callable[[Params, Any], Array]

SUPPORTED_LAYERS = ("flax.linen Dense, DenseGeneral, Conv, Embed (and Embed.attend), flax.nnx "
                    "Linear, LinearGeneral, Conv, Embed (and Embed.attend), or a layer marked with "
                    "tag_linear")


@dataclass(frozen=True)
class LayerSpec:
    """Static description of one tracked layer.

    Attributes:
      name: ``/``-joined Flax module path (e.g. ``"Dense_0"``).
      kind: ``"dense"``, ``"dense_general"``, ``"conv"``, ``"embed"`` or ``"tagged"``.
      path: the module path as a tuple (where its parameters live in the params tree).
      param_names: Flax names of the weight and (optionally) bias parameters.
      kernel_shape: shape of the weight parameter.
      in_dim: rows of the matrix view, bias row included.
      out_dim: columns of the matrix view.
      has_bias: whether the last row of the matrix view is the bias.
      conv_perm: for convolutions, kernel axes order that puts input channels first.
    """

    name: str
    kind: str
    path: tuple[str, ...]
    param_names: tuple[str, ...]
    kernel_shape: tuple[int, ...]
    in_dim: int
    out_dim: int
    has_bias: bool
    conv_perm: tuple[int, ...] | None = None

    @property
    def num_params(self) -> int:
        return self.in_dim * self.out_dim

    def to_matrix(self, layer_params: dict[str, Array]) -> Array:
        """Flax parameters of this layer -> ``[in_dim, out_dim]`` matrix (bias as the last row)."""
        kernel = layer_params[self.param_names[0]]
        if self.conv_perm is not None:
            kernel = jnp.transpose(kernel, self.conv_perm)
        weight = jnp.reshape(kernel, (self.in_dim - int(self.has_bias), self.out_dim))
        if self.has_bias:
            bias = jnp.reshape(layer_params[self.param_names[1]], (1, self.out_dim))
            weight = jnp.concatenate([weight, bias], axis=0)
        return weight

    def from_matrix(self, matrix: Array) -> dict[str, Array]:
        """Inverse of :meth:`to_matrix`; accepts extra leading axes (e.g. ``[Q, in, out]``)."""
        lead = matrix.shape[:-2]
        rows = self.in_dim - int(self.has_bias)
        kernel = matrix[..., :rows, :]
        if self.conv_perm is not None:
            permuted = tuple(self.kernel_shape[i] for i in self.conv_perm)
            kernel = jnp.reshape(kernel, (*lead, *permuted))
            inverse = tuple(int(i) for i in np.argsort(self.conv_perm))
            kernel = jnp.transpose(kernel, (*range(len(lead)), *(len(lead) + i for i in inverse)))
        else:
            kernel = jnp.reshape(kernel, (*lead, *self.kernel_shape))
        out = {self.param_names[0]: kernel}
        if self.has_bias:
            out[self.param_names[1]] = jnp.reshape(matrix[..., rows, :], (*lead, *self.bias_shape))
        return out

    @property
    def bias_shape(self) -> tuple[int, ...]:
        """Shape of the bias: the kernel's trailing (feature) axes, e.g. ``(heads, head_dim)``."""
        for start in range(len(self.kernel_shape) - 1, -1, -1):
            if math.prod(self.kernel_shape[start:]) == self.out_dim:
                return tuple(self.kernel_shape[start:])
        return (self.out_dim,)


@dataclass
class _Record:
    """What one layer call produced during a traced forward pass.

    A *transposed* call uses the layer's matrix ``W [in, out]`` as ``y = x W^T`` (``Embed.attend``:
    tied output embeddings). Its gradient contribution ``sum_t g_t x_t^T`` has the output gradient
    on the ``in`` side and the input ``x [B, T, out]`` on the ``out`` side.
    """

    spec: LayerSpec
    inputs: Array  # [B, T, in_dim], or [B, T, out_dim] for a transposed call
    outputs_shape: tuple[int, ...]
    transposed: bool = False


@dataclass
class _CaptureContext:
    perturbations: dict[str, Array] | None
    records: dict[str, list[_Record]]


_ACTIVE: contextvars.ContextVar[_CaptureContext | None] = contextvars.ContextVar(
    "tda_jax_capture", default=None
)


def _with_ones(x: Array) -> Array:
    return jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)


def _as_positions(x: Array, batch: int) -> Array:
    """``[B, ..., F] -> [B, T, F]`` with every middle axis a shared position."""
    return jnp.reshape(x, (batch, -1, x.shape[-1]))


def _module_path(module: nn.Module) -> tuple[str, ...]:
    return tuple(str(p) for p in module.scope.path)


def _param_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    params = module.scope.variables().get("params", {})
    return {k: tuple(np.shape(v)) for k, v in params.items()}


def _dense_record(module: nn.Dense, x: Array) -> tuple[LayerSpec, Array]:
    shapes = _param_shapes(module)
    has_bias = "bias" in shapes
    a = _as_positions(x, x.shape[0])
    if has_bias:
        a = _with_ones(a)
    kernel_shape = shapes["kernel"]
    spec = LayerSpec(
        name="/".join(_module_path(module)), kind="dense", path=_module_path(module),
        param_names=("kernel", "bias") if has_bias else ("kernel",), kernel_shape=kernel_shape,
        in_dim=kernel_shape[0] + int(has_bias), out_dim=kernel_shape[1], has_bias=has_bias,
    )
    return spec, a


def _dense_general_record(module: nn.DenseGeneral, x: Array) -> tuple[LayerSpec, Array]:
    name = "/".join(_module_path(module))
    if module.batch_dims:
        raise ValueError(f"layer {name!r}: DenseGeneral with batch_dims is not supported; "
                         "mark the computation with tda_jax.capture.tag_linear instead.")
    shapes = _param_shapes(module)
    return _dense_general_call(name, _module_path(module), x, module.axis, shapes["kernel"],
                               "bias" in shapes)


def _dense_general_call(name: str, path: tuple[str, ...], x: Array, axis: Any,
                        kernel_shape: tuple[int, ...], has_bias: bool) -> tuple[LayerSpec, Array]:
    """Spec and inputs of a kernel ``[*in_features, *out_features]`` contracting ``axis`` of ``x``
    (linen ``DenseGeneral``, nnx ``LinearGeneral``): every other non-batch axis is a position."""
    axis = axis if isinstance(axis, Sequence) else (axis,)
    axis = tuple(sorted(a % x.ndim for a in axis))
    if 0 in axis:
        raise ValueError(f"layer {name!r}: DenseGeneral contracts the batch axis; not supported.")
    rest = [i for i in range(x.ndim) if i not in axis]
    x = jnp.transpose(x, (*rest, *axis))
    in_features = math.prod(x.shape[len(rest):])
    a = jnp.reshape(x, (x.shape[0], -1, in_features))
    if has_bias:
        a = _with_ones(a)
    out_dim = math.prod(kernel_shape) // in_features
    spec = LayerSpec(
        name=name, kind="dense_general", path=path,
        param_names=("kernel", "bias") if has_bias else ("kernel",), kernel_shape=kernel_shape,
        in_dim=in_features + int(has_bias), out_dim=out_dim, has_bias=has_bias,
    )
    return spec, a


def _conv_padding(padding: Any, num_spatial: int, name: str) -> Any:
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise ValueError(f"layer {name!r}: Conv padding {padding!r} is not supported for capture; "
                         "use 'SAME', 'VALID' or explicit integer padding.")
    if isinstance(padding, int):
        return [(padding, padding)] * num_spatial
    out = []
    for p in padding:
        out.append((p, p) if isinstance(p, int) else tuple(p))
    return out


def _conv_record(module: nn.Conv, x: Array) -> tuple[LayerSpec, Array]:
    name = "/".join(_module_path(module))
    if module.feature_group_count != 1:
        raise ValueError(f"layer {name!r}: grouped convolutions (feature_group_count="
                         f"{module.feature_group_count}) are not supported for capture.")
    if isinstance(module, nn.ConvTranspose) or not isinstance(module, nn.Conv):
        raise ValueError(f"layer {name!r}: only flax.linen.Conv is supported.")
    shapes = _param_shapes(module)
    return _conv_call(name, _module_path(module), x, shapes["kernel"], "bias" in shapes,
                      module.kernel_size, module.strides, module.padding, module.input_dilation,
                      module.kernel_dilation)


def _conv_call(name: str, path: tuple[str, ...], x: Array, kernel_shape: tuple[int, ...],
               has_bias: bool, kernel_size: Sequence[int], strides: Any, padding: Any,
               input_dilation: Any, kernel_dilation: Any) -> tuple[LayerSpec, Array]:
    """Spec and im2col inputs of an ungrouped convolution (linen and nnx ``Conv``) of ``x``
    ``[B, *spatial, in]`` with a kernel ``[*kernel_size, in, out]``."""
    kernel_size = tuple(kernel_size)
    num_spatial = len(kernel_size)
    if x.ndim != num_spatial + 2:
        raise ValueError(f"layer {name!r}: expected batched input of rank {num_spatial + 2} "
                         f"([batch, spatial..., channels]), got shape {x.shape}.")

    def _tuple(v, default=1):
        if v is None:
            return (default,) * num_spatial
        return (v,) * num_spatial if isinstance(v, int) else tuple(v)

    spatial = "".join("HWDXYZ"[i] for i in range(num_spatial))
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    patches = jax.lax.conv_general_dilated_patches(
        x, kernel_size, _tuple(strides), _conv_padding(padding, num_spatial, name),
        lhs_dilation=_tuple(input_dilation), rhs_dilation=_tuple(kernel_dilation),
        dimension_numbers=dims,
    )
    a = _as_positions(patches, x.shape[0])
    if has_bias:
        a = _with_ones(a)
    # kernel [*kernel_size, in, out]; patches order features (in, *kernel)
    perm = (num_spatial, *range(num_spatial), num_spatial + 1)
    spec = LayerSpec(
        name=name, kind="conv", path=path,
        param_names=("kernel", "bias") if has_bias else ("kernel",), kernel_shape=kernel_shape,
        in_dim=math.prod(kernel_shape[:-1]) + int(has_bias), out_dim=kernel_shape[-1],
        has_bias=has_bias, conv_perm=perm,
    )
    return spec, a


def embed_spec(name: str, path: tuple[str, ...], shape: tuple[int, ...],
               param_name: str = "embedding") -> LayerSpec:
    """The spec of an embedding table ``[num_embeddings, features]`` (one-hot inputs)."""
    return LayerSpec(name=name, kind="embed", path=path, param_names=(param_name,),
                     kernel_shape=shape, in_dim=shape[0], out_dim=shape[1], has_bias=False)


def embed_inputs(name: str, x: Array, num_embeddings: int) -> Array:
    """One-hot layer inputs ``[B, T, num_embeddings]`` of an embedding lookup of ids ``x``."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"layer {name!r}: Embed expects integer token ids, got dtype {x.dtype}.")
    return jax.nn.one_hot(jnp.reshape(x, (x.shape[0], -1)), num_embeddings, dtype=jnp.float32)


def _embed_record(module: nn.Embed, x: Array) -> tuple[LayerSpec, Array]:
    name = "/".join(_module_path(module))
    spec = embed_spec(name, _module_path(module), _param_shapes(module)["embedding"])
    return spec, embed_inputs(name, x, module.num_embeddings)


_RECORDERS: list[tuple[type, Callable]] = [
    (nn.DenseGeneral, _dense_general_record),
    (nn.Dense, _dense_record),
    (nn.Conv, _conv_record),
    (nn.Embed, _embed_record),
]


def add_record(spec: LayerSpec, a: Array, y: Array, transposed: bool = False) -> Array:
    """Records one call of a tracked layer in the active capture; returns ``y`` (perturbed).

    Outside capture it returns ``y`` unchanged. ``a [B, T, in]`` are the call's layer inputs
    (``[B, T, out]`` inputs ``x`` for a transposed call ``y = x W^T``).
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        return y
    return _add_record(ctx, spec, a, y, transposed)


def _add_record(ctx: _CaptureContext, spec: LayerSpec, a: Array, y: Array,
                transposed: bool = False) -> Array:
    calls = ctx.records.setdefault(spec.name, [])
    key = f"{spec.name}#{len(calls)}"
    calls.append(_Record(spec=spec, inputs=a, outputs_shape=tuple(y.shape), transposed=transposed))
    if ctx.perturbations is not None:
        if key not in ctx.perturbations:
            raise ValueError(f"layer call {key!r} was not seen when the model's layers were "
                             "discovered; the model's structure must not depend on the batch.")
        y = y + ctx.perturbations[key].astype(y.dtype)
    return y


def _interceptor(next_fun, args, kwargs, context):
    ctx = _ACTIVE.get()
    module = context.module
    if ctx is None:
        return next_fun(*args, **kwargs)
    if isinstance(module, nn.Embed) and context.method_name == "attend":
        y = next_fun(*args, **kwargs)
        spec = embed_spec("/".join(_module_path(module)), _module_path(module),
                          _param_shapes(module)["embedding"])
        return _add_record(ctx, spec, _as_positions(args[0], args[0].shape[0]), y, transposed=True)
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    for cls, recorder in _RECORDERS:
        if type(module) is cls or (cls is not nn.Dense and isinstance(module, cls)):
            y = next_fun(*args, **kwargs)
            spec, a = recorder(module, args[0])
            return _add_record(ctx, spec, a, y)
    return next_fun(*args, **kwargs)


def tag_linear(module: nn.Module, inputs: Array, outputs: Array, kernel: str = "kernel",
               bias: str | None = None) -> Array:
    """Marks a custom layer computing ``outputs = inputs @ kernel (+ bias)`` for capture.

    Call it inside the custom module's ``__call__`` on the layer's result and return what it
    returns. Outside capture it is the identity. ``inputs`` is ``[B, ..., in]``, ``outputs``
    ``[B, ..., out]``, the kernel parameter ``[in, out]`` and the bias ``[out]``.

    Example::

        class MyLinear(nn.Module):
            @nn.compact
            def __call__(self, x):
                w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 3))
                return tag_linear(self, x, x @ w, kernel="w")
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        return outputs
    shapes = _param_shapes(module)
    name = "/".join(_module_path(module))
    if kernel not in shapes or (bias is not None and bias not in shapes):
        raise ValueError(f"tag_linear on layer {name!r}: parameters {kernel!r}/{bias!r} not found; "
                         f"the layer has {sorted(shapes)}.")
    kernel_shape = shapes[kernel]
    if len(kernel_shape) != 2 or kernel_shape[0] != inputs.shape[-1]:
        raise ValueError(f"tag_linear on layer {name!r}: kernel shape {kernel_shape} does not map "
                         f"inputs of shape {inputs.shape} to outputs of shape {outputs.shape}.")
    a = _as_positions(inputs, inputs.shape[0])
    if bias is not None:
        a = _with_ones(a)
    spec = LayerSpec(
        name=name, kind="tagged", path=_module_path(module),
        param_names=(kernel, bias) if bias is not None else (kernel,), kernel_shape=kernel_shape,
        in_dim=kernel_shape[0] + int(bias is not None), out_dim=kernel_shape[1],
        has_bias=bias is not None,
    )
    return _add_record(ctx, spec, a, outputs)


@contextlib.contextmanager
def _capturing(perturbations: dict[str, Array] | None):
    from tda_jax.capture.nnx import nnx_layers_recorded  # nnx.py builds on this module

    ctx = _CaptureContext(perturbations=perturbations, records={})
    token = _ACTIVE.set(ctx)
    try:
        with nn.intercept_methods(_interceptor), nnx_layers_recorded():
            yield ctx
    finally:
        _ACTIVE.reset(token)


def forward_with_capture(apply_fn: ApplyFn, params: Params, inputs: Any,
                         perturbations: dict[str, Array] | None = None
                         ) -> tuple[Array, dict[str, list[_Record]], dict[str, LayerSpec]]:
    """Runs ``apply_fn(params, inputs)`` while recording every call of every tracked layer.

    Args:
      apply_fn: ``(params, inputs) -> outputs``; an unmodified Flax ``apply`` wrapper.
      params: model parameters.
      inputs: a batch whose leading axis is the example axis.
      perturbations: optional ``{"<layer>#<call>": zeros of the call's output shape}`` added to
        layer outputs (their gradients are the output gradients ``g``).

    Returns:
      ``(outputs, calls, specs)``: ``calls[name]`` lists the layer's calls in order (each with its
      inputs ``[B, T, in_dim]``, or ``[B, T, out_dim]`` for a transposed call).
    """
    with _capturing(perturbations) as ctx:
        outputs = apply_fn(params, inputs)
    specs = {}
    for name, calls in ctx.records.items():
        specs[name] = calls[0].spec
        if any((c.spec.in_dim, c.spec.out_dim) != (calls[0].spec.in_dim, calls[0].spec.out_dim)
               for c in calls):
            raise ValueError(f"layer {name!r} was called with inputs of different sizes.")
    return outputs, dict(ctx.records), specs


def output_shapes(apply_fn: ApplyFn, params: Params, inputs: Any
                  ) -> tuple[dict[str, LayerSpec], dict[str, tuple[int, ...]], Any]:
    """Discovers tracked layers abstractly (no FLOPs) for a batch like ``inputs``.

    Returns:
      ``(specs, perturbation_shapes, output_shape_dtype)`` where ``perturbation_shapes`` maps
      ``"<layer>#<call>"`` to the output shape of that call.
    """
    found: dict[str, Any] = {}

    def run(p, x):
        with _capturing(None) as ctx:
            out = apply_fn(p, x)
        found["specs"] = {n: calls[0].spec for n, calls in ctx.records.items()}
        found["shapes"] = {f"{n}#{i}": c.outputs_shape for n, calls in ctx.records.items()
                           for i, c in enumerate(calls)}
        return out

    try:
        out_struct = jax.eval_shape(run, params, inputs)
    except (TypeError, ValueError, flax.errors.FlaxError) as err:
        shapes = jax.tree.map(lambda v: tuple(np.shape(v)), inputs)
        raise ValueError(f"applying the model to inputs of shape {shapes} failed: {err}. Check that "
                        "the batch matches the parameters (feature sizes, dtypes).") from err
    return found["specs"], found["shapes"], out_struct


def _flatten_params(params: Params) -> dict[tuple[str, ...], Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat[tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)] = leaf
    return flat


def params_root(params: Params) -> Params:
    """The ``params`` collection if ``params`` is a Flax variables dict, else ``params`` itself."""
    if isinstance(params, dict) and "params" in params and len(params) >= 1:
        return params["params"]
    return params


def untracked_parameters(params: Params, specs: dict[str, LayerSpec]) -> list[str]:
    """``/``-joined paths of the parameters that no tracked layer owns (e.g. LayerNorm scales)."""
    owned = {(*s.path, n) for s in specs.values() for n in s.param_names}
    leaves = _flatten_params(params_root(params))
    return sorted("/".join(k) for k in leaves if k not in owned)


def check_coverage(params: Params, specs: dict[str, LayerSpec], allow_untracked: bool) -> list[str]:
    """Raises if parameters exist that no tracked layer owns (unless ``allow_untracked``).

    Returns:
      the untracked parameter paths (empty when every parameter is tracked).
    """
    untracked = untracked_parameters(params, specs)
    if not specs:
        raise ValueError(f"the model has no tracked layers; supported: {SUPPORTED_LAYERS}.")
    if untracked and not allow_untracked:
        raise ValueError(
            "parameters outside tracked layers: " + ", ".join(untracked[:10])
            + (" ..." if len(untracked) > 10 else "")
            + f". Supported layers: {SUPPORTED_LAYERS}. Mark custom layers with "
            "tda_jax.capture.tag_linear, or pass allow_untracked=True to leave these parameters "
            "out of attribution."
        )
    return untracked


def layer_params(params: Params, spec: LayerSpec) -> dict[str, Array]:
    """The parameter dict of one tracked layer."""
    node = params_root(params)
    for key in spec.path:
        node = node[key]
    return {n: node[n] for n in spec.param_names}
