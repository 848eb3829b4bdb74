"""Capture: per-example layer statistics from unmodified Flax models.

Public API:
  * :func:`layer_statistics`: layer inputs ``a [B, T, in]`` and output gradients ``g [K, B, T, out]``.
  * :func:`tag_linear`: opt a custom layer into capture.
  * :func:`per_example_gradients`: ``vmap(grad)`` per-example gradients of any loss.
  * :class:`LayerSpec`: static description of a tracked layer (matrix view of its parameters).
  * :func:`nnx_module_paths`: locate the layers of a Flax NNX model in a hand-written ``apply_fn``
    (``tda_jax.models.apply_fn_of`` does this for you).
"""

from tda_jax.capture.layers import (
    SUPPORTED_LAYERS,
    LayerSpec,
    check_coverage,
    forward_with_capture,
    layer_params,
    output_shapes,
    params_root,
    tag_linear,
)
from tda_jax.capture.nnx import nnx_module_paths
from tda_jax.capture.statistics import (
    layer_gradients,
    layer_statistics,
    loss_cotangents,
    per_example_gradients,
)

__all__ = [
    "SUPPORTED_LAYERS",
    "LayerSpec",
    "check_coverage",
    "forward_with_capture",
    "layer_gradients",
    "layer_params",
    "layer_statistics",
    "loss_cotangents",
    "nnx_module_paths",
    "output_shapes",
    "params_root",
    "per_example_gradients",
    "tag_linear",
]
