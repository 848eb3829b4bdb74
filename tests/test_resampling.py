"""Resampling schemes: unbiased offspring counts (CI over many keys) and their known ranges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.probability import (
    adaptive_resample,
    multinomial,
    residual,
    stratified,
    systematic,
)

SCHEMES = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}
WEIGHTS = np.array([0.05, 0.0, 0.31, 0.12, 0.02, 0.28, 0.22], np.float32)
NUM_KEYS = 4000


def _offspring_counts(weights, num_samples):
    """Per scheme: offspring counts [NUM_KEYS, N] and ancestors over NUM_KEYS keys (one compile)."""
    keys = jax.random.split(jax.random.key(123), NUM_KEYS)
    n = weights.shape[0]

    def counts(key):
        out = {}
        for name, scheme in SCHEMES.items():
            idx = scheme(key, jnp.asarray(weights), num_samples)
            out[name] = (jnp.zeros(n, jnp.int32).at[idx].add(1), idx)
        return out

    results = jax.jit(jax.vmap(counts))(keys)
    return {name: (np.asarray(c), np.asarray(i)) for name, (c, i) in results.items()}


@pytest.fixture(scope="module", params=[7, 13], ids=["M=N", "M=13"])
def counts_by_scheme(request):
    m = request.param
    return m, _offspring_counts(WEIGHTS, m)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_unbiased_offspring_counts(counts_by_scheme, name):
    m, results = counts_by_scheme
    counts, idx = results[name]
    assert idx.dtype == np.int32 and idx.shape == (NUM_KEYS, m)
    assert np.all(counts.sum(axis=1) == m)
    assert np.all(counts[:, 1] == 0), "a zero-weight particle was chosen"
    expected = m * WEIGHTS.astype(np.float64)
    mean = counts.mean(axis=0)
    se = counts.std(axis=0, ddof=1) / np.sqrt(NUM_KEYS)
    # 4.5 standard errors (7 comparisons); the 1e-9 covers counts that are deterministic.
    assert np.all(np.abs(mean - expected) <= 4.5 * se + 1e-9), (mean, expected, se)


def test_offspring_count_ranges(counts_by_scheme):
    m, results = counts_by_scheme
    scaled = m * WEIGHTS.astype(np.float64)
    lo, hi = np.floor(scaled), np.ceil(scaled)
    sys_counts = results["systematic"][0]
    assert np.all((sys_counts >= lo) & (sys_counts <= hi))
    strat = results["stratified"][0]
    assert np.all((strat >= np.maximum(lo - 1, 0)) & (strat <= hi + 1))
    res_counts = results["residual"][0]
    assert np.all(res_counts >= lo)
    assert np.all(res_counts <= lo + (m - lo.sum()))
    # Multinomial counts are Binomial(M, w): check the variance too (independence of draws).
    var = results["multinomial"][0].var(axis=0)
    np.testing.assert_allclose(var, m * WEIGHTS * (1 - WEIGHTS), rtol=0.15, atol=1e-6)


def test_residual_with_integer_counts_is_deterministic():
    w = jnp.array([0.5, 0.25, 0.25])
    for seed in range(3):
        idx = residual(jax.random.key(seed), w, 4)
        np.testing.assert_array_equal(idx, [0, 0, 1, 2])


def test_bad_weights_raise():
    with pytest.raises(ValueError, match="weights"):
        systematic(jax.random.key(0), jnp.ones((2, 2)) / 4, 4)
    with pytest.raises(ValueError, match="num_samples"):
        multinomial(jax.random.key(0), jnp.ones(3) / 3, 0)


def test_adaptive_resample_under_jit():
    n = 8
    flat = jnp.zeros(n)
    peaked = jnp.array([0.0] + [-20.0] * (n - 1))
    batch = jnp.stack([flat, peaked, flat + 3.0])
    keys = jax.random.split(jax.random.key(0), 3)

    fn = jax.jit(jax.vmap(lambda k, lw: adaptive_resample(k, lw, systematic, 0.5)))
    out = fn(keys, batch)
    np.testing.assert_array_equal(out.resampled, [False, True, False])
    np.testing.assert_array_equal(out.ancestors[0], np.arange(n))
    np.testing.assert_array_equal(out.ancestors[1], np.zeros(n))
    np.testing.assert_allclose(out.log_weights, np.full((3, n), -np.log(n)), rtol=1e-6)
    np.testing.assert_allclose(out.ess, [n, 1.0, n], rtol=1e-4)

    # Carried-over weights stay normalized and unchanged up to the normalization.
    lw = jnp.log(jnp.array([0.2, 0.3, 0.1, 0.4]))
    kept = jax.jit(lambda k: adaptive_resample(k, lw + 5.0, systematic, 0.1))(keys[0])
    assert not bool(kept.resampled)
    np.testing.assert_allclose(kept.log_weights, lw, rtol=1e-5)

    always = adaptive_resample(keys[0], lw, systematic, 1.0)
    never = adaptive_resample(keys[0], peaked, systematic, 0.0)
    assert bool(always.resampled) and not bool(never.resampled)
    np.testing.assert_array_equal(never.ancestors, np.arange(n))
