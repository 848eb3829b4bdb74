"""Linear-Gaussian model with closed-form mutual information.

The generative model is ``z ~ N(0, I_{d_z})``, ``x = W z + sigma * eps`` with ``eps ~ N(0, I_{d_x})``.
Everything about it is available in closed form:

* ``log p(x | z) = log N(x; W z, sigma^2 I)``
* ``log p(x) = log N(x; 0, W W^T + sigma^2 I)``
* ``p(z | x) = N(Lambda^{-1} W^T x / sigma^2, Lambda^{-1})`` with ``Lambda = I + W^T W / sigma^2``
* ``I(x; z) = 0.5 log det(I + W W^T / sigma^2) = 0.5 sum_i log(1 + s_i^2 / sigma^2)`` for the
  singular values ``s_i`` of ``W``.

Correlated Gaussians (``x_i = rho z_i + sqrt(1 - rho^2) eps_i``, ``I = -d/2 log(1 - rho^2)``) are the
special case ``W = rho I``, ``sigma = sqrt(1 - rho^2)`` (:func:`correlated_gaussian_model`).

:func:`scale_to_mi` rescales a fixed ``W`` so that the model's MI equals a requested number of nats,
and :func:`true_mi_sample` gives the exact value of ``log p(x|z) - log p(x)`` averaged over the very
samples a bound is evaluated on (the reference that removes sampling noise from comparisons).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)


class LinearGaussianModel(NamedTuple):
    """``z ~ N(0, I)``, ``x | z ~ N(W z, noise_std^2 I)``.

    Attributes:
      weight: ``W``, ``[x_dim, z_dim]``.
      noise_std: ``sigma``, a positive scalar.
    """

    weight: Array
    noise_std: Array

    @property
    def x_dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def z_dim(self) -> int:
        return int(self.weight.shape[1])


def _check_model(model: LinearGaussianModel) -> None:
    if jnp.ndim(model.weight) != 2:
        raise ValueError(
            f"`model.weight` must be a matrix [x_dim, z_dim], got shape {jnp.shape(model.weight)}."
        )
    if jnp.ndim(model.noise_std) != 0:
        raise ValueError(
            f"`model.noise_std` must be a scalar, got shape {jnp.shape(model.noise_std)}."
        )


def linear_gaussian_model(weight: Array, noise_std: float = 1.0) -> LinearGaussianModel:
    """Builds a :class:`LinearGaussianModel`, checking shapes and the noise level.

    Args:
      weight: ``[x_dim, z_dim]``.
      noise_std: positive observation noise standard deviation.

    Returns:
      The model.
    """
    weight = jnp.asarray(weight, jnp.float32)
    if not float(noise_std) > 0.0:
        raise ValueError(f"`noise_std` must be positive, got {noise_std}.")
    model = LinearGaussianModel(weight, jnp.asarray(noise_std, jnp.float32))
    _check_model(model)
    return model


def correlated_gaussian_model(rho: float, dim: int) -> LinearGaussianModel:
    """Correlated Gaussians ``x_i = rho z_i + sqrt(1 - rho^2) eps_i``; MI ``-dim/2 log(1-rho^2)``.

    Args:
      rho: correlation in ``(-1, 1)``.
      dim: number of independent correlated pairs.

    Returns:
      The model with ``W = rho I`` and ``sigma = sqrt(1 - rho^2)``.
    """
    if not -1.0 < rho < 1.0:
        raise ValueError(f"`rho` must lie in (-1, 1), got {rho}.")
    return linear_gaussian_model(rho * jnp.eye(dim), math.sqrt(1.0 - rho**2))


def linear_gaussian_mi(model: LinearGaussianModel) -> Array:
    """Closed-form ``I(x; z) = 0.5 log det(I + W W^T / sigma^2)`` in nats (scalar)."""
    _check_model(model)
    singular_values = jnp.linalg.svd(model.weight, compute_uv=False)
    return 0.5 * jnp.sum(jnp.log1p(singular_values**2 / model.noise_std**2))


def scale_to_mi(base_weight: Array, target_mi: float, noise_std: float = 1.0) -> Array:
    """Returns ``c * base_weight`` with ``c > 0`` chosen so that the model's MI is ``target_mi``.

    ``MI(c) = 0.5 sum_i log(1 + c^2 s_i^2 / sigma^2)`` is increasing in ``c``; it is solved by
    bisection on ``log c`` in float64 on the host (accurate to about 1e-9 nats).

    Args:
      base_weight: ``[x_dim, z_dim]`` with at least one non-zero singular value.
      target_mi: requested MI in nats, positive.
      noise_std: observation noise ``sigma``.

    Returns:
      The scaled weight ``[x_dim, z_dim]`` (float32).
    """
    base = np.asarray(base_weight, np.float64)
    if base.ndim != 2:
        raise ValueError(f"`base_weight` must be a matrix [x_dim, z_dim], got shape {base.shape}.")
    if not target_mi > 0.0:
        raise ValueError(f"`target_mi` must be positive, got {target_mi}.")
    s2 = np.linalg.svd(base, compute_uv=False) ** 2 / float(noise_std) ** 2
    s2 = s2[s2 > 0]
    if s2.size == 0:
        raise ValueError("`base_weight` is zero; it cannot be scaled to a positive MI.")

    def mi(log_c: float) -> float:
        return 0.5 * float(np.sum(np.log1p(np.exp(2.0 * log_c) * s2)))

    lo, hi = -30.0, 30.0
    if mi(hi) < target_mi:
        raise ValueError(f"`target_mi`={target_mi} is out of reach for this `base_weight`.")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mi(mid) < target_mi:
            lo = mid
        else:
            hi = mid
    return jnp.asarray(base * math.exp(0.5 * (lo + hi)), jnp.float32)


def _haar_orthonormal(key: Array, rows: int, cols: int) -> Array:
    """``[rows, cols]`` with orthonormal columns, Haar-distributed (``rows >= cols``)."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (rows, cols), jnp.float32))
    # The sign fix makes Q Haar-distributed rather than biased by the QR convention.
    return q * jnp.sign(jnp.diag(r))[None, :]


