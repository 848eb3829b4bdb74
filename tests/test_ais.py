"""Tests for annealed importance sampling, its reverse chain and BDMC against closed-form log Z.

Target: prior N(0, I_D) and an unnormalised Gaussian likelihood
``log L(z) = c - 0.5 * sum_i lam_i (z_i - m_i)^2``, so that
``log Z = c + sum_i [-0.5 log(1 + lam_i) - 0.5 lam_i m_i^2 / (1 + lam_i)]`` and the posterior is
``N(lam m / (1 + lam), diag(1 / (1 + lam)))`` (exact posterior samples for the reverse chains).
Bounds are checked with standard errors from the chains themselves, so a sign flip, a missing
``- log C`` (log 64 ≈ 4.2 nats) or a reversed step-size map fails.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax import mcmc

D = 10
LAM = jnp.linspace(1.0, 30.0, D)
M = jnp.linspace(-1.0, 1.0, D)
C_LIK = 2.0


def gaussian_log_z(lam):
    return float(C_LIK + jnp.sum(-0.5 * jnp.log1p(lam) - 0.5 * lam * M**2 / (1.0 + lam)))


LOG_Z = gaussian_log_z(LAM)
POST_MEAN = LAM * M / (1.0 + LAM)
POST_SD = 1.0 / jnp.sqrt(1.0 + LAM)
# A weak likelihood (lam <= 0.5) for which plain importance sampling has finite, small variance in
# both directions (E_posterior[1 / L^2] is finite only for lam < 1).
LAM_WEAK = LAM / 60.0
LOG_Z_WEAK = gaussian_log_z(LAM_WEAK)
NUM_CHAINS = 64
ais_module = importlib.import_module("tda_jax.mcmc.ais")  # `mcmc.ais` is the function


def log_prior(z):
    return -0.5 * jnp.sum(z**2) - 0.5 * z.shape[0] * jnp.log(2.0 * jnp.pi)


def log_lik(z):
    return C_LIK - 0.5 * jnp.sum(LAM * (z - M) ** 2)


def weak_log_lik(z):
    return C_LIK - 0.5 * jnp.sum(LAM_WEAK * (z - M) ** 2)


def prior_samples(key, n=NUM_CHAINS):
    return jax.random.normal(key, (n, D))


def posterior_samples(key, n=NUM_CHAINS):
    return POST_MEAN + POST_SD * jax.random.normal(key, (n, D))


def standard_error(x):
    x = np.asarray(x, np.float64)
    return x.std(ddof=1) / np.sqrt(x.size)


def relative_standard_error_of_mean_weight(log_w):
    """Delta-method standard error of log(mean w), from the chains' own weights."""
    w = np.exp(np.asarray(log_w, np.float64) - np.max(log_w))
    return w.std(ddof=1) / w.mean() / np.sqrt(w.size)


@pytest.fixture(scope="module")
def tuned():
    """Geometric schedules and pilot-tuned, frozen step sizes for T = 10 and T = 300."""
    out = {}
    for num_steps in (10, 300):
        betas = mcmc.geometric_schedule(num_steps, start=1e-3)
        step_sizes = mcmc.tune_ais_step_sizes(
            jax.random.key(1),
            prior_samples(jax.random.key(0)),
            log_prior,
            log_lik,
            betas,
            num_anchors=6,
            num_pilot_steps=50,
        )
        out[num_steps] = (betas, step_sizes)
    return out


