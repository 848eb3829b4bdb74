"""Optax training loops for the learned parts of MI bounds: encoders and critics.

Every loop draws a fresh batch from ``sample_joint_fn(key, batch_size) -> (x [B, x_dim],
z [B, z_dim])`` at each step (a generative model can be sampled without limit), jits its step once,
and runs Adam with a cosine-decayed learning rate in the library's one optax loop
(:mod:`tda_jax.optimization`: a progress bar, objective values checked for NaN/inf once per 100
steps, never a host sync per step). Callables may be given as
``jax.tree_util.Partial(module_level_fn, arrays...)``: the bound arrays are then traced and the
compiled step is reused across calls (e.g. across the models of a sweep).

* :func:`fit_encoder`: maximizes the Barber-Agakov objective ``E log q(z|x)`` (``p(z)`` is fixed).
* :func:`fit_giwae_critic`: maximizes GIWAE over the critic for a fixed proposal.
* :func:`fit_mine_critic`: maximizes the MINE-DV or MINE-F batch objective.
* :func:`fit_mine_ais_critic`: ascends ``I_EB`` with HMC negative samples (MINE-AIS training); the
  HMC step size adapts to a target acceptance rate between steps (training only; evaluation uses
  frozen step sizes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tda_jax.mi.bounds import (
    Proposal,
    as_partial,
    check_num_samples,
    diagonal_gaussian_proposal,
    giwae_lower,
)
from tda_jax.mi.mine import (
    critic_score_matrix,
    energy_based_surrogate,
    mine_dv_lower,
    mine_f_lower,
    sample_energy_posterior,
)
from tda_jax.optimization import gradient_step, run_steps

Array = jax.Array
Params = Any
SampleJointFn = Callable[[Array, int], tuple[Array, Array]]
ParamCriticFn = Callable[[Params, Array, Array], Array]  # (params, x [x_dim], z [z_dim]) -> scalar


class FitResult(NamedTuple):
    """Trained parameters and the per-step training objective (higher is better), ``[num_steps]``."""

    params: Params
    objective: np.ndarray


def _optimizer(learning_rate: float, num_steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.01))


def _check_loop(num_steps: int, batch_size: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive int, got {num_steps!r}.")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"`batch_size` must be an int >= 2, got {batch_size!r}.")


@functools.partial(jax.jit, static_argnames=("objective", "static", "num_steps", "learning_rate"))
def _train_step(params, opt_state, key, extra, callables, *, objective, static, num_steps,
                learning_rate):
    """One Adam ascent step on ``objective(params, key, extra, callables, static)``."""
    ascend = gradient_step(lambda p, k, e, c: objective(p, k, e, c, static),
                           _optimizer(learning_rate, num_steps), maximize=True, has_aux=True)
    return ascend(params, opt_state, key, extra, callables)


_RECORD_EVERY = 10  # the history keeps every 10th step's objective (and the last), NaN between


def _run(key, params, objective, callables, static, num_steps, learning_rate, desc, extra=None,
         update_extra=None):
    """Maximizes ``objective`` with Adam; the jitted step is shared by every call with the same
    objective, static settings and callables' structure."""
    opt_state = _optimizer(learning_rate, num_steps).init(params)
    callables = tuple(as_partial(fn) for fn in callables)

    def step(state, step_key):
        params, opt_state, extra = state
        params, opt_state, value, aux = _train_step(
            params, opt_state, step_key, extra, callables, objective=objective, static=static,
            num_steps=num_steps, learning_rate=float(learning_rate),
        )
        if update_extra is not None:
            extra = update_extra(extra, aux)
        return (params, opt_state, extra), value

    (params, _, extra), values = run_steps(
        step, (params, opt_state, extra), jax.random.split(key, num_steps), num_steps=num_steps,
        desc=desc, what=f"{desc}: the training objective", hint="Lower the learning rate.",
    )
    steps = np.arange(num_steps)
    recorded = (steps % _RECORD_EVERY == 0) | (steps == num_steps - 1)
    history = np.where(recorded, values, np.nan).astype(np.float32)
    return FitResult(params, history), extra


