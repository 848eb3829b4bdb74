"""Exact block: the dense ``[P, P]`` GGN / Fisher over all tracked parameters (small models).

One pass accumulates ``sum_b sum_k vec(DW_{k,b}) vec(DW_{k,b})^T`` (``P x P`` memory). On the host,
in ``eigh_dtype`` (float64 by default), the mean is damped (default ``0.1 x trace / P``) and
factorised by a blocked Cholesky; the factor ``L`` is kept in float32 on the device, so the block is
a pytree like any other and ``(F + damping)^-1 v`` is two triangular solves under ``jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from tda_jax.capture.statistics import layer_gradients
from tda_jax.curvature.blocks.base import (
    CurvatureBlock,
    default_damping,
    register_block,
)


def blocked_cholesky(matrix: np.ndarray, block: int = 8192) -> np.ndarray:
    """Lower Cholesky factor of a symmetric positive definite host matrix, by 2x2 blocks.

    Multithreaded OpenBLAS ``potrf`` was seen to crash (segfault) on matrices of ~23k rows here; the
    recursion keeps every LAPACK call at most ``block`` rows and does the rest with ``trsm``/``gemm``.
    ``matrix`` is overwritten.
    """
    n = matrix.shape[0]
    if n <= block:
        return scipy.linalg.cholesky(matrix, lower=True, overwrite_a=True, check_finite=False)
    half = n // 2
    top = blocked_cholesky(np.array(matrix[:half, :half]), block)
    lower_left = scipy.linalg.solve_triangular(top, matrix[half:, :half].T, lower=True,
                                               check_finite=False).T
    schur = matrix[half:, half:] - lower_left @ lower_left.T
    bottom = blocked_cholesky(schur, block)
    matrix[:half, :half] = top
    matrix[:half, half:] = 0.0
    matrix[half:, :half] = lower_left
    matrix[half:, half:] = bottom
    return matrix


def _flatten(specs, grads) -> jax.Array:
    """``{layer: [Q, in, out]}`` -> ``[Q, P]`` in ``specs`` order."""
    return jnp.concatenate([jnp.reshape(grads[s.name], (grads[s.name].shape[0], -1)) for s in specs],
                           axis=1)


def _unflatten(specs, flat) -> dict[str, jax.Array]:
    out, offset = {}, 0
    for s in specs:
        out[s.name] = jnp.reshape(flat[:, offset:offset + s.num_params], (-1, s.in_dim, s.out_dim))
        offset += s.num_params
    return out


class ExactBlock(CurvatureBlock):
    """Dense curvature; factors ``{"cholesky": L [P, P], "damping", "trace_mean"}``."""

    name = "exact"
    passes = ("dense",)

    def statistics(self, pass_name, specs, a, g, mask, inputs):
        rows = [jnp.reshape(layer_gradients(a[s.name], g[s.name]), (-1, s.num_params)) for s in specs]
        jac = jnp.concatenate(rows, axis=1)
        return {"F": jac.T @ jac}

    def finalize(self, pass_name, specs, stats, count, factors, damping, eigh_dtype):
        # P x P can be gigabytes: take the statistic out of ``stats`` so it is freed, work in place.
        dense = np.array(stats.pop("F"), dtype=eigh_dtype)
        dense /= count
        trace_mean = float(np.trace(dense)) / dense.shape[0]
        largest_diagonal = float(np.max(np.diag(dense)))
        used = default_damping(trace_mean, damping)
        dense[np.diag_indices_from(dense)] += used
        try:
            cholesky = blocked_cholesky(dense)
        except np.linalg.LinAlgError:
            cholesky = None
        smallest_pivot = 0.0 if cholesky is None else float(np.min(np.diag(cholesky))) ** 2
        if not np.isfinite(smallest_pivot) or smallest_pivot <= 1e-7 * (largest_diagonal + used):
            raise ValueError(
                f"exact curvature: F + damping is singular (damping {used:.3g}, smallest Cholesky "
                f"pivot {smallest_pivot:.3g}, largest diagonal {largest_diagonal:.3g}); e.g. constant "
                "input features give zero eigenvalues. Use damping > 0 or damping=None.")
        del dense
        lower = jnp.asarray(cholesky, dtype=jnp.float32)
        del cholesky
        return {"cholesky": lower, "damping": jnp.float32(used), "trace_mean": jnp.float32(trace_mean)}

    def _solve(self, factors, flat):
        return jax.scipy.linalg.cho_solve((factors["cholesky"], True), flat.T).T

    def query_transform(self, specs, factors, grads):
        return _unflatten(specs, self._solve(factors, _flatten(specs, grads)))

    def precondition(self, specs, factors, grads):
        return self.query_transform(specs, factors, grads)

    def self_quadratic(self, specs, factors, a, g):
        flat = jnp.concatenate([jnp.reshape(layer_gradients(a[s.name], g[s.name])[0],
                                            (a[s.name].shape[0], -1)) for s in specs], axis=1)
        return jnp.sum(flat * self._solve(factors, flat), axis=1)

    def to_dense(self, specs, factors, damped=False):
        lower = factors["cholesky"]
        dense = lower @ lower.T
        return dense if damped else dense - factors["damping"] * jnp.eye(dense.shape[0])

    def damping(self, specs, factors):
        return {"exact": float(factors["damping"])}


EXACT = register_block(ExactBlock())

__all__ = ["EXACT", "ExactBlock", "blocked_cholesky"]
