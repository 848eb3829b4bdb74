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

    Returns:
      A short hexadecimal string; equal inputs give equal strings on every machine.
    """
    digest = hashlib.sha256()
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            leaf = np.ascontiguousarray(np.asarray(leaf))
            digest.update(f"{leaf.dtype}{leaf.shape}".encode())
            digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]