def _encoder_objective(p, key, extra, callables, static):
    encoder_fn, sample_joint_fn = callables
    (batch_size,) = static
    x, z = sample_joint_fn(key, batch_size)
    proposal = diagonal_gaussian_proposal(lambda xi: encoder_fn(p, xi))
    return jnp.mean(jax.vmap(proposal.log_prob)(x, z)), None


def _giwae_objective(p, key, extra, callables, static):
    critic_fn, proposal_sample, proposal_log_prob, log_prior_fn, sample_joint_fn = callables
    batch_size, num_samples = static
    key_data, key_bound = jax.random.split(key)
    x, z = sample_joint_fn(key_data, batch_size)
    values = giwae_lower(
        key_bound, x, z, lambda xi, zi: critic_fn(p, xi, zi), log_prior_fn,
        Proposal(proposal_sample, proposal_log_prob), num_samples,
    )
    return jnp.mean(values), None


def _mine_objective(p, key, extra, callables, static):
    critic_fn, sample_joint_fn = callables
    batch_size, objective = static
    estimator = {"dv": mine_dv_lower, "f": mine_f_lower}[objective]
    x, z = sample_joint_fn(key, batch_size)
    scores = critic_score_matrix(lambda xi, zi: critic_fn(p, xi, zi), x, z)
    return estimator(scores), None


def _mine_ais_objective(p, key, log_step_size, callables, static):
    critic_fn, log_prior_fn, sample_joint_fn = callables
    batch_size, num_hmc_steps, num_integration_steps = static
    key_data, key_hmc = jax.random.split(key)
    x, z = sample_joint_fn(key_data, batch_size)
    frozen = jax.lax.stop_gradient(p)
    z_negative, acceptance = sample_energy_posterior(
        key_hmc, x, z, lambda xi, zi: critic_fn(frozen, xi, zi), log_prior_fn,
        jnp.exp(log_step_size), num_hmc_steps, num_integration_steps,
    )
    surrogate = energy_based_surrogate(lambda xi, zi: critic_fn(p, xi, zi), x, z, z_negative)
    return surrogate, acceptance


def fit_encoder(
    key: Array,
    encoder_fn: Callable[[Params, Array], tuple[Array, Array]],
    params: Params,
    sample_joint_fn: SampleJointFn,
    num_steps: int = 2000,
    batch_size: int = 256,
    learning_rate: float = 1e-2,
) -> FitResult:
    """Fits a diagonal Gaussian encoder ``q(z|x)`` by maximizing the Barber-Agakov objective.

    Maximizes ``E_{p(x,z)}[log q(z|x)]`` (``I_BA`` up to the constant ``H(z)``).

    Args:
      key: PRNG key.
      encoder_fn: ``(params, x [x_dim]) -> (mean [z_dim], log_std [z_dim])``.
      params: initial parameters.
      sample_joint_fn: ``(key, batch_size) -> (x, z)``.
      num_steps, batch_size, learning_rate: Adam settings (cosine-decayed rate).

    Returns:
      :class:`FitResult` with the mean ``log q(z|x)`` every 10 steps (NaN in between).
    """
    _check_loop(num_steps, batch_size)
    return _run(
        key, params, _encoder_objective, (encoder_fn, sample_joint_fn), (batch_size,), num_steps,
        learning_rate, "fit encoder (BA)",
    )[0]


def fit_giwae_critic(
    key: Array,
    critic_fn: ParamCriticFn,
    params: Params,
    proposal: Proposal,
    log_prior_fn: Callable[[Array], Array],
    sample_joint_fn: SampleJointFn,
    num_samples: int,
    num_steps: int = 2000,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
) -> FitResult:
    """Maximizes the GIWAE bound over the critic ``T`` for a fixed proposal ``q(z|x)``.

    Args:
      key: PRNG key.
      critic_fn: ``(params, x [x_dim], z [z_dim]) -> T(x, z)``.
      params: initial critic parameters.
      proposal: the fixed ``q(z|x)``.
      log_prior_fn: ``log p(z)``.
      sample_joint_fn: ``(key, batch_size) -> (x, z)``.
      num_samples: GIWAE's ``K`` (the true ``z`` plus ``K - 1`` proposal samples).
      num_steps, batch_size, learning_rate: Adam settings (cosine-decayed rate).

    Returns:
      :class:`FitResult` with the GIWAE training estimate every 10 steps (NaN in between).
    """
    _check_loop(num_steps, batch_size)
    check_num_samples(num_samples)
    callables = (critic_fn, proposal.sample, proposal.log_prob, log_prior_fn, sample_joint_fn)
    return _run(
        key, params, _giwae_objective, callables, (batch_size, num_samples), num_steps,
        learning_rate, "fit GIWAE critic",
    )[0]


