"""K-FAC block: ``F_l = A (x) G`` with ``A = mean_{b,t} a_t a_t^T`` and ``G = E_b[sum_k sum_t g g^T]``.

``A`` is averaged over all real positions of all examples (padding tokens left out) and ``G``
summed over positions (and over the expected Fisher's ``K`` cotangents) and averaged over
examples, the usual convention for shared weights (conv positions, tokens, a layer called twice);
for ``T = 1`` both are ordinary expectations. ``A`` and ``G`` are eigendecomposed on the host
in ``eigh_dtype``; the preconditioner works in the eigenbasis ``Q_A (x) Q_G`` with eigenvalues
``outer(eig_A, eig_G)``. Default damping: ``0.1 x mean(eig_A) x mean(eig_G)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tda_jax.curvature.blocks.base import (
    LayerwiseBlock,
    default_damping,
    lapack_threads,
    register_block,
)


def covariance_sums(a, g, mask):
    """``{"A": sum_{b,t} m a a^T, "A_count": sum m, "G": sum_{k,b,t} g g^T}`` for one batch.

    ``mask [B, T]`` marks real positions of real examples. ``g`` is masked too: for a transposed
    call (a tied ``Embed.attend``) its ``g`` part is the call's input, not a gradient, so it is not
    zero on padded rows by itself.
    """
    masked_a = a * mask[:, :, None].astype(a.dtype)
    masked_g = g * mask[None, :, :, None].astype(g.dtype)
    return {"A": jnp.einsum("bti,btj->ij", masked_a, a), "A_count": jnp.sum(mask),
            "G": jnp.einsum("kbto,kbtp->op", masked_g, g)}


def host_eigh(matrix: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0) and eigenvectors of a symmetric host matrix, computed in ``dtype``."""
    matrix = np.asarray(matrix, dtype=dtype)
    with lapack_threads(matrix.shape[-1]):
        vals, vecs = np.linalg.eigh(matrix)
    return np.clip(vals, 0.0, None).astype(np.float32), vecs.astype(np.float32)


class KFACBlock(LayerwiseBlock):
    """Kronecker-factored curvature from one covariance pass."""

    name = "kfac"
    passes = ("covariance",)

    def layer_statistics(self, pass_name, a, g, mask, inputs):
        return covariance_sums(a, g, mask)

    def layer_finalize(self, pass_name, spec, stats, count, factors, damping, eigh_dtype):
        vals_a, vecs_a = host_eigh(np.asarray(stats["A"]) / max(float(stats["A_count"]), 1.0),
                                   eigh_dtype)
        vals_g, vecs_g = host_eigh(np.asarray(stats["G"]) / count, eigh_dtype)
        used = default_damping(vals_a.mean() * vals_g.mean(), damping)
        return {"eigvecs_A": jnp.asarray(vecs_a), "eigvals_A": jnp.asarray(vals_a),
                "eigvecs_G": jnp.asarray(vecs_g), "eigvals_G": jnp.asarray(vals_g),
                "damping": jnp.float32(used)}

    def layer_finalize_cost(self, pass_name, spec):
        if pass_name == "covariance":  # two symmetric eigendecompositions, O(n^3) each
            return float(spec.in_dim ** 3 + spec.out_dim ** 3)
        return super().layer_finalize_cost(pass_name, spec)

    def basis(self, factors):
        return factors["eigvecs_A"], factors["eigvecs_G"]

    def eigenvalues(self, factors):
        return jnp.outer(factors["eigvals_A"], factors["eigvals_G"])


KFAC = register_block(KFACBlock())
