"""Variational and importance-sampling bounds on ``I(x; z)`` for a joint ``p(x, z) = p(z) p(x|z)``.

Notation (Brekelmans et al., 2022, "Improving Mutual Information Estimation with Annealed and
Energy-Based Bounds"): ``(x, z_1) ~ p(x, z)`` is a joint sample, so ``z_1`` is an exact posterior
sample for ``x``; ``q(z|x)`` is a normalized proposal (variational posterior, "encoder");
``T(x, z)`` is a critic. Every bound is an expectation; the functions here return its Monte Carlo
summand per joint sample, shape ``[N]``, so callers can average and put confidence intervals on it
(:func:`mean_and_stderr`).

Lower bounds (``<= I``)
  * Barber-Agakov: ``I_BA(q) = E_{p(x,z)}[log q(z|x) - log p(z)]``.
  * GIWAE: ``I_GIWAE(q, T, K) = E_{p(x,z_1) prod_{k>=2} q(z_k|x)}[log q(z_1|x)/p(z_1)
    + T(x,z_1) - log (1/K) sum_{k=1}^K exp T(x,z_k)]``. The contrastive term is ``<= log K``;
    ``K = 1`` gives BA, ``q = p(z)`` gives InfoNCE, ``T = log p(x,z)/q(z|x)`` gives the IWAE lower
    bound.
  * InfoNCE: ``I_NCE(T, K) = E_{p(x,z_1) prod_{k>=2} p(z_k)}[T(x,z_1) - log (1/K) sum_k
    exp T(x,z_k)] <= log K`` (with the optimal critic ``T = log p(x|z)`` when ``p(x|z)`` is known).
  * IWAE lower (needs ``p(x|z)``): ``E_{p(x,z_1) prod_{k>=2} q(z_k|x)}[log p(x|z_1) - log (1/K)
    sum_k p(x,z_k)/q(z_k|x)]``: the true ``z_1`` is one of the ``K`` importance samples, which makes
    the estimate of ``log p(x)`` an upper bound in expectation.

Upper bound (``>= I``)
  * IWAE upper (needs ``p(x|z)``): ``E_{p(x,z)}[log p(x|z)] - E_{p(x) prod_k q(z_k|x)}[log (1/K)
    sum_{k=1}^K p(x,z_k)/q(z_k|x)]``: the IWAE lower bound on ``log p(x)``.

Both IWAE bounds tighten monotonically in ``K`` (in expectation).

Function conventions: callables act on one example, ``x`` ``[x_dim]`` and ``z`` ``[z_dim]``, and
return a scalar; ``K`` (``num_samples``) counts all samples per ``x``, including the true one for
the lower bounds. Nothing is jitted here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

# One log-mean-exp for the whole library (exact -inf/+inf handling, NaN-free gradients); re-exported
# as tda_jax.mi.log_mean_exp.
from tda_jax.probability.weights import log_mean_exp

Array = jax.Array
LogLikelihoodFn = Callable[[Array, Array], Array]  # (x [x_dim], z [z_dim]) -> scalar
LogPriorFn = Callable[[Array], Array]  # z [z_dim] -> scalar
CriticFn = Callable[[Array, Array], Array]  # (x [x_dim], z [z_dim]) -> scalar


class Proposal(NamedTuple):
    """A normalized proposal ``q(z|x)`` as two pure functions of one example.

    Attributes:
      sample: ``(key, x [x_dim]) -> z [z_dim]``.
      log_prob: ``(x [x_dim], z [z_dim]) -> scalar`` normalized ``log q(z|x)``.
    """

    sample: Callable[[Array, Array], Array]
    log_prob: Callable[[Array, Array], Array]


_LOG_2PI = math.log(2.0 * math.pi)


def as_partial(fn: Callable) -> Partial:
    """Wraps a callable as a :class:`jax.tree_util.Partial` (a pytree) unless it already is one.

    A ``Partial(module_level_fn, arrays...)`` can be passed through ``jit`` as an argument: its
    arrays are traced, so compiled code is reused for new arrays of the same shapes.
    """
    return fn if isinstance(fn, Partial) else Partial(fn)


def _diagonal_gaussian_sample(mean_and_log_std_fn, key: Array, x: Array) -> Array:
    mean, log_std = mean_and_log_std_fn(x)
    return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)


def _diagonal_gaussian_log_prob(mean_and_log_std_fn, x: Array, z: Array) -> Array:
    mean, log_std = mean_and_log_std_fn(x)
    u = (z - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * u**2 - log_std - 0.5 * _LOG_2PI)


def diagonal_gaussian_proposal(
    mean_and_log_std_fn: Callable[[Array], tuple[Array, Array]],
) -> Proposal:
    """``q(z|x) = N(mean(x), diag(exp(2 log_std(x))))`` from ``x -> (mean, log_std)`` ``[z_dim]``.

    The returned functions are :class:`jax.tree_util.Partial` objects (pytrees), so a proposal
    built from ``Partial(encoder_apply, params)`` can be passed into jitted code with traced
    parameters.
    """
    fn = as_partial(mean_and_log_std_fn)
    return Proposal(Partial(_diagonal_gaussian_sample, fn), Partial(_diagonal_gaussian_log_prob, fn))


def _zeros_mean_and_log_std(zeros: Array, x: Array) -> tuple[Array, Array]:
    return zeros, zeros


def standard_normal_proposal(z_dim: int) -> Proposal:
    """The prior ``p(z) = N(0, I_{z_dim})`` as a proposal that ignores ``x``."""
    zeros = jnp.zeros((z_dim,), jnp.float32)
    return diagonal_gaussian_proposal(Partial(_zeros_mean_and_log_std, zeros))


def mean_and_stderr(values: Array) -> tuple[float, float]:
    """Mean and standard error of per-example bound values ``[N]`` (host floats)."""
    values = jnp.asarray(values, jnp.float32)
    n = values.shape[0]
    stderr = float(jnp.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(jnp.mean(values)), stderr


def check_joint_samples(x: Array, z: Array) -> None:
    """Raises ``ValueError`` unless ``x`` is ``[N, x_dim]`` and ``z`` is ``[N, z_dim]``."""
    if jnp.ndim(x) != 2 or jnp.ndim(z) != 2:
        raise ValueError(
            f"`x` must be [N, x_dim] and `z` must be [N, z_dim]; got shapes {jnp.shape(x)} and "
            f"{jnp.shape(z)}. Add a leading batch axis for a single example."
        )
    if x.shape[0] != z.shape[0]:
        raise ValueError(
            f"`x` and `z` must hold the same number of joint samples N; got {x.shape[0]} "
            f"(x shape {x.shape}) and {z.shape[0]} (z shape {z.shape})."
        )


def check_num_samples(num_samples: int, name: str = "num_samples") -> int:
    """Raises ``ValueError`` unless ``num_samples`` is a Python int ``>= 1``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"`{name}` must be a Python int, got {type(num_samples).__name__}.")
    if num_samples < 1:
        raise ValueError(f"`{name}` (K) must be >= 1, got {num_samples}.")
    return num_samples


