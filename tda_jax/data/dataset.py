"""In-memory datasets and fixed-shape batching.

A :class:`Dataset` is a pair of host (numpy) arrays that share their leading axis. Batches always
hold exactly ``batch_size`` rows so that a jitted training or scoring step compiles once: the last,
partial batch is padded by repeating row 0 with ``mask == 0`` and ``index == -1``. Every consumer
weights rows by ``mask`` so padding never counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np


class Dataset(NamedTuple):
    """Examples held on the host.

    Attributes:
      inputs: ``[num_examples, ...]`` float32 features.
      targets: ``[num_examples]`` int32 class labels (classification) or ``[num_examples, d]``
        float32 regression targets.
      num_classes: number of classes for classification (the vocabulary size for a language
        model), ``None`` for regression.
      input_mask: optional ``[num_examples, T]`` float32 mask of the input positions of sequence
        data (1 = a real token, 0 = padding). Padding positions are left out of curvature
        statistics. Language-model datasets (:func:`tda_jax.data.lm_dataset`) set it; their
        ``targets`` are ``[num_examples, T]`` next-token ids with ``-1`` where no loss is taken.

    ``len(dataset)`` is the tuple length (4); use :func:`num_examples` for the number of examples.
    """

    inputs: np.ndarray
    targets: np.ndarray
    num_classes: int | None
    input_mask: np.ndarray | None = None


def _check_dataset(dataset: Dataset) -> int:
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a tda_jax.data.Dataset, got {type(dataset).__name__}")
    n_in, n_tg = np.shape(dataset.inputs)[0], np.shape(dataset.targets)[0]
    if n_in != n_tg:
        raise ValueError(
            f"dataset.inputs has {n_in} rows (shape {np.shape(dataset.inputs)}) but "
            f"dataset.targets has {n_tg} (shape {np.shape(dataset.targets)});"
            " they must share their leading axis."
        )
    if dataset.input_mask is not None:
        shape = np.shape(dataset.input_mask)
        if len(shape) != 2 or shape[0] != n_in or tuple(np.shape(dataset.inputs)[:2]) != shape:
            raise ValueError(f"dataset.input_mask has shape {shape} but must be [num_examples, T] = "
                             f"{tuple(np.shape(dataset.inputs)[:2])}, matching the inputs' first two "
                             "axes.")
    return int(n_in)


def num_examples(dataset: Dataset) -> int:
    """Number of examples (rows) in ``dataset``; checks that inputs and targets agree."""
    return _check_dataset(dataset)


def subset(dataset: Dataset, indices: np.ndarray) -> Dataset:
    """The examples at ``indices`` (``[k]`` ints or a ``[num_examples]`` bool mask), in order."""
    n = _check_dataset(dataset)
    indices = np.asarray(indices)
    if indices.dtype == bool:
        if indices.shape != (n,):
            raise ValueError(
                f"boolean indices must have shape ({n},) to select from the dataset, got "
                f"{indices.shape}."
            )
        indices = np.flatnonzero(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if indices.size and (indices.min() < -n or indices.max() >= n):
        raise ValueError(f"indices out of range for a dataset of {n} examples")
    mask = None if dataset.input_mask is None else np.asarray(dataset.input_mask)[indices]
    return Dataset(np.asarray(dataset.inputs)[indices], np.asarray(dataset.targets)[indices],
                   dataset.num_classes, mask)


def shuffled_order(key: jax.Array, n: int) -> np.ndarray:
    """The permutation ``[n]`` of example positions that ``key`` selects.

    Training (:func:`tda_jax.training.train` and the vectorized ``train_many``) draws each epoch's
    order with this same function, so saved data orders can be regenerated from keys.
    """
    return np.asarray(jax.random.permutation(key, n), dtype=np.int32)


def num_batches(dataset: Dataset, batch_size: int, drop_remainder: bool = False) -> int:
    """Number of batches :func:`batch_iterator` yields for ``dataset``."""
    n = _check_dataset(dataset)
    _check_batch_size(batch_size)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def batch_iterator(dataset: Dataset, batch_size: int, key: jax.Array | None = None,
                   drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Yields fixed-size batches of ``dataset``.

    Args:
      dataset: the examples.
      batch_size: rows per batch ``B``; every yielded batch has exactly ``B`` rows.
      key: PRNG key; if given, examples come in the order ``shuffled_order(key, n)``, otherwise in
        dataset order.
      drop_remainder: drop the last, partial batch instead of padding it.

    Yields:
      dicts with ``"inputs"`` ``[B, ...]``, ``"targets"`` ``[B, ...]``, ``"mask"`` ``[B]`` float32
      (1 for real rows, 0 for padding) and ``"index"`` ``[B]`` int32 (the row's position in
      ``dataset``, -1 for padding), plus ``"input_mask"`` ``[B, T]`` when the dataset has one.
      Padding rows repeat row 0 of the dataset.

    Raises:
      ValueError: if the dataset is empty or ``batch_size < 1``.
    """
    n = _check_dataset(dataset)
    _check_batch_size(batch_size)
    if n == 0:
        raise ValueError("cannot iterate over an empty dataset (0 examples)")
    order = np.arange(n, dtype=np.int32) if key is None else shuffled_order(key, n)
    return _iterate(dataset, order, int(batch_size), drop_remainder)


def _iterate(dataset: Dataset, order: np.ndarray, batch_size: int,
             drop_remainder: bool) -> Iterator[dict[str, np.ndarray]]:
    inputs, targets = np.asarray(dataset.inputs), np.asarray(dataset.targets)
    input_mask = None if dataset.input_mask is None else np.asarray(dataset.input_mask, np.float32)
    n = order.shape[0]
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        real = index.shape[0]
        mask = np.ones(batch_size, np.float32)
        if real < batch_size:
            mask[real:] = 0.0
            index = np.concatenate([index, np.full(batch_size - real, -1, np.int32)])
        rows = np.where(index >= 0, index, 0)
        batch = {"inputs": inputs[rows], "targets": targets[rows], "mask": mask,
                 "index": index.astype(np.int32)}
        if input_mask is not None:
            batch["input_mask"] = input_mask[rows] * mask[:, None]
        yield batch


def batches_in_order(dataset: Dataset, order: np.ndarray, batch_size: int,
                     drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Like :func:`batch_iterator` but with an explicit order ``[n]`` of example positions."""
    n = _check_dataset(dataset)
    _check_batch_size(batch_size)
    order = np.asarray(order, dtype=np.int32)
    if n == 0 or order.size == 0:
        raise ValueError("cannot iterate over an empty dataset (0 examples)")
    return _iterate(dataset, order, int(batch_size), drop_remainder)
