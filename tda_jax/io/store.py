"""A chunked, resumable array on disk: one memory-mapped ``.npy`` file plus a JSON header.

An :class:`ArrayStore` is a directory holding

* ``data.npy``: the array, a plain C-ordered ``.npy`` file (readable by ``np.load(...,
  mmap_mode="r")`` without this module), written through a memory map, so arrays larger than memory
  are filled piece by piece (a written chunk's pages are released from the process once flushed,
  so its resident memory stays about one chunk);
* ``header.json``: shape, dtype, the chunk layout, which chunks are complete, and the
  ``arguments`` that produced the values (compared on every reopen, as :class:`tda_jax.io.Stage`
  does). No pickle anywhere.

Chunks tile the first axis, or the first two axes (a grid), in fixed sizes: ``chunks=(256,)`` cuts
rows (training examples of a gradient store) into blocks of 256, ``chunks=(64, 1024)`` cuts a
``[num_queries, num_train, ...]`` score matrix into query blocks x training blocks. Trailing axes are
never cut. A chunk is written whole by :meth:`ArrayStore.write_chunk`: its values are copied into the
map and flushed to the file, and only then is the chunk recorded as complete in the header (replaced
atomically, under a file lock so that several processes may fill disjoint chunks of one store). A
process killed at any point therefore loses at most the chunks it had not yet recorded; a rerun asks
:meth:`ArrayStore.missing_chunks` and computes only those.

Example::

    store = ArrayStore.create(workdir / "grads", shape=(n, p), dtype="float32", chunks=256,
                              arguments={"params": fingerprint(params)})
    for chunk in store.missing_chunks():
        rows, = store.chunk_region(chunk)
        store.write_chunk(chunk, compute(rows))
    values = store.read(rows=slice(0, 10))   # any block; refuses chunks not yet written
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tda_jax.io.stages import ArgumentMismatchError, CorruptStageFileError, _diff, _jsonable

try:  # POSIX advisory locks; without them concurrent writers of one store are not supported
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

HEADER_FILE = "header.json"
DATA_FILE = "data.npy"
_LOCK_FILE = ".lock"
_FORMAT = "tda_jax.ArrayStore"
_VERSION = 1
_log = logging.getLogger(__name__)

Chunk = int | tuple[int, ...]
Index = int | slice | Sequence[int] | np.ndarray | None


class StoreCorruptError(CorruptStageFileError):
    """A store's header or data file is unreadable or inconsistent."""


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_header(path: Path, header: dict) -> None:
    """Writes the header through a synced temporary file and a rename (old or new, never half)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        # One key per line, values compact: readable, and small however many runs there are.
        f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in header.items())
                + "\n}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_header(path: Path) -> dict:
    try:
        header = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreCorruptError(f"cannot read the array store header {path}: {error}. Delete the "
                                "store directory (or create it with overwrite=True) to recompute."
                                ) from error
    required = ("format", "version", "shape", "dtype", "chunks", "arguments", "complete_chunks")
    missing = [key for key in required if not isinstance(header, dict) or key not in header]
    if missing or header.get("format") != _FORMAT:
        raise StoreCorruptError(
            f"{path} is not an array store header (missing {missing or ['format']}); delete the "
            "store directory (or create it with overwrite=True) to recompute.")
    if header["version"] != _VERSION:
        raise StoreCorruptError(f"{path} has store format version {header['version']}; this "
                                f"version of tda_jax reads version {_VERSION}.")
    return header


def _check_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"dtype={dtype} is not a plain numeric dtype; an array store holds numbers "
                        "only (no objects, no pickle).")
    return dtype


def _check_layout(shape: Sequence[int], chunks: int | Sequence[int]) -> tuple[tuple, tuple]:
    shape = tuple(int(s) for s in shape)
    chunks = (int(chunks),) if np.ndim(chunks) == 0 else tuple(int(c) for c in chunks)
    if any(s < 0 for s in shape) or not shape:
        raise ValueError(f"shape must have at least one axis and no negative size, got {shape}.")
    if not 1 <= len(chunks) <= min(2, len(shape)) or any(c < 1 for c in chunks):
        raise ValueError(f"chunks must be 1 or 2 positive sizes for the leading axes of shape "
                         f"{shape} (e.g. chunks=(256,) or (64, 1024)), got {chunks}.")
    return shape, chunks


def _runs(flat: Sequence[int]) -> list[list[int]]:
    """Sorted flat chunk numbers -> half-open runs ``[[start, stop], ...]``."""
    runs: list[list[int]] = []
    for number in sorted(set(flat)):
        if runs and runs[-1][1] == number:
            runs[-1][1] += 1
        else:
            runs.append([number, number + 1])
    return runs


def _unruns(runs: Sequence[Sequence[int]]) -> set[int]:
    return {number for start, stop in runs for number in range(int(start), int(stop))}


def _data_offset(path: Path, shape: tuple, dtype: np.dtype) -> int:
    """Checks the ``.npy`` header of ``path`` against the store's shape/dtype; returns its length."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            file_shape, fortran, file_dtype = read(f)
            offset = f.tell()
        size = os.path.getsize(path)
    except (OSError, ValueError) as error:
        raise StoreCorruptError(f"cannot read the array store data file {path}: {error}. Delete the "
                                "store directory to recompute.") from error
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if (tuple(file_shape) != shape or fortran or file_dtype.itemsize != dtype.itemsize
            or size < offset + nbytes):
        raise StoreCorruptError(
            f"the array store data file {path} holds {tuple(file_shape)} {file_dtype} "
            f"({size} bytes) but its header says {shape} {dtype}; delete the store directory to "
            "recompute.")
    return offset


