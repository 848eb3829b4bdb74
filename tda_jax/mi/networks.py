"""Small flax.linen networks for the learned parts of MI bounds: critics and a Gaussian encoder.

A critic scores one example: ``module.apply(params, x [x_dim], z [z_dim]) -> scalar``; vmap over
examples. Inputs are expected on a unit scale (standardize ``x`` first, see
:func:`standardized_critic`).

* :class:`DecoderCritic`: ``T(x, z) = -0.5 sum_j exp(2 a_j) (x_j - g_j(z))^2 + h(x)``, a learned
  unnormalized "decoder" energy. The optimal energy-based critic is ``log p(x|z) + c(x)``, which this
  family contains for Gaussian decoders (``g`` linear: the linear-Gaussian model; ``g`` an MLP: a
  Gaussian VAE). ``h(x) = -0.5 sum_j u_j x_j^2 + v^T x`` (``x_terms=True``) adds the ``x``-only part
  that MINE-DV / MINE-F need (their optimal critic is ``log p(x|z) - log p(x) + const``).
  The energy posterior ``p(z) exp T(x, z)`` is normalizable for any parameters because ``T`` is
  bounded above in ``z``.

* :class:`GaussianEncoder`: ``q(z|x) = N(mean(x), diag(exp(2 log_std(x))))`` with an MLP (or affine)
  trunk, for Barber-Agakov, IWAE and GIWAE proposals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.tree_util import Partial

Array = jax.Array


class DecoderCritic(nn.Module):
    """``T(x, z) = -0.5 sum_j exp(2 a_j) (x_j - g_j(z))^2 [+ h(x)]`` for one example.

    Attributes:
      x_dim: size of ``x``.
      hidden: hidden widths of the MLP ``g`` (empty: ``g`` is affine).
      x_terms: add ``h(x) = -0.5 sum_j u_j x_j^2 + v^T x`` (needed by MINE-DV / MINE-F).
      init_log_precision: initial ``2 a_j``.
    """

    x_dim: int
    hidden: Sequence[int] = ()
    x_terms: bool = False
    init_log_precision: float = 0.0

    @nn.compact
    def __call__(self, x: Array, z: Array) -> Array:
        h = z
        for width in self.hidden:
            h = nn.tanh(nn.Dense(width)(h))
        prediction = nn.Dense(self.x_dim)(h)
        log_precision = self.param(
            "log_precision", nn.initializers.constant(self.init_log_precision), (self.x_dim,)
        )
        value = -0.5 * jnp.sum(jnp.exp(log_precision) * (x - prediction) ** 2)
        if self.x_terms:
            u = self.param("x_quadratic", nn.initializers.zeros, (self.x_dim,))
            v = self.param("x_linear", nn.initializers.zeros, (self.x_dim,))
            value = value - 0.5 * jnp.sum(u * x**2) + jnp.sum(v * x)
        return value


@dataclasses.dataclass(frozen=True)
class _StandardizedCriticApply:
    """Hashable (by module) function ``(x_mean, x_std, params, x, z) -> T``."""

    module: nn.Module

    def __call__(self, x_mean: Array, x_std: Array, params: Any, x: Array, z: Array) -> Array:
        return self.module.apply(params, (x - x_mean) / x_std, z)


def standardized_critic(module: nn.Module, x_mean: Array, x_std: Array) -> Partial:
    """``(params, x, z) -> module.apply(params, (x - x_mean) / x_std, z)`` for one example.

    Returned as a :class:`jax.tree_util.Partial` with ``x_mean`` and ``x_std`` as traced leaves, so
    jitted code taking it as an argument compiles once per module configuration.
    """
    return Partial(_StandardizedCriticApply(module), jnp.asarray(x_mean), jnp.asarray(x_std))


@dataclasses.dataclass(frozen=True)
class _StandardizedEncoderApply:
    module: nn.Module

    def __call__(self, x_mean: Array, x_std: Array, params: Any, x: Array):
        return self.module.apply(params, (x - x_mean) / x_std)


def standardized_encoder(module: nn.Module, x_mean: Array, x_std: Array) -> Partial:
    """``(params, x) -> module.apply(params, (x - x_mean) / x_std)`` as a ``Partial``."""
    return Partial(_StandardizedEncoderApply(module), jnp.asarray(x_mean), jnp.asarray(x_std))


class GaussianEncoder(nn.Module):
    """Diagonal Gaussian encoder ``x [x_dim] -> (mean [z_dim], log_std [z_dim])``.

    Attributes:
      z_dim: latent size.
      hidden: hidden widths (empty: mean and log-std are affine in ``x``).
    """

    z_dim: int
    hidden: Sequence[int] = ()

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        h = x
        for width in self.hidden:
            h = nn.tanh(nn.Dense(width)(h))
        mean = nn.Dense(self.z_dim)(h)
        log_std = nn.Dense(self.z_dim, kernel_init=nn.initializers.zeros)(h)
        return mean, log_std
