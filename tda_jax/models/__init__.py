"""Small Flax (linen) models built from standard layers, so attribution needs no model changes.

See :mod:`tda_jax.models.apply` for how a module (linen or NNX) relates to attribution's
``apply_fn(params, x)``.
"""

from tda_jax.models.apply import (
    ModelApply,
    NNXApply,
    apply_fn_of,
    num_outputs_of,
    output_shape_of,
    params_of,
)
from tda_jax.models.cnn import CNN1D, CNN2D
from tda_jax.models.mlp import MLP
from tda_jax.models.transformer import DecoderBlock, FeedForward, TransformerLM

__all__ = ["CNN1D", "CNN2D", "MLP", "DecoderBlock", "FeedForward", "ModelApply", "NNXApply",
           "TransformerLM", "apply_fn_of", "num_outputs_of", "output_shape_of", "params_of"]