def test_single_step_weights_are_the_likelihood_and_unbiased():
    """T = 1 is importance sampling with the prior as proposal: exact oracle for both signs."""
    betas = jnp.array([0.0, 1.0])
    z_prior = prior_samples(jax.random.key(2), 4000)
    forward = mcmc.ais(jax.random.key(3), z_prior, log_prior, weak_log_lik, betas, 0.1)
    expected = jax.vmap(weak_log_lik)(z_prior)
    np.testing.assert_allclose(forward.log_weights, expected, rtol=1e-5, atol=1e-5)
    # E[w] = Z exactly.
    se = relative_standard_error_of_mean_weight(forward.log_weights)
    estimate = float(mcmc.ais_log_normalizer_lower(forward.log_weights))
    assert se < 0.02
    assert abs(estimate - LOG_Z_WEAK) < 4 * se, (estimate, LOG_Z_WEAK, se)

    post_mean = LAM_WEAK * M / (1.0 + LAM_WEAK)
    z_post = post_mean + jax.random.normal(jax.random.key(4), (4000, D)) / jnp.sqrt(1.0 + LAM_WEAK)
    reverse = mcmc.ais(jax.random.key(5), z_post, log_prior, weak_log_lik, betas, 0.1, reverse=True)
    # Reverse value is -log w_rev = +log L(z_0) for the one step 1 -> 0.
    expected = jax.vmap(weak_log_lik)(z_post)
    np.testing.assert_allclose(reverse.log_weights, expected, rtol=1e-5, atol=1e-5)
    # E[exp(-value)] = 1 / Z exactly.
    se = relative_standard_error_of_mean_weight(-reverse.log_weights)
    estimate = float(mcmc.ais_log_normalizer_upper(reverse.log_weights))
    assert se < 0.02
    assert abs(estimate - LOG_Z_WEAK) < 4 * se, (estimate, LOG_Z_WEAK, se)


def test_forward_ais_is_a_lower_bound_and_accurate(tuned):
    betas, step_sizes = tuned[300]
    result = mcmc.ais(
        jax.random.key(6), prior_samples(jax.random.key(7)), log_prior, log_lik, betas, step_sizes
    )
    log_w = np.asarray(result.log_weights)
    assert result.log_weights.shape == (NUM_CHAINS,)
    assert result.positions.shape == (NUM_CHAINS, D)
    assert np.all(np.isfinite(log_w))
    # E[log w] <= log Z.
    assert log_w.mean() <= LOG_Z + 3 * standard_error(log_w)
    lower = float(mcmc.ais_log_normalizer_lower(result.log_weights))
    se = relative_standard_error_of_mean_weight(log_w)
    assert lower <= LOG_Z + 4 * se
    assert LOG_Z - lower < 0.2, (lower, LOG_Z)
    # The final states are approximately posterior samples.
    np.testing.assert_allclose(result.positions.mean(0), POST_MEAN, atol=4 * 1.0 / 8.0)
    acceptance = float(result.acceptance.mean())
    assert 0.45 < acceptance < 0.9, acceptance


def test_reverse_ais_from_exact_posterior_is_an_upper_bound(tuned):
    betas, step_sizes = tuned[300]
    result = mcmc.ais(
        jax.random.key(8),
        posterior_samples(jax.random.key(9)),
        log_prior,
        log_lik,
        betas,
        step_sizes,
        reverse=True,
    )
    values = np.asarray(result.log_weights)
    # E[value] >= log Z.
    assert values.mean() >= LOG_Z - 3 * standard_error(values)
    upper = float(mcmc.ais_log_normalizer_upper(result.log_weights))
    se = relative_standard_error_of_mean_weight(-values)
    assert upper >= LOG_Z - 4 * se
    assert upper - LOG_Z < 0.2, (upper, LOG_Z)
    # Reverse chains end near the prior.
    assert abs(float(result.positions.mean())) < 0.2


def test_bdmc_sandwich_contains_log_z_and_narrows(tuned):
    gaps = {}
    for num_steps in (10, 300):
        betas, step_sizes = tuned[num_steps]
        result = mcmc.bdmc(
            jax.random.key(10 + num_steps),
            prior_samples(jax.random.key(11)),
            posterior_samples(jax.random.key(12)),
            log_prior,
            log_lik,
            betas,
            step_sizes,
        )
        lower_se = relative_standard_error_of_mean_weight(result.forward.log_weights)
        upper_se = relative_standard_error_of_mean_weight(-result.reverse.log_weights)
        assert float(result.lower) <= LOG_Z + 4 * lower_se
        assert float(result.upper) >= LOG_Z - 4 * upper_se
        # The single-sample (mean log weight) bounds sandwich log Z too, and more loosely.
        assert float(result.forward.log_weights.mean()) <= float(result.lower) + 1e-5
        assert float(result.reverse.log_weights.mean()) >= float(result.upper) - 1e-5
        gaps[num_steps] = float(result.upper - result.lower)
    assert gaps[10] > 1.0, gaps  # few steps: a loose sandwich ...
    assert gaps[300] < 0.3 * gaps[10], gaps  # ... that narrows as T grows