def make_linear_gaussian(
    key: Array,
    x_dim: int,
    z_dim: int,
    target_mi: float,
    noise_std: float = 1.0,
    base: str = "orthogonal",
    spectrum_ratio: float = 1.0,
) -> LinearGaussianModel:
    """A model whose fixed random ``W`` direction is scaled to ``target_mi`` nats.

    Args:
      key: PRNG key; the same key gives the same direction of ``W`` for every ``target_mi``, so a
        sweep over MI levels rescales one fixed matrix.
      x_dim, z_dim: dimensions (``x_dim >= z_dim`` for ``base="orthogonal"``).
      target_mi: requested MI in nats.
      noise_std: ``sigma``.
      base: ``"orthogonal"``: ``W = c U diag(s) V^T`` with Haar ``U`` ``[x_dim, z_dim]`` and ``V``
        ``[z_dim, z_dim]`` and singular values ``s`` log-spaced from 1 to ``spectrum_ratio``
        (``spectrum_ratio = 1``: an isotropic posterior, every latent direction carries
        ``target_mi / z_dim`` nats; larger ratios give a correlated, anisotropic posterior);
        ``"gaussian"``: i.i.d. standard normal entries (an ill-conditioned posterior, much harder
        for HMC-based AIS at high MI).
      spectrum_ratio: ``s_max / s_min >= 1`` of the orthogonal base.

    Returns:
      The model.
    """
    if base == "orthogonal":
        if x_dim < z_dim:
            raise ValueError(f"base='orthogonal' needs x_dim >= z_dim, got {x_dim} < {z_dim}.")
        if not spectrum_ratio >= 1.0:
            raise ValueError(f"`spectrum_ratio` must be >= 1, got {spectrum_ratio}.")
        key_u, key_v = jax.random.split(key)
        u = _haar_orthonormal(key_u, x_dim, z_dim)
        v = _haar_orthonormal(key_v, z_dim, z_dim)
        spectrum = jnp.geomspace(1.0, spectrum_ratio, z_dim).astype(jnp.float32)
        direction = (u * spectrum) @ v.T
    elif base == "gaussian":
        direction = jax.random.normal(key, (x_dim, z_dim), jnp.float32)
    else:
        raise ValueError(f"`base` must be 'orthogonal' or 'gaussian', got {base!r}.")
    return linear_gaussian_model(scale_to_mi(direction, target_mi, noise_std), noise_std)


def sample_joint(key: Array, model: LinearGaussianModel, num_samples: int) -> tuple[Array, Array]:
    """Draws ``(x, z) ~ p(x, z)``.

    Returns:
      ``x`` ``[num_samples, x_dim]`` and ``z`` ``[num_samples, z_dim]``.
    """
    _check_model(model)
    key_z, key_eps = jax.random.split(key)
    z = jax.random.normal(key_z, (num_samples, model.z_dim), model.weight.dtype)
    eps = jax.random.normal(key_eps, (num_samples, model.x_dim), model.weight.dtype)
    return z @ model.weight.T + model.noise_std * eps, z


def log_prior(z: Array) -> Array:
    """``log N(z; 0, I)`` over the last axis: ``[..., z_dim] -> [...]``."""
    return -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * z.shape[-1] * _LOG_2PI


def log_likelihood(model: LinearGaussianModel, x: Array, z: Array) -> Array:
    """``log p(x | z) = log N(x; W z, sigma^2 I)``; broadcasts ``[..., x_dim]``, ``[..., z_dim]``."""
    residual = x - z @ model.weight.T
    var = model.noise_std**2
    return -0.5 * jnp.sum(residual**2, axis=-1) / var - 0.5 * x.shape[-1] * (
        _LOG_2PI + jnp.log(var)
    )


def _thin_svd(model: LinearGaussianModel) -> tuple[Array, Array, Array]:
    """``W = U diag(s) V^T`` with ``U`` ``[x_dim, r]``, ``s`` ``[r]``, ``V`` ``[z_dim, r]``."""
    u, s, vt = jnp.linalg.svd(model.weight, full_matrices=False)
    return u, s, vt.T


