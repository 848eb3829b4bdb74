"""Precision controls: ``compute_dtype`` (bfloat16 capture) with float32 statistics and float64 eigh.

Checked: the argument is validated (naming it) before any pass; bfloat16 capture really runs
(statistics and scores differ from float32 ones) yet the statistics come back in float32 and within
a bfloat16-sized error of the float32 statistics; pairwise and self scores from a bfloat16 fit and
bfloat16 scoring agree with the float32 ones per query (Pearson thresholds measured on these
problems, with a margin; see benchmarks/results/precision.md for larger models); a model that fixes
its own computation dtype is named in a warning.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.attribution import fit_curvature, pairwise_scores, self_scores
from tda_jax.capture import layer_statistics
from tda_jax.capture.statistics import check_compute_dtype
from tda_jax.curvature import build_fit_steps, discover_layers
from tda_jax.curvature.fit import run_pass
from tda_jax.data import Dataset
from tda_jax.losses import (
    causal_lm_loss,
    classification_margin,
    completion_log_prob,
    softmax_cross_entropy,
)
from tda_jax.models import MLP, TransformerLM, apply_fn_of
from tda_jax.sharding import make_data_mesh


def pearson_per_row(a, b):
    a = np.asarray(a, np.float64) - np.mean(a, axis=1, keepdims=True)
    b = np.asarray(b, np.float64) - np.mean(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1) / np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))


def _mlp(num_train=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_train + 8, 10)).astype(np.float32)
    y = np.argmax(x[:, :4] + 0.3 * rng.normal(size=(len(x), 4)), axis=1).astype(np.int32)
    model = MLP(hidden_sizes=(32, 32), num_outputs=4)
    params = model.init(jax.random.key(0), x[:1])["params"]
    return (apply_fn_of(model), params, Dataset(x[:num_train], y[:num_train], 4),
            Dataset(x[num_train:], y[num_train:], 4))


def test_compute_dtype_and_eigh_dtype_are_validated():
    assert check_compute_dtype(None) is None
    assert check_compute_dtype(jnp.bfloat16) == "bfloat16"
    assert check_compute_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="compute_dtype.*float64"):
        check_compute_dtype(np.float64)
    with pytest.raises(ValueError, match="compute_dtype.*int8"):
        check_compute_dtype("int8")
    with pytest.raises(TypeError, match="compute_dtype.*'bf16'"):
        check_compute_dtype("bf16")
    apply_fn, params, train, queries = _mlp(16)
    loss = softmax_cross_entropy()
    with pytest.raises(TypeError, match="compute_dtype"):
        fit_curvature(apply_fn, params, train, loss=loss, compute_dtype="half-ish")
    with pytest.raises(ValueError, match="eigh_dtype"):
        fit_curvature(apply_fn, params, train, loss=loss, eigh_dtype="float16")
    curvature = fit_curvature(apply_fn, params, train, strategy="identity", loss=loss)
    with pytest.raises(ValueError, match="compute_dtype"):
        pairwise_scores(apply_fn, params, curvature, queries, train, loss=loss,
                        measurement=classification_margin, compute_dtype=jnp.int32)
    with pytest.raises(ValueError, match="compute_dtype"):
        self_scores(apply_fn, params, curvature, train, loss=loss, compute_dtype="float64")


def test_bf16_statistics_are_accumulated_in_float32():
    apply_fn, params, train, _ = _mlp(1024, seed=2)
    loss = softmax_cross_entropy()
    specs = discover_layers(apply_fn, params, train)
    mesh = make_data_mesh(1)
    extra = {"inputs": {s.name: None for s in specs}}
    totals = {}
    for dtype in (None, jnp.bfloat16):
        steps = build_fit_steps(apply_fn, "kfac", loss, specs, mesh=mesh, compute_dtype=dtype)
        totals[dtype] = run_pass(steps["covariance"], params, extra, train, 32, mesh, "covariance")
    for s in specs:
        for name in ("A", "G"):
            exact, low = totals[None][s.name][name], totals[jnp.bfloat16][s.name][name]
            assert low.dtype == np.float32, (s.name, name, low.dtype)
            error = np.linalg.norm(low - exact) / np.linalg.norm(exact)
            # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per value);
            # measured 2e-4 .. 4.4e-3 here. Nonzero: the passes really ran in bfloat16.
            assert 1e-5 < error < 1.5e-2, (s.name, name, error)


def _lm():
    rng = np.random.default_rng(1)
    vocab, length = 11, 8
    tokens = rng.integers(0, vocab, size=(36, length + 1)).astype(np.int32)
    # dtype=None: the model computes in its parameters' dtype (bfloat16 under compute_dtype).
    model = TransformerLM(vocab_size=vocab, max_len=length, d_model=8, num_heads=2, num_layers=1,
                          d_mlp=16, dtype=None)
    params = model.init(jax.random.key(0), tokens[:1, :-1])["params"]
    return (model, apply_fn_of(model), params,
            Dataset(tokens[:32, :-1], tokens[:32, 1:], vocab),
            Dataset(tokens[32:, :-1], tokens[32:, 1:], vocab))


def _scores(apply_fn, params, train, queries, loss, measurement, strategy, dtype, with_self):
    curvature = fit_curvature(apply_fn, params, train, strategy=strategy, loss=loss, batch_size=32,
                              compute_dtype=dtype)
    assert curvature.settings.get("compute_dtype") == (None if dtype is None else "bfloat16")
    scores = pairwise_scores(apply_fn, params, curvature, queries, train, loss=loss,
                             measurement=measurement, train_batch_size=32, compute_dtype=dtype)
    own = None
    if with_self:
        own = self_scores(apply_fn, params, curvature, train, loss=loss, batch_size=32,
                          compute_dtype=dtype)
    return scores, own


# Flax's LayerNorm mixes its bfloat16 input with float32 statistics, which the suite's strict
# promotion refuses (the library itself does not depend on the promotion mode).
@pytest.mark.parametrize("problem", ["mlp", pytest.param("transformer",
                                                         marks=pytest.mark.standard_promotion)])
def test_bf16_scores_agree_with_fp32(problem):
    if problem == "mlp":
        apply_fn, params, train, queries = _mlp()
        loss, measurement, strategy, threshold = (softmax_cross_entropy(), classification_margin,
                                                  "ekfac", 0.99)  # measured min 0.9967
    else:
        _, apply_fn, params, train, queries = _lm()
        loss, measurement, strategy, threshold = (causal_lm_loss(), completion_log_prob, "kfac",
                                                  0.999)  # measured min 0.9999
    scores, own = {}, {}
    for dtype in (None, jnp.bfloat16):
        scores[dtype], own[dtype] = _scores(apply_fn, params, train, queries, loss, measurement,
                                            strategy, dtype, problem == "mlp")
    exact, low = scores[None], scores[jnp.bfloat16]
    assert low.dtype == np.float32
    relative = np.max(np.abs(low - exact)) / np.max(np.abs(exact))
    assert relative > 1e-4  # bfloat16 was really used
    correlation = pearson_per_row(exact, low)
    assert np.all(correlation > threshold), correlation
    if problem == "mlp":
        assert pearson_per_row(own[None][None], own[jnp.bfloat16][None])[0] > 0.999


@pytest.mark.standard_promotion
def test_a_model_with_a_fixed_dtype_is_named_in_a_warning():
    model, apply_fn, params, train, _ = _lm()
    fixed = TransformerLM(vocab_size=11, max_len=8, d_model=8, num_heads=2, num_layers=1,
                          d_mlp=16, dtype=jnp.float32)
    tokens = jnp.asarray(train.inputs[:2])

    def capture(fn):  # traced only (the warning is raised while tracing)
        return jax.eval_shape(lambda p, x: layer_statistics(fn, p, x, lambda out: out[None], None,
                                                            jnp.bfloat16).a, params, tokens)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the dtype=None model: no warning
        capture(apply_fn)
    with pytest.warns(UserWarning, match=r"compute_dtype=bfloat16: the inputs of layers.*attn"):
        capture(apply_fn_of(fixed))
