"""One content fingerprint for arrays and pytrees, recorded in saved arguments.

Every stage that saves its arguments (curvature passes, training runs, LDS ground truth) pins the
exact parameters and data it was run on with :func:`fingerprint`, so a rerun on other data or other
weights is refused instead of silently reusing finished work.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def fingerprint(*trees: Any) -> str:
    """A 16-hex-digit SHA-256 digest of the leaves' shapes, dtypes and bytes, in tree order.

    Args:
      *trees: pytrees of arrays (parameters, datasets, masks, ...). ``None`` leaves are skipped.
        Memory-mapped and other row-readable arrays (:mod:`tda_jax.data.source`) are read block by
        block and hash as the same array in memory does.

    Returns:
      A short hexadecimal string; equal inputs give equal strings on every machine.
    """
    from tda_jax.data.dataset import _is_lazy, iter_row_blocks  # (tda_jax.data imports tda_jax.io)

    digest = hashlib.sha256()
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            if _is_lazy(leaf) and np.ndim(leaf) > 0:  # a memory map or a record source's column:
                # hashed block by block, the same bytes in the same order as a whole array.
                digest.update(f"{np.dtype(leaf.dtype)}{tuple(leaf.shape)}".encode())
                for _, block in iter_row_blocks(leaf):  # hashed in place: no copy of the block
                    digest.update(memoryview(np.ascontiguousarray(block)).cast("B"))
                continue
            leaf = np.ascontiguousarray(np.asarray(leaf))
            digest.update(f"{leaf.dtype}{leaf.shape}".encode())
            digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]
