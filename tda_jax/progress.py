"""Progress bars for long Python loops (tqdm), silenced with ``TDA_JAX_PROGRESS=0``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str | None = None, total: int | None = None,
             **kwargs) -> Iterable[T]:
    """Wraps ``iterable`` in a tqdm bar unless ``TDA_JAX_PROGRESS=0`` is set."""
    disable = os.environ.get("TDA_JAX_PROGRESS", "1") == "0"
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, **kwargs)
