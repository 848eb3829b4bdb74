"""A synthetic linear-Gaussian regression problem (closed-form oracles are available)."""

from __future__ import annotations

import numpy as np

from tda_jax.data.dataset import Dataset


def make_synthetic_regression(num_train: int = 512, num_test: int = 128, input_dim: int = 8,
                              output_dim: int = 1, noise: float = 0.1,
                              seed: int = 0) -> tuple[Dataset, Dataset]:
    """Samples ``y = x W + noise * eps`` with ``x ~ N(0, I)``, ``W ~ N(0, 1 / input_dim)``.

    Args:
      num_train: training examples.
      num_test: test examples.
      input_dim: dimension of ``x``.
      output_dim: dimension of ``y``.
      noise: standard deviation of the Gaussian target noise.
      seed: seed of ``numpy.random.default_rng``; the same seed gives the same data.

    Returns:
      ``(train, test)`` datasets with inputs ``[N, input_dim]`` and targets ``[N, output_dim]``,
      both float32, and ``num_classes=None``.
    """
    if min(num_train, num_test) < 0 or min(input_dim, output_dim) < 1:
        raise ValueError("num_train/num_test must be >= 0 and input_dim/output_dim >= 1, got "
                         f"{num_train}, {num_test}, {input_dim}, {output_dim}")
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(input_dim, output_dim)) / np.sqrt(input_dim)
    x = rng.normal(size=(num_train + num_test, input_dim))
    y = x @ weights + noise * rng.normal(size=(num_train + num_test, output_dim))
    x, y = x.astype(np.float32), y.astype(np.float32)
    return (Dataset(x[:num_train], y[:num_train], None),
            Dataset(x[num_train:], y[num_train:], None))
