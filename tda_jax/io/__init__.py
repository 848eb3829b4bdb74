"""Saving and resuming: stages with saved arguments, atomic JSON, array stores."""

from tda_jax.io.fingerprint import fingerprint
from tda_jax.io.stages import (
    ArgumentMismatchError,
    CorruptStageFileError,
    Stage,
    allow_overwrite,
    atomic_write_text,
    finished_work,
    write_json,
    write_npz,
)
from tda_jax.io.store import ArrayStore, StoreCorruptError

__all__ = [
    "ArgumentMismatchError",
    "ArrayStore",
    "CorruptStageFileError",
    "Stage",
    "StoreCorruptError",
    "allow_overwrite",
    "atomic_write_text",
    "finished_work",
    "fingerprint",
    "write_json",
    "write_npz",
]