def check_finite(values: Array, what: str) -> Array:
    """Returns ``values``; raises ``ValueError`` if concrete ``values`` contain NaN or +-inf.

    Bound summands, critic scores and log weights are never legitimately infinite here. Tracers
    (inside jit/vmap) pass through unchecked; jitted callers check the outputs afterwards.
    """
    if isinstance(values, jax.core.Tracer):
        return values
    bad = ~jnp.isfinite(values)
    if bool(jnp.any(bad)):
        count = int(jnp.sum(bad))
        raise ValueError(
            f"{what} returned {count} non-finite value(s) (NaN or inf) out of {values.size}; check "
            "the log density / critic (overflow, log of zero, NaN parameters) at these inputs."
        )
    return values


def barber_agakov_lower(
    x: Array, z: Array, encoder_log_prob_fn: Callable[[Array, Array], Array], log_prior_fn: LogPriorFn
) -> Array:
    """Barber-Agakov lower bound summands ``log q(z|x) - log p(z)``.

    ``I >= I_BA(q) = E_{p(x,z)}[log q(z|x) - log p(z)]``; the gap is
    ``E_{p(x)} KL(p(z|x) || q(z|x))``.

    Args:
      x: ``[N, x_dim]`` joint samples.
      z: ``[N, z_dim]`` the matching latents.
      encoder_log_prob_fn: normalized ``log q(z|x)`` of one example.
      log_prior_fn: ``log p(z)`` of one latent.

    Returns:
      ``[N]`` per-example values; their mean is the bound.
    """
    check_joint_samples(x, z)
    values = jax.vmap(encoder_log_prob_fn)(x, z) - jax.vmap(log_prior_fn)(z)
    return check_finite(values, "barber_agakov_lower")