def test_mala_kernel_and_several_mcmc_steps():
    betas = mcmc.linear_schedule(100)
    # MALA step size is the Langevin time step: about half the squared leapfrog step.
    step_sizes = 0.3 / (1.0 + betas[1:] * float(LAM.max()))
    result = mcmc.ais(
        jax.random.key(13),
        prior_samples(jax.random.key(14)),
        log_prior,
        log_lik,
        betas,
        step_sizes,
        kernel="mala",
        num_mcmc_steps=3,
    )
    lower = float(mcmc.ais_log_normalizer_lower(result.log_weights))
    se = relative_standard_error_of_mean_weight(result.log_weights)
    assert lower <= LOG_Z + 4 * se
    assert LOG_Z - lower < 1.0, (lower, LOG_Z)
    assert 0.3 < float(result.acceptance.mean()) < 0.95


def test_tuned_step_sizes_shrink_with_beta(tuned):
    betas, step_sizes = tuned[300]
    assert step_sizes.shape == (300,)
    s = np.asarray(step_sizes)
    assert np.all(s > 0) and np.all(np.isfinite(s))
    # The posterior at beta = 1 is ~sqrt(31) times narrower than the prior.
    assert s[-1] < 0.5 * s[0]


def _lik_with_mean(lam, m, z):
    return C_LIK - 0.5 * jnp.sum(lam * (z - m) ** 2)


def test_tuning_with_inputs_is_the_same_recipe_and_compiles_once():
    """``inputs`` mode (used by tda_jax.mi) = the plain tuner per problem, without recompiling."""
    betas = mcmc.geometric_schedule(20, start=1e-3)
    tuning = importlib.import_module("tda_jax.mcmc.tuning")
    small = dict(num_anchors=3, num_pilot_steps=10, num_integration_steps=3)
    z = prior_samples(jax.random.key(30), 8)
    key = jax.random.key(31)
    before = tuning._tune_anchors_jit._cache_size()
    # One problem through `inputs` equals the plain call on that problem's key.
    lik = jax.tree_util.Partial(_lik_with_mean, LAM)
    batched = mcmc.tune_ais_step_sizes(key, z[None], log_prior, lik, betas, inputs=M[None], **small)
    plain = mcmc.tune_ais_step_sizes(
        jax.random.split(key, 1)[0], z, log_prior, functools.partial(_lik_with_mean, LAM, M), betas,
        **small,
    )
    np.testing.assert_allclose(batched, plain, rtol=1e-4)
    assert float(batched[-1]) < float(batched[0])
    # New bound arrays and new data of the same shapes reuse the compiled pilot (one entry for
    # the batched calls, one for the plain call).
    for scale in (0.5, 2.0):
        lik = jax.tree_util.Partial(_lik_with_mean, scale * LAM)
        steps = mcmc.tune_ais_step_sizes(
            key, z[None], log_prior, lik, betas, inputs=scale * M[None], **small
        )
        assert steps.shape == (20,) and bool(jnp.all(steps > 0))
    assert tuning._tune_anchors_jit._cache_size() - before <= 2
    with pytest.raises(ValueError, match="num_problems"):
        mcmc.tune_ais_step_sizes(key, jnp.stack([z, z]), log_prior, lik, betas, inputs=M[None])


def test_annealed_chain_matches_documented_reverse_convention():
    """Decreasing betas with reverse_step_sizes in annealed_chain == ais(reverse=True)."""
    betas = mcmc.linear_schedule(10)  # same shapes as the T = 10 runs: no new compile of ais
    step_sizes = jnp.linspace(0.3, 0.1, 10)
    z_post = posterior_samples(jax.random.key(15))
    key = jax.random.key(16)
    result = mcmc.ais(key, z_post, log_prior, log_lik, betas, step_sizes, reverse=True)
    chain_keys = jax.random.split(key, NUM_CHAINS)
    log_w, position, _ = jax.jit(mcmc.annealed_chain, static_argnums=(2, 3))(
        chain_keys[0],
        z_post[0],
        log_prior,
        log_lik,
        betas[::-1],
        mcmc.reverse_step_sizes(step_sizes),
    )
    np.testing.assert_allclose(log_w, result.log_weights[0], rtol=1e-4)
    np.testing.assert_allclose(position, result.positions[0], rtol=1e-4, atol=1e-5)


