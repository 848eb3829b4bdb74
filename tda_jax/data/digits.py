"""The scikit-learn 8x8 handwritten digits (1797 examples, 10 classes)."""

from __future__ import annotations

import numpy as np

from tda_jax.data.dataset import Dataset


def load_digits(test_fraction: float = 0.2, seed: int = 0,
                image: bool = False) -> tuple[Dataset, Dataset]:
    """Loads ``sklearn.datasets.load_digits`` and splits it into train and test sets.

    Pixel values (0..16) are divided by 16, so inputs lie in ``[0, 1]``. The split is stratified by
    class and determined by ``seed``.

    Args:
      test_fraction: fraction of the 1797 examples held out for testing, in ``(0, 1)``.
      seed: seed of the split.
      image: return inputs as ``[N, 8, 8, 1]`` images (for :class:`tda_jax.models.CNN2D`) instead
        of ``[N, 64]`` vectors.

    Returns:
      ``(train, test)`` datasets with float32 inputs and int32 labels in ``0..9``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    raw = _sk_load_digits()
    x = (raw.data / 16.0).astype(np.float32)
    y = raw.target.astype(np.int32)
    if image:
        x = x.reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Dataset(x_train, y_train, 10), Dataset(x_test, y_test, 10)