def fit_mine_critic(
    key: Array,
    critic_fn: ParamCriticFn,
    params: Params,
    sample_joint_fn: SampleJointFn,
    objective: str = "dv",
    num_steps: int = 2000,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
) -> FitResult:
    """Maximizes the MINE-DV (``objective="dv"``) or MINE-F (``"f"``) batch objective.

    Negatives are the off-diagonal pairs of each batch (:func:`tda_jax.mi.mine.critic_score_matrix`).

    Args:
      key: PRNG key.
      critic_fn: ``(params, x [x_dim], z [z_dim]) -> T(x, z)``.
      params: initial critic parameters.
      sample_joint_fn: ``(key, batch_size) -> (x, z)``.
      objective: ``"dv"`` or ``"f"``.
      num_steps, batch_size, learning_rate: Adam settings (cosine-decayed rate).

    Returns:
      :class:`FitResult` with the batch estimate every 10 steps (NaN in between).
    """
    _check_loop(num_steps, batch_size)
    if objective not in ("dv", "f"):
        raise ValueError(f"`objective` must be 'dv' or 'f', got {objective!r}.")
    return _run(
        key, params, _mine_objective, (critic_fn, sample_joint_fn), (batch_size, objective),
        num_steps, learning_rate, f"fit MINE-{objective}",
    )[0]


def fit_mine_ais_critic(
    key: Array,
    critic_fn: ParamCriticFn,
    params: Params,
    log_prior_fn: Callable[[Array], Array],
    sample_joint_fn: SampleJointFn,
    num_steps: int = 2000,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    num_hmc_steps: int = 5,
    num_integration_steps: int = 10,
    initial_step_size: float = 0.1,
    target_acceptance: float = 0.65,
) -> tuple[FitResult, float]:
    """MINE-AIS training: stochastic gradient ascent on ``I_EB(T)`` with HMC negatives.

    Each step draws joint samples, runs ``num_hmc_steps`` HMC transitions on
    ``pi_T(z|x) ∝ p(z) exp T(x,z)`` from the true ``z`` and follows the gradient of
    :func:`tda_jax.mi.mine.energy_based_surrogate`. Between steps the log step size moves by
    ``0.1 * (acceptance - target_acceptance)`` (Robbins-Monro), tracking the critic as it sharpens.

    Args:
      key: PRNG key.
      critic_fn: ``(params, x [x_dim], z [z_dim]) -> T(x, z)``; ``p(z) exp T`` must be
        normalizable in ``z`` (e.g. :class:`tda_jax.mi.DecoderCritic`).
      params: initial critic parameters.
      log_prior_fn: ``log p(z)``.
      sample_joint_fn: ``(key, batch_size) -> (x, z)``.
      num_steps, batch_size, learning_rate: Adam settings (cosine-decayed rate).
      num_hmc_steps: HMC transitions per negative sample (from the true ``z``).
      num_integration_steps: leapfrog steps per transition.
      initial_step_size: starting HMC step size.
      target_acceptance: acceptance rate the step size adapts toward.

    Returns:
      ``(FitResult, final HMC step size)``; the objective history holds the surrogate value
      ``mean T(x,z) - mean T(x,z_neg)`` (a training diagnostic, not a bound).
    """
    _check_loop(num_steps, batch_size)

    def update(log_step_size, acceptance):
        return log_step_size + 0.1 * (acceptance - target_acceptance)

    result, log_step_size = _run(
        key, params, _mine_ais_objective, (critic_fn, log_prior_fn, sample_joint_fn),
        (batch_size, num_hmc_steps, num_integration_steps), num_steps, learning_rate,
        "fit MINE-AIS critic", extra=jnp.log(jnp.float32(initial_step_size)), update_extra=update,
    )
    return result, float(jnp.exp(log_step_size))