def test_new_schedule_values_do_not_recompile():
    z = prior_samples(jax.random.key(17))
    before = ais_module._ais_chains._cache_size()
    for start in (1e-2, 1e-3, 1e-4):
        betas = mcmc.geometric_schedule(10, start)
        mcmc.ais(jax.random.key(0), z, log_prior, log_lik, betas, 0.1)
    assert ais_module._ais_chains._cache_size() - before <= 1


def nan_likelihood(z):
    # Undefined (NaN) far out in the first coordinate.
    return jnp.where(z[0] > 1.5, jnp.nan, log_lik(z))


def test_nan_likelihood_region_is_never_entered():
    z = jnp.clip(prior_samples(jax.random.key(18)), -1.0, 1.0)
    result = mcmc.ais(jax.random.key(19), z, log_prior, nan_likelihood, mcmc.linear_schedule(10), 0.5)
    assert np.all(np.isfinite(np.asarray(result.log_weights)))
    assert np.all(np.asarray(result.positions[:, 0]) <= 1.5)


def test_bad_inputs_raise():
    betas = mcmc.linear_schedule(4)
    z = prior_samples(jax.random.key(20), 4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="log_likelihood_fn.*not finite"):
        mcmc.ais(key, z.at[1, 0].set(3.0), log_prior, nan_likelihood, betas, 0.1)
    with pytest.raises(ValueError, match=r"initial_positions.*\[num_chains, D\]"):
        mcmc.ais(key, z[0], log_prior, log_lik, betas, 0.1)
    with pytest.raises(ValueError, match="step_sizes"):
        mcmc.ais(key, z, log_prior, log_lik, betas, jnp.ones(5))
    with pytest.raises(ValueError, match="start at 0"):
        mcmc.ais(key, z, log_prior, log_lik, betas[::-1], 0.1)
    with pytest.raises(ValueError, match="kernel"):
        mcmc.ais(key, z, log_prior, log_lik, betas, 0.1, kernel="gibbs")
    with pytest.raises(ValueError, match=r"initial_position.*\[D\]"):
        mcmc.annealed_chain(key, z, log_prior, log_lik, betas, 0.1)
    with pytest.raises(ValueError, match="scalar"):
        mcmc.ais(key, z, log_prior, lambda x: x, betas, 0.1)
    with pytest.raises(ValueError, match="num_anchors"):
        mcmc.tune_ais_step_sizes(key, z, log_prior, log_lik, betas, num_anchors=1)


def test_ais_and_bdmc_under_outer_jit_with_traced_betas_match_eager():
    """Betas (and step sizes, positions) traced by an enclosing jit: same numbers as eager calls;
    only the host-side value checks are skipped."""
    num_steps = 12
    z = prior_samples(jax.random.key(21), 8)
    posterior = posterior_samples(jax.random.key(23), 8)
    betas = mcmc.geometric_schedule(num_steps, 1e-2)
    step_sizes = jnp.linspace(0.3, 0.1, num_steps)
    key = jax.random.key(22)

    def forward(b, s, z0):
        return mcmc.ais(key, z0, log_prior, log_lik, b, s)

    def sandwich(b, s):
        result = mcmc.bdmc(key, z, posterior, log_prior, log_lik, b, s)
        return result.lower, result.upper

    for traced, eager in (
        (jax.jit(forward)(betas, step_sizes, z), forward(betas, step_sizes, z)),
        # Constant (closed-over) positions with traced betas: the case that raised
        # TracerArrayConversionError in the initial-density check.
        (jax.jit(lambda b: forward(b, 0.2, z))(betas), forward(betas, 0.2, z)),
        (jax.jit(sandwich)(betas, step_sizes), sandwich(betas, step_sizes)),
    ):
        for got, want in zip(jax.tree.leaves(traced), jax.tree.leaves(eager), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
