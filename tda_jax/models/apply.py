"""The model convention: a Flax module for training, ``apply_fn(params, inputs)`` for attribution.

Training and evaluation (:mod:`tda_jax.training`, :mod:`tda_jax.evaluation`) take the
``nn.Module`` itself and work with its full *variables*, the dict ``model.init(key, x)`` returns
(``{"params": ...}``). Attribution (:mod:`tda_jax.attribution`, :mod:`tda_jax.curvature`) takes a
pure ``apply_fn(params, inputs) -> outputs [B, C]`` and the pytree it differentiates. The bridge is

    apply_fn = apply_fn_of(model)             # (params, x) -> model.apply({"params": params}, x)
    scores = pairwise_scores(apply_fn, variables["params"], ...)

``apply_fn_of`` returns a named, hashable callable (equal for equal modules), so jitted or cached
code that receives it compiles once per architecture instead of once per fresh lambda.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """``(params, inputs) -> model.apply({"params": params}, inputs)``; see :func:`apply_fn_of`."""

    model: nn.Module

    def __call__(self, params: Any, inputs: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, inputs)


def apply_fn_of(model: nn.Module) -> ModelApply:
    """The attribution-side ``apply_fn(params, inputs)`` of a Flax module (``params`` is
    ``variables["params"]`` of the variables that training returns)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
    return ModelApply(model)


def output_shape_of(model: nn.Module, example_inputs: Any) -> tuple[int, ...]:
    """The shape of the model's outputs for ``example_inputs``, from one abstract forward
    (``jax.eval_shape``: no parameters are allocated and nothing is computed).

    Args:
      model: the Flax module.
      example_inputs: ``[B, ...]`` inputs (one row is enough; token ids stay integers).

    Returns:
      e.g. ``(B, C)`` for a classifier, ``(B, T, V)`` for a language model.
    """
    outputs = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x)[0], example_inputs)
    return tuple(int(d) for d in outputs.shape)


def num_outputs_of(model: nn.Module, example_inputs: Any) -> int:
    """The size of the model's last output axis, from one abstract forward (:func:`output_shape_of`).

    Args:
      model: the Flax module.
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
