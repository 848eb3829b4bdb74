"""Small convolutional classifiers built from standard ``nn.Conv`` and ``nn.Dense`` layers.

Each convolution has stride 2 (halving the spatial size) so no pooling layers are needed; the
feature map is flattened into one hidden ``nn.Dense`` layer and an output layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax


class CNN1D(nn.Module):
    """1-D convolutional network for sequences such as MNIST-1D.

    Attributes:
      channels: output channels of each stride-2 ``nn.Conv`` layer.
      kernel_size: convolution width.
      hidden_size: width of the dense hidden layer.
      num_outputs: number of outputs (classes).
    """

    channels: Sequence[int] = (16, 32)
    kernel_size: int = 5
    hidden_size: int = 64
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``x`` ``[B, L]`` (or ``[B, L, C]``) to outputs ``[B, num_outputs]``."""
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"CNN1D expects inputs [B, L] or [B, L, C], got shape {x.shape}")
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (self.kernel_size,), strides=(2,), padding="SAME")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden_size)(x))
        return nn.Dense(self.num_outputs)(x)


class CNN2D(nn.Module):
    """2-D convolutional network for small images such as the 8x8 digits.

    Attributes:
      channels: output channels of each stride-2 ``nn.Conv`` layer.
      kernel_size: convolution height and width.
      hidden_size: width of the dense hidden layer.
      num_outputs: number of outputs (classes).
    """

    channels: Sequence[int] = (16, 32)
    kernel_size: int = 3
    hidden_size: int = 64
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, H, W, C]`` (or ``[B, H, W]``, or square ``[B, H*W]``) to ``[B, outs]``."""
        if x.ndim == 2:
            side = math.isqrt(x.shape[1])
            if side * side != x.shape[1]:
                raise ValueError(f"CNN2D got flat inputs {x.shape} whose width is not a square; "
                                 "pass images [B, H, W, C].")
            x = x.reshape(x.shape[0], side, side, 1)
        elif x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"CNN2D expects images [B, H, W, C], got shape {x.shape}")
        k = self.kernel_size
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (k, k), strides=(2, 2), padding="SAME")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden_size)(x))
        return nn.Dense(self.num_outputs)(x)
