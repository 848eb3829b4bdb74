"""Persistent pipeline stages: saved arguments, resumable outputs, no silent overwrites.

A *stage* is a directory holding ``arguments.json`` (the settings that produced it), its outputs,
and a ``COMPLETE`` marker written last. Rerunning a stage with the same arguments reuses its outputs
(an interrupted stage resumes from its finished parts).

**Finished work** of a stage is exactly what :meth:`Stage.finished_work` lists, anywhere below the
stage directory:

* a ``COMPLETE`` marker (:meth:`Stage.mark_complete`; below the top level: a nested stage that
  finished);
* an array file ``<name>.npz`` (:meth:`Stage.save_arrays` / :func:`write_npz`: written to a hidden
  temporary file and renamed, so a visible ``.npz`` file is a finished part);
* a trajectory checkpoint ``checkpoints/<step>/`` (orbax renames a checkpoint into its step number
  only once it is fully written);
* an array store (:mod:`tda_jax.io.store`) whose ``header.json`` records at least one complete
  chunk (or whose header is unreadable, since then nothing can be told), listed as its
  ``header.json``.

Everything else (``arguments.json``, JSON side files, hidden ``.*.tmp`` temporaries of an
interrupted write, empty folders) is *partial* and worth nothing on its own.

Opening a stage whose saved arguments differ from the new ones:

* no finished work (a crash or a config typo before anything finished): the stale partial files are
  removed (logged as a warning) and the stage starts afresh with the new arguments;
* finished work: :class:`ArgumentMismatchError`, naming each differing argument and the finished
  files, unless the caller opts in with ``Stage(..., overwrite=True)`` (or inside
  :func:`allow_overwrite`, which the experiments' ``--overwrite`` flag sets): then the directory's
  contents are deleted (logged as a warning) and the stage starts afresh.

``overwrite`` never discards a stage whose arguments are equal: it is reused as always.

In a multi-process run (``jax.distributed``) process 0 alone opens, checks and writes the stage
(arguments, arrays, the marker) and the other processes wait for it: opening a stage,
:meth:`Stage.save_arrays` and :meth:`Stage.mark_complete` are called by every process and return
once the files are there, so every process may read them back at once. The directory must be on a
file system that every process sees.

Example::

    stage = Stage(workdir / "factors", {"strategy": "ekfac", "damping": None})
    if stage.is_complete():
        arrays = stage.load_arrays("factors")
    else:
        arrays = compute()
        stage.save_arrays("factors", arrays)
        stage.mark_complete()
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import secrets
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

_ARGS_FILE = "arguments.json"
_MARKER = "COMPLETE"
_TMP_SUFFIX = ".tmp"
_CHECKPOINTS = "checkpoints"
# Files of a tda_jax.io.store.ArrayStore (read here without importing it: it imports this module).
_STORE_HEADER = "header.json"
_STORE_DATA = "data.npy"

_log = logging.getLogger(__name__)
_OVERWRITE = contextvars.ContextVar("tda_jax_stage_overwrite", default=False)


class ArgumentMismatchError(ValueError):
    """A stage directory holds finished work computed with different arguments."""


class CorruptStageFileError(ValueError):
    """A file of a stage cannot be read (truncated or corrupt); the message names it."""


@contextlib.contextmanager
def allow_overwrite(enabled: bool = True) -> Iterator[None]:
    """Within this block, stages opened without an explicit ``overwrite`` use ``enabled``.

    Lets an experiment's ``--overwrite`` flag reach stages opened inside library functions
    (ground truth, curvature, training checkpoints). Each replacement is logged as a warning.
    """
    token = _OVERWRITE.set(bool(enabled))
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def _jsonable(value: Any) -> Any:
    """Converts configs, tuples and numpy scalars into plain JSON values."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return repr(value)


