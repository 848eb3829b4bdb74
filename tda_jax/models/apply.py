"""The model convention: a Flax module for training, ``apply_fn(params, inputs)`` for attribution.

Training and evaluation (:mod:`tda_jax.training`, :mod:`tda_jax.evaluation`) take the
``nn.Module`` itself and work with its full *variables*, the dict ``model.init(key, x)`` returns
(``{"params": ...}``). Attribution (:mod:`tda_jax.attribution`, :mod:`tda_jax.curvature`) takes a
pure ``apply_fn(params, inputs) -> outputs [B, C]`` and the pytree it differentiates. The bridge is

    apply_fn = apply_fn_of(model)             # (params, x) -> model.apply({"params": params}, x)
    scores = pairwise_scores(apply_fn, variables["params"], ...)

Flax NNX models (``flax.nnx.Module``, which hold their own parameters) use the same bridge and
:func:`params_of` for the parameters:

    apply_fn, params = apply_fn_of(model), params_of(model)   # model: an nnx.Module
    scores = pairwise_scores(apply_fn, params, ...)

``params_of`` is a plain nested dict of the model's ``nnx.Param`` arrays keyed by attribute path,
every key a string (list entries of ``nnx.List``/``nnx.Sequential`` as ``"0"``, ``"1"``, ...), e.g.
``{"layers": {"0": {"kernel": ..., "bias": ...}}}``. The NNX ``apply_fn`` rebuilds the model from
these arrays and the model's other state (batch statistics, RNG state: fixed at ``apply_fn_of``
time) with ``nnx.merge`` and calls it; it never mutates the model, so it is a pure function under
``jit``/``vmap``/``eval_shape``. Put models with dropout or batch normalisation in evaluation mode
(``model.eval()``) before building it.

``apply_fn_of`` returns a named, hashable callable (equal for equal modules: for NNX, equal graph
definitions and equal non-parameter state), so jitted or cached code that receives it compiles once
per architecture instead of once per fresh lambda.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from tda_jax.capture.nnx import nnx_module_paths
from tda_jax.io.fingerprint import fingerprint


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """``(params, inputs) -> model.apply({"params": params}, inputs)``; see :func:`apply_fn_of`."""

    model: nn.Module

    def __call__(self, params: Any, inputs: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, inputs)


@dataclasses.dataclass(frozen=True, eq=False)
class NNXApply:
    """``(params, inputs) -> nnx.merge(graphdef, params, state)(inputs)``; see :func:`apply_fn_of`.

    Attributes:
      graphdef: the model's ``nnx.GraphDef``.
      state: the model's non-``Param`` state as a pure dict (closed over, never updated).
      param_paths: NNX paths of the ``Param`` variables (list indices as ints), to map the
        string-keyed ``params`` of :func:`params_of` back to NNX's keys.
      state_fingerprint: content hash of ``state``; with ``graphdef`` and ``param_paths`` it decides
        equality and the hash.
    """

    graphdef: Any
    state: Any
    param_paths: tuple[tuple[Any, ...], ...]
    state_fingerprint: str

    def _key(self) -> tuple:
        return (self.graphdef, self.param_paths, self.state_fingerprint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NNXApply) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, params: Any, inputs: jax.Array) -> jax.Array:
        nested: dict[Any, Any] = {}
        for path in self.param_paths:
            node, target = params, nested
            try:
                for key in path:
                    node = node[str(key)]
            except (KeyError, TypeError, IndexError) as err:
                raise ValueError(f"params has no entry {'/'.join(map(str, path))!r}; pass "
                                 "params_of(model) (string keys) or a tree of the same "
                                 "structure.") from err
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = node
        model = nnx.merge(self.graphdef, nested, self.state)
        with nnx_module_paths(model):
            return model(inputs)


def _hashable_leaves(tree: Any) -> Any:
    return jax.tree.map(lambda v: jax.random.key_data(v) if jax.dtypes.issubdtype(
        getattr(v, "dtype", None), jax.dtypes.prng_key) else v, tree)


def _string_keyed(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {str(k): _string_keyed(v) for k, v in tree.items()}
    return tree


def params_of(model: nnx.Module) -> dict[str, Any]:
    """The parameters of a Flax NNX model as attribution's ``params``: a nested dict of its
    ``nnx.Param`` arrays keyed by attribute path, all keys strings (``"0"`` for list entries).

    Use with ``apply_fn_of(model)``. A linen module holds no parameters: use
    ``variables["params"]`` from ``model.init`` (or training) instead.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"params_of takes a flax.nnx Module, got {type(model).__name__}; for a "
                        "flax.linen module use variables['params'] from model.init or training.")
    return _string_keyed(nnx.state(model, nnx.Param).to_pure_dict())


def apply_fn_of(model: nn.Module | nnx.Module) -> ModelApply | NNXApply:
    """The attribution-side ``apply_fn(params, inputs)`` of a Flax module.

    Args:
      model: a ``flax.linen`` Module (``params`` is then ``variables["params"]`` of the variables
        that training returns) or a ``flax.nnx`` Module (``params`` is :func:`params_of(model)`;
        the model's other state is fixed now).

    Returns:
      A hashable callable, equal for equal models.
    """
    if isinstance(model, nnx.Module):
        graphdef, params, state = nnx.split(model, nnx.Param, ...)
        paths = tuple(tuple(getattr(k, "key", k) for k in path) for path, _ in
                      jax.tree_util.tree_flatten_with_path(params.to_pure_dict())[0])
        state = state.to_pure_dict()
        # The graph definition fixes the state's structure; the fingerprint pins its values.
        return NNXApply(graphdef, state, paths, fingerprint(_hashable_leaves(state)))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}")
    return ModelApply(model)


def output_shape_of(model: nn.Module | nnx.Module, example_inputs: Any) -> tuple[int, ...]:
    """The shape of the model's outputs for ``example_inputs``, from one abstract forward
    (``jax.eval_shape``: no parameters are allocated and nothing is computed).

    Args:
      model: the Flax module (linen or NNX).
      example_inputs: ``[B, ...]`` inputs (one row is enough; token ids stay integers).

    Returns:
      e.g. ``(B, C)`` for a classifier, ``(B, T, V)`` for a language model.
    """
    if isinstance(model, nnx.Module):
        outputs = jax.eval_shape(apply_fn_of(model), params_of(model), example_inputs)
        return tuple(int(d) for d in outputs.shape)
    outputs = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x)[0], example_inputs)
    return tuple(int(d) for d in outputs.shape)


def num_outputs_of(model: nn.Module | nnx.Module, example_inputs: Any) -> int:
    """The size of the model's last output axis, from one abstract forward (:func:`output_shape_of`).

    Args:
      model: the Flax module (linen or NNX).
      example_inputs: ``[B, ...]`` inputs (one row is enough).

    Returns:
      ``C`` of outputs ``[B, C]``, or the vocabulary ``V`` of sequence outputs ``[B, T, V]``.
    """
    shape = output_shape_of(model, example_inputs)
    if len(shape) not in (2, 3):
        raise ValueError(f"the model must map inputs [B, ...] to outputs [B, C] (or [B, T, V] for "
                         f"a sequence model); {type(model).__name__} gives outputs of shape {shape} "
                         f"for inputs {example_inputs.shape}")
    return shape[-1]
