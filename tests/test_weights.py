"""Log-weight utilities against direct numpy/scipy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from tda_jax.probability import (
    effective_sample_size,
    log_mean_exp,
    log_sum_exp,
    normalize_log_weights,
)


def test_normalize_matches_softmax_and_keeps_zero_weights():
    lw = np.array([0.3, -np.inf, 2.0, -1.5, -np.inf], np.float32)
    normalized, total = normalize_log_weights(lw)
    np.testing.assert_allclose(total, logsumexp(lw), rtol=1e-6)
    finite = np.isfinite(lw)
    np.testing.assert_allclose(
        np.asarray(normalized)[finite], lw[finite] - logsumexp(lw), rtol=1e-6
    )
    assert np.all(np.isneginf(np.asarray(normalized)[~finite]))
    np.testing.assert_allclose(np.exp(np.asarray(normalized)).sum(), 1.0, rtol=1e-6)


def test_normalize_is_shift_invariant_for_huge_log_weights():
    lw = jnp.array([1e4, 1e4 + np.log(3.0)], jnp.float32)
    normalized, total = normalize_log_weights(lw)
    # float32 spacing at 1e4 is ~1e-3, which bounds the accuracy; no overflow is the point.
    np.testing.assert_allclose(np.exp(normalized), [0.25, 0.75], rtol=2e-3)
    np.testing.assert_allclose(total, 1e4 + np.log(4.0), rtol=1e-6)


def test_all_neg_inf_raises_eagerly_and_flags_under_jit():
    lw = jnp.full((4,), -jnp.inf)
    with pytest.raises(ValueError, match="zero"):
        normalize_log_weights(lw)
    normalized, total = jax.jit(normalize_log_weights)(lw)
    np.testing.assert_allclose(normalized, np.full(4, -np.log(4.0)), rtol=1e-6)
    assert np.isneginf(total)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        normalize_log_weights(jnp.array([0.0, jnp.nan]))
    with pytest.raises(ValueError, match=r"\+inf"):
        normalize_log_weights(jnp.array([0.0, jnp.inf]))
    with pytest.raises(ValueError, match="shape"):
        normalize_log_weights(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        effective_sample_size(jnp.zeros((0,)))
    with pytest.raises(TypeError, match="dtype"):
        normalize_log_weights(jnp.array([1, 2]))


def test_effective_sample_size_oracle():
    rng = np.random.default_rng(0)
    lw = rng.normal(size=50).astype(np.float32) * 2.0
    w = np.exp(lw - lw.max())
    expected = w.sum() ** 2 / (w**2).sum()
    np.testing.assert_allclose(effective_sample_size(lw), expected, rtol=1e-5)
    np.testing.assert_allclose(effective_sample_size(lw + 300.0), expected, rtol=1e-5)
    np.testing.assert_allclose(effective_sample_size(jnp.zeros(7)), 7.0, rtol=1e-6)
    one_alive = jnp.array([-jnp.inf, 5.0, -jnp.inf])
    np.testing.assert_allclose(effective_sample_size(one_alive), 1.0, rtol=1e-6)
    assert float(effective_sample_size(jnp.full((3,), -jnp.inf))) == 0.0


def test_log_mean_exp_and_log_sum_exp():
    x = np.array([[0.5, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]], np.float32)
    np.testing.assert_allclose(log_sum_exp(x, axis=1)[0], logsumexp(x[0]), rtol=1e-6)
    assert np.isneginf(log_sum_exp(x, axis=1)[1])
    np.testing.assert_allclose(
        log_mean_exp(x, axis=1)[0], logsumexp(x[0]) - np.log(3.0), rtol=1e-6
    )
    assert np.isneginf(log_mean_exp(x, axis=1)[1])
    np.testing.assert_allclose(log_mean_exp(x), logsumexp(x) - np.log(6.0), rtol=1e-6)
    # Zero-weight entries must not poison gradients.
    g = jax.grad(lambda v: log_mean_exp(v))(jnp.array([0.0, -jnp.inf, 0.0]))
    np.testing.assert_allclose(g, [0.5, 0.0, 0.5], atol=1e-6)
    g_all = jax.grad(lambda v: log_sum_exp(v + 0.0))(jnp.full((2,), -jnp.inf))
    assert np.all(np.isfinite(g_all))


def test_log_mean_exp_infinite_edge_cases_eager_and_jitted():
    """One log_mean_exp for SMC, AIS and the MI bounds: infinities are exact, never NaN."""
    import tda_jax.mi as mi
    from tda_jax.mcmc import log_mean_exp as mcmc_log_mean_exp

    assert mi.log_mean_exp is log_mean_exp and mcmc_log_mean_exp is log_mean_exp
    inf = np.inf
    x = np.array(
        [
            [-inf, -inf, -inf],  # all zero weight -> -inf
            [inf, 0.0, 1.0],  # an infinite weight -> +inf
            [inf, -inf, -inf],  # +inf beats -inf -> +inf
            [inf, inf, inf],
            [-inf, 0.0, -inf],  # only finite entry: log(1/3)
            [1000.0, 1000.0, -inf],  # no overflow: 1000 + log(2/3)
            [-1000.0, -1000.0, -1000.0],  # no underflow
            [np.nan, 0.0, -inf],  # NaN stays NaN
        ],
        np.float32,
    )
    expected = [-inf, inf, inf, inf, np.log(1 / 3), 1000.0 + np.log(2 / 3), -1000.0, np.nan]
    for fn in (log_mean_exp, jax.jit(log_mean_exp, static_argnames="axis")):
        for axis, values in ((1, x), (-1, x), (0, x.T)):
            out = np.asarray(fn(jnp.asarray(values), axis=axis), np.float64)
            np.testing.assert_allclose(out, expected, rtol=1e-6)
            assert np.array_equal(np.isnan(out), np.isnan(expected)), out
    # Batched (vmapped) use, as in the MI bounds: the -inf row does not poison the others.
    out = jax.vmap(log_mean_exp)(jnp.asarray(x[:7]))
    np.testing.assert_allclose(np.asarray(out, np.float64), expected[:7], rtol=1e-6)
    # Gradients stay finite for all -inf inputs and put zero weight on -inf entries.
    g = jax.grad(lambda v: log_mean_exp(v, axis=0))(jnp.full((3,), -jnp.inf))
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    g = jax.grad(lambda v: log_mean_exp(v, axis=0))(jnp.array([1000.0, 1000.0, -jnp.inf]))
    np.testing.assert_allclose(g, [0.5, 0.5, 0.0], atol=1e-6)
