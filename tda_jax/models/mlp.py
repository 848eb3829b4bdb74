"""A multilayer perceptron built from standard ``nn.Dense`` layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """Fully connected network ``Dense -> activation -> ... -> Dense``.

    Built only from ``nn.Dense`` so that per-example layer statistics can be captured from the
    unmodified module. Trailing input dimensions are flattened.

    Attributes:
      hidden_sizes: widths of the hidden layers, e.g. ``(128, 128)``.
      num_outputs: width of the output layer (classes, or regression outputs).
      activation: elementwise nonlinearity after each hidden layer.

    Example::

        model = MLP(hidden_sizes=(128, 128), num_outputs=10)
        params = model.init(key, jnp.zeros((1, 40)))
        logits = model.apply(params, x)  # [B, 10]
    """

    hidden_sizes: Sequence[int]
    num_outputs: int
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``x`` ``[B, ...]`` to outputs ``[B, num_outputs]``."""
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden_sizes:
            x = self.activation(nn.Dense(width)(x))
        return nn.Dense(self.num_outputs)(x)