class ArrayStore:
    """A chunked array in a directory (``data.npy`` + ``header.json``); see the module docstring.

    Build with :meth:`create` (new, or resume one made with the same arguments) or :meth:`open`.

    Attributes:
      path: the store directory.
      shape, dtype: of the whole array.
      chunks: chunk sizes along the first one or two axes.
      grid: number of chunks along those axes.
      arguments: the (JSON-normalised) arguments that produced the values.
    """

    def __init__(self, path: Path, header: dict, writable: bool):
        self.path = Path(path)
        self.shape: tuple[int, ...] = tuple(int(s) for s in header["shape"])
        self.dtype: np.dtype = _check_dtype(header["dtype"])
        self.chunks: tuple[int, ...] = tuple(int(c) for c in header["chunks"])
        self.grid: tuple[int, ...] = tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))
        self.arguments: dict = header["arguments"]
        self.writable = writable
        self._complete = _unruns(header["complete_chunks"])
        self._map: mmap.mmap | None = None
        self._offset = 0
        data_path = self.path / DATA_FILE
        if not data_path.exists():
            raise StoreCorruptError(f"the array store {self.path} has a header but no data file "
                                    f"{data_path}; delete the store directory to recompute.")
        self._offset = _data_offset(data_path, self.shape, self.dtype)
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if nbytes == 0:
            self._data = np.zeros(self.shape, self.dtype)
            return
        with open(data_path, "r+b" if writable else "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if writable
                                  else mmap.ACCESS_READ)
        self._data = np.ndarray(self.shape, self.dtype, buffer=self._map, offset=self._offset)

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, shape: Sequence[int], dtype: Any,
               chunks: int | Sequence[int], arguments: Mapping[str, Any],
               overwrite: bool = False) -> ArrayStore:
        """A new store at ``path``, or the existing one if it was made with the same settings.

        Args:
          path: the store directory (created).
          shape: the whole array's shape.
          dtype: a numeric dtype (e.g. ``"float32"``, ``"bfloat16"``).
          chunks: chunk sizes along the first axis (an int or ``(rows,)``) or the first two axes
            (``(rows, cols)``); the last chunk along an axis may be smaller.
          arguments: JSON-serialisable settings that produced the values (fingerprints, names).
          overwrite: replace an existing store made with other settings that has finished chunks
            (or an unreadable one) instead of refusing it. A store with equal settings is always
            resumed; one with other settings but no finished chunk is replaced (logged), as
            :class:`tda_jax.io.Stage` does.

        Returns:
          A writable store; its completed chunks (if it existed) are kept.

        Raises:
          ArgumentMismatchError: the directory holds finished chunks made with other
            ``arguments``, ``shape``, ``dtype`` or ``chunks`` (each differing key named) and
            ``overwrite`` is False.
          StoreCorruptError: the existing header or data file is unreadable (names the file).
        """
        path = Path(path)
        shape, chunks = _check_layout(shape, chunks)
        dtype = _check_dtype(dtype)
        wanted = {"shape": list(shape), "dtype": dtype.name, "chunks": list(chunks),
                  "arguments": _jsonable(dict(arguments))}
        header_path = path / HEADER_FILE
        if header_path.exists():
            try:
                saved = _read_header(header_path)
            except StoreCorruptError:
                if not overwrite:
                    raise
                saved = None
            if saved is not None:
                differences = _diff({k: saved[k] for k in wanted}, wanted)
                if not differences:
                    return cls(path, saved, writable=True)
                finished = len(_unruns(saved["complete_chunks"]))
                if finished and not overwrite:
                    raise ArgumentMismatchError(
                        f"{path} holds an array store with {finished} finished chunk(s) made with "
                        "different settings:\n  " + "\n  ".join(differences)
                        + "\nUse another path, delete the store, or pass overwrite=True to "
                        "recompute it.")
                _log.warning("array store %s: replaced (%s finished chunks) since its settings "
                             "differ:\n  %s", path, finished, "\n  ".join(differences))
            for name in (HEADER_FILE, DATA_FILE):  # only the store's own files
                (path / name).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        # Data first, header last: a store killed in between has no header and is made again.
        np.lib.format.open_memmap(path / DATA_FILE, mode="w+", dtype=dtype, shape=shape).flush()
        header = {"format": _FORMAT, "version": _VERSION, **wanted, "grid":
                  [-(-s // c) for s, c in zip(shape, chunks)], "complete_chunks": [],
                  "complete": any(s == 0 for s in shape[:len(chunks)])}  # no chunks: complete
        _write_header(header_path, header)
        return cls(path, header, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> ArrayStore:
        """Opens an existing store read-only (``mode="r"``) or for writing chunks (``"r+"``).

        Raises:
          FileNotFoundError: no store at ``path``.
          StoreCorruptError: its header or data file is unreadable or inconsistent.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}.")
        header_path = Path(path) / HEADER_FILE
        if not header_path.exists():
            raise FileNotFoundError(f"no array store at {path} (no {HEADER_FILE}).")
        return cls(Path(path), _read_header(header_path), writable=mode == "r+")

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a store header (it may still be incomplete)."""
        return (Path(path) / HEADER_FILE).exists()

    def check_arguments(self, arguments: Mapping[str, Any]) -> None:
        """Raises :class:`ArgumentMismatchError` naming each key that differs from the saved ones."""
        differences = _diff({"arguments": self.arguments}, {"arguments": _jsonable(dict(arguments))})
        if differences:
            raise ArgumentMismatchError(
                f"{self.path} holds an array store made with different arguments:\n  "
                + "\n  ".join(differences) + "\nUse another path or delete the store.")

    # --- chunks ---------------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_chunks(self) -> int:
        return int(np.prod(self.grid, dtype=np.int64))

    def _flat(self, chunk: Chunk) -> int:
        index = (chunk,) if np.ndim(chunk) == 0 else tuple(chunk)
        if len(index) != len(self.grid) or any(not 0 <= int(i) < n for i, n in zip(index, self.grid)):
            raise IndexError(f"chunk {chunk!r} is not in this store's chunk grid {self.grid} "
                             f"(give {'an int' if len(self.grid) == 1 else 'a pair (i, j)'}).")
        return int(np.ravel_multi_index(tuple(int(i) for i in index), self.grid))

    def _unflat(self, number: int) -> Chunk:
        index = tuple(int(i) for i in np.unravel_index(number, self.grid))
        return index[0] if len(index) == 1 else index

    def chunk_ids(self) -> list[Chunk]:
        """Every chunk, in row-major order (ints for a 1-D grid, ``(i, j)`` for a 2-D one)."""
        return [self._unflat(n) for n in range(self.num_chunks)]

    def chunk_region(self, chunk: Chunk) -> tuple[slice, ...]:
        """The slices of the leading axes that ``chunk`` covers."""
        index = np.unravel_index(self._flat(chunk), self.grid)
        return tuple(slice(int(i) * c, min((int(i) + 1) * c, s))
                     for i, c, s in zip(index, self.chunks, self.shape))

    def is_complete(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` was written and recorded (as of the last header read/write here)."""
        return self._flat(chunk) in self._complete

    def missing_chunks(self) -> list[Chunk]:
        """Chunks not yet complete, in row-major order."""
        return [self._unflat(n) for n in range(self.num_chunks) if n not in self._complete]

    @property
    def complete(self) -> bool:
        """Whether every chunk is complete."""
        return len(self._complete) == self.num_chunks

    def refresh(self) -> None:
        """Rereads which chunks are complete (other processes may be filling the store)."""
        self._complete = _unruns(_read_header(self.path / HEADER_FILE)["complete_chunks"])

    def write_chunk(self, chunk: Chunk, values: Any) -> None:
        """Writes ``chunk`` whole, flushes it to the file, then records it complete in the header.

        Args:
          chunk: an int (1-D grid) or ``(i, j)`` (2-D grid).
          values: array of exactly the chunk's shape (``chunk_region`` of the leading axes, the
            trailing axes whole); cast to the store's dtype (same kind only).

        Raises:
          ValueError: the store was opened read-only, ``values`` has another shape, or the chunk is
            already complete (chunks are written once; delete the store to recompute).
        """
        if not self.writable:
            raise ValueError(f"the array store {self.path} was opened read-only; use "
                             "ArrayStore.open(path, mode='r+').")
        number = self._flat(chunk)
        if number in self._complete:
            raise ValueError(f"chunk {chunk!r} of {self.path} is already complete; chunks are "
                             "written once (delete the store to recompute).")
        region = self.chunk_region(chunk)
        expected = tuple(r.stop - r.start for r in region) + self.shape[len(region):]
        values = np.asarray(values)
        if values.shape != expected:
            raise ValueError(f"values for chunk {chunk!r} must have shape {expected}, got "
                             f"{values.shape}.")
        if values.dtype != self.dtype and not np.can_cast(values.dtype, self.dtype, "same_kind"):
            raise TypeError(f"values of dtype {values.dtype} cannot be stored as {self.dtype}.")
        if values.size:
            self._data[region] = values
            self._flush(region)
        self._record(number)

    def _flush(self, region: tuple[slice, ...]) -> None:
        """Syncs the pages spanning ``region`` to the file (the data is on disk before the header
        says so)."""
        strides = self._data.strides
        first = self._offset + sum(r.start * st for r, st in zip(region, strides))
        last = self._offset + sum((r.stop - 1) * st for r, st in zip(region, strides))
        last += int(np.prod(self.shape[len(region):], dtype=np.int64)) * self.dtype.itemsize
        start = first - first % mmap.ALLOCATIONGRANULARITY
        self._map.flush(start, last - start)
        if hasattr(mmap, "MADV_DONTNEED"):
            # The pages are on disk (or dirty in the page cache, which keeps them): unmapping them
            # from this process keeps its resident set bounded by one chunk however large the
            # store is; a later read maps them back from the file.
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(mmap.MADV_DONTNEED, start, last - start)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.path / _LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _record(self, number: int) -> None:
        """Adds chunk ``number`` to the header's complete set (merged with other writers')."""
        header_path = self.path / HEADER_FILE
        with self._locked():
            header = _read_header(header_path)
            ours = {"shape": list(self.shape), "dtype": self.dtype.name, "chunks": list(self.chunks),
                    "arguments": self.arguments}
            if {k: header[k] for k in ours} != ours:
                raise ArgumentMismatchError(
                    f"the array store {self.path} was replaced by one with other settings while "
                    f"this process was writing chunk {self._unflat(number)!r}; not recording it.")
            done = _unruns(header["complete_chunks"]) | self._complete | {number}
            header["complete_chunks"] = _runs(done)
            header["complete"] = len(done) == self.num_chunks
            _write_header(header_path, header)
        self._complete = done

    # --- reading --------------------------------------------------------------------------------

    def _touched(self, axis: int, index: Index) -> np.ndarray:
        """Chunk numbers along ``axis`` that ``index`` reaches."""
        positions = np.arange(self.shape[axis])
        picked = positions[slice(None) if index is None else index]
        return np.unique(np.atleast_1d(picked) // self.chunks[axis])

    def _check_read(self, rows: Index, cols: Index) -> None:
        touched = [self._touched(0, rows)]
        if len(self.grid) == 2:
            touched.append(self._touched(1, cols))
        grid = np.stack(np.meshgrid(*touched, indexing="ij"), -1).reshape(-1, len(self.grid))
        missing = [tuple(int(i) for i in c) for c in grid
                   if int(np.ravel_multi_index(tuple(c), self.grid)) not in self._complete]
        if missing:
            shown = [m[0] if len(m) == 1 else m for m in missing[:5]]
            raise ValueError(
                f"the array store {self.path} has not completed chunks {shown}"
                f"{' ...' if len(missing) > 5 else ''} of the requested block; finish computing "
                "them, call refresh() if another process is writing, or pass allow_incomplete=True "
                "(unwritten entries read as zeros).")

    def read(self, rows: Index = None, cols: Index = None, allow_incomplete: bool = False
             ) -> np.ndarray:
        """A block of the array, copied into memory.

        Args:
          rows: index of the first axis (int, slice, or integer array); None for all.
          cols: index of the second axis; None for all.
          allow_incomplete: read chunks that are not complete (their entries are zeros or stale).

        Returns:
          ``values[rows][:, cols]`` (numpy advanced indexing per axis, trailing axes whole).

        Raises:
          ValueError: the block reaches a chunk that is not complete (unless allowed).
        """
        if not allow_incomplete:
            self._check_read(rows, cols)
        rows = slice(None) if rows is None else rows
        block = self._data[rows]
        if cols is not None:  # an integer row index drops the first axis
            axis = 0 if isinstance(rows, int | np.integer) else 1
            block = block[(slice(None),) * axis + (cols,)]
        return np.array(block)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        """``store[...]``: numpy indexing of the whole array, refusing incomplete chunks."""
        parts = key if isinstance(key, tuple) else (key,)
        if any(p is Ellipsis or p is None for p in parts[:2]):  # axes shift: check every chunk
            parts = ()
        self._check_read(parts[0] if parts else None, parts[1] if len(parts) > 1 else None)
        return np.array(self._data[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.read().astype(dtype) if dtype is not None else self.read()

    def close(self) -> None:
        """Releases the memory map (the store stays on disk)."""
        self._data = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view handed out still uses it
                self._map.close()
            self._map = None

    def __repr__(self) -> str:
        return (f"ArrayStore({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, "
                f"chunks={self.chunks}, complete {len(self._complete)}/{self.num_chunks})")
