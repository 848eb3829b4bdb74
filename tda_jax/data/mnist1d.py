"""MNIST-1D (Greydanus & Kobak, 2020), generated offline with the ``mnist1d`` package."""

from __future__ import annotations

import functools
import random

import numpy as np

from tda_jax.data.dataset import Dataset

_NUM_CLASSES = 10


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Imported lazily: mnist1d pulls in matplotlib and requests at import time.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # Keep every example in 'x' so we choose the split ourselves.
    args.train_split = 1.0
    # make_dataset seeds the global numpy / random generators; restore them so that loading data
    # has no side effects on the caller's randomness.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return data["x"].astype(np.float32), data["y"].astype(np.int32)


def load_mnist1d(num_train: int = 4000, num_test: int = 1000,
                 seed: int = 0) -> tuple[Dataset, Dataset]:
    """Generates MNIST-1D train and test sets (no download).

    The generator (``mnist1d.data.make_dataset`` with its default transform settings and
    ``args.seed = seed``) makes ``num_samples`` balanced examples, standardized to zero mean and
    unit standard deviation over the whole set; the first ``num_train`` are the training set and
    the next ``num_test`` the test set. With the defaults (4000 + 1000 of 5000) this is the
    standard 80/20 split of the generator's 5000 examples.

    Args:
      num_train: number of training examples.
      num_test: number of test examples.
      seed: generator seed; the same seed always gives the same arrays.

    Returns:
      ``(train, test)`` datasets with inputs ``[N, 40]`` float32 and int32 labels in ``0..9``.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train}, {num_test}")
    total = num_train + num_test
    # The generator makes num_samples // 10 examples per class.
    num_samples = max(5000, -(-total // _NUM_CLASSES) * _NUM_CLASSES)
    x, y = _generate(num_samples, int(seed))
    train = Dataset(x[:num_train].copy(), y[:num_train].copy(), _NUM_CLASSES)
    test = Dataset(x[num_train:total].copy(), y[num_train:total].copy(), _NUM_CLASSES)
    return train, test
