"""MI bounds against closed forms on linear-Gaussian models (tda_jax.mi).

Oracles: the exact posterior makes BA and both IWAE bounds equal the per-sample truth
``log p(x|z) - log p(x)`` (any K), so an off-by-log-K bug fails exactly; statistical tests compare
paired per-example differences to 3 standard errors with fixed keys.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax import mi
from tda_jax.mcmc import geometric_schedule, linear_schedule


def _exact_posterior_proposal(model):
    def mean_and_log_std(x):
        mean, cov = mi.posterior(model, x)
        return mean, 0.5 * jnp.log(jnp.diag(cov))

    return mi.diagonal_gaussian_proposal(mean_and_log_std)


def _diagonal_proposal(model):
    matrix, log_std = mi.optimal_diagonal_encoder(model)
    return mi.diagonal_gaussian_proposal(lambda x: (matrix @ x, log_std))


def _per_sample_truth(model, x, z):
    return mi.log_likelihood(model, x, z) - mi.log_marginal(model, x)


def _compiled(fn):
    """Runs ``fn()`` as one compiled program (much faster than eager vmaps on a busy CPU)."""
    return jax.jit(fn)()


def _assert_below(values, truth, sigmas=3.0):
    """Paired test: mean(values - truth) <= sigmas * stderr."""
    diff = np.asarray(values - truth, np.float64)
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert diff.mean() <= sigmas * se + 1e-4, (diff.mean(), se)


def _assert_above(values, truth, sigmas=3.0):
    _assert_below(truth, values, sigmas)


@pytest.fixture(scope="module")
def isotropic():
    """z_dim = x_dim = 3 with a diagonal exact posterior (W = rho I)."""
    model = mi.correlated_gaussian_model(0.9, 3)
    x, z = mi.sample_joint(jax.random.key(0), model, 400)
    return model, x, z


@pytest.fixture(scope="module")
def correlated():
    """A 4-d model with a correlated posterior: the diagonal encoder is strictly suboptimal."""
    model = mi.make_linear_gaussian(jax.random.key(1), 4, 4, 6.0, base="gaussian")
    x, z = mi.sample_joint(jax.random.key(2), model, 400)
    return model, x, z


# ----------------------------------------------------------------------------- closed forms


def test_closed_form_mi_matches_log_det_and_correlated_gaussians():
    model = mi.make_linear_gaussian(jax.random.key(3), 5, 3, 7.5, noise_std=0.5, base="gaussian")
    w, s = np.asarray(model.weight, np.float64), 0.5
    expected = 0.5 * np.linalg.slogdet(np.eye(5) + w @ w.T / s**2)[1]
    assert float(mi.linear_gaussian_mi(model)) == pytest.approx(expected, rel=1e-4)
    assert expected == pytest.approx(7.5, abs=1e-3)  # scale_to_mi hit the target
    rho, dim = 0.8, 4
    assert float(mi.linear_gaussian_mi(mi.correlated_gaussian_model(rho, dim))) == pytest.approx(
        -0.5 * dim * math.log(1 - rho**2), rel=1e-5
    )


def test_marginal_and_posterior_satisfy_bayes_rule(correlated):
    model, x, _ = correlated
    z = mi.sample_posterior(jax.random.key(4), model, x)
    mean, cov = mi.posterior(model, x)
    chol = np.linalg.cholesky(np.asarray(cov, np.float64))
    diff = np.asarray(z - mean, np.float64)
    sol = np.linalg.solve(chol, diff.T)
    log_post = -0.5 * (sol**2).sum(0) - np.log(np.diag(chol)).sum() - 0.5 * model.z_dim * np.log(
        2 * np.pi
    )
    lhs = np.asarray(mi.log_marginal(model, x), np.float64)
    rhs = np.asarray(mi.log_likelihood(model, x, z) + mi.log_prior(z), np.float64) - log_post
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-3)


def test_true_mi_sample_is_unbiased(correlated):
    model, x, z = correlated
    truth = np.asarray(_per_sample_truth(model, x, z))
    se = truth.std(ddof=1) / math.sqrt(truth.size)
    assert abs(float(mi.true_mi_sample(model, x, z)) - 6.0) < 3 * se
    assert float(mi.true_mi_sample(model, x, z)) == pytest.approx(truth.mean(), rel=1e-5)


# ------------------------------------------------------------------ exact-posterior oracles


@pytest.mark.parametrize("num_samples", [1, 7])
def test_exact_posterior_makes_ba_and_iwae_exact(isotropic, num_samples):
    model, x, z = isotropic
    proposal = _exact_posterior_proposal(model)
    truth = np.asarray(_per_sample_truth(model, x, z))
    ll = mi.likelihood_fn(model)
    all_values = _compiled(
        lambda: (
            mi.barber_agakov_lower(x, z, proposal.log_prob, mi.log_prior),
            mi.iwae_lower(jax.random.key(5), x, z, ll, mi.log_prior, proposal, num_samples),
            mi.iwae_upper(jax.random.key(6), x, z, ll, mi.log_prior, proposal, num_samples),
        )
    )
    for values in all_values:
        np.testing.assert_allclose(np.asarray(values), truth, atol=2e-3)


def test_giwae_special_cases_are_ba_iwae_and_infonce(correlated):
    model, x, z = correlated
    x, z = x[:64], z[:64]
    proposal = _diagonal_proposal(model)
    ll = mi.likelihood_fn(model)
    key = jax.random.key(7)
    prior = mi.standard_normal_proposal(model.z_dim)

    def importance_critic(xi, zi):
        return ll(xi, zi) + mi.log_prior(zi) - proposal.log_prob(xi, zi)

    ba, giwae_k1, giwae, iwae, giwae_prior, nce = _compiled(
        lambda: (
            mi.barber_agakov_lower(x, z, proposal.log_prob, mi.log_prior),
            mi.giwae_lower(key, x, z, ll, mi.log_prior, proposal, 1),
            mi.giwae_lower(key, x, z, importance_critic, mi.log_prior, proposal, 9),
            mi.iwae_lower(key, x, z, ll, mi.log_prior, proposal, 9),
            mi.giwae_lower(key, x, z, ll, mi.log_prior, prior, 9),
            mi.infonce_lower(key, x, z, ll, mi.standard_normal_sampler(model.z_dim), 9),
        )
    )
    np.testing.assert_allclose(np.asarray(giwae_k1), np.asarray(ba), atol=1e-4)
    np.testing.assert_allclose(np.asarray(giwae), np.asarray(iwae), atol=1e-3)
    np.testing.assert_allclose(np.asarray(giwae_prior), np.asarray(nce), atol=1e-3)


# ------------------------------------------------------------------------ statistical tests


@pytest.mark.slow
def test_iwae_sandwich_and_monotone_in_k(correlated):
    model, x, z = correlated
    truth = _per_sample_truth(model, x, z)
    proposal = _diagonal_proposal(model)
    ll = mi.likelihood_fn(model)
    ks = (1, 10, 100)
    lowers, uppers = _compiled(
        lambda: (
            [mi.iwae_lower(jax.random.key(8), x, z, ll, mi.log_prior, proposal, k) for k in ks],
            [mi.iwae_upper(jax.random.key(9), x, z, ll, mi.log_prior, proposal, k) for k in ks],
        )
    )
    for lower, upper in zip(lowers, uppers, strict=True):
        _assert_below(lower, truth)
        _assert_above(upper, truth)
    for a, b in zip(lowers, lowers[1:], strict=False):
        _assert_below(a, b)  # lower bound increases with K
    for a, b in zip(uppers, uppers[1:], strict=False):
        _assert_above(a, b)  # upper bound decreases with K
    # The diagonal proposal is strictly suboptimal here, so K matters by a clear margin.
    assert float(jnp.mean(lowers[2] - lowers[0])) > 0.3
    assert float(jnp.mean(uppers[0] - uppers[2])) > 0.3


def test_infonce_never_exceeds_log_k_and_saturates():
    model = mi.make_linear_gaussian(jax.random.key(10), 4, 4, 20.0)
    x, z = mi.sample_joint(jax.random.key(11), model, 200)
    k = 16
    nce = _compiled(
        lambda: mi.infonce_lower(
            jax.random.key(12), x, z, mi.likelihood_fn(model), mi.standard_normal_sampler(4), k
        )
    )
    assert float(jnp.max(nce)) <= math.log(k) + 1e-5
    # With MI = 20 nats >> log K and the optimal critic, InfoNCE sits just below its ceiling.
    assert math.log(k) - 0.2 < float(jnp.mean(nce)) <= math.log(k) + 1e-5
    scores = _compiled(lambda: mi.critic_score_matrix(mi.likelihood_fn(model), x, z))
    batch = mi.infonce_from_scores(scores)
    assert float(jnp.max(batch)) <= math.log(200) + 1e-5


def test_infonce_is_a_lower_bound_at_low_mi(isotropic):
    model, x, z = isotropic
    nce = _compiled(
        lambda: mi.infonce_lower(
            jax.random.key(13), x, z, mi.likelihood_fn(model), mi.standard_normal_sampler(3), 64
        )
    )
    _assert_below(nce, _per_sample_truth(model, x, z))


def test_mine_estimators_with_optimal_critic(isotropic):
    model, x, z = isotropic
    truth = float(jnp.mean(_per_sample_truth(model, x, z)))

    def critic(xi, zi):  # log p(x|z) / p(x): optimal for MINE-DV; MINE-F wants it + 1.
        return mi.log_likelihood(model, xi, zi) - mi.log_marginal(model, xi)

    scores = _compiled(lambda: mi.critic_score_matrix(critic, x, z))
    dv = float(mi.mine_dv_lower(scores))
    f = float(mi.mine_f_lower(scores + 1.0))
    assert f <= truth + 0.25 and f > truth - 0.5
    assert dv == pytest.approx(truth, abs=0.5)
    # A constant shift leaves DV unchanged but costs MINE-F.
    assert float(mi.mine_dv_lower(scores + 3.0)) == pytest.approx(dv, abs=1e-4)
    assert float(mi.mine_f_lower(scores + 3.0)) < f - 1.0


# ------------------------------------------------------------------------ multi-sample AIS


@pytest.fixture(scope="module")
def ais_problem():
    model = mi.make_linear_gaussian(jax.random.key(14), 3, 2, 5.0)
    x, z = mi.sample_joint(jax.random.key(15), model, 48)
    return model, x, z


def _shifted_log_likelihood(shift, model, x, z):
    return mi.log_likelihood(model, x, z) + shift


@functools.partial(jax.jit, static_argnames=("num_chains",))
def _ais_jit(key, x, z, betas, step_sizes, log_likelihood_fn, *, num_chains):
    return mi.multi_sample_ais_bounds(
        key, x, z, log_likelihood_fn, mi.log_prior, betas, step_sizes, num_chains
    )


def _run_ais(model, x, z, betas, step_sizes, num_chains, key=16, log_likelihood_fn=None):
    ll = mi.likelihood_fn(model) if log_likelihood_fn is None else mi.as_partial(log_likelihood_fn)
    return _ais_jit(
        jax.random.key(key), x, z, betas, jnp.asarray(step_sizes, jnp.float32), ll,
        num_chains=num_chains,
    )


@pytest.mark.slow
def test_multi_sample_ais_sandwich_contains_truth(ais_problem):
    model, x, z = ais_problem
    truth = _per_sample_truth(model, x, z)
    betas = geometric_schedule(200, start=1e-4)
    steps = mi.tune_mi_step_sizes(
        jax.random.key(17), x[:1], mi.likelihood_fn(model), mi.log_prior, betas, z_dim=2,
        num_pilot_steps=30, num_anchors=4, num_pilot_chains=8,
    )
    assert steps.shape == (200,) and bool(jnp.all(steps > 0))
    assert float(steps[-1]) < float(steps[0])  # the posterior is narrower than the prior
    shift = jax.tree_util.Partial(_shifted_log_likelihood, jnp.float32(0.0), model)
    result = _run_ais(model, x, z, betas, steps, 4, log_likelihood_fn=shift)
    _assert_below(result.lower, truth)
    _assert_above(result.upper, truth)
    width = float(jnp.mean(result.upper - result.lower))
    # Tight enough that an off-by-log(K) error (log 4 = 1.39) would break the sandwich.
    assert 0.0 <= width < 0.3, width
    assert float(jnp.mean(result.acceptance)) > 0.4
    # A constant added to the critic cancels in the lower bound (MINE-AIS invariance).
    shifted = _run_ais(
        model, x, z, betas, steps, 4,
        log_likelihood_fn=jax.tree_util.Partial(_shifted_log_likelihood, jnp.float32(5.0), model),
    )
    np.testing.assert_allclose(np.asarray(shifted.lower), np.asarray(result.lower), atol=0.05)


@pytest.mark.slow
def test_single_step_ais_lower_bound_is_infonce_capped(ais_problem):
    """With T = 1 the lower bound is InfoNCE with K chains: never above log K, per example."""
    model, x, z = ais_problem
    result = _run_ais(model, x, z, linear_schedule(1), 0.1, 4)
    assert float(jnp.max(result.lower)) <= math.log(4) + 1e-5
    _assert_below(result.lower, _per_sample_truth(model, x, z))
    _assert_above(result.upper, _per_sample_truth(model, x, z))


# ---------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_fit_encoder_reaches_the_best_diagonal_encoder():
    model = mi.make_linear_gaussian(jax.random.key(18), 3, 3, 4.0, base="gaussian")
    module = mi.GaussianEncoder(3)
    params = module.init(jax.random.key(19), jnp.zeros(3))
    x_std = jnp.sqrt(jnp.sum(model.weight**2, axis=1) + 1.0)
    encoder = mi.standardized_encoder(module, jnp.zeros(3), x_std)
    fit = mi.fit_encoder(
        jax.random.key(20), encoder, params, mi.joint_sampler(model), num_steps=1500,
        batch_size=256, learning_rate=3e-2,
    )
    x, z = mi.sample_joint(jax.random.key(21), model, 2000)
    learned = mi.diagonal_gaussian_proposal(jax.tree_util.Partial(encoder, fit.params))
    best = _diagonal_proposal(model)
    ba_learned, ba_best = _compiled(
        lambda: (
            mi.barber_agakov_lower(x, z, learned.log_prob, mi.log_prior),
            mi.barber_agakov_lower(x, z, best.log_prob, mi.log_prior),
        )
    )
    gap = float(jnp.mean(ba_best - ba_learned))
    assert -0.05 < gap < 0.1, gap
    _assert_below(ba_best, _per_sample_truth(model, x, z))


@pytest.mark.slow
def test_mine_ais_training_improves_the_energy_bound():
    model = mi.correlated_gaussian_model(0.95, 2)
    critic_module = mi.DecoderCritic(2)
    critic = mi.standardized_critic(critic_module, jnp.zeros(2), jnp.ones(2))
    params = critic_module.init(jax.random.key(22), jnp.zeros(2), jnp.zeros(2))
    fit, step_size = mi.fit_mine_ais_critic(
        jax.random.key(23), critic, params, mi.log_prior, mi.joint_sampler(model),
        num_steps=200, batch_size=64, learning_rate=3e-2, num_hmc_steps=3,
        num_integration_steps=5,
    )
    assert step_size > 0
    x, z = mi.sample_joint(jax.random.key(24), model, 64)
    betas = geometric_schedule(100, start=1e-3)
    before = _run_ais(model, x, z, betas, 0.2, 4, log_likelihood_fn=jax.tree_util.Partial(
        critic, params))
    after = _run_ais(model, x, z, betas, 0.2, 4, log_likelihood_fn=jax.tree_util.Partial(
        critic, fit.params))
    truth = _per_sample_truth(model, x, z)
    _assert_below(after.lower, truth)
    assert float(jnp.mean(after.lower)) > float(jnp.mean(before.lower)) + 0.5
    assert float(jnp.mean(after.lower)) > float(jnp.mean(truth)) - 0.5


@pytest.mark.slow
def test_vae_trains_and_exposes_its_joint():
    module = mi.GaussianVAE(x_dim=6, latent_dim=2, hidden=(8,))
    data = jax.random.normal(jax.random.key(25), (64, 6))
    params, history = mi.train_vae(jax.random.key(26), module, data, num_steps=10, batch_size=16)
    assert np.isfinite(history[-1])
    x, z = mi.vae_sample_joint(module, params)(jax.random.key(27), 5)
    assert x.shape == (5, 6) and z.shape == (5, 2)
    ll = jax.vmap(mi.vae_log_likelihood(module, params))(x, z)
    q = jax.vmap(mi.vae_proposal(module, params).log_prob)(x, z)
    assert ll.shape == (5,) and bool(jnp.all(jnp.isfinite(ll))) and bool(jnp.all(jnp.isfinite(q)))


# --------------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors(isotropic):
    model, x, z = isotropic
    proposal = _exact_posterior_proposal(model)
    ll = mi.likelihood_fn(model)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="same number of joint samples"):
        mi.iwae_lower(key, x[:5], z[:4], ll, mi.log_prior, proposal, 3)
    with pytest.raises(ValueError, match=r"\[N, x_dim\]"):
        mi.barber_agakov_lower(x[0], z[0], proposal.log_prob, mi.log_prior)
    with pytest.raises(ValueError, match="K\\) must be >= 1"):
        mi.iwae_upper(key, x, z, ll, mi.log_prior, proposal, 0)
    with pytest.raises(TypeError, match="Python int"):
        mi.giwae_lower(key, x, z, ll, mi.log_prior, proposal, 2.0)
    with pytest.raises(ValueError, match="num_chains"):
        mi.multi_sample_ais_bounds(key, x, z, ll, mi.log_prior, linear_schedule(2), 0.1, 0)
    nan_ll = lambda xi, zi: jnp.nan * mi.log_likelihood(model, xi, zi)
    with pytest.raises(ValueError, match="non-finite"):
        mi.iwae_upper(key, x[:4], z[:4], nan_ll, mi.log_prior, proposal, 2)
    with pytest.raises(ValueError, match="non-finite"):
        mi.mine_dv_lower(jnp.full((3, 3), jnp.nan))
    with pytest.raises(ValueError, match="square"):
        mi.infonce_from_scores(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="target_mi"):
        mi.scale_to_mi(jnp.eye(2), -1.0)
    with pytest.raises(ValueError, match="step_sizes"):
        mi.multi_sample_ais_bounds(key, x, z, ll, mi.log_prior, linear_schedule(4), jnp.ones(3), 2)
