"""Multi-sample annealed importance sampling (AIS) bounds on ``I(x; z)`` (Brekelmans et al., 2022).

For a joint ``p(x, z) = p(z) p(x|z)`` with known densities, ``I = E[log p(x|z)] - E[log p(x)]``, so
every stochastic bound on ``log p(x)`` gives a bound on MI. AIS anneals from ``pi_0 = p(z)`` to
``pi_1 = p(z|x)`` through ``pi_beta ∝ p(z) p(x|z)^beta``; a chain's log weight is
``log w = sum_{t=1}^T (beta_t - beta_{t-1}) log p(x|z_{t-1})`` (:func:`tda_jax.mcmc.annealed_chain`).

For each joint sample ``(x, z_true)`` this module runs ``K`` forward chains (``z_0 ~ p(z)``) and one
reverse chain started at the TRUE latent ``z_true``, which is an exact posterior sample of ``x``.
The reverse chain visits the same temperatures backwards (1 -> 0); its returned value is the forward
AIS log weight of the reversed trajectory, ``log w_rev = sum_t (beta_t - beta_{t-1}) log p(x|z_t)``.

Multi-Sample AIS upper bound on MI (``K`` forward chains; a lower bound on ``log p(x)``)::

    I <= I_AIS_U(K, T) = E_{p(x,z)}[log p(x|z)] - E[log (1/K) sum_{k=1}^K w_fwd^(k)]

Multi-Sample AIS lower bound on MI (the reverse chain plus ``K - 1`` forward chains; an upper bound
on ``log p(x)`` because the trajectory that started from the exact posterior sample is one of the
``K`` weighted trajectories)::

    I >= I_AIS_L(K, T) = E_{p(x,z)}[log p(x|z)] - E[log (1/K) (w_rev + sum_{k=2}^K w_fwd^(k))]

Both tighten as ``K`` or ``T`` grows; with ``T`` large they meet at ``I``. ``K = 1`` gives the
single-chain (BDMC-style) bounds; with no MCMC moves the lower bound reduces to InfoNCE and the upper
bound to the importance-sampling bound with the prior as proposal.

Energy-based critics (MINE-AIS): with ``log_likelihood_fn`` replaced by any critic ``T(x, z)``, the
annealing path ends at ``pi_T(z|x) ∝ p(z) exp T(x,z)`` and the lower-bound estimator
``E[T(x,z_true)] - E[log (1/K)(w_rev + sum_{k>=2} w_fwd^(k))]`` is still a lower bound on the true
``I(x; z)`` for every ``T`` (the reverse chain starting from the true latent makes it a
GIWAE-type bound on an extended state space; it needs only ``p(z)`` and samples of the joint), so
:func:`multi_sample_ais_bounds` with ``log_likelihood_fn = critic`` evaluates MINE-AIS. The upper
bound is an MI upper bound only when the critic is the true ``log p(x|z)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from tda_jax.mcmc import (
    annealed_chain,
    broadcast_step_sizes,
    check_schedule,
    reverse_step_sizes,
    tune_ais_step_sizes,
)
from tda_jax.mcmc.ais import JITTER
from tda_jax.mi.bounds import (
    as_partial,
    check_finite,
    check_joint_samples,
    check_num_samples,
)
from tda_jax.probability.weights import log_mean_exp

Array = jax.Array
LogLikelihoodFn = Callable[[Array, Array], Array]  # (x [x_dim], z [z_dim]) -> scalar
LogPriorFn = Callable[[Array], Array]
PriorSampleFn = Callable[[Array], Array]  # key -> z [z_dim]


class AISMIBounds(NamedTuple):
    """Per-example multi-sample AIS bounds on MI.

    Attributes:
      lower: ``[N]`` summands of ``I_AIS_L``: ``log p(x|z) - log_marginal_upper``.
      upper: ``[N]`` summands of ``I_AIS_U``: ``log p(x|z) - log_marginal_lower``.
      log_marginal_upper: ``[N]`` ``log (1/K)(w_rev + sum_{k>=2} w_fwd^(k))``, ``E >= log p(x)``.
      log_marginal_lower: ``[N]`` ``log (1/K) sum_k w_fwd^(k)``, ``E <= log p(x)``.
      forward_log_weights: ``[N, K]`` forward chains' log weights.
      reverse_log_weights: ``[N]`` the reverse chain's (forward-direction) log weight.
      acceptance: ``[N]`` mean acceptance probability over all ``K + 1`` chains of each example.
    """

    lower: Array
    upper: Array
    log_marginal_upper: Array
    log_marginal_lower: Array
    forward_log_weights: Array
    reverse_log_weights: Array
    acceptance: Array


def _standard_normal(zeros: Array, key: Array) -> Array:
    return jax.random.normal(key, zeros.shape, zeros.dtype)


def standard_normal_sampler(z_dim: int) -> PriorSampleFn:
    """``key -> z ~ N(0, I_{z_dim})`` (float32), as a ``jax.tree_util.Partial``."""
    return Partial(_standard_normal, jnp.zeros((z_dim,), jnp.float32))


def multi_sample_ais_bounds(
    key: Array,
    x: Array,
    z: Array,
    log_likelihood_fn: LogLikelihoodFn,
    log_prior_fn: LogPriorFn,
    betas: Array,
    step_sizes: Array | float,
    num_chains: int,
    prior_sample_fn: PriorSampleFn | None = None,
    num_integration_steps: int = 10,
    kernel: str = "hmc",
    num_mcmc_steps: int = 1,
) -> AISMIBounds:
    """Multi-Sample AIS lower and upper bounds on ``I(x; z)`` from joint samples.

    ``I_AIS_L = E[log p(x|z) - log (1/K)(w_rev + sum_{k=2}^K w_fwd^(k))] <= I <=
    E[log p(x|z) - log (1/K) sum_{k=1}^K w_fwd^(k)] = I_AIS_U``, where ``w_rev`` comes from a reverse
    chain started at the true ``z`` (see the module docstring). Runs ``N * (K + 1)`` chains in one
    vmap; pure and unjitted (jit it from outside, passing model parameters as arguments so a new
    model does not recompile).

    Args:
      key: PRNG key.
      x: ``[N, x_dim]`` joint samples.
      z: ``[N, z_dim]`` their latents (exact posterior samples for the reverse chains).
      log_likelihood_fn: ``log p(x|z)`` of one example (or a critic ``T(x, z)`` for MINE-AIS).
      log_prior_fn: normalized ``log p(z)``.
      betas: forward schedule ``[T + 1]`` from 0 to 1.
      step_sizes: forward step sizes ``[T]`` (``step_sizes[t-1]`` for ``beta_t``) or a scalar, e.g.
        from :func:`tune_mi_step_sizes`; reversed for the reverse chain.
      num_chains: ``K >= 1``.
      prior_sample_fn: ``key -> z [z_dim]`` draws from ``p(z)``; default standard normal.
      num_integration_steps: leapfrog steps per HMC transition.
      kernel: ``"hmc"`` or ``"mala"``.
      num_mcmc_steps: transitions per temperature.

    Returns:
      :class:`AISMIBounds`; average ``lower``/``upper`` for the bounds.
    """
    check_joint_samples(x, z)
    num_chains = check_num_samples(num_chains, "num_chains")
    check_schedule(betas)
    betas = jnp.asarray(betas, jnp.float32)
    num_steps = betas.shape[0] - 1
    step_sizes = broadcast_step_sizes(step_sizes, num_steps)
    if prior_sample_fn is None:
        prior_sample_fn = standard_normal_sampler(z.shape[1])
    n = x.shape[0]
    common = dict(
        log_prior_fn=log_prior_fn,
        num_integration_steps=num_integration_steps,
        kernel=kernel,
        num_mcmc_steps=num_mcmc_steps,
    )
    reverse_betas = betas[::-1]
    reverse_steps = reverse_step_sizes(step_sizes)

    def per_example(example_key, xi, zi):
        key_init, key_fwd, key_rev = jax.random.split(example_key, 3)

        def log_lik(zz):
            return log_likelihood_fn(xi, zz)

        z0 = jax.vmap(prior_sample_fn)(jax.random.split(key_init, num_chains))
        fwd = jax.vmap(
            lambda k, z_init: annealed_chain(
                k, z_init, log_likelihood_fn=log_lik, betas=betas, step_sizes=step_sizes, **common
            )
        )(jax.random.split(key_fwd, num_chains), z0)
        rev = annealed_chain(
            key_rev,
            zi,
            log_likelihood_fn=log_lik,
            betas=reverse_betas,
            step_sizes=reverse_steps,
            **common,
        )
        log_lik_true = log_lik(zi)
        acceptance = (jnp.sum(fwd[2]) + rev[2]) / (num_chains + 1)
        return fwd[0], rev[0], log_lik_true, acceptance

    fwd_log_w, rev_log_w, log_lik_true, acceptance = jax.vmap(per_example)(
        jax.random.split(key, n), x, z
    )
    check_finite(fwd_log_w, "forward AIS log weights (log_likelihood_fn)")
    check_finite(rev_log_w, "reverse AIS log weights (log_likelihood_fn)")
    check_finite(log_lik_true, "log_likelihood_fn at the true latents")
    log_marginal_lower = log_mean_exp(fwd_log_w, axis=1)
    combined = jnp.concatenate([rev_log_w[:, None], fwd_log_w[:, : num_chains - 1]], axis=1)
    log_marginal_upper = log_mean_exp(combined, axis=1)
    return AISMIBounds(
        lower=log_lik_true - log_marginal_upper,
        upper=log_lik_true - log_marginal_lower,
        log_marginal_upper=log_marginal_upper,
        log_marginal_lower=log_marginal_lower,
        forward_log_weights=fwd_log_w,
        reverse_log_weights=rev_log_w,
        acceptance=acceptance,
    )


@functools.partial(jax.jit, static_argnames=("num_examples", "num_chains"))
def _prior_samples(key, prior_sample_fn, *, num_examples, num_chains):
    """``[num_examples, num_chains, z_dim]`` draws of ``prior_sample_fn`` (a traced Partial)."""
    keys = jax.random.split(key, (num_examples, num_chains))
    return jax.vmap(jax.vmap(prior_sample_fn))(keys)


def tune_mi_step_sizes(
    key: Array,
    x: Array,
    log_likelihood_fn: LogLikelihoodFn,
    log_prior_fn: LogPriorFn,
    betas: Array,
    num_pilot_chains: int = 16,
    prior_sample_fn: PriorSampleFn | None = None,
    z_dim: int | None = None,
    num_anchors: int = 10,
    num_integration_steps: int = 10,
    num_pilot_steps: int = 100,
    target_acceptance: float | None = None,
    initial_step_size: float = 0.1,
    kernel: str = "hmc",
    step_size_jitter: float = JITTER,
) -> Array:
    """Pilot-tunes one step size per temperature on a few examples; freeze the result.

    A thin wrapper of :func:`tda_jax.mcmc.tune_ais_step_sizes` with the examples as its
    ``inputs``: ``num_pilot_chains`` prior samples per example, each example tuned independently
    (dual averaging toward ``target_acceptance`` at anchor temperatures spaced evenly in
    ``log beta``, pilot chains carried from anchor to anchor) and the log step sizes averaged over
    examples, then interpolated linearly in ``log beta``. The examples and any arrays bound into
    ``jax.tree_util.Partial`` callables are traced arguments of the compiled pilot, so a sweep over
    models of the same shapes compiles once.

    Args:
      key: PRNG key.
      x: ``[M, x_dim]`` a few examples to tune on.
      log_likelihood_fn: ``log p(x|z)`` (or a critic) of one example, ``(x, z) -> scalar``.
      log_prior_fn: ``log p(z)``.
      betas: forward schedule ``[T + 1]`` (concrete).
      num_pilot_chains: pilot chains per example, started at prior samples.
      prior_sample_fn: ``key -> z``; default standard normal (then ``z_dim`` is required).
      z_dim: latent size for the default sampler.
      num_anchors: anchor temperatures (>= 2).
      num_integration_steps: leapfrog steps per HMC transition (as in the AIS run).
      num_pilot_steps: dual-averaging transitions per anchor.
      target_acceptance: in ``(0, 1)``; default 0.65 for HMC, 0.574 for MALA.
      initial_step_size: step size the first anchor starts from.
      kernel: ``"hmc"`` or ``"mala"``, as in :func:`multi_sample_ais_bounds`.
      step_size_jitter: relative step-size jitter during the pilot; the default equals the one
        :func:`multi_sample_ais_bounds` runs with.

    Returns:
      ``[T]`` float32 step sizes for :func:`multi_sample_ais_bounds` (``step_sizes[t-1]`` for
      ``beta_t``).
    """
    if jnp.ndim(x) != 2:
        raise ValueError(f"`x` must be [M, x_dim] (a few examples), got shape {jnp.shape(x)}.")
    if prior_sample_fn is None:
        if z_dim is None:
            raise ValueError("Pass `prior_sample_fn` or `z_dim` (for a standard normal prior).")
        prior_sample_fn = standard_normal_sampler(z_dim)
    if isinstance(num_pilot_chains, bool) or not isinstance(num_pilot_chains, int):
        raise TypeError(
            f"`num_pilot_chains` must be a Python int, got {type(num_pilot_chains).__name__}."
        )
    if num_pilot_chains < 1:
        raise ValueError(f"`num_pilot_chains` must be >= 1, got {num_pilot_chains}.")
    key_init, key_tune = jax.random.split(key)
    positions = _prior_samples(
        key_init, as_partial(prior_sample_fn), num_examples=x.shape[0], num_chains=num_pilot_chains
    )
    step_sizes = tune_ais_step_sizes(
        key_tune,
        positions,
        as_partial(log_prior_fn),
        as_partial(log_likelihood_fn),
        betas,
        num_anchors=num_anchors,
        kernel=kernel,
        num_integration_steps=num_integration_steps,
        target_acceptance=target_acceptance,
        num_pilot_steps=num_pilot_steps,
        initial_step_size=initial_step_size,
        step_size_jitter=step_size_jitter,
        inputs=jnp.asarray(x, jnp.float32),
    )
    return step_sizes.astype(jnp.float32)
