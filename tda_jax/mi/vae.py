"""A small Gaussian VAE (flax.linen + optax) whose generative model defines ``I(x; z)``.

Generative model: ``z ~ N(0, I)``, ``x | z ~ N(decoder(z), diag(sigma^2))`` with a learned
per-dimension ``sigma >= min_std``. After training on data, the MI of interest is that of this joint
``p(z) p(x|z)`` (Brekelmans et al., 2022, Sec. 6): samples come from ancestral sampling and
``log p(x|z)`` is known exactly, so IWAE and AIS bounds apply, with the encoder as proposal.

Functions return plain callables matching :mod:`tda_jax.mi.bounds`: one example at a time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from tda_jax.mi.bounds import Proposal, diagonal_gaussian_proposal
from tda_jax.optimization import gradient_step, run_steps

Array = jax.Array
_LOG_2PI = math.log(2.0 * math.pi)


class GaussianVAE(nn.Module):
    """Encoder ``x -> (mean, log_std)`` and decoder ``z -> (mean, log_std)`` MLPs.

    Attributes:
      x_dim: data size.
      latent_dim: ``z`` size.
      hidden: hidden widths of both MLPs.
      min_std: floor on the decoder's observation noise (keeps ``I(x;z)`` finite and AIS feasible);
        with ``learn_std=False`` the noise is fixed at this value.
      learn_std: learn a per-dimension noise ``min_std + softplus(raw)`` (else fixed ``min_std``).
    """

    x_dim: int
    latent_dim: int
    hidden: Sequence[int] = (128, 128)
    min_std: float = 0.1
    learn_std: bool = True

    def setup(self):
        self.encoder_layers = [nn.Dense(w) for w in self.hidden]
        self.encoder_out = nn.Dense(2 * self.latent_dim)
        self.decoder_layers = [nn.Dense(w) for w in self.hidden]
        self.decoder_out = nn.Dense(self.x_dim)
        if self.learn_std:
            self.decoder_raw_std = self.param(
                "decoder_raw_std", nn.initializers.zeros, (self.x_dim,)
            )

    def encode(self, x: Array) -> tuple[Array, Array]:
        h = x
        for layer in self.encoder_layers:
            h = nn.tanh(layer(h))
        out = self.encoder_out(h)
        return out[..., : self.latent_dim], out[..., self.latent_dim :]

    def decode(self, z: Array) -> tuple[Array, Array]:
        h = z
        for layer in self.decoder_layers:
            h = nn.tanh(layer(h))
        if self.learn_std:
            log_std = jnp.log(self.min_std + jax.nn.softplus(self.decoder_raw_std))
        else:
            log_std = jnp.full((self.x_dim,), jnp.log(self.min_std), jnp.float32)
        return self.decoder_out(h), jnp.broadcast_to(log_std, h.shape[:-1] + (self.x_dim,))

    def __call__(self, x: Array, eps: Array) -> Array:
        """Per-example ELBO ``E_q[log p(x|z)] - KL(q(z|x) || p(z))`` with ``z = mean + std * eps``."""
        mean, log_std = self.encode(x)
        z = mean + jnp.exp(log_std) * eps
        x_mean, x_log_std = self.decode(z)
        log_lik = _gaussian_log_prob(x, x_mean, x_log_std)
        kl = 0.5 * jnp.sum(mean**2 + jnp.exp(2 * log_std) - 1.0 - 2 * log_std, axis=-1)
        return log_lik - kl


def _gaussian_log_prob(x: Array, mean: Array, log_std: Array) -> Array:
    u = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * u**2 - log_std - 0.5 * _LOG_2PI, axis=-1)


def train_vae(
    key: Array,
    module: GaussianVAE,
    data: Array,
    num_steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
) -> tuple[Any, np.ndarray]:
    """Trains the VAE by maximizing the ELBO with Adam (cosine-decayed rate), in the library's one
    optax loop (:mod:`tda_jax.optimization`).

    Args:
      key: PRNG key.
      module: the :class:`GaussianVAE`.
      data: ``[num_examples, x_dim]`` training data (standardized).
      num_steps, batch_size, learning_rate: optimizer settings.

    Returns:
      ``(params, elbo_history [num_steps])``: the mean ELBO (nats per example) every 10 steps
      and at the last step, NaN in between.

    Raises:
      FloatingPointError: naming the first step whose ELBO is non-finite (checked once per 100
        steps by :func:`tda_jax.optimization.run_steps`).
    """
    data = jnp.asarray(data, jnp.float32)
    if data.ndim != 2 or data.shape[1] != module.x_dim:
        raise ValueError(
            f"`data` must be [num_examples, {module.x_dim}] for this module, got {data.shape}."
        )
    if batch_size > data.shape[0]:
        raise ValueError(f"`batch_size`={batch_size} exceeds the {data.shape[0]} examples.")
    key_init, key_train = jax.random.split(key)
    params = module.init(
        key_init, data[:1], jnp.zeros((1, module.latent_dim), jnp.float32)
    )
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.05))
    opt_state = optimizer.init(params)

    def negative_elbo(params, step_key):
        key_batch, key_eps = jax.random.split(step_key)
        index = jax.random.choice(key_batch, data.shape[0], (batch_size,), replace=False)
        eps = jax.random.normal(key_eps, (batch_size, module.latent_dim), jnp.float32)
        return -jnp.mean(module.apply(params, data[index], eps))

    update = jax.jit(gradient_step(negative_elbo, optimizer))  # the library's one optax update

    def step(state, step_key):
        params, opt_state, value, _ = update(*state, step_key)
        return (params, opt_state), value

    (params, _), negative = run_steps(
        step, (params, opt_state), jax.random.split(key_train, num_steps), num_steps=num_steps,
        desc="train VAE", what="the VAE's ELBO", hint="Lower the learning rate.",
    )
    steps = np.arange(num_steps)
    history = np.where((steps % 10 == 0) | (steps == num_steps - 1), -negative, np.nan)
    history = history.astype(np.float32)
    return params, history


# Small frozen dataclasses: hashable and equal by module, so jitted code that receives
# ``Partial(_VAELogLikelihood(module), params)`` compiles once per module configuration.
@dataclasses.dataclass(frozen=True)
class _VAELogLikelihood:
    module: GaussianVAE

    def __call__(self, params: Any, x: Array, z: Array) -> Array:
        mean, log_std = self.module.apply(params, z, method=GaussianVAE.decode)
        return _gaussian_log_prob(x, mean, log_std)


@dataclasses.dataclass(frozen=True)
class _VAEEncode:
    module: GaussianVAE

    def __call__(self, params: Any, x: Array) -> tuple[Array, Array]:
        return self.module.apply(params, x, method=GaussianVAE.encode)


@dataclasses.dataclass(frozen=True)
class _VAESampleJoint:
    module: GaussianVAE

    def __call__(self, params: Any, key: Array, n: int) -> tuple[Array, Array]:
        key_z, key_x = jax.random.split(key)
        z = jax.random.normal(key_z, (n, self.module.latent_dim), jnp.float32)
        mean, log_std = self.module.apply(params, z, method=GaussianVAE.decode)
        x = mean + jnp.exp(log_std) * jax.random.normal(key_x, mean.shape, mean.dtype)
        return x, z


def vae_log_likelihood(module: GaussianVAE, params: Any) -> Partial:
    """``(x [x_dim], z [latent_dim]) -> log p(x|z)`` of the VAE's decoder (a ``Partial``)."""
    return Partial(_VAELogLikelihood(module), params)


def vae_proposal(module: GaussianVAE, params: Any) -> Proposal:
    """The VAE encoder as a proposal ``q(z|x)``."""
    return diagonal_gaussian_proposal(Partial(_VAEEncode(module), params))


def vae_sample_joint(module: GaussianVAE, params: Any) -> Partial:
    """``(key, n) -> (x [n, x_dim], z [n, latent_dim])`` ancestral samples of ``p(z) p(x|z)``."""
    return Partial(_VAESampleJoint(module), params)
