"""Twisted SMC on a tiny enumerable LM: exact log Z with optimal twists, unbiasedness, bounds,
potentials and bad input (oracle: exhaustive enumeration of all V^T sequences)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.twisted import enumeration as en
from tda_jax.twisted.models import TinyLM, sample_sequences, teacher_force
from tda_jax.twisted.potentials import boolean, product, soft
from tda_jax.twisted.smc import TwistedProblem, log_z_estimates, twisted_csmc, twisted_smc
from tda_jax.twisted.twists import HeadTwist, TableTwist, UniformTwist

V, T = 5, 4
PROMPT = jnp.array([1], jnp.int32)


@pytest.fixture(scope="module")
def setup():
    lm = TinyLM(V, hidden=8, sharpness=2.0)
    params = lm.init(jax.random.key(0))
    rare = boolean(lambda s, c: jnp.sum(s == 3, axis=1) >= 3, "three threes")
    bonus = soft(lambda s, c: 0.7 * jnp.sum(s == 2, axis=1).astype(jnp.float32)
                 - 0.3 * s[:, -1].astype(jnp.float32), "soft")
    targets = {name: en.exact_target(lm, params, pot, PROMPT, T)
               for name, pot in (("rare", rare), ("soft", bonus))}
    return lm, params, {"rare": rare, "soft": bonus}, targets


def _problem(setup, name, twist=None, twist_params=None):
    lm, params, pots, targets = setup
    if twist is None:
        twist, twist_params = TableTwist(V, T), en.optimal_log_twists(targets[name])
    return TwistedProblem(lm, twist, pots[name], T, params, twist_params, PROMPT)


def test_enumeration_matches_teacher_forcing(setup):
    lm, params, pots, targets = setup
    seqs = en.all_sequences(V, T)
    lp, _ = teacher_force(lm, params, PROMPT, seqs)
    direct = jnp.sum(jnp.take_along_axis(lp, seqs[..., None], 2)[..., 0], axis=1)
    np.testing.assert_allclose(targets["soft"].log_p0, direct, atol=1e-5)
    assert abs(float(jax.scipy.special.logsumexp(direct))) < 1e-5
    z = np.sum(np.exp(np.asarray(direct, np.float64)) * (np.sum(np.asarray(seqs) == 3, 1) >= 3))
    np.testing.assert_allclose(np.exp(float(targets["rare"].log_z)), z, rtol=1e-5)
    # exact draws follow sigma: empirical frequency of the most likely sequence
    draws = en.sample_target(jax.random.key(5), targets["soft"], 20000)
    top = int(jnp.argmax(targets["soft"].log_sigma))
    idx = np.asarray(draws) @ (V ** np.arange(T - 1, -1, -1))
    p = float(jnp.exp(targets["soft"].log_sigma[top]))
    assert abs(np.mean(idx == top) - p) < 4 * np.sqrt(p * (1 - p) / 20000)


def test_optimal_twists_are_sums_over_continuations(setup):
    lm, params, pots, targets = setup
    target = targets["rare"]
    table = en.optimal_log_twists(target)
    seqs = np.asarray(en.all_sequences(V, T))
    p0 = np.exp(np.asarray(target.log_p0, np.float64))
    phi = np.exp(np.asarray(target.log_phi, np.float64))
    prefix = seqs[7, :2]  # psi*_2(s_1:2) by brute force over continuations
    match = np.all(seqs[:, :2] == prefix, axis=1)
    brute = np.sum(p0[match] * phi[match]) / np.sum(p0[match])
    got = float(np.exp(table[1, prefix[0], prefix[1]]))
    np.testing.assert_allclose(got, brute, rtol=1e-5)
    lq = en.sequence_log_probs(lm, params, PROMPT, T, TableTwist(V, T), table)
    assert en.kl_divergence(target.log_sigma, lq) < 1e-5
    assert abs(en.kl_divergence(lq, target.log_sigma)) < 1e-5


@pytest.mark.parametrize("name", ["rare", "soft"])
def test_optimal_twists_give_exact_log_z(setup, name):
    target = setup[3][name]
    problem = _problem(setup, name)
    refs = en.sample_target(jax.random.key(1), target, 3)
    for i, (k, ess) in enumerate(((1, 1.0), (3, 0.5), (16, 1.0))):
        if True:
            smc = twisted_smc(jax.random.key(i), problem, k, ess_threshold=ess)
            assert abs(float(smc.log_normalizer - target.log_z)) < 1e-4, (k, ess)
            csmc = twisted_csmc(jax.random.key(i), problem, refs[i], k, ess_threshold=ess)
            assert abs(float(csmc.log_normalizer - target.log_z)) < 1e-4, (k, ess)
            assert np.all(np.asarray(csmc.state.particles.tokens[0]) == np.asarray(refs[i]))


def _random_head(setup):
    twist = HeadTwist(V, 8, T, hidden=16)
    tp = twist.init(jax.random.key(2))
    tp["out"]["w"] = jax.random.normal(jax.random.key(3), tp["out"]["w"].shape) * 0.5
    return twist, tp


def test_zhat_unbiased_and_bounds_with_non_optimal_twist(setup):
    target = setup[3]["soft"]
    twist, tp = _random_head(setup)
    problem = _problem(setup, "soft", twist, tp)
    n = 5000
    ratio = np.exp(np.asarray(log_z_estimates(jax.random.key(7), problem, 4, n),
                              np.float64) - float(target.log_z))
    se = ratio.std() / np.sqrt(n)
    assert abs(ratio.mean() - 1.0) < 3 * se, (ratio.mean(), se)
    assert ratio.std() > 0.05  # the twist really is not optimal
    refs = en.sample_target(jax.random.key(8), target, 2000)
    upper = np.asarray(log_z_estimates(jax.random.key(9), problem, 4, 2000, references=refs))
    # E_csmc[Z / Zhat] = 1 (size-biased law), and the two bounds sandwich log Z
    inv = np.exp(float(target.log_z) - upper.astype(np.float64))
    assert abs(inv.mean() - 1.0) < 3 * inv.std() / np.sqrt(len(inv))
    lower = np.log(ratio) + float(target.log_z)
    assert lower.mean() < float(target.log_z) < upper.mean()


def test_bootstrap_on_rare_event_all_dead(setup):
    lm, params, pots, targets = setup
    problem = TwistedProblem(lm, UniformTwist(V), pots["rare"], T, params, {}, PROMPT)
    est = np.asarray(log_z_estimates(jax.random.key(3), problem, 2, 400))
    dead = np.isneginf(est)
    assert 0.2 < dead.mean() < 1.0  # documented: Zhat = 0 under jit, no NaN
    assert not np.isnan(est).any()
    ratio = np.exp(est - float(targets["rare"].log_z))
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std() / np.sqrt(len(ratio))
    with pytest.raises(ValueError, match="zero weight"):
        twisted_smc(jax.random.key(0), problem, 1)


def test_potentials_interface():
    tokens = jnp.array([[1, 2], [3, 3]], jnp.int32)
    a = boolean(lambda s, c: s[:, 0] == 3, "first is 3")
    b = soft(lambda s, c: jnp.sum(s, axis=1).astype(jnp.float32), "sum")
    both = product(a, b)
    np.testing.assert_array_equal(np.asarray(both(tokens)), [-np.inf, 6.0])
    assert both.kind == "product" and product(a, a).kind == "boolean"
    with pytest.raises(ValueError, match="NaN for sequence 1"):
        soft(lambda s, c: jnp.array([0.0, jnp.nan]), "bad")(tokens)
    with pytest.raises(ValueError, match="returned shape"):
        soft(lambda s, c: jnp.zeros((3,)), "wide")(tokens)
    with pytest.raises(TypeError, match="booleans"):
        boolean(lambda s, c: s[:, 0], "ints")(tokens)
    with pytest.raises(TypeError, match="not a Potential"):
        product(a, 3)


def test_bad_input(setup):
    lm, params, pots, targets = setup
    wide = HeadTwist(V + 1, 8, T)
    with pytest.raises(ValueError, match="vocab_size=5"):
        twisted_smc(jax.random.key(0), TwistedProblem(lm, wide, pots["soft"], T, params,
                                                      wide.init(jax.random.key(0)), PROMPT), 4)
    problem = _problem(setup, "soft")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        twisted_csmc(jax.random.key(0), problem, jnp.zeros((T + 1,), jnp.int32), 4)
    with pytest.raises(ValueError, match="max_len=4"):
        TwistedProblem(lm, UniformTwist(V), pots["soft"], T, params, {}, PROMPT, max_len=4)
    nan_pot = soft(lambda s, c: jnp.where(s[:, 0] >= 0, jnp.nan, 0.0), "nan")
    bad = TwistedProblem(lm, UniformTwist(V), nan_pot, T, params, {}, PROMPT)
    with pytest.raises(ValueError, match="NaN"):
        twisted_smc(jax.random.key(0), bad, 64)
    with pytest.raises(ValueError, match="exceeds"):
        en.all_sequences(13, 6)


def test_sample_sequences_follow_p0(setup):
    lm, params, pots, targets = setup
    draws = np.asarray(sample_sequences(jax.random.key(4), lm, params, PROMPT, 20000, T))
    idx = draws @ (V ** np.arange(T - 1, -1, -1))
    top = int(jnp.argmax(targets["soft"].log_p0))
    p = float(jnp.exp(targets["soft"].log_p0[top]))
    assert abs(np.mean(idx == top) - p) < 4 * np.sqrt(p * (1 - p) / 20000)