def _contrastive_samples(key: Array, x: Array, z: Array, sample_fn, num_samples: int) -> Array:
    """``[N, K, z_dim]``: the true ``z`` first, then ``K - 1`` draws from ``sample_fn(key, x)``."""
    n = x.shape[0]
    if num_samples == 1:
        return z[:, None, :]
    keys = jax.random.split(key, (n, num_samples - 1))
    others = jax.vmap(lambda ks, xi: jax.vmap(lambda k: sample_fn(k, xi))(ks))(keys, x)
    return jnp.concatenate([z[:, None, :], others], axis=1)


def _scores(fn: CriticFn, x: Array, zs: Array) -> Array:
    """``fn(x_n, zs[n, k])`` for all ``n, k``: ``[N, K]``."""
    return jax.vmap(lambda xi, zi: jax.vmap(lambda zk: fn(xi, zk))(zi))(x, zs)


def giwae_lower(
    key: Array,
    x: Array,
    z: Array,
    critic_fn: CriticFn,
    log_prior_fn: LogPriorFn,
    proposal: Proposal,
    num_samples: int,
) -> Array:
    """Generalized IWAE (GIWAE) lower bound summands.

    ``I >= I_GIWAE(q, T, K) = E[log q(z_1|x)/p(z_1) + T(x,z_1) - log (1/K) sum_{k=1}^K exp T(x,z_k)]``
    with ``(x, z_1) ~ p(x,z)`` and ``z_{2:K} ~ q(z|x)``. The second (contrastive) part is at most
    ``log K``, so ``I_BA(q) <= I_GIWAE`` for the best critic and ``I_GIWAE <= I_BA(q) + log K``.

    Args:
      key: PRNG key for the ``K - 1`` proposal samples per example.
      x: ``[N, x_dim]``; z: ``[N, z_dim]`` joint samples.
      critic_fn: ``T(x, z)`` of one example.
      log_prior_fn: ``log p(z)``.
      proposal: ``q(z|x)``.
      num_samples: ``K >= 1`` (including the true ``z_1``).

    Returns:
      ``[N]`` per-example values.
    """
    check_joint_samples(x, z)
    num_samples = check_num_samples(num_samples)
    zs = _contrastive_samples(key, x, z, proposal.sample, num_samples)
    scores = check_finite(_scores(critic_fn, x, zs), "critic_fn")
    ba = jax.vmap(proposal.log_prob)(x, z) - jax.vmap(log_prior_fn)(z)
    values = ba + scores[:, 0] - log_mean_exp(scores, axis=1)
    return check_finite(values, "giwae_lower")


def infonce_lower(
    key: Array,
    x: Array,
    z: Array,
    critic_fn: CriticFn,
    prior_sample_fn: Callable[[Array], Array],
    num_samples: int,
) -> Array:
    """InfoNCE lower bound summands; every summand is ``<= log K``.

    ``I >= I_NCE(T, K) = E_{p(x,z_1) prod_{k>=2} p(z_k)}[T(x,z_1) - log (1/K) sum_{k=1}^K
    exp T(x, z_k)]``, i.e. GIWAE with ``q = p(z)``. With ``p(x|z)`` known, ``T = log p(x|z)`` is the
    optimal critic. The value can never exceed ``log K``, whatever the true MI.

    Args:
      key: PRNG key for the ``K - 1`` negatives per example.
      x: ``[N, x_dim]``; z: ``[N, z_dim]`` joint samples.
      critic_fn: ``T(x, z)``.
      prior_sample_fn: ``key -> z [z_dim]`` draws from ``p(z)``.
      num_samples: ``K >= 1`` (one positive and ``K - 1`` negatives).

    Returns:
      ``[N]`` per-example values.
    """
    check_joint_samples(x, z)
    num_samples = check_num_samples(num_samples)
    zs = _contrastive_samples(key, x, z, lambda k, xi: prior_sample_fn(k), num_samples)
    scores = check_finite(_scores(critic_fn, x, zs), "critic_fn")
    return scores[:, 0] - log_mean_exp(scores, axis=1)


