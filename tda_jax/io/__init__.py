"""Saving and resuming: stages with saved arguments, atomic JSON, array stores."""

from tda_jax.io.fingerprint import fingerprint
from tda_jax.io.stages import ArgumentMismatchError, Stage, atomic_write_text, write_json

__all__ = ["ArgumentMismatchError", "Stage", "atomic_write_text", "fingerprint", "write_json"]
