"""Data larger than memory: random-access record sources and memory-mapped datasets on disk.

The attribution drivers (:func:`tda_jax.curvature.fit_curvature`,
:func:`tda_jax.attribution.pairwise_scores`, :func:`tda_jax.attribution.self_scores`) read their
data one fixed-size batch at a time (:func:`tda_jax.data.batch_iterator`) and validate it block by
block, so a :class:`~tda_jax.data.Dataset` whose arrays are memory maps, or columns of a record
source, is never loaded whole. Two ways to hand them such data:

* **Memory-mapped arrays.** ``Dataset(np.load("x.npy", mmap_mode="r"), np.load("y.npy",
  mmap_mode="r"), num_classes)``, or a dataset written by :func:`save_memmap_dataset` (in chunks,
  from any iterable of batches, so a dataset of 10^6 examples never has to exist in memory) and
  opened by :func:`load_memmap_dataset`.
* **Random-access record sources** in the ``grain`` convention: ``len(source)`` and
  ``source[i] -> record`` (``grain.sources.ArrayRecordDataSource``, ``grain``'s in-memory sources,
  a PyTorch map-style dataset, a list). A record is a mapping with ``"inputs"``, ``"targets"`` and
  optionally ``"input_mask"``, or a tuple ``(inputs, targets[, input_mask])``, after an optional
  ``decode(record)`` (e.g. parsing the bytes of an ArrayRecord file). :func:`from_source` wraps
  the source as a :class:`Dataset` whose columns read it lazily; the drivers also accept the source
  itself (:func:`as_dataset`). A batch of ``B`` consecutive rows is one call where the source
  allows it: ``source[start:stop]`` if its ``__getitem__`` takes a slice and returns a sequence of
  records, else ``source.__getitems__(indices)`` (array_record / grain, PyTorch), else ``B`` calls
  of ``source[i]``. Besides its passes, each driver reads the data to fingerprint it (once per
  field: the fingerprint is that of the same arrays in memory) and to check its targets, block by
  block (:data:`tda_jax.data.dataset.CHUNK_BYTES` of whole records at a time).

On-disk format of :func:`save_memmap_dataset`: a directory with ``dataset.json`` (format, version,
number of examples, ``num_classes``, the fields) and one :class:`tda_jax.io.ArrayStore` per field
(``inputs/``, ``targets/``, optionally ``input_mask/``: a plain ``.npy`` file plus a JSON header of
the chunks written). No pickle. A write that was killed leaves incomplete stores, which
:func:`load_memmap_dataset` refuses, naming them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tda_jax.data.dataset import Dataset, host_array, iter_row_blocks, num_examples, take_rows
from tda_jax.io import ArrayStore
from tda_jax.io.stages import atomic_write_text

FIELDS = ("inputs", "targets", "input_mask")
_FORMAT = "tda_jax.MemmapDataset"
_VERSION = 1
HEADER_FILE = "dataset.json"


# --- record sources -----------------------------------------------------------------------------


def _fields_of(record: Any, index: int) -> dict[str, np.ndarray]:
    """A decoded record -> ``{field: array}`` (a mapping by name, or a 2/3-tuple by position)."""
    if isinstance(record, Mapping):
        missing = [f for f in FIELDS[:2] if f not in record]
        if missing:
            raise ValueError(f"record {index} of the source has keys {sorted(record)} but needs "
                             f"'inputs' and 'targets' (and optionally 'input_mask'); pass "
                             "decode=... to map records to them.")
        return {f: np.asarray(record[f]) for f in FIELDS if f in record and record[f] is not None}
    if isinstance(record, tuple | list) and len(record) in (2, 3):
        return {f: np.asarray(v) for f, v in zip(FIELDS, record) if v is not None}
    raise ValueError(f"record {index} of the source is a {type(record).__name__}; a record must be a "
                     "mapping with 'inputs' and 'targets' (optionally 'input_mask') or a tuple "
                     "(inputs, targets[, input_mask]); pass decode=... to convert it.")


class RecordReader:
    """Reads rows of a random-access record source as stacked arrays, one call per batch.

    The last block read is kept, so the columns of one batch (inputs, targets, mask) read the
    source once.
    """

    def __init__(self, source: Any, decode: Callable[[Any], Any] | None = None):
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise TypeError(f"a data source needs __len__ and __getitem__ (random access, the grain "
                            f"convention); got {type(source).__name__}.")
        self.source, self.decode = source, decode
        self.length = len(source)
        if self.length == 0:
            raise ValueError("the data source is empty (0 records).")
        first = self._record(source[0], 0)
        self.fields = {name: (value.shape, value.dtype) for name, value in first.items()}
        self.sliceable = self._probe_slicing()
        self._key: tuple | None = None
        self._block: dict[str, np.ndarray] | None = None

    def _record(self, record: Any, index: int) -> dict[str, np.ndarray]:
        return _fields_of(record if self.decode is None else self.decode(record), index)

    def _probe_slicing(self) -> bool:
        try:
            got = self.source[0:1]
        except Exception:  # noqa: BLE001 (an int-only __getitem__ may raise anything)
            return False
        return isinstance(got, Sequence) and not isinstance(got, str | bytes) and len(got) == 1

    def _fetch(self, rows: np.ndarray) -> list:
        contiguous = rows.size > 1 and int(rows[-1]) - int(rows[0]) == rows.size - 1 and \
            bool(np.all(np.diff(rows) == 1))
        if contiguous and self.sliceable:
            records = self.source[int(rows[0]):int(rows[-1]) + 1]
        elif rows.size > 1 and hasattr(self.source, "__getitems__"):
            records = self.source.__getitems__([int(i) for i in rows])
        else:
            records = [self.source[int(i)] for i in rows]
        if len(records) != rows.size:
            raise ValueError(f"the data source returned {len(records)} records for {rows.size} "
                             "requested.")
        return list(records)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``{field: [len(rows), ...]}`` for the given (non-negative, in-range) row numbers."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        key = (rows.size, rows.tobytes())
        if key == self._key:
            return self._block
        records = [self._record(r, int(i)) for r, i in zip(self._fetch(rows), rows)]
        block = {}
        for name, (shape, dtype) in self.fields.items():
            values = [r.get(name) for r in records]
            for value, i in zip(values, rows):
                if value is None or value.shape != shape:
                    raise ValueError(
                        f"record {int(i)} of the source has {name} of shape "
                        f"{None if value is None else value.shape} but record 0's is {shape}; every "
                        "record must have the same fields and shapes (pad sequences to one length).")
            block[name] = np.stack(values).astype(dtype, copy=False) if values else \
                np.zeros((0, *shape), dtype)
        self._key, self._block = key, block
        return block


class SourceColumn:
    """One field of a record source as a row-readable array: ``shape``, ``dtype``, ``len`` and
    numpy-style indexing of the first axis (int, slice, integer or boolean array), reading only the
    rows asked for. Converting it with ``np.asarray`` reads it whole (block by block)."""

    def __init__(self, reader: RecordReader, name: str):
        self.reader, self.name = reader, name
        field_shape, self.dtype = reader.fields[name]
        self.shape = (reader.length, *field_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def record_bytes(self) -> int:
        """Bytes of a whole record (every field): what reading one row of this column reads."""
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                   for shape, dtype in self.reader.fields.values())

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, key: Any) -> tuple[np.ndarray, bool]:
        if isinstance(key, slice):
            return np.arange(*key.indices(self.shape[0]), dtype=np.int64), False
        if isinstance(key, int | np.integer):
            index = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= index < self.shape[0]:
                raise IndexError(f"row {key} out of range for {self.shape[0]} rows")
            return np.array([index], np.int64), True
        rows = np.asarray(key)
        if rows.dtype == bool:
            if rows.shape != (self.shape[0],):
                raise IndexError(f"a boolean row index must have shape ({self.shape[0]},)")
            rows = np.flatnonzero(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows must be an int, a slice or a 1-D integer array, got {key!r}")
        rows = np.where(rows < 0, rows + self.shape[0], rows).astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows out of range for {self.shape[0]} rows")
        return rows, False

    def __getitem__(self, key: Any) -> np.ndarray:
        rest = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        rows, scalar = self._rows(key)
        if not rows.size:
            values = np.zeros((0, *self.shape[1:]), self.dtype)
        else:
            values = self.reader.read(rows)[self.name]
        values = values[0] if scalar else values
        return values[rest] if rest else values

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        blocks = [block for _, block in iter_row_blocks(self)]
        values = np.concatenate(blocks) if blocks else np.zeros(self.shape, self.dtype)
        return values if dtype is None else values.astype(dtype)

    def __repr__(self) -> str:
        return f"SourceColumn({self.name!r}, shape={self.shape}, dtype={self.dtype})"


def from_source(source: Any, num_classes: int | None = None, *,
                decode: Callable[[Any], Any] | None = None) -> Dataset:
    """A :class:`Dataset` that reads a random-access record source batch by batch.

    Args:
      source: ``len(source)`` and ``source[i] -> record`` (the ``grain`` data-source convention,
        e.g. ``grain.sources.ArrayRecordDataSource``); see the module docstring for how batches
        are read.
      num_classes: number of classes (checked against the model's outputs), None to skip.
      decode: ``record -> {"inputs", "targets"[, "input_mask"]}`` or a tuple ``(inputs, targets[,
        input_mask])``; None if records already are.

    Returns:
      A dataset whose ``inputs``/``targets``/``input_mask`` are :class:`SourceColumn` views of the
      source (record 0 fixes each field's shape and dtype; every record must match it).
    """
    if isinstance(source, Dataset):
        raise TypeError("from_source takes a record source (len and source[i] -> record); this is "
                        "already a tda_jax.data.Dataset, which the drivers take as it is.")
    reader = RecordReader(source, decode)
    mask = SourceColumn(reader, "input_mask") if "input_mask" in reader.fields else None
    return Dataset(SourceColumn(reader, "inputs"), SourceColumn(reader, "targets"), num_classes,
                   mask)


def as_dataset(data: Any, role: str = "data") -> Dataset:
    """``data`` itself if it is a :class:`Dataset`; a random-access record source wrapped by
    :func:`from_source` (``num_classes=None``) otherwise.

    Raises:
      TypeError: naming ``role`` when ``data`` is neither.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, np.ndarray | Mapping | str | bytes) or not (
            hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"{role} must be a tda_jax.data.Dataset or a random-access data source "
                        f"(__len__ and __getitem__ -> record, as grain's); got {type(data).__name__}.")
    return from_source(data)


# --- memory-mapped datasets on disk ---------------------------------------------------------------


def _as_batch(part: Any, number: int) -> dict[str, np.ndarray]:
    if isinstance(part, Dataset):
        fields = {"inputs": part.inputs, "targets": part.targets, "input_mask": part.input_mask}
    elif isinstance(part, Mapping):
        fields = {f: part.get(f) for f in FIELDS}
    elif isinstance(part, tuple | list) and len(part) in (2, 3):
        fields = dict(zip(FIELDS, part))
    else:
        raise TypeError(f"batch {number} is a {type(part).__name__}; give Datasets, mappings with "
                        "'inputs' and 'targets' (optionally 'input_mask') or tuples.")
    if fields.get("inputs") is None or fields.get("targets") is None:
        raise ValueError(f"batch {number} has no 'inputs' or no 'targets'.")
    out = {f: np.asarray(v) for f, v in fields.items() if v is not None}
    sizes = {f: v.shape[0] if v.ndim else None for f, v in out.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"batch {number} has fields with different numbers of rows: {sizes}.")
    return out


def _dataset_blocks(dataset: Dataset) -> Iterable[dict[str, np.ndarray]]:
    """A dataset's rows in blocks (memory maps and sources are read block by block)."""
    arrays = {f: getattr(dataset, f) for f in FIELDS if getattr(dataset, f) is not None}
    for start, block in iter_row_blocks(arrays["inputs"]):
        rows = np.arange(start, start + len(block))
        yield {f: block if f == "inputs" else take_rows(a, rows) for f, a in arrays.items()}


def save_memmap_dataset(directory: str | os.PathLike, data: Dataset | Iterable, *,
                        num_examples: int | None = None, num_classes: int | None = None,
                        chunk_rows: int | None = None, overwrite: bool = False) -> Dataset:
    """Writes a dataset to ``directory`` chunk by chunk; :func:`load_memmap_dataset` maps it back.

    Args:
      directory: created; must not hold a dataset already unless ``overwrite``.
      data: a :class:`Dataset` (in memory, memory-mapped or from a source; read block by block) or
        an iterable of batches (Datasets, mappings with ``"inputs"``, ``"targets"`` and optionally
        ``"input_mask"``, or tuples), of any sizes, consumed once.
      num_examples: total rows; required for an iterable of batches (the files are sized up front),
        checked against what it yields.
      num_classes: recorded for :func:`load_memmap_dataset` (a Dataset's own is used if None).
      chunk_rows: rows per stored chunk (default: about 16 MiB of the widest field).
      overwrite: replace an existing dataset in ``directory``.

    Returns:
      The written dataset, memory-mapped read-only (as :func:`load_memmap_dataset` returns it).

    Raises:
      FileExistsError: ``directory`` holds a dataset and ``overwrite`` is False.
      ValueError: the batches' fields, shapes or dtypes disagree, or their total is not
        ``num_examples``.
    """
    directory = Path(directory)
    if (directory / HEADER_FILE).exists() or any((directory / f).exists() for f in FIELDS):
        if not overwrite:
            raise FileExistsError(f"{directory} already holds a dataset; pass overwrite=True to "
                                  "replace it or use another directory.")
        (directory / HEADER_FILE).unlink(missing_ok=True)
        for field in FIELDS:
            if (directory / field).is_dir():
                shutil.rmtree(directory / field)
    if isinstance(data, Dataset):
        total = num_examples if num_examples is not None else _count(data)
        if total != _count(data):
            raise ValueError(f"num_examples={num_examples} but the dataset has {_count(data)} rows.")
        num_classes = data.num_classes if num_classes is None else num_classes
        batches: Iterable = _dataset_blocks(data)
    else:
        if num_examples is None:
            raise ValueError("num_examples is required when data is an iterable of batches (the "
                             "files are sized before the first batch is written).")
        total, batches = int(num_examples), data
    if total < 1:
        raise ValueError(f"a dataset needs at least one example, got num_examples={total}.")

    directory.mkdir(parents=True, exist_ok=True)
    stores: dict[str, ArrayStore] = {}
    buffers: dict[str, list[np.ndarray]] = {}
    filled, written, chunk = 0, 0, None
    for number, part in enumerate(batches):
        batch = _as_batch(part, number)
        rows = len(batch["inputs"])
        if not stores:
            row_bytes = max(int(np.prod(v.shape[1:], dtype=np.int64)) * v.dtype.itemsize
                            for v in batch.values())
            chunk = int(chunk_rows) if chunk_rows is not None else max(1, (1 << 24) // max(row_bytes, 1))
            if chunk < 1:
                raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}.")
            chunk = min(chunk, total)
            for field, value in batch.items():
                stores[field] = ArrayStore.create(directory / field, (total, *value.shape[1:]),
                                                  value.dtype, chunk, {"field": field})
                buffers[field] = []
        if set(batch) != set(stores):
            raise ValueError(f"batch {number} has fields {sorted(batch)} but the first had "
                             f"{sorted(stores)}.")
        for field, value in batch.items():
            store = stores[field]
            if value.shape[1:] != store.shape[1:] or not np.can_cast(value.dtype, store.dtype,
                                                                     "same_kind"):
                raise ValueError(f"batch {number} has {field} {value.dtype} {value.shape[1:]} per row "
                                 f"but the first batch had {store.dtype} {store.shape[1:]}.")
        if filled + rows > total:
            raise ValueError(f"the batches hold more than num_examples={total} rows.")
        for field, value in batch.items():
            buffers[field].append(value)
        filled += rows
        while filled - written >= chunk or (filled == total and written < total):
            size = min(chunk, total - written)
            for field, store in stores.items():
                values = np.concatenate(buffers[field]) if len(buffers[field]) > 1 else buffers[field][0]
                store.write_chunk(written // chunk, values[:size])
                buffers[field] = [values[size:]] if len(values) > size else []
            written += size
    if filled != total:
        raise ValueError(f"the batches held {filled} rows but num_examples={total}.")
    for store in stores.values():
        store.close()
    header = {"format": _FORMAT, "version": _VERSION, "num_examples": total,
              "num_classes": None if num_classes is None else int(num_classes),
              "fields": sorted(stores, key=FIELDS.index)}
    atomic_write_text(directory / HEADER_FILE, json.dumps(header, indent=1) + "\n")
    return load_memmap_dataset(directory)


def _count(dataset: Dataset) -> int:
    return num_examples(dataset)


def load_memmap_dataset(directory: str | os.PathLike) -> Dataset:
    """The dataset :func:`save_memmap_dataset` wrote, as read-only memory maps (nothing is read
    until a batch asks for its rows).

    Raises:
      FileNotFoundError: no dataset in ``directory``.
      ValueError: a field's store is incomplete (a write that was killed), naming it.
    """
    directory = Path(directory)
    path = directory / HEADER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no memory-mapped dataset at {directory} (no {HEADER_FILE}); write "
                                "one with tda_jax.data.save_memmap_dataset.")
    try:
        header = json.loads(path.read_text())
        fields = header["fields"]
        total = int(header["num_examples"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read the dataset header {path}: {error}") from error
    if header.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a tda_jax memory-mapped dataset header.")
    arrays = {}
    for field in fields:
        store = ArrayStore.open(directory / field)
        if not store.complete or store.shape[0] != total:
            raise ValueError(f"the dataset field {directory / field} is incomplete ("
                             f"{len(store.missing_chunks())} chunk(s) missing) or has "
                             f"{store.shape[0]} rows for {total}; write the dataset again.")
        store.close()
        arrays[field] = np.load(directory / field / "data.npy", mmap_mode="r")
    return Dataset(arrays["inputs"], arrays["targets"], header.get("num_classes"),
                   arrays.get("input_mask"))


__all__ = ["RecordReader", "SourceColumn", "as_dataset", "from_source", "host_array",
           "load_memmap_dataset", "save_memmap_dataset"]