def infonce_from_scores(scores: Array) -> Array:
    """Batch InfoNCE from a critic matrix ``scores[i, j] = T(x_i, z_j)`` ``[N, N]``.

    Pairs ``(x_i, z_i)`` are joint samples and the other ``z_j`` of the batch act as the ``N - 1``
    negatives: summands ``T(x_i, z_i) - log (1/N) sum_j exp T(x_i, z_j) <= log N``.

    Returns:
      ``[N]`` per-example values.
    """
    if jnp.ndim(scores) != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"`scores` must be a square matrix [N, N], got shape {jnp.shape(scores)}.")
    check_finite(scores, "scores")
    return jnp.diagonal(scores) - log_mean_exp(scores, axis=1)


def _log_importance_weights(log_likelihood_fn, log_prior_fn, proposal, x, zs) -> Array:
    """``log p(x, z_k) - log q(z_k|x)`` for ``zs`` ``[N, K, z_dim]``: ``[N, K]``."""

    def log_w(xi, zk):
        return log_likelihood_fn(xi, zk) + log_prior_fn(zk) - proposal.log_prob(xi, zk)

    return check_finite(_scores(log_w, x, zs), "log p(x,z) - log q(z|x)")


def iwae_lower(
    key: Array,
    x: Array,
    z: Array,
    log_likelihood_fn: LogLikelihoodFn,
    log_prior_fn: LogPriorFn,
    proposal: Proposal,
    num_samples: int,
) -> Array:
    """IWAE lower bound on MI (summands), for a known ``p(x|z)``.

    ``I >= E_{p(x,z_1) prod_{k>=2} q(z_k|x)}[log p(x|z_1) - log (1/K) sum_{k=1}^K
    p(x,z_k)/q(z_k|x)]``. Including the true posterior sample ``z_1`` makes
    ``log (1/K) sum_k w_k`` an upper bound on ``log p(x)`` in expectation. Equals GIWAE with the
    critic ``T = log p(x,z) - log q(z|x)``; ``K = 1`` gives BA.

    Args:
      key: PRNG key for the ``K - 1`` proposal samples.
      x: ``[N, x_dim]``; z: ``[N, z_dim]`` joint samples.
      log_likelihood_fn: ``log p(x|z)``.
      log_prior_fn: ``log p(z)``.
      proposal: ``q(z|x)``.
      num_samples: ``K >= 1``.

    Returns:
      ``[N]`` per-example values.
    """
    check_joint_samples(x, z)
    num_samples = check_num_samples(num_samples)
    zs = _contrastive_samples(key, x, z, proposal.sample, num_samples)
    log_w = _log_importance_weights(log_likelihood_fn, log_prior_fn, proposal, x, zs)
    log_lik = jax.vmap(log_likelihood_fn)(x, z)
    return check_finite(log_lik - log_mean_exp(log_w, axis=1), "iwae_lower")


def iwae_upper(
    key: Array,
    x: Array,
    z: Array,
    log_likelihood_fn: LogLikelihoodFn,
    log_prior_fn: LogPriorFn,
    proposal: Proposal,
    num_samples: int,
) -> Array:
    """IWAE upper bound on MI (summands), for a known ``p(x|z)``.

    ``I <= E_{p(x,z)}[log p(x|z)] - E_{p(x) prod_{k=1}^K q(z_k|x)}[log (1/K) sum_k
    p(x,z_k)/q(z_k|x)]``: the IWAE lower bound on ``log p(x)``, with ``K`` fresh proposal samples.

    Args:
      key: PRNG key for the ``K`` proposal samples.
      x: ``[N, x_dim]``; z: ``[N, z_dim]`` joint samples (``z`` enters only ``log p(x|z)``).
      log_likelihood_fn: ``log p(x|z)``.
      log_prior_fn: ``log p(z)``.
      proposal: ``q(z|x)``.
      num_samples: ``K >= 1``.

    Returns:
      ``[N]`` per-example values.
    """
    check_joint_samples(x, z)
    num_samples = check_num_samples(num_samples)
    n = x.shape[0]
    keys = jax.random.split(key, (n, num_samples))
    zs = jax.vmap(lambda ks, xi: jax.vmap(lambda k: proposal.sample(k, xi))(ks))(keys, x)
    log_w = _log_importance_weights(log_likelihood_fn, log_prior_fn, proposal, x, zs)
    log_lik = jax.vmap(log_likelihood_fn)(x, z)
    return check_finite(log_lik - log_mean_exp(log_w, axis=1), "iwae_upper")
