"""Diagonal block: ``F = diag(E[sum_k DW_k^2])``, exactly the diagonal of the GGN / Fisher."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tda_jax.curvature.blocks.base import (
    LayerwiseBlock,
    default_damping,
    register_block,
    squared_gradient_sums,
)


class DiagonalBlock(LayerwiseBlock):
    """One pass accumulating squared per-example layer gradients (positions summed first)."""

    name = "diagonal"
    passes = ("diagonal",)

    def layer_statistics(self, pass_name, a, g, mask, inputs):
        return squared_gradient_sums(a, g)

    def layer_finalize(self, pass_name, spec, stats, count, factors, damping, eigh_dtype):
        values = (np.asarray(stats, np.float64) / count).astype(np.float32)
        used = default_damping(values.mean(), damping)
        return {"diagonal": jnp.asarray(values), "damping": jnp.float32(used)}

    def eigenvalues(self, factors):
        return factors["diagonal"]


DIAGONAL = register_block(DiagonalBlock())
