"""SMC and conditional SMC against exact normalizing constants.

Oracles written here, independently of the library: a Kalman filter and forward-filter
backward-sample (FFBS) for a 1-D linear-Gaussian state-space model, the forward algorithm for a
discrete HMM, exact twists for a Gaussian drift (zero-variance weights), and plain importance
sampling for a run that never resamples. Statistical checks use fixed keys and confidence
intervals over vmapped runs (one compile per check).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tda_jax.probability import (
    build_kernel,
    init,
    multinomial,
    pin_reference,
    run_conditional_smc,
    run_smc,
    smc_step,
    systematic,
)
from tda_jax.sharding import make_data_mesh

NUM_RUNS = 200

# ---------------------------------------------------------------------------------------------
# 1-D linear-Gaussian state-space model: x_0 ~ N(M0, P0), x_t = A x_{t-1} + N(0, Q),
# y_t = x_t + N(0, R) for t = 0..T-1.
A, Q, R, M0, P0, T = 0.9, 1.0, 0.5, 0.0, 1.0, 25


def _simulate_lgssm(seed=0):
    rng = np.random.default_rng(seed)
    x = M0 + np.sqrt(P0) * rng.normal()
    ys = []
    for _ in range(T):
        ys.append(x + np.sqrt(R) * rng.normal())
        x = A * x + np.sqrt(Q) * rng.normal()
    return np.array(ys)


Y = _simulate_lgssm()


def _log_normal(y, mean, var):
    return -0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)


def kalman(ys):
    """Returns (log p(y_{0:T-1}), filtered means [T], filtered variances [T]) in float64."""
    m, p, ll = M0, P0, 0.0
    means, variances = [], []
    for y in ys:
        s = p + R
        ll += _log_normal(y, m, s)
        k = p / s
        m, p = m + k * (y - m), (1 - k) * p
        means.append(m)
        variances.append(p)
        m, p = A * m, A * A * p + Q
    return ll, np.array(means), np.array(variances)


def ffbs(ys, num_draws, seed):
    """Exact draws x_{0:T-1} ~ p(x | y) by forward filtering, backward sampling: [draws, T]."""
    rng = np.random.default_rng(seed)
    _, mf, pf = kalman(ys)
    x = np.empty((num_draws, T))
    x[:, -1] = mf[-1] + np.sqrt(pf[-1]) * rng.normal(size=num_draws)
    for t in range(T - 2, -1, -1):
        gain = pf[t] * A / (A * A * pf[t] + Q)
        mean = mf[t] + gain * (x[:, t + 1] - A * mf[t])
        var = pf[t] - gain * A * pf[t]
        x[:, t] = mean + np.sqrt(var) * rng.normal(size=num_draws)
    return x


LOG_Z = kalman(Y)[0]
YJ = jnp.asarray(Y, jnp.float32)


def lgssm_proposal(key, x, t):
    return A * x + np.sqrt(Q) * jax.random.normal(key, x.shape)


def lgssm_potential(x_prev, x, t):
    return -0.5 * (jnp.log(2 * jnp.pi * R) + (YJ[t] - x) ** 2 / R)


def lgssm_init(key, num_particles):
    x0 = M0 + np.sqrt(P0) * jax.random.normal(key, (num_particles,))
    return x0


def _bootstrap_log_z(num_particles, ess_threshold=1.0, resampling_fn=systematic):
    def one(key):
        k0, k1 = jax.random.split(key)
        x0 = lgssm_init(k0, num_particles)
        state = init(x0, lgssm_potential(None, x0, 0))
        out = run_smc(
            k1, state, lgssm_proposal, lgssm_potential, T - 1, resampling_fn, ess_threshold
        )
        return out.log_normalizer, out.infos.resampled

    keys = jax.random.split(jax.random.key(7), NUM_RUNS)
    log_z, resampled = jax.jit(jax.vmap(one))(keys)
    return np.asarray(log_z, np.float64), np.asarray(resampled)


def _mean_se(v):
    return v.mean(), v.std(ddof=1) / np.sqrt(v.size)


def _assert_unbiased(log_z_hat, log_z, num_se=4.0):
    """E[Zhat / Z] == 1 within num_se standard errors (a factor-2 bug fails at these sizes)."""
    ratio = np.exp(log_z_hat - log_z)
    mean, se = _mean_se(ratio)
    assert se < 0.15, f"test too weak: se={se}"
    assert abs(mean - 1.0) < num_se * se, (mean, se)


@pytest.mark.slow
def test_bootstrap_lgssm_log_z_is_unbiased_and_a_lower_bound():
    log_z_hat, _ = _bootstrap_log_z(64)
    _assert_unbiased(log_z_hat, LOG_Z)
    mean, se = _mean_se(log_z_hat)
    assert mean + 3 * se < LOG_Z, (mean, se, LOG_Z)
    # And not absurdly far (the bias is about -Var/2).
    assert mean > LOG_Z - 2.0


@pytest.mark.slow
def test_adaptive_resampling_keeps_log_z_unbiased():
    log_z_hat, resampled = _bootstrap_log_z(64, ess_threshold=0.5)
    frac = resampled.mean()
    assert 0.05 < frac < 0.95, f"both branches must be exercised, resampled fraction {frac}"
    _assert_unbiased(log_z_hat, LOG_Z)
    mean, se = _mean_se(log_z_hat)
    assert mean + 3 * se < LOG_Z


@pytest.mark.slow
def test_conditional_smc_upper_bounds_log_z():
    refs = jnp.asarray(ffbs(Y, NUM_RUNS, seed=3), jnp.float32)
    num_particles = 64

    def one(key, ref):
        k0, k1 = jax.random.split(key)
        x0 = pin_reference(lgssm_init(k0, num_particles), ref)
        state = init(x0, lgssm_potential(None, x0, 0))
        out = run_conditional_smc(k1, state, ref, lgssm_proposal, lgssm_potential, T - 1)
        return out.log_normalizer, out.infos.ancestors[:, 0], out.state.particles[0]

    keys = jax.random.split(jax.random.key(11), NUM_RUNS)
    log_z_hat, ref_ancestors, last = jax.jit(jax.vmap(one))(keys, refs)
    assert np.all(np.asarray(ref_ancestors) == 0)
    np.testing.assert_array_equal(last, refs[:, -1])
    log_z_hat = np.asarray(log_z_hat, np.float64)
    mean, se = _mean_se(log_z_hat)
    assert mean - 3 * se > LOG_Z, (mean, se, LOG_Z)
    # Size-biased law: E_csmc[Z / Zhat] = 1.
    _assert_unbiased(-log_z_hat, -LOG_Z)


def test_conditional_resampling_law_is_independent_draws_with_pinned_reference():
    """Exact oracle for the conditional multinomial step of CSMC (what its invariance rests on).

    Given weights ``w``, particle 0 keeps ancestor 0 (the reference) and every other slot
    ``j >= 1`` draws its ancestor independently from ``Categorical(w)``, the reference included.
    Checked slot by slot over many runs with binomial confidence intervals; a scheme that sorts the
    ancestors and then overwrites slot 0 (dropping the smallest draw instead of a uniformly chosen
    one) puts order statistics in the slots and fails by many standard errors.
    """
    weights = np.array([0.1, 0.3, 0.05, 0.4, 0.15])
    n, num_runs = weights.size, 20_000
    x0 = jnp.arange(n, dtype=jnp.float32)
    ref = jnp.array([0.0, 10.0], jnp.float32)  # reference[0] is particle 0 at time 0

    def keep(key, x, t):  # identity move, so particles reveal their ancestors
        return x

    def flat(x_prev, x, t):
        return jnp.zeros_like(x)

    def one(key):
        state = init(pin_reference(x0, ref), jnp.log(jnp.asarray(weights, jnp.float32)))
        out = run_conditional_smc(key, state, ref, keep, flat, 1)
        return out.infos.ancestors[0], out.state.particles

    keys = jax.random.split(jax.random.key(12), num_runs)
    ancestors, particles = (np.asarray(a) for a in jax.jit(jax.vmap(one))(keys))
    assert np.all(ancestors[:, 0] == 0) and np.all(particles[:, 0] == 10.0)
    np.testing.assert_array_equal(particles[:, 1:], np.asarray(x0)[ancestors[:, 1:]])
    for j in range(1, n):
        freq = np.bincount(ancestors[:, j], minlength=n) / num_runs
        z = (freq - weights) / np.sqrt(weights * (1 - weights) / num_runs)
        assert np.all(np.abs(z) < 4.5), (j, freq, z)
    # Independence between slots: the reference's offspring count among the free slots is
    # Binomial(n - 1, w_0) (a sorted or otherwise correlated scheme changes this law).
    count = (ancestors[:, 1:] == 0).sum(axis=1)
    pmf = np.array([math.comb(n - 1, k) * weights[0] ** k * (1 - weights[0]) ** (n - 1 - k)
                    for k in range(n)])
    freq = np.bincount(count, minlength=n) / num_runs
    z = (freq - pmf) / np.sqrt(pmf * (1 - pmf) / num_runs)
    assert np.all(np.abs(z[pmf > 1e-3]) < 4.5), (freq, pmf, z)


# ---------------------------------------------------------------------------------------------
# Gaussian drift with exact twists: x_0 = 0, x_t = x_{t-1} + N(0, S2 I), t = 1..D, one
# observation y ~ N(x_D, R2 I) in 2-D. Twist psi_t(x) = N(y; x, ((D - t) S2 + R2) I); proposing
# from p(x_t | x_{t-1}, y) makes every incremental weight exactly 1 and log G_0 = log Z.
S2, R2, D = 0.7, 0.3, 6
Y_DRIFT = jnp.array([1.5, -2.0])


def _log_psi(x, t):
    # t is the int32 time index; cast it (strict dtype promotion in tests).
    var = (D - jnp.asarray(t, jnp.float32)) * S2 + R2
    return jnp.sum(-0.5 * (jnp.log(2 * jnp.pi * var) + (Y_DRIFT - x) ** 2 / var), axis=-1)


def _optimal_moments(x_prev, t):
    v = (D - jnp.asarray(t, jnp.float32)) * S2 + R2
    var = 1.0 / (1.0 / S2 + 1.0 / v)
    return var * (x_prev / S2 + Y_DRIFT / v), var


def drift_proposal(key, particles, t):
    mean, var = _optimal_moments(particles["position"], t)
    return {"position": mean + jnp.sqrt(var) * jax.random.normal(key, mean.shape)}


def drift_potential(prev, particles, t):
    xp, x = prev["position"], particles["position"]
    mean, var = _optimal_moments(xp, t)
    log_f = jnp.sum(-0.5 * (jnp.log(2 * jnp.pi * S2) + (x - xp) ** 2 / S2), axis=-1)
    log_q = jnp.sum(-0.5 * (jnp.log(2 * jnp.pi * var) + (x - mean) ** 2 / var), axis=-1)
    return log_f + _log_psi(x, t) - _log_psi(xp, t - 1) - log_q


def test_optimal_proposal_gives_zero_variance_weights_and_exact_log_z():
    num_particles = 32
    var = D * S2 + R2
    log_z = float(np.sum(-0.5 * (np.log(2 * np.pi * var) + np.asarray(Y_DRIFT) ** 2 / var)))
    x0 = {"position": jnp.zeros((num_particles, 2))}
    state = init(x0, _log_psi(x0["position"], 0))
    # Multinomial resampling shuffles ancestors, so misaligned previous particles would show.
    out = jax.jit(lambda k, s: run_smc(k, s, drift_proposal, drift_potential, D, multinomial))(
        jax.random.key(0), state
    )
    np.testing.assert_allclose(out.log_normalizer, log_z, atol=1e-4)
    np.testing.assert_allclose(out.infos.log_normalizer_increment, 0.0, atol=1e-4)
    np.testing.assert_allclose(out.infos.ess, num_particles, rtol=1e-4)
    np.testing.assert_allclose(out.state.log_weights, -np.log(num_particles), atol=1e-4)
    assert int(out.state.step) == D


# ---------------------------------------------------------------------------------------------
# Discrete HMM: K hidden states, V symbols, forward algorithm oracle.
K, V, T_HMM = 3, 4, 15
_rng = np.random.default_rng(5)
INIT_P = _rng.dirichlet(np.ones(K))
TRANS = _rng.dirichlet(np.ones(K), size=K)
EMIT = _rng.dirichlet(np.ones(V), size=K)


def _simulate_hmm():
    rng = np.random.default_rng(6)
    z = rng.choice(K, p=INIT_P)
    obs = []
    for _ in range(T_HMM):
        obs.append(rng.choice(V, p=EMIT[z]))
        z = rng.choice(K, p=TRANS[z])
    return np.array(obs)


OBS = _simulate_hmm()


def forward_log_likelihood(obs):
    alpha = INIT_P * EMIT[:, obs[0]]
    log_z = np.log(alpha.sum())
    alpha /= alpha.sum()
    for o in obs[1:]:
        alpha = (alpha @ TRANS) * EMIT[:, o]
        log_z += np.log(alpha.sum())
        alpha /= alpha.sum()
    return log_z


@pytest.mark.slow
def test_hmm_bootstrap_matches_forward_algorithm():
    log_trans = jnp.log(jnp.asarray(TRANS, jnp.float32))
    log_emit = jnp.log(jnp.asarray(EMIT, jnp.float32))
    obs = jnp.asarray(OBS)
    num_particles = 32

    def proposal(key, z, t):
        return jax.random.categorical(key, log_trans[z]).astype(jnp.int32)

    def potential(z_prev, z, t):
        return log_emit[z, obs[t]]

    def one(key):
        k0, k1 = jax.random.split(key)
        z0 = jax.random.categorical(k0, jnp.log(jnp.asarray(INIT_P)), shape=(num_particles,))
        state = init(z0.astype(jnp.int32), potential(None, z0, 0))
        return run_smc(k1, state, proposal, potential, T_HMM - 1).log_normalizer

    keys = jax.random.split(jax.random.key(3), NUM_RUNS)
    log_z_hat = np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)
    log_z = forward_log_likelihood(OBS)
    _assert_unbiased(log_z_hat, log_z)
    mean, se = _mean_se(log_z_hat)
    assert abs(mean - log_z) < 0.5, (mean, log_z)


# ---------------------------------------------------------------------------------------------
def test_never_resampling_is_importance_sampling():
    """ess_threshold=0 carries weights over: log Zhat = log mean_i exp(sum_t log G_t(x_i))."""
    x0 = jnp.linspace(-1.0, 1.0, 8)

    def proposal(key, x, t):
        return x + 0.1 * t.astype(x.dtype)

    def potential(x_prev, x, t):
        return -((x - 0.3) ** 2) * t.astype(x.dtype)

    state = init(x0, -(x0**2))
    out = run_smc(jax.random.key(0), state, proposal, potential, 4, ess_threshold=0.0)
    total = -(np.asarray(x0, np.float64) ** 2)
    x = np.asarray(x0, np.float64)
    for t in range(1, 5):
        x = x + 0.1 * t
        total += -((x - 0.3) ** 2) * t
    expected = np.log(np.mean(np.exp(total)))
    np.testing.assert_allclose(out.log_normalizer, expected, rtol=1e-5)
    assert not np.asarray(out.infos.resampled).any()
    np.testing.assert_array_equal(out.infos.ancestors, np.tile(np.arange(8), (4, 1)))
    # The kernel API gives the same step as smc_step.
    kernel = build_kernel(proposal, potential, systematic, 0.0)
    s1, i1 = kernel(jax.random.key(1), state)
    s2, i2 = smc_step(jax.random.key(1), state, proposal, potential, systematic, 0.0)
    np.testing.assert_allclose(s1.log_normalizer, s2.log_normalizer)


def test_sharded_particles_match_single_device():
    num_particles = 64

    def run(mesh, key):
        k0, k1 = jax.random.split(key)
        x0 = lgssm_init(k0, num_particles)
        state = init(x0, lgssm_potential(None, x0, 0))
        return run_smc(
            k1, state, lgssm_proposal, lgssm_potential, T - 1, ess_threshold=0.5, mesh=mesh
        )

    mesh4, mesh1 = make_data_mesh(4), make_data_mesh(1)
    key = jax.random.key(42)
    out4 = jax.jit(lambda k: run(mesh4, k))(key)
    out1 = jax.jit(lambda k: run(mesh1, k))(key)
    assert isinstance(out4.state.particles.sharding, NamedSharding)
    assert out4.state.particles.sharding.spec == PartitionSpec("data")
    assert len(out4.state.particles.sharding.device_set) == 4
    np.testing.assert_array_equal(out4.infos.ancestors, out1.infos.ancestors)
    np.testing.assert_allclose(out4.log_normalizer, out1.log_normalizer, rtol=1e-5)
    np.testing.assert_allclose(out4.state.particles, out1.state.particles, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        smc_step(key, init(jnp.zeros(6)), lgssm_proposal, lgssm_potential, mesh=mesh4)
    with pytest.raises(ValueError, match="divisible"):
        run_smc(key, init(jnp.zeros(6)), lgssm_proposal, lgssm_potential, 2, mesh=mesh4)


# ---------------------------------------------------------------------------------------------
# Bad input.
def _flat_proposal(key, x, t):
    return x + jax.random.normal(key, x.shape)


def test_nan_potential_raises_eagerly_and_flags_under_jit():
    def nan_potential(x_prev, x, t):
        return jnp.where(t == 2, jnp.nan, -(x**2))

    state = init(jnp.zeros(8))
    with pytest.raises(ValueError, match="step 2 is NaN"):
        run_smc(jax.random.key(0), state, _flat_proposal, nan_potential, 3)
    with pytest.raises(ValueError, match="NaN"):
        smc_step(jax.random.key(0), state, _flat_proposal, lambda a, b, t: jnp.full(8, jnp.nan))
    out = jax.jit(lambda k: run_smc(k, state, _flat_proposal, nan_potential, 3))(jax.random.key(0))
    assert np.isnan(out.log_normalizer)


def test_zero_total_weight_raises_eagerly_and_flags_under_jit():
    def dead_at_1(x_prev, x, t):
        return jnp.where(t == 1, -jnp.inf, 0.0) * jnp.ones_like(x)

    state = init(jnp.zeros(8))
    with pytest.raises(ValueError, match="zero weight"):
        run_smc(jax.random.key(0), state, _flat_proposal, dead_at_1, 3)
    out = jax.jit(lambda k: run_smc(k, state, _flat_proposal, dead_at_1, 3))(jax.random.key(0))
    assert np.isneginf(out.log_normalizer)
    assert np.all(np.isfinite(out.state.log_weights)) and np.all(np.isfinite(out.state.particles))
    with pytest.raises(ValueError, match="zero"):
        init(jnp.zeros(4), jnp.full(4, -jnp.inf))


def test_mismatched_shapes_raise():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="leading particle axis"):
        init({"a": jnp.zeros(4), "b": jnp.zeros((5, 2))})
    with pytest.raises(ValueError, match="one initial log-weight"):
        init(jnp.zeros(4), jnp.zeros(5))
    state = init(jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="proposal_fn returned a leaf of shape"):
        smc_step(key, state, lambda k, x, t: x[:, :1], lambda a, b, t: jnp.zeros(4))
    with pytest.raises(ValueError, match="log_potential_fn returned shape"):
        smc_step(key, state, lambda k, x, t: x, lambda a, b, t: jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="structure"):
        smc_step(key, state, lambda k, x, t: (x, x), lambda a, b, t: jnp.zeros(4))
    ref = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="reference"):
        run_conditional_smc(
            key, state, ref, lambda k, x, t: x, lambda a, b, t: jnp.zeros(4), 2
        )
    pinned = init(pin_reference(jnp.zeros((4, 2)), ref))
    with pytest.raises(ValueError, match="reference covers 3 times"):
        run_conditional_smc(
            key, pinned, ref, lambda k, x, t: x, lambda a, b, t: jnp.zeros(4), 3
        )
    with pytest.raises(ValueError, match="reference leaf has shape"):
        run_conditional_smc(
            key, pinned, jnp.ones((3, 3)), lambda k, x, t: x, lambda a, b, t: jnp.zeros(4), 2
        )
