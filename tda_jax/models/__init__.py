"""Small Flax (linen) models built from standard layers, so attribution needs no model changes."""

from tda_jax.models.cnn import CNN1D, CNN2D
from tda_jax.models.mlp import MLP

__all__ = ["CNN1D", "CNN2D", "MLP"]
