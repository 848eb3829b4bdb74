"""KV-cache stepping of the TransformerLM: cached logits equal recomputed ones, also after the
particles (and their caches) are reordered by SMC resampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.models import TransformerLM
from tda_jax.twisted.kv_cache import CachedTransformer, RecomputedTransformer
from tda_jax.twisted.models import teacher_force
from tda_jax.twisted.potentials import soft
from tda_jax.twisted.smc import TwistedProblem, twisted_smc
from tda_jax.twisted.twists import HeadTwist, UniformTwist


@pytest.fixture(scope="module")
def lm():
    model = TransformerLM(vocab_size=11, max_len=9, d_model=16, num_heads=2, num_layers=2,
                          d_mlp=32)
    params = model.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))["params"]
    return model, params


def test_cached_logits_equal_full_forward(lm):
    model, params = lm
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 11).at[:, 0].set(7)
    full = jax.nn.log_softmax(model.apply({"params": params}, tokens), axis=-1)
    for step_model in (CachedTransformer(model), RecomputedTransformer(model)):
        lp, feat = teacher_force(step_model, params, tokens[0, :1], tokens[:, 1:])
        # lp[:, t] is the distribution after tokens[:, :t + 1]
        np.testing.assert_allclose(lp, full[:, :-1], atol=2e-5)
        assert feat.shape == (3, 8, 16)
    _, f_cache = teacher_force(CachedTransformer(model), params, tokens[0, :1], tokens[:, 1:])
    _, f_full = teacher_force(RecomputedTransformer(model), params, tokens[0, :1], tokens[:, 1:])
    np.testing.assert_allclose(f_cache, f_full, atol=2e-5)


def test_cache_follows_resampled_particles(lm):
    model, params = lm
    prompt = jnp.array([3, 4], jnp.int32)
    pot = soft(lambda s, c: 2.0 * (s[:, -1] == 5).astype(jnp.float32), "ends in 5")
    horizon = 6
    twist = HeadTwist(11, 16, horizon, hidden=8)
    tp = twist.init(jax.random.key(2))
    tp["out"]["w"] = jax.random.normal(jax.random.key(3), tp["out"]["w"].shape)
    problem = TwistedProblem(CachedTransformer(model), twist, pot, horizon, params, tp, prompt,
                             max_len=model.max_len)
    result = twisted_smc(jax.random.key(4), problem, 8)
    assert bool(np.any(np.asarray(result.infos.ancestors) != np.arange(8)))  # it reordered
    parts = result.state.particles
    full_tokens = jnp.concatenate([jnp.broadcast_to(prompt, (8, 2)), parts.tokens], axis=1)
    full = jax.nn.log_softmax(model.apply({"params": params}, full_tokens), axis=-1)
    np.testing.assert_allclose(parts.log_p_next, full[:, -1], atol=2e-5)
    # same key, recomputed prefix: identical particles and estimate
    slow = TwistedProblem(RecomputedTransformer(model), twist, pot, horizon, params, tp, prompt,
                          max_len=model.max_len)
    other = twisted_smc(jax.random.key(4), slow, 8)
    np.testing.assert_array_equal(np.asarray(other.state.particles.tokens), np.asarray(
        parts.tokens))
    np.testing.assert_allclose(other.log_normalizer, result.log_normalizer, atol=1e-4)


def test_context_errors(lm):
    model, params = lm
    with pytest.raises(ValueError, match="max_len=9"):
        TwistedProblem(CachedTransformer(model), UniformTwist(11), soft(lambda s, c: s[:, 0] * 0.0),
                       8, params, {}, jnp.array([1, 2], jnp.int32), max_len=model.max_len)
    with pytest.raises(ValueError, match="at least one token"):
        CachedTransformer(model).init_carry(params, jnp.zeros((0,), jnp.int32), 2)