def _diff(saved: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(saved) | set(new)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in saved:
                out.append(f"{name}: not in saved arguments, now {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: saved {saved[key]!r}, now missing")
            else:
                out.extend(_diff(saved[key], new[key], name))
        return out
    return [] if saved == new else [f"{prefix or '<root>'}: saved {saved!r}, now {new!r}"]


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` through a hidden temporary file in the same folder and a rename.

    The temporary file is created with mode ``0o666`` minus the umask (what ``open`` gives), and
    removed if writing fails or is interrupted, so ``path`` is either the old file or the whole new
    one and nothing is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (temporary file + rename), mode 0666 & ~umask."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def write_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> None:
    """Saves a flat mapping of arrays as an uncompressed ``.npz`` file atomically."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def finished_work(directory: str | os.PathLike) -> list[str]:
    """The finished work below ``directory`` (see the module docstring), as sorted relative paths.

    Args:
      directory: a stage directory (need not exist).

    Returns:
      ``COMPLETE`` markers, ``*.npz`` array files, ``checkpoints/<step>/`` folders (suffixed
      with ``/``) and the ``header.json`` of array stores with complete chunks, relative to
      ``directory``.
    """
    root = Path(directory)
    found = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder).relative_to(root)
        for name in files:
            if name == _MARKER or (name.endswith(".npz") and not name.startswith(".")):
                found.append((here / name).as_posix())
            elif name == _STORE_HEADER and _store_has_chunks(Path(folder)):
                found.append((here / name).as_posix())
        if Path(folder).name == _CHECKPOINTS:
            steps = [d for d in subfolders if d.isdigit()]
            found.extend(f"{(here / d).as_posix()}/" for d in steps)
            subfolders[:] = [d for d in subfolders if not d.isdigit()]
    return sorted(found)


def _store_has_chunks(folder: Path) -> bool:
    """Whether the array store in ``folder`` has recorded a complete chunk (or cannot be read)."""
    try:
        header = json.loads((folder / _STORE_HEADER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return (folder / _STORE_DATA).exists()
    return isinstance(header, dict) and bool(header.get("complete_chunks"))


def _summarize_paths(paths: list[str], limit: int = 6) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _remove_contents(directory: Path) -> list[str]:
    """Deletes every entry of ``directory`` (not the directory itself); returns their names."""
    removed = []
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            removed.append(entry.name + "/")
        else:
            entry.unlink()
            removed.append(entry.name)
    return removed


def _on_main(fn: Callable[[], Any], what: str) -> None:
    """Runs ``fn`` (a write) on process 0 of a multi-process run while the others wait for it
    (they raise if it fails); just ``fn()`` on one process."""
    from tda_jax.sharding import run_on_main  # imports jax: only when a stage is used

    run_on_main(fn, what)


class Stage:
    """A directory of outputs tied to the arguments that produced them.

    Args:
      directory: where the stage lives; created if missing.
      arguments: JSON-serialisable settings (dicts, ConfigDicts, numbers, strings). Saved on first
        use and compared on every later use.
      overwrite: whether finished work computed with *other* arguments may be deleted and
        recomputed (logged as a warning). ``None``: the value of the enclosing
        :func:`allow_overwrite` block (``False`` outside one). A stage with equal arguments is
        reused whatever this says.

    Raises:
      ArgumentMismatchError: if the directory holds finished work (:func:`finished_work`) made
        with other arguments (or with unreadable saved arguments) and ``overwrite`` is false. A
        directory without finished work is cleared and reused instead (logged as a warning).
    """

    def __init__(self, directory: str | os.PathLike, arguments: Mapping[str, Any],
                 overwrite: bool | None = None):
        self.directory = Path(directory)
        self.arguments = _jsonable(dict(arguments))
        self.overwrite = _OVERWRITE.get() if overwrite is None else bool(overwrite)
        _on_main(self._open, f"opening the stage {self.directory}")

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args_path = self.directory / _ARGS_FILE
        if not args_path.exists():
            write_json(args_path, self.arguments)
            return
        try:
            differences = _diff(json.loads(args_path.read_text()), self.arguments)
        except (ValueError, UnicodeDecodeError) as err:
            differences = [f"{_ARGS_FILE} is unreadable ({type(err).__name__}: {err})"]
        if differences:
            self._replace(differences)

    def _replace(self, differences: list[str]) -> None:
        """Starts the stage afresh with the new arguments, unless that would discard finished
        work without ``overwrite``."""
        listed = "\n  ".join(differences)
        finished = finished_work(self.directory)
        if finished and not self.overwrite:
            raise ArgumentMismatchError(
                f"{self.directory} holds finished work computed with different arguments:\n  "
                f"{listed}\nFinished work there: {_summarize_paths(finished)}.\nTo recompute "
                "it with the new arguments (deleting that work), pass overwrite=True to Stage "
                "(experiments: rerun with --overwrite) or delete the directory; to keep it, use "
                "another work directory."
            )
        removed = _remove_contents(self.directory)
        if finished:
            _log.warning(
                "stage %s: overwrite requested; deleted its finished work (%s) and every other "
                "file, computed with different arguments:\n  %s",
                self.directory, _summarize_paths(finished), listed)
        else:
            _log.warning(
                "stage %s: arguments changed and nothing had finished there; removed its stale "
                "partial files (%s) and starting afresh. Differences:\n  %s",
                self.directory, _summarize_paths(removed), listed)
        write_json(self.directory / _ARGS_FILE, self.arguments)

    def finished_work(self) -> list[str]:
        """The stage's finished work (see :func:`finished_work`)."""
        return finished_work(self.directory)

    def is_complete(self) -> bool:
        """Whether the stage finished (its marker exists)."""
        return (self.directory / _MARKER).exists()

    def mark_complete(self) -> None:
        """Marks the stage finished; call after every output is saved (on every process of a
        multi-process run; process 0 writes it)."""
        _on_main(lambda: atomic_write_text(self.directory / _MARKER, ""),
                 f"marking the stage {self.directory} complete")

    def path(self, name: str) -> Path:
        """The path of the stage's file ``name``."""
        return self.directory / name

    def save_arrays(self, name: str, arrays: Mapping[str, Any]) -> None:
        """Saves a flat mapping of arrays as ``name.npz`` (a finished part) plus a dtype record
        ``name.dtypes.json``, each atomically; the ``.npz`` is written last.

        Refuses to overwrite the outputs of a completed stage. In a multi-process run every
        process calls it (with the same values) and process 0 writes; it returns on every process
        once the files are there.
        """
        arrays = {k: np.asarray(v) for k, v in arrays.items()}

        def write() -> None:
            if self.is_complete():
                raise FileExistsError(
                    f"stage {self.directory} is complete; refusing to overwrite {name!r}. Delete "
                    "the stage directory to recompute it."
                )
            write_json(self.directory / f"{name}.dtypes.json",
                       {k: str(v.dtype) for k, v in arrays.items()})
            write_npz(self.directory / f"{name}.npz", arrays)

        _on_main(write, f"saving {name!r} in the stage {self.directory}")

    def _unreadable(self, path: Path, err: BaseException) -> CorruptStageFileError:
        marker = " and the stage's COMPLETE marker" if self.is_complete() else ""
        return CorruptStageFileError(
            f"cannot read {path} ({type(err).__name__}: {err}): the file is truncated or corrupt "
            f"(an interrupted copy, a full disk). It belongs to the stage {self.directory}. Delete "
            f"this file{marker} and rerun to recompute it (the stage's other finished parts are "
            "reused), or delete the stage directory to recompute the whole stage."
        )

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        """Loads arrays saved by :meth:`save_arrays` (dtypes such as bfloat16 restored).

        Raises:
          FileNotFoundError: if the stage has no output ``name``.
          CorruptStageFileError: if the file is truncated or corrupt (naming it and the stage).
        """
        target = self.directory / f"{name}.npz"
        if not target.exists():
            raise FileNotFoundError(f"stage {self.directory} has no output {name!r}")
        try:
            with np.load(target) as data:
                arrays = {k: data[k] for k in data.files}
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
            raise self._unreadable(target, err) from err
        record = self.directory / f"{name}.dtypes.json"
        if record.exists():
            dtypes = self.load_json(record.name)
            for key, value in arrays.items():
                # np.savez stores extension dtypes (bfloat16, float8) as raw bytes ("|V2").
                if value.dtype.kind != "V" or key not in dtypes:
                    continue
                try:
                    saved = np.dtype(dtypes[key])  # extension names resolve once ml_dtypes loaded
                except TypeError:
                    continue
                if saved.itemsize == value.dtype.itemsize:
                    arrays[key] = value.view(saved)
        return arrays

    def load_json(self, name: str) -> Any:
        """Reads the stage's JSON file ``name``.

        Raises:
          FileNotFoundError: if it does not exist.
          CorruptStageFileError: if it is truncated or corrupt (naming it and the stage).
        """
        path = self.directory / name
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise self._unreadable(path, err) from err

    def has(self, name: str) -> bool:
        """Whether the finished part ``name.npz`` exists."""
        return (self.directory / f"{name}.npz").exists()