def log_marginal(model: LinearGaussianModel, x: Array) -> Array:
    """Exact ``log p(x) = log N(x; 0, W W^T + sigma^2 I)``: ``[..., x_dim] -> [...]``.

    Computed through the SVD of ``W`` (no explicit covariance), which stays accurate in float32
    when ``W W^T`` is far larger than ``sigma^2`` (MI of 100 nats and more).
    """
    u, s, _ = _thin_svd(model)
    var = model.noise_std**2
    coords = x @ u  # [..., r]
    residual = x - coords @ u.T  # the part of x outside the column space of W
    quad = jnp.sum(residual**2, axis=-1) / var + jnp.sum(coords**2 / (s**2 + var), axis=-1)
    log_det = jnp.sum(jnp.log(s**2 + var)) + (model.x_dim - s.shape[0]) * jnp.log(var)
    return -0.5 * (quad + log_det + model.x_dim * _LOG_2PI)


def posterior(model: LinearGaussianModel, x: Array) -> tuple[Array, Array]:
    """Exact posterior ``p(z | x) = N(mean, cov)``, computed through the SVD of ``W``.

    ``cov = (I - V V^T) + V diag(sigma^2 / (s^2 + sigma^2)) V^T`` and
    ``mean = V diag(s / (s^2 + sigma^2)) U^T x``.

    Args:
      model: the model.
      x: ``[..., x_dim]``.

    Returns:
      ``mean`` ``[..., z_dim]`` and ``cov`` ``[z_dim, z_dim]`` (the same for every ``x``).
    """
    u, s, v = _thin_svd(model)
    var = model.noise_std**2
    mean = ((x @ u) * (s / (s**2 + var))) @ v.T
    cov = jnp.eye(model.z_dim) - v @ v.T + (v * (var / (s**2 + var))) @ v.T
    return mean, 0.5 * (cov + cov.T)


def sample_posterior(key: Array, model: LinearGaussianModel, x: Array) -> Array:
    """Draws ``z ~ p(z | x)`` for each row of ``x`` ``[N, x_dim]``; returns ``[N, z_dim]``."""
    mean, cov = posterior(model, x)
    chol = jnp.linalg.cholesky(cov)
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + eps @ chol.T


def true_mi_sample(model: LinearGaussianModel, x: Array, z: Array) -> Array:
    """Exact ``mean_n [log p(x_n | z_n) - log p(x_n)]`` on the given joint samples (scalar).

    Its expectation is the MI; bounds evaluated on the same ``(x, z)`` should bracket this value
    more tightly than they bracket the closed form, since the sampling noise of ``(x, z)`` is shared.

    Args:
      model: the model.
      x: ``[N, x_dim]``.
      z: ``[N, z_dim]``.
    """
    if x.ndim != 2 or z.ndim != 2 or x.shape[0] != z.shape[0]:
        raise ValueError(
            f"`x` [N, x_dim] and `z` [N, z_dim] must share N; got {x.shape} and {z.shape}."
        )
    return jnp.mean(log_likelihood(model, x, z) - log_marginal(model, x))


def optimal_diagonal_encoder(model: LinearGaussianModel) -> tuple[Array, Array]:
    """The best mean-field Gaussian encoder ``q(z|x) = N(A x, diag(exp(2 log_std)))``.

    Maximizing ``E_{p(x,z)} log q(z|x)`` (the Barber-Agakov objective) over this family gives the
    exact posterior mean ``A x`` and the posterior marginal variances ``diag(Lambda^{-1})``; the
    resulting Barber-Agakov bound is ``-0.5 sum_i log Lambda^{-1}_ii <= -0.5 log det Lambda^{-1}``
    (Hadamard's inequality). Used as an oracle for encoder fitting.

    Returns:
      ``A`` ``[z_dim, x_dim]`` and ``log_std`` ``[z_dim]``.
    """
    u, s, v = _thin_svd(model)
    var = model.noise_std**2
    matrix = (v * (s / (s**2 + var))) @ u.T
    _, cov = posterior(model, jnp.zeros((model.x_dim,), model.weight.dtype))
    return matrix, 0.5 * jnp.log(jnp.diag(cov))


def _sample_joint_model_first(model: LinearGaussianModel, key: Array, num_samples: int):
    return sample_joint(key, model, num_samples)


def likelihood_fn(model: LinearGaussianModel) -> Partial:
    """``(x [x_dim], z [z_dim]) -> log p(x|z)`` as a ``Partial`` with the model as traced leaves.

    Jitted code taking it as an argument compiles once for all models of the same shapes.
    """
    return Partial(log_likelihood, model)


def joint_sampler(model: LinearGaussianModel) -> Partial:
    """``(key, n) -> (x [n, x_dim], z [n, z_dim])`` as a ``Partial`` with traced model leaves."""
    return Partial(_sample_joint_model_first, model)
