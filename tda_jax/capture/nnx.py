"""Capture for Flax NNX models: ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` and ``nnx.Embed``.

NNX layers are plain Python objects whose methods run eagerly, so there is no method interceptor
like linen's ``intercept_methods``. For the duration of a capture (and only then) the forward
methods of the supported layer classes are wrapped at class level, the way
``nnx.capture(..., method_outputs=...)`` instruments module methods: the wrapper calls the original
method, then hands the call's layer inputs and output to :func:`tda_jax.capture.layers.add_record`,
which records them and adds the capture's zero perturbation to the output (NNX's
``Module.perturb`` idea). Outside a capture the classes are untouched; a wrapped method called
outside a capture (e.g. from another thread) behaves exactly as the original.

An NNX layer does not know where it sits in its model, and a record needs the layer's path in the
``params`` dict. The bridge :class:`tda_jax.models.apply.NNXApply` (``apply_fn_of(nnx_model)``)
rebuilds the model for each call and runs it inside :func:`nnx_module_paths`, which names every
submodule by its ``nnx.iter_modules`` path (keys as strings, list indices ``"0"``, ``"1"``, ...),
the same path its parameters have in ``tda_jax.models.params_of(model)``.

Supported: ``Linear`` (kind ``"dense"``), ``LinearGeneral`` without ``batch_axis`` (kind
``"dense_general"``, as inside ``nnx.MultiHeadAttention``: contracted axes are the features, every
other non-batch axis a position), ``Conv`` without groups or a kernel mask (im2col patches,
``'SAME'``/``'VALID'``/integer padding), ``Embed.__call__`` (one-hot inputs) and ``Embed.attend``
(a transposed call of the table: tied output embeddings). Layers called inside NNX transforms within
the model (``nnx.scan``, ``nnx.remat``, ``nnx.vmap``) are rebuilt by the transform and cannot be
located; a capture raises for them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator

import numpy as np
from flax import nnx

from tda_jax.capture.layers import (
    _ACTIVE,
    Array,
    LayerSpec,
    _as_positions,
    _conv_call,
    _dense_general_call,
    _with_ones,
    add_record,
    embed_inputs,
    embed_spec,
)

# id(module) -> its path (string keys) in the params dict, for the model being applied.
_PATHS: contextvars.ContextVar[dict[int, tuple[str, ...]] | None] = contextvars.ContextVar(
    "tda_jax_nnx_paths", default=None)


@contextlib.contextmanager
def nnx_module_paths(model: nnx.Module) -> Iterator[None]:
    """Makes the submodules of ``model`` locatable by a capture while the model is applied.

    Used by :class:`tda_jax.models.apply.NNXApply`; call it yourself only in a hand-written NNX
    ``apply_fn`` (around the model call, with ``params`` keyed as :func:`tda_jax.models.params_of`
    keys them). Outside a capture it does nothing.
    """
    if _ACTIVE.get() is None:
        yield
        return
    paths = {id(m): tuple(str(k) for k in path) for path, m in nnx.iter_modules(model)}
    token = _PATHS.set(paths)
    try:
        yield
    finally:
        _PATHS.reset(token)


def _path_of(layer: nnx.Module) -> tuple[str, ...]:
    paths = _PATHS.get()
    path = None if paths is None else paths.get(id(layer))
    if path is None:
        raise ValueError(
            f"an nnx.{type(layer).__name__} layer was called during capture, but its place in the "
            "model is unknown: apply NNX models through tda_jax.models.apply_fn_of(model) with "
            "params = tda_jax.models.params_of(model) (or wrap the call in "
            "tda_jax.capture.nnx_module_paths(model)); layers created or rebuilt during the call "
            "(inside nnx.scan/remat/vmap) cannot be located.")
    return path


def _shape(variable: nnx.Variable) -> tuple[int, ...]:
    return tuple(np.shape(variable.get_value()))


def _weights(layer: nnx.Module) -> tuple[tuple[int, ...], bool]:
    return _shape(layer.kernel), getattr(layer, "bias", None) is not None


def _linear(layer: nnx.Linear, x: Array, path: tuple[str, ...]) -> tuple[LayerSpec, Array]:
    kernel_shape, has_bias = _weights(layer)
    a = _as_positions(x, x.shape[0])
    if has_bias:
        a = _with_ones(a)
    spec = LayerSpec(
        name="/".join(path), kind="dense", path=path,
        param_names=("kernel", "bias") if has_bias else ("kernel",), kernel_shape=kernel_shape,
        in_dim=kernel_shape[0] + int(has_bias), out_dim=kernel_shape[1], has_bias=has_bias,
    )
    return spec, a


def _linear_general(layer: nnx.LinearGeneral, x: Array, path: tuple[str, ...]
                    ) -> tuple[LayerSpec, Array]:
    name = "/".join(path)
    if layer.batch_axis:
        raise ValueError(f"layer {name!r}: nnx.LinearGeneral with batch_axis is not supported for "
                         "capture.")
    kernel_shape, has_bias = _weights(layer)
    return _dense_general_call(name, path, x, layer.axis, kernel_shape, has_bias)


def _conv(layer: nnx.Conv, x: Array, path: tuple[str, ...]) -> tuple[LayerSpec, Array]:
    name = "/".join(path)
    if layer.feature_group_count != 1:
        raise ValueError(f"layer {name!r}: grouped convolutions (feature_group_count="
                         f"{layer.feature_group_count}) are not supported for capture.")
    if layer.mask is not None:
        raise ValueError(f"layer {name!r}: nnx.Conv with a kernel mask is not supported for "
                         "capture.")
    kernel_shape, has_bias = _weights(layer)
    return _conv_call(name, path, x, kernel_shape, has_bias, layer.kernel_size, layer.strides,
                      layer.padding, layer.input_dilation, layer.kernel_dilation)


def _embed(layer: nnx.Embed, x: Array, path: tuple[str, ...]) -> tuple[LayerSpec, Array]:
    name = "/".join(path)
    spec = embed_spec(name, path, _shape(layer.embedding))
    return spec, embed_inputs(name, x, layer.num_embeddings)


def _attend(layer: nnx.Embed, query: Array, path: tuple[str, ...]) -> tuple[LayerSpec, Array]:
    return embed_spec("/".join(path), path, _shape(layer.embedding)), _as_positions(
        query, query.shape[0])


# (class, method, name of the method's input argument, recorder, transposed call)
_METHODS: tuple[tuple[type, str, str, Callable, bool], ...] = (
    (nnx.Linear, "__call__", "inputs", _linear, False),
    (nnx.LinearGeneral, "__call__", "inputs", _linear_general, False),
    (nnx.Conv, "__call__", "inputs", _conv, False),
    (nnx.Embed, "__call__", "inputs", _embed, False),
    (nnx.Embed, "attend", "query", _attend, True),
)


def _recording(method: Callable, argument: str, recorder: Callable, transposed: bool) -> Callable:
    # updated=() keeps the original's attributes (e.g. nnx.capture's '_does_capturing' marker) off
    # the wrapper, so the two instrumentations never mistake each other's wrappers.
    @functools.wraps(method, updated=())
    def recorded(self, *args, **kwargs):
        outputs = method(self, *args, **kwargs)
        if _ACTIVE.get() is None:
            return outputs
        x = args[0] if args else kwargs[argument]
        spec, a = recorder(self, x, _path_of(self))
        return add_record(spec, a, outputs, transposed=transposed)

    recorded._tda_jax_original = method
    return recorded


_LOCK = threading.Lock()
_DEPTH = 0


def _install() -> None:
    for cls, name, argument, recorder, transposed in _METHODS:
        setattr(cls, name, _recording(cls.__dict__[name], argument, recorder, transposed))


def _uninstall() -> None:
    for cls, name, *_ in _METHODS:
        original = getattr(cls.__dict__[name], "_tda_jax_original", None)
        if original is not None:
            setattr(cls, name, original)


@contextlib.contextmanager
def nnx_layers_recorded() -> Iterator[None]:
    """Wraps the supported NNX layer methods for the duration of the block (re-entrant and
    thread-safe: the classes are restored when the outermost block exits)."""
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            _install()
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _uninstall()
