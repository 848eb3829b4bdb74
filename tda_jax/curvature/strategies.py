"""Curvature strategies: what each one accumulates and how it applies ``(F + damping I)^{-1}``.

Every strategy works on the matrix view ``W [in, out]`` of each tracked layer (bias as the last row)
and states the statistics it needs. ``a`` are layer inputs ``[B, T, in]``, ``g`` output gradients
``[K, B, T, out]``, per-example layer gradient ``DW_b = sum_{k?} sum_t a_t g_t^T``.

============  =================================================  ================================
strategy      curvature (per layer, per example normalised)       statistics
============  =================================================  ================================
identity      ``I``                                               none
diagonal      ``diag(E[DW^2])``                                   ``diagonal [in, out]``
kfac          ``A (x) G``, ``A = E[mean_t a a^T]``,               ``A``, ``G`` -> eigenbases
              ``G = E[sum_t g g^T]``
ekfac         K-FAC eigenbasis ``Q_A (x) Q_G`` with eigenvalues   ``A``, ``G``, then ``lambda``
              ``lambda = E[(Q_A^T DW Q_G)^2]`` (George et al.)
exact         dense ``F = E[J^T H J]`` over all tracked params    ``dense [P, P]``
============  =================================================  ================================

``A`` is averaged over positions and ``G`` summed over them (the usual "independent positions"
convention for shared weights); for plain MLP layers (``T = 1``) both are ordinary expectations.
Default damping (``damping=None``) is ``0.1 x`` the mean eigenvalue of each layer's curvature (the
whole matrix for ``exact``); an explicit float is used as is. The identity strategy has no damping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac", "exact")

# Which statistics each strategy accumulates, in order of passes over the data.
REQUIRED_PASSES = {
    "identity": (),
    "diagonal": ("diagonal",),
    "kfac": ("covariance",),
    "ekfac": ("covariance", "lambda"),
    "exact": ("dense",),
}


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}.")


def covariance_statistics(a: Array, g: Array, mask: Array) -> dict[str, Array]:
    """Sums for the Kronecker factors of one batch: ``{"A": [in, in], "G": [out, out]}``.

    ``a`` rows of padded examples are zeroed with ``mask``; ``g`` is already zero there.
    """
    masked_a = a * mask[:, None, None].astype(a.dtype)
    positions = a.shape[1]
    return {
        "A": jnp.einsum("bti,btj->ij", masked_a, a) / positions,
        "G": jnp.einsum("kbto,kbtp->op", g, g),
    }


def squared_gradient_statistics(a: Array, g: Array, basis_a: Array | None = None,
                                basis_g: Array | None = None) -> Array:
    """``sum_{k,b} (Q_A^T DW_{k,b} Q_G)^2`` -> ``[in, out]`` (identity bases give the diagonal).

    For ``T = 1`` the per-example gradient is an outer product and the square factorises, so no
    ``[B, in, out]`` array is formed.
    """
    if basis_a is not None:
        a = a @ basis_a
    if basis_g is not None:
        g = g @ basis_g
    if a.shape[1] == 1:
        return jnp.einsum("bi,kbo->io", jnp.square(a[:, 0]), jnp.square(g[:, :, 0]))
    grads = jnp.einsum("bti,kbto->kbio", a, g)
    return jnp.sum(jnp.square(grads), axis=(0, 1))


def default_damping(eigenvalues_mean: float, damping: float | None) -> float:
    """``damping`` if given, else ``0.1 x`` the mean eigenvalue."""
    if damping is not None:
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}.")
        return float(damping)
    return 0.1 * float(eigenvalues_mean)


def precondition_layer(strategy: str, factors: dict[str, Array], damping: float,
                       v: Array) -> Array:
    """Applies ``(F_layer + damping I)^{-1}`` to ``v [..., in, out]`` for one layer."""
    if strategy == "identity":
        return v
    if strategy == "diagonal":
        return v / (factors["diagonal"] + damping)
    if strategy in ("kfac", "ekfac"):
        qa, qg = factors["eigvecs_A"], factors["eigvecs_G"]
        if strategy == "kfac":
            eig = jnp.outer(factors["eigvals_A"], factors["eigvals_G"])
        else:
            eig = factors["lambda"]
        rotated = jnp.swapaxes(qa, 0, 1) @ v @ qg
        return qa @ (rotated / (eig + damping)) @ jnp.swapaxes(qg, 0, 1)
    raise ValueError(f"strategy {strategy!r} is not applied per layer.")


def self_quadratic_layer(strategy: str, factors: dict[str, Array], damping: float,
                         a: Array, g: Array) -> Array:
    """``<DW_b, (F + damping)^{-1} DW_b>`` per example for one layer -> ``[B]``.

    Works on the factors; for ``T = 1`` it never forms a ``[B, in, out]`` gradient.
    """
    if strategy == "identity":
        weights = None
    elif strategy == "diagonal":
        weights = 1.0 / (factors["diagonal"] + damping)
    elif strategy == "kfac":
        weights = 1.0 / (jnp.outer(factors["eigvals_A"], factors["eigvals_G"]) + damping)
    elif strategy == "ekfac":
        weights = 1.0 / (factors["lambda"] + damping)
    else:
        raise ValueError(f"strategy {strategy!r} is not applied per layer.")
    if strategy in ("kfac", "ekfac"):
        a = a @ factors["eigvecs_A"]
        g = g @ factors["eigvecs_G"]
    g = g[0]  # training-loss gradients have a single cotangent: [1, B, T, out]
    if a.shape[1] == 1:
        a2, g2 = jnp.square(a[:, 0]), jnp.square(g[:, 0])
        if weights is None:
            return jnp.sum(a2, axis=-1) * jnp.sum(g2, axis=-1)
        return jnp.einsum("bi,io,bo->b", a2, weights, g2)
    grads = jnp.einsum("bti,bto->bio", a, g)
    if weights is None:
        return jnp.sum(jnp.square(grads), axis=(1, 2))
    return jnp.einsum("bio,io->b", jnp.square(grads), weights)
