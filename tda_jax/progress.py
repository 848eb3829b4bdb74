"""Progress bars for long Python loops (tqdm), silenced with ``TDA_JAX_PROGRESS=0``.

In a multi-process run (``jax.distributed``) only process 0 draws bars, so a stage shows one bar
however many processes work on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

import jax
from tqdm.auto import tqdm

T = TypeVar("T")


def _disabled() -> bool:
    if os.environ.get("TDA_JAX_PROGRESS", "1") == "0":
        return True
    # Checked without starting a JAX backend when no distributed run was initialized.
    return jax.distributed.is_initialized() and jax.process_index() != 0


def progress(iterable: Iterable[T], desc: str | None = None, total: int | None = None,
             **kwargs) -> Iterable[T]:
    """Wraps ``iterable`` in a tqdm bar unless ``TDA_JAX_PROGRESS=0`` or not process 0."""
    return tqdm(iterable, desc=desc, total=total, disable=_disabled(), leave=False, **kwargs)


def progress_bar(total: int, desc: str | None = None, **kwargs) -> tqdm:
    """A bar advanced by hand (``bar.update(n)``, ``bar.close()``) for work spread over nested
    loops, e.g. query super-blocks x training batches; silenced like :func:`progress`."""
    return tqdm(total=total, desc=desc, disable=_disabled(), leave=False, **kwargs)
