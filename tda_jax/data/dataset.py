"""Datasets and fixed-shape batching.

A :class:`Dataset` is a pair of host arrays that share their leading axis. Batches always hold
exactly ``batch_size`` rows so that a jitted training or scoring step compiles once: the last,
partial batch is padded by repeating row 0 with ``mask == 0`` and ``index == -1``. Every consumer
weights rows by ``mask`` so padding never counts.

The arrays need not be in memory: a memory-mapped ``.npy`` file (``np.load(path, mmap_mode="r")``,
:func:`tda_jax.data.load_memmap_dataset`) or any *row-readable* array (``shape``, ``dtype`` and
``__getitem__`` of a slice of rows, e.g. the columns of a record source made by
:func:`tda_jax.data.from_source`) is read one batch at a time by :func:`batch_iterator`
(:func:`take_rows`), and whole-array checks walk it in blocks of at most :data:`CHUNK_BYTES`
(:func:`row_chunks`), so nothing is ever loaded whole.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np

#: Largest block (bytes) that whole-array checks and fingerprints read from a dataset array at once.
CHUNK_BYTES = 1 << 24


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

    The arrays may also be memory maps (``np.load(path, mmap_mode="r")``) or other row-readable
    arrays (:mod:`tda_jax.data.source`); batches and checks then read them block by block.

    ``len(dataset)`` is the tuple length (4); use :func:`num_examples` for the number of examples.
    """

    inputs: np.ndarray
    targets: np.ndarray
    num_classes: int | None
    input_mask: np.ndarray | None = None


def _is_lazy(array) -> bool:
    """Whether ``array`` is read row block by row block (a memory map or another row-readable
    array-like) rather than converted to an in-memory numpy array."""
    if isinstance(array, np.memmap):
        return True
    if isinstance(array, np.ndarray | jax.Array | list | tuple):
        return False
    return hasattr(array, "shape") and hasattr(array, "dtype") and hasattr(array, "__getitem__")


def host_array(array):
    """``array`` as something :func:`take_rows` reads: numpy arrays, memory maps and row-readable
    array-likes as they are; JAX arrays, lists and tuples converted to numpy."""
    return array if _is_lazy(array) or isinstance(array, np.ndarray) else np.asarray(array)


def take_rows(array, rows) -> np.ndarray:
    """The rows ``rows`` (``[k]`` ints, negative counted from the end) of ``array`` as an in-memory
    numpy array, reading only those rows.

    A contiguous, increasing run of rows is read as one slice (one read of a memory map or a record
    source); other selections by integer-array indexing.
    """
    array = host_array(array)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if type(array) is np.ndarray:  # in memory: plain fancy indexing
        return array[rows]
    length = int(np.shape(array)[0])
    rows = np.where(rows < 0, rows + length, rows)
    if rows.size and (rows.min() < 0 or rows.max() >= length):
        raise IndexError(f"rows out of range for an array of {length} rows")
    if rows.size and int(rows[-1]) - int(rows[0]) == rows.size - 1 and \
            (rows.size == 1 or bool(np.all(np.diff(rows) == 1))):
        values = np.array(array[int(rows[0]):int(rows[-1]) + 1])
        release_pages(array, int(rows[0]), int(rows[-1]) + 1)
        return values
    if not rows.size:
        return np.array(array[0:0])
    return np.array(array[rows])


def row_chunks(array, chunk_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """Half-open row ranges ``(start, stop)`` covering ``array`` in blocks of at most
    ``chunk_bytes`` (default :data:`CHUNK_BYTES`; at least one row per block). An array whose rows
    are read with others (a record source's column) sizes blocks by its ``record_bytes``."""
    shape = np.shape(array)
    row_bytes = getattr(array, "record_bytes", None) or \
        int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(array.dtype).itemsize
    budget = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    step = max(1, budget // max(row_bytes, 1))
    for start in range(0, int(shape[0]), step):
        yield start, min(start + step, int(shape[0]))


def iter_row_blocks(array, chunk_bytes: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, block)`` for consecutive in-memory blocks of ``array``'s rows (see
    :func:`row_chunks`); an in-memory numpy array is returned whole, as one block."""
    array = host_array(array)
    if type(array) is np.ndarray:
        yield 0, array
        return
    for start, stop in row_chunks(array, chunk_bytes):
        yield start, np.asarray(array[start:stop])
        release_pages(array, start, stop)


def release_pages(array, start: int, stop: int) -> None:
    """Unmaps rows ``start..stop`` of a memory-mapped array (``np.memmap``) from this process.

    The pages stay in the kernel's page cache (a later read maps them back without disk I/O); they
    just stop counting towards this process's resident set, so passes over a memory-mapped dataset
    keep it at about one block instead of the whole file. Copy-on-write maps (``mode="c"``), whose
    pages may hold private changes, and anything else are left alone.
    """
    handle = getattr(array, "_mmap", None)
    if handle is None or getattr(array, "mode", "c") not in ("r", "r+", "w+") or stop <= start or \
            not hasattr(mmap, "MADV_DONTNEED") or array.ndim == 0 or array.strides[0] <= 0:
        return
    with contextlib.suppress(ValueError, TypeError, OSError, BufferError):
        base = np.frombuffer(handle, np.uint8).__array_interface__["data"][0]
        first = array.__array_interface__["data"][0] - base + start * array.strides[0]
        last = first + (stop - start) * array.strides[0]
        first -= first % mmap.PAGESIZE
        handle.madvise(mmap.MADV_DONTNEED, first, min(last, len(handle)) - first)


def _check_dataset(dataset: Dataset) -> int:
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a tda_jax.data.Dataset, got {type(dataset).__name__} "
                        "(wrap a random-access record source with tda_jax.data.from_source)")
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
    mask = None if dataset.input_mask is None else take_rows(dataset.input_mask, indices)
    return Dataset(take_rows(dataset.inputs, indices), take_rows(dataset.targets, indices),
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
    inputs, targets = host_array(dataset.inputs), host_array(dataset.targets)
    input_mask = None if dataset.input_mask is None else host_array(dataset.input_mask)
    n = order.shape[0]
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        real = index.shape[0]
        mask = np.ones(batch_size, np.float32)
        if real < batch_size:
            mask[real:] = 0.0
            index = np.concatenate([index, np.full(batch_size - real, -1, np.int32)])
        batch = {"inputs": _batch_rows(inputs, index, real), "targets": _batch_rows(targets, index, real),
                 "mask": mask, "index": index.astype(np.int32)}
        if input_mask is not None:
            batch["input_mask"] = _batch_rows(input_mask, index, real).astype(np.float32) * mask[:, None]
        yield batch


def _batch_rows(array, index: np.ndarray, real: int) -> np.ndarray:
    """The rows of a padded batch: ``index[:real]``, then row 0 for each padding row."""
    if type(array) is np.ndarray:
        return array[np.where(index >= 0, index, 0)]
    rows = take_rows(array, index[:real])
    if real == index.shape[0]:
        return rows
    pad = np.repeat(take_rows(array, np.zeros(1, np.int64)), index.shape[0] - real, axis=0)
    return np.concatenate([rows, pad])


def batches_in_order(dataset: Dataset, order: np.ndarray, batch_size: int,
                     drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Like :func:`batch_iterator` but with an explicit order ``[n]`` of example positions."""
    n = _check_dataset(dataset)
    _check_batch_size(batch_size)
    order = np.asarray(order, dtype=np.int32)
    if n == 0 or order.size == 0:
        raise ValueError("cannot iterate over an empty dataset (0 examples)")
    return _iterate(dataset, order, int(batch_size), drop_remainder)
