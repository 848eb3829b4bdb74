"""Twist learning on a tiny enumerable LM: every method behind one interface, CTL against the
exact KL(sigma || q), the CTL gradient against its enumeration oracle, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.twisted import enumeration as en
from tda_jax.twisted import tasks
from tda_jax.twisted.learning import (
    METHODS,
    TwistTrainConfig,
    link_for,
    train_twist,
    twist_loss,
    twist_tables,
)
from tda_jax.twisted.models import TinyLM
from tda_jax.twisted.smc import TwistedProblem
from tda_jax.twisted.twists import HeadTwist

V, T = 5, 3
PROMPT = jnp.zeros((0,), jnp.int32)


@pytest.fixture(scope="module")
def setup():
    lm = TinyLM(V, hidden=8, sharpness=2.0)
    params = lm.init(jax.random.key(0))
    rare, rare_exact = tasks.rare_event_task(lm, params, jax.random.key(1), T, rate=0.01)
    soft, soft_exact = tasks.soft_task(lm, params, jax.random.key(2), T)
    return lm, params, {"rare_event": (rare, rare_exact), "soft": (soft, soft_exact)}


def _problem(setup, name, method, key=3):
    lm, params, ts = setup
    twist = HeadTwist(V, 8, T, hidden=32, link=link_for(method))
    return TwistedProblem(lm, twist, ts[name][0].potential, T, params,
                          twist.init(jax.random.key(key)), PROMPT)


def test_ctl_learns_the_rare_event_twist(setup):
    task, exact = setup[2]["rare_event"]
    problem = _problem(setup, "rare_event", "ctl")
    params, losses = train_twist(jax.random.key(4), "ctl", problem, task,
                                 TwistTrainConfig(num_steps=300, positives_per_group=32,
                                                  negatives_per_group=32, learning_rate=1e-2))
    assert np.all(np.isfinite(losses))
    lq = en.sequence_log_probs(problem.lm, problem.lm_params, PROMPT, T, problem.twist, params)
    kl = en.kl_divergence(exact.log_sigma, lq)
    kl_bootstrap = en.kl_divergence(exact.log_sigma, exact.log_p0)
    assert kl_bootstrap > 2.0 and kl < 0.15, (kl, kl_bootstrap)


def test_ctl_loss_gradient_matches_enumeration(setup):
    """With all sequences as weighted samples the CTL loss is the sum over t of
    E_pi_t[log psi_t] - E_sigma[log psi_t], whose gradient is that of sum_t KL(sigma_t || pi_t)."""
    lm, params, ts = setup
    task, exact = ts["soft"]
    problem = _problem(setup, "soft", "ctl")
    tp = problem.twist_params
    tp = dict(tp, out={"w": jax.random.normal(jax.random.key(9), tp["out"]["w"].shape) * 0.3,
                       "b": tp["out"]["b"]})
    seqs = en.all_sequences(V, T)

    def kl_sum(p):  # sum_t KL(sigma(s_1:t) || pi_t(s_1:t)), pi_t ∝ p0(s_1:t) psi_t(s_1:t)
        lp, lpsi = twist_tables(dataclasses.replace(problem, twist_params=p), seqs)
        g = jnp.take_along_axis(lpsi, seqs[..., None], 2)[..., 0]
        total = 0.0
        for t in range(1, T + 1):
            log_pi = (exact.log_p0 + 0.0).reshape(V ** t, -1)
            log_pi = jax.scipy.special.logsumexp(log_pi, axis=1) + g[:: V ** (T - t), t - 1]
            log_pi = log_pi - jax.scipy.special.logsumexp(log_pi)
            log_sig = jax.scipy.special.logsumexp(exact.log_sigma.reshape(V ** t, -1), axis=1)
            total = total + jnp.sum(jnp.exp(log_sig) * (log_sig - log_pi))
        return total

    # exact-weight batch: negatives are all sequences weighted by q (q samples' IS weights
    # reproduce pi_t exactly), positives are all sequences weighted by sigma: emulate with large
    # samples and compare directions.
    key = jax.random.key(10)
    pos = en.sample_target(key, exact, 20000)[None]
    q_lp = en.sequence_log_probs(lm, params, PROMPT, T, problem.twist, tp)
    idx = jax.random.categorical(jax.random.key(11), q_lp, shape=(20000,))
    neg = seqs[idx][None]
    batch = {"positives": pos, "negatives": neg, "cond": None,
             "neg_log_phi": task.potential(neg[0])[None]}
    g_loss = jax.jit(jax.grad(lambda p: twist_loss("ctl", p, problem, batch)))(tp)
    g_kl = jax.jit(jax.grad(kl_sum))(tp)
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g_loss)])
    b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g_kl)])
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos > 0.95, cos
    np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(b), rtol=0.15)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("ctl", "bootstrap")])
def test_every_method_trains_and_helps_on_soft(setup, method):
    task, exact = setup[2]["soft"]
    problem = _problem(setup, "soft", method)
    params, losses = train_twist(jax.random.key(5), method, problem, task,
                                 TwistTrainConfig(num_steps=150, positives_per_group=32,
                                                  negatives_per_group=32, learning_rate=1e-2))
    assert losses.shape == (150,) and np.all(np.isfinite(losses))
    lq = en.sequence_log_probs(problem.lm, problem.lm_params, PROMPT, T, problem.twist, params)
    before = en.kl_divergence(exact.log_sigma, exact.log_p0)
    assert en.kl_divergence(exact.log_sigma, lq) < 0.7 * before


def test_bad_input(setup):
    task, _ = setup[2]["soft"]
    problem = _problem(setup, "soft", "ctl")
    with pytest.raises(ValueError, match="unknown twist-learning method 'ppo'"):
        train_twist(jax.random.key(0), "ppo", problem, task, TwistTrainConfig(num_steps=1))
    with pytest.raises(ValueError, match="link='log_sigmoid'"):
        train_twist(jax.random.key(0), "fudge", problem, task, TwistTrainConfig(num_steps=1))
    with pytest.raises(ValueError, match="negatives_per_group"):
        train_twist(jax.random.key(0), "ctl", problem, task,
                    TwistTrainConfig(num_steps=1, negatives_per_group=0))
    params, losses = train_twist(jax.random.key(0), "bootstrap", problem, task,
                                 TwistTrainConfig(num_steps=10))
    assert losses.size == 0 and params is problem.twist_params
