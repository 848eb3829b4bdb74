"""Energy-based MI lower bounds: MINE-DV, MINE-F and MINE-AIS (Brekelmans et al., 2022, Sec. 5).

All three use a critic ``T(x, z)``, joint samples ``(x, z) ~ p(x, z)`` and the marginal ``p(z)``.

* MINE-DV (Donsker-Varadhan; Belghazi et al., 2018):
  ``I >= I_DV(T) = E_{p(x,z)}[T(x,z)] - log E_{p(x)p(z)}[exp T(x,z)]``.
* MINE-F (``f``-divergence / NWJ form):
  ``I >= I_F(T) = E_{p(x,z)}[T(x,z)] - E_{p(x)p(z)}[exp(T(x,z) - 1)]``.
* Energy-based bound optimized by MINE-AIS, with the log partition function inside the ``x``
  expectation (tighter than DV by Jensen):
  ``I >= I_EB(T) = E_{p(x,z)}[T(x,z)] - E_{p(x)}[log Z_T(x)]``, ``Z_T(x) = E_{p(z)}[exp T(x,z)]``.
  It is the Barber-Agakov bound of the energy-based posterior ``pi_T(z|x) = p(z) exp T(x,z) / Z_T(x)``,
  so its gap is ``E_{p(x)} KL(p(z|x) || pi_T(z|x))``; the optimum ``T = log p(x|z) + c(x)`` is tight.
  Gradient: ``grad I_EB = E_{p(x,z)}[grad T(x,z)] - E_{p(x) pi_T(z|x)}[grad T(x,z)]``; the negative
  phase uses HMC samples of ``pi_T(z|x)`` (:func:`sample_energy_posterior`), started from the true
  ``z`` of each pair (which is close to ``pi_T`` once ``T`` is good).
  Evaluation: ``log Z_T(x)`` is intractable, so MINE-AIS reports the Multi-Sample AIS lower bound
  with the critic as the annealed "likelihood"
  (:func:`tda_jax.mi.ais_bounds.multi_sample_ais_bounds` with ``log_likelihood_fn = T``), a valid
  lower bound on ``I`` for any ``T``.

Batch estimators take a score matrix ``scores[i, j] = T(x_i, z_j)`` ``[N, N]``: the diagonal holds
joint pairs and the off-diagonal entries stand in for ``p(x) p(z)`` (shuffled pairs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tda_jax.mcmc import hmc_init, hmc_step
from tda_jax.mi.bounds import check_finite, check_joint_samples
from tda_jax.probability.weights import log_mean_exp

Array = jax.Array
CriticFn = Callable[[Array, Array], Array]


def critic_score_matrix(critic_fn: CriticFn, x: Array, z: Array) -> Array:
    """``scores[i, j] = T(x_i, z_j)`` for joint samples ``x`` ``[N, x_dim]``, ``z`` ``[N, z_dim]``."""
    check_joint_samples(x, z)
    return jax.vmap(lambda xi: jax.vmap(lambda zj: critic_fn(xi, zj))(z))(x)


def _joint_and_marginal(scores: Array) -> tuple[Array, Array]:
    if jnp.ndim(scores) != 2 or scores.shape[0] != scores.shape[1] or scores.shape[0] < 2:
        raise ValueError(
            f"`scores` must be a square matrix [N, N] with N >= 2, got shape {jnp.shape(scores)}."
        )
    check_finite(scores, "critic scores")
    # Concrete (numpy) indices keep this usable under jit.
    rows, cols = np.nonzero(~np.eye(scores.shape[0], dtype=bool))
    return jnp.diagonal(scores), scores[rows, cols]


def mine_dv_lower(scores: Array) -> Array:
    """MINE-DV estimate ``mean_i T_ii - log mean_{i != j} exp T_ij`` (scalar).

    ``I_DV(T) = E_{p(x,z)}[T] - log E_{p(x)p(z)}[exp T]``. The batch estimate of the log term is
    biased (downward), so the estimate is not a strict bound at finite batch size.
    """
    joint, marginal = _joint_and_marginal(scores)
    return jnp.mean(joint) - log_mean_exp(marginal)


def mine_f_lower(scores: Array) -> Array:
    """MINE-F estimate ``mean_i T_ii - mean_{i != j} exp(T_ij - 1)`` (scalar, unbiased).

    ``I_F(T) = E_{p(x,z)}[T] - E_{p(x)p(z)}[exp(T - 1)]``.
    """
    joint, marginal = _joint_and_marginal(scores)
    return jnp.mean(joint) - jnp.mean(jnp.exp(marginal - 1.0))


def energy_log_density(critic_fn: CriticFn, log_prior_fn: Callable[[Array], Array], x: Array):
    """``z -> log p(z) + T(x, z)``: the unnormalized energy-based posterior ``pi_T(z|x)``."""
    return lambda z: log_prior_fn(z) + critic_fn(x, z)


def sample_energy_posterior(
    key: Array,
    x: Array,
    z_init: Array,
    critic_fn: CriticFn,
    log_prior_fn: Callable[[Array], Array],
    step_size: float | Array,
    num_steps: int,
    num_integration_steps: int = 10,
) -> tuple[Array, Array]:
    """HMC samples of ``pi_T(z|x) ∝ p(z) exp T(x, z)`` for each row of ``x`` (negative phase).

    Args:
      key: PRNG key.
      x: ``[N, x_dim]``.
      z_init: ``[N, z_dim]`` chain starts (e.g. the true latents of the joint samples).
      critic_fn: ``T(x, z)`` of one example.
      log_prior_fn: ``log p(z)``.
      step_size: HMC step size (scalar, may be traced).
      num_steps: HMC transitions per chain.
      num_integration_steps: leapfrog steps per transition.

    Returns:
      ``(z [N, z_dim], mean acceptance probability (scalar))``.
    """
    check_joint_samples(x, z_init)

    def chain(chain_key, xi, zi):
        log_density = energy_log_density(critic_fn, log_prior_fn, xi)
        state = hmc_init(zi, log_density)

        def body(carry, step_key):
            state, acc = carry
            state, info = hmc_step(
                step_key, state, log_density, step_size, num_integration_steps
            )
            return (state, acc + info.acceptance_probability), None

        (state, acc), _ = jax.lax.scan(
            body, (state, jnp.zeros((), zi.dtype)), jax.random.split(chain_key, num_steps)
        )
        return state.position, acc / num_steps

    z, acceptance = jax.vmap(chain)(jax.random.split(key, x.shape[0]), x, z_init)
    return z, jnp.mean(acceptance)


def energy_based_surrogate(critic_fn: CriticFn, x: Array, z: Array, z_negative: Array) -> Array:
    """Scalar whose gradient is the MINE-AIS gradient of ``I_EB``.

    ``mean_n T(x_n, z_n) - mean_n T(x_n, stop_gradient(z_negative_n))`` with ``z_negative`` drawn
    from ``pi_T(z|x)``: its gradient estimates
    ``E_{p(x,z)}[grad T] - E_{p(x) pi_T(z|x)}[grad T] = grad I_EB``. Its value is not a bound.
    """
    check_joint_samples(x, z)
    z_negative = jax.lax.stop_gradient(z_negative)
    positive = jax.vmap(critic_fn)(x, z)
    negative = jax.vmap(critic_fn)(x, z_negative)
    return jnp.mean(positive) - jnp.mean(negative)
