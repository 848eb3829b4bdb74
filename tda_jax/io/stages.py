"""Persistent pipeline stages: saved arguments, resumable outputs, no silent overwrites.

A *stage* is a directory holding ``arguments.json`` (the settings that produced it), its outputs,
and a ``COMPLETE`` marker written last. Rerunning a stage with the same arguments reuses its outputs;
rerunning with different arguments raises :class:`ArgumentMismatchError` naming each differing key,
so finished work is never silently overwritten. An interrupted stage (no marker) is recomputed.

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

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

_ARGS_FILE = "arguments.json"
_MARKER = "COMPLETE"


class ArgumentMismatchError(ValueError):
    """A stage directory holds results computed with different arguments."""


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


class Stage:
    """A directory of outputs tied to the arguments that produced them.

    Args:
      directory: where the stage lives; created if missing.
      arguments: JSON-serialisable settings (dicts, ConfigDicts, numbers, strings). Saved on first
        use and compared on every later use.

    Raises:
      ArgumentMismatchError: if the directory already holds a stage made with other arguments.
    """

    def __init__(self, directory: str | os.PathLike, arguments: Mapping[str, Any]):
        self.directory = Path(directory)
        self.arguments = _jsonable(dict(arguments))
        self.directory.mkdir(parents=True, exist_ok=True)
        args_path = self.directory / _ARGS_FILE
        if args_path.exists():
            saved = json.loads(args_path.read_text())
            differences = _diff(saved, self.arguments)
            if differences:
                raise ArgumentMismatchError(
                    f"{self.directory} holds results computed with different arguments:\n  "
                    + "\n  ".join(differences)
                    + "\nUse another work directory, or delete this stage directory to recompute."
                )
        else:
            write_json(args_path, self.arguments)

    def is_complete(self) -> bool:
        """Whether the stage finished (its marker exists)."""
        return (self.directory / _MARKER).exists()

    def mark_complete(self) -> None:
        """Marks the stage finished; call after every output is saved."""
        atomic_write_text(self.directory / _MARKER, "")

    def path(self, name: str) -> Path:
        return self.directory / name

    def save_arrays(self, name: str, arrays: Mapping[str, Any]) -> None:
        """Saves a flat mapping of arrays as ``name.npz`` plus a dtype record ``name.dtypes.json``.

        Refuses to overwrite the outputs of a completed stage.
        """
        if self.is_complete():
            raise FileExistsError(
                f"stage {self.directory} is complete; refusing to overwrite {name!r}. Delete the "
                "stage directory to recompute it."
            )
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        target = self.directory / f"{name}.npz"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, target)
        write_json(self.directory / f"{name}.dtypes.json", {k: str(v.dtype) for k, v in arrays.items()})

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        """Loads arrays saved by :meth:`save_arrays`."""
        target = self.directory / f"{name}.npz"
        if not target.exists():
            raise FileNotFoundError(f"stage {self.directory} has no output {name!r}")
        with np.load(target) as data:
            return {k: data[k] for k in data.files}

    def has(self, name: str) -> bool:
        return (self.directory / f"{name}.npz").exists()
