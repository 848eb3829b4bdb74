"""EK-FAC block (George et al. 2018): K-FAC's eigenbasis with eigenvalues refitted per entry.

After K-FAC's covariance pass, a second pass accumulates
``lambda = E[sum_k (Q_A^T DW_k Q_G)^2]`` (positions summed before squaring), the diagonal of the
curvature in the Kronecker eigenbasis. Default damping: ``0.1 x mean(lambda)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tda_jax.curvature.blocks.base import (
    default_damping,
    register_block,
    squared_gradient_sums,
)
from tda_jax.curvature.blocks.kfac import KFACBlock


class EKFACBlock(KFACBlock):
    """Covariance pass (eigenbases), then the ``lambda`` pass in those bases."""

    name = "ekfac"
    passes = ("covariance", "lambda")

    def layer_pass_inputs(self, pass_name, factors):
        if pass_name == "lambda":
            return (factors["eigvecs_A"], factors["eigvecs_G"])
        return None

    def layer_statistics(self, pass_name, a, g, mask, inputs):
        if pass_name == "lambda":
            return squared_gradient_sums(a, g, *inputs)
        return super().layer_statistics(pass_name, a, g, mask, inputs)

    def layer_finalize(self, pass_name, spec, stats, count, factors, damping, eigh_dtype):
        if pass_name != "lambda":
            return super().layer_finalize(pass_name, spec, stats, count, factors, damping, eigh_dtype)
        values = (np.asarray(stats, np.float64) / count).astype(np.float32)
        used = default_damping(values.mean(), damping)
        return {**factors, "lambda": jnp.asarray(values), "damping": jnp.float32(used)}

    def eigenvalues(self, factors):
        return factors["lambda"]


EKFAC = register_block(EKFACBlock())
