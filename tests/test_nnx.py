"""Flax NNX models are attributed like linen ones, against the same oracles.

Models: an NNX MLP (layers in an ``nnx.List``, so parameter paths hold list indices), an NNX 1-D CNN
(the same architecture as ``tests/oracles.py``'s ``conv`` problem) and a tiny NNX transformer
(``nnx.Embed``, ``nnx.MultiHeadAttention`` with a causal mask, ``nnx.LayerNorm``, an ``nnx.Linear``
MLP and the output tied to the embedding through ``Embed.attend``; ``[B, T, V]`` outputs and
``causal_lm_loss``). Oracles: per-example gradients from a loop of ``jax.grad``; the dense GGN
(``jax.jacobian``/``jax.hessian``, ``tests/oracles.py``) or, for the tied transformer, the dense
empirical Fisher from ``jax.grad``; K-FAC factors from hand-written forwards that expose each layer's
inputs and take perturbations of its outputs (independent of the capture code); dense solves for
scores.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src import monitoring
from oracles import (
    Problem,
    _conv_reference,
    _with_one,
    block_diagonal,
    dense_ggn,
    flatten,
    influence_oracle,
    kronecker_factors,
    layer_offsets,
    matrices,
    model_specs,
    per_example_grads,
    reference_outputs,
    unflatten,
)

from tda_jax.attribution import fit_curvature, pairwise_scores
from tda_jax.capture import (
    check_coverage,
    layer_gradients,
    layer_params,
    layer_statistics,
    loss_cotangents,
    output_shapes,
)
from tda_jax.data import Dataset
from tda_jax.losses import (
    IGNORE,
    causal_lm_loss,
    classification_margin,
    negative_loss,
    softmax_cross_entropy,
)
from tda_jax.models import apply_fn_of, num_outputs_of, params_of

NUM_CLASSES, NUM_TRAIN, NUM_QUERIES = 3, 20, 5
VOCAB, LENGTH, D_MODEL, HEADS = 6, 4, 4, 2
DAMPING = 1e-2
BATCH = 16  # 20 training examples: two batches, the second one padded.
# The tied transformer is fitted in five full batches: a padded row's final hidden state reaches
# K-FAC's G of the tied table (see test_padded_rows_stay_out_of_the_tied_tables_g).
LM_BATCH = 4
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac", "exact")


# ----------------------------------------------------------------------------------------------
# Models and their hand-written reference forwards (one example; see tests/oracles.py)
# ----------------------------------------------------------------------------------------------


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, NUM_CLASSES, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x)))


def _mlp_reference(mats, x, eps):
    a0 = _with_one(x[None])
    a1 = _with_one(jnp.tanh(a0 @ mats["layers/0"] + eps["layers/0"]))
    return (a1 @ mats["layers/1"] + eps["layers/1"])[0], {"layers/0": a0, "layers/1": a1}


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(NUM_CLASSES, name="Dense_1")(jnp.tanh(nn.Dense(5, name="Dense_0")(x)))


class CNN(nnx.Module):
    """``oracles.ConvNet`` in NNX: ``[B, 6, 2]`` -> Conv(3, kernel 3, SAME) -> tanh -> Linear."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, kernel_size=(3,), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(18, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.conv(x))
        return self.head(jnp.reshape(h, (h.shape[0], -1)))


class StridedCNN(nnx.Module):
    """Strides, dilation, VALID/integer padding, no bias, and a 2-D convolution."""

    def __init__(self, rngs):
        self.first = nnx.Conv(2, 3, kernel_size=3, strides=2, padding="SAME", rngs=rngs)
        self.second = nnx.Conv(3, 2, kernel_size=(2,), padding="VALID", kernel_dilation=2,
                               use_bias=False, rngs=rngs)
        self.image = nnx.Conv(1, 2, kernel_size=(2, 2), padding=1, rngs=rngs)
        self.head = nnx.Linear(2 + 4 * 5 * 2, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.second(jnp.tanh(self.first(x))))  # [B, 6, 2] -> [B, 3, 3] -> [B, 1, 2]
        image = jnp.tanh(self.image(jnp.reshape(x, (x.shape[0], 3, 4, 1))))  # -> [B, 4, 5, 2]
        features = [jnp.reshape(v, (v.shape[0], -1)) for v in (h, image)]
        return self.head(jnp.concatenate(features, axis=-1))


class TinyLM(nnx.Module):
    """Embedding -> causal self-attention block -> MLP block -> tied output (``embed.attend``)."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.ln1 = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D_MODEL, decode=False,
                                           rngs=rngs)
        self.ln2 = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.up = nnx.Linear(D_MODEL, 2 * D_MODEL, rngs=rngs)
        self.down = nnx.Linear(2 * D_MODEL, D_MODEL, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(self.ln1(h), mask=nnx.make_causal_mask(tokens))
        h = h + self.down(jnp.tanh(self.up(self.ln2(h))))
        return self.embed.attend(h)


def _layer_norm(x, scale, bias):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * scale + bias


def _lm_reference(params):
    """Reference forward of ``TinyLM``; ``eps["embed"]`` perturbs the lookup, ``eps["attend"]`` the
    tied output (the transposed call of the same table). LayerNorm parameters are fixed."""

    def reference(mats, tokens, eps):
        length, head_dim = tokens.shape[0], D_MODEL // HEADS
        a_embed = jax.nn.one_hot(tokens, VOCAB, dtype=jnp.float32)
        h = a_embed @ mats["embed"] + eps["embed"]
        a_qkv = _with_one(_layer_norm(h, params["ln1"]["scale"], params["ln1"]["bias"]))
        q, k, v = (jnp.reshape(a_qkv @ mats[f"attn/{n}"] + eps[f"attn/{n}"],
                               (length, HEADS, head_dim)) for n in ("query", "key", "value"))
        logits = jnp.einsum("thd,shd->hts", q / math.sqrt(head_dim), k)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
        a_out = _with_one(jnp.reshape(jnp.einsum("hts,shd->thd", weights, v), (length, -1)))
        h = h + a_out @ mats["attn/out"] + eps["attn/out"]
        a_up = _with_one(_layer_norm(h, params["ln2"]["scale"], params["ln2"]["bias"]))
        a_down = _with_one(jnp.tanh(a_up @ mats["up"] + eps["up"]))
        h = h + a_down @ mats["down"] + eps["down"]
        out = h @ mats["embed"].T + eps.get("attend", 0.0)
        inputs = {"embed": a_embed, "attn/query": a_qkv, "attn/key": a_qkv, "attn/value": a_qkv,
                  "attn/out": a_out, "up": a_up, "down": a_down, "attend": h}
        return out, inputs

    return reference


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


def _shift_biases(params):
    # Non-zero biases (and LayerNorm scales off 1) so that no row of the matrix views is degenerate.
    def shift(path, v):
        if getattr(path[-1], "key", None) in ("bias", "scale"):
            return v + 0.1 * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape) / v.size
        return v

    return jax.tree_util.tree_map_with_path(shift, params)


@functools.cache
def _problem(name):
    n = NUM_TRAIN + NUM_QUERIES
    rng = np.random.default_rng(sum(map(ord, name)))
    labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
    num_classes = NUM_CLASSES
    if name == "mlp":
        model, x, positions = MLP(nnx.Rngs(0)), rng.normal(size=(n, 4)), {"layers/0": 1,
                                                                            "layers/1": 1}
        reference, loss = _mlp_reference, softmax_cross_entropy()
    elif name == "cnn":
        model, x, positions = CNN(nnx.Rngs(0)), rng.normal(size=(n, 6, 2)), {"conv": 6, "head": 1}
        reference, loss = _conv_reference, softmax_cross_entropy()
    elif name == "lm":
        model, loss = TinyLM(nnx.Rngs(0)), causal_lm_loss()
        x = rng.integers(0, VOCAB, size=(n, LENGTH + 1))
        labels = x[:, 1:].astype(np.int32)
        labels[rng.random(labels.shape) < 0.2] = IGNORE  # positions without a loss
        x, num_classes = x[:, :-1], VOCAB
        positions = {"embed": LENGTH, "attend": LENGTH, "up": LENGTH, "down": LENGTH,
                     **{f"attn/{p}": LENGTH for p in ("query", "key", "value", "out")}}
        reference = None
    else:
        raise ValueError(name)
    x = x.astype(np.int32 if name == "lm" else np.float32)
    params = _shift_biases(params_of(model))
    if name == "lm":
        reference = _lm_reference(params)
    train = Dataset(x[:NUM_TRAIN], labels[:NUM_TRAIN], num_classes)
    queries = Dataset(x[NUM_TRAIN:], labels[NUM_TRAIN:], num_classes)
    problem = Problem(name, model, apply_fn_of(model), params, train, queries, loss, reference,
                      positions)
    return problem, model_specs(problem)


def _measurement(name):
    return negative_loss(causal_lm_loss()) if name == "lm" else classification_margin


@functools.cache
def _gradients(name):
    problem, specs = _problem(name)
    return (per_example_grads(problem, specs, _measurement(name), problem.queries),
            per_example_grads(problem, specs, problem.loss.per_example, problem.train))


@functools.cache
def _curvature_oracle(name):
    """The dense GGN, or for the tied transformer the empirical Fisher ``mean_n g_n g_n^T``."""
    problem, specs = _problem(name)
    if name == "lm":
        train_grads = _gradients(name)[1]
        return train_grads.T @ train_grads / len(train_grads)
    return dense_ggn(problem, specs)


@functools.cache
def _fit(name, strategy):
    problem, specs = _problem(name)
    curvature = fit_curvature(problem.apply_fn, problem.params, problem.train, strategy=strategy,
                              loss=problem.loss, damping=None if strategy == "identity" else DAMPING,
                              fisher="empirical" if name == "lm" else "expected",
                              batch_size=LM_BATCH if name == "lm" else BATCH)
    assert [s.name for s in curvature.specs] == [s.name for s in specs]
    return curvature


def _lm_kronecker_factors(problem, specs):
    """K-FAC factors of the empirical Fisher from the reference forward: ``A = mean over real
    positions of a_t a_t^T`` and ``G = E[sum_t g_t g_t^T]``; the tied table's positions are its
    lookup (one-hot a, g = d loss / d embedding output) and its transposed use (a = d loss / d
    logits, g = the final hidden state)."""
    mats = matrices(flatten(problem.params, specs), specs)
    eps0 = {n: jnp.zeros((LENGTH, VOCAB if n == "attend" else m.shape[1])) for n, m in
            {**mats, "attend": mats["embed"]}.items()}

    def one(x, y):
        def scalar(eps):
            out, a = problem.reference(mats, x, eps)
            return problem.loss.per_example(out[None], y[None])[0], a

        return jax.grad(scalar, has_aux=True)(eps0)

    g, a = jax.jit(jax.vmap(one))(jnp.asarray(problem.train.inputs),
                                  jnp.asarray(problem.train.targets))
    a = {n: np.asarray(v, np.float64) for n, v in a.items()}
    g = {n: np.asarray(v, np.float64) for n, v in g.items()}
    a["embed"] = np.concatenate([a["embed"], g["attend"]], axis=1)
    g["embed"] = np.concatenate([g["embed"], a["attend"]], axis=1)
    return {s.name: (np.einsum("nti,ntj->ij", a[s.name], a[s.name]) / np.prod(a[s.name].shape[:2]),
                     np.einsum("nto,ntp->op", g[s.name], g[s.name]) / len(g[s.name]))
            for s in specs}


@functools.cache
def _kronecker(name):
    problem, specs = _problem(name)
    if name == "lm":
        return _lm_kronecker_factors(problem, specs)
    return kronecker_factors(problem, specs)


def _dense(curvature, damped=False):
    return np.asarray(curvature.to_dense(damped=damped), np.float64)


def _close(got, expected, rtol=1e-4, err_msg=""):
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol,
                               atol=rtol * np.abs(expected).max(), err_msg=err_msg)


PROBLEMS = ("mlp", "cnn", "lm")


# ----------------------------------------------------------------------------------------------
# The bridge and the capture
# ----------------------------------------------------------------------------------------------


def test_params_are_string_keyed_and_the_apply_fn_is_the_model():
    problem, specs = _problem("mlp")
    model = problem.model
    assert set(problem.params["layers"]) == {"0", "1"}
    x = jnp.asarray(problem.train.inputs[:3])
    np.testing.assert_array_equal(apply_fn_of(model)(params_of(model), x), model(x))
    # Equal for equal models (another instance, other weights), so compiled steps are shared.
    other = MLP(nnx.Rngs(7))
    assert apply_fn_of(other) == apply_fn_of(model) and hash(apply_fn_of(other)) == hash(
        apply_fn_of(model))
    assert apply_fn_of(CNN(nnx.Rngs(0))) != apply_fn_of(model)
    # Pure: usable under jit/vmap/eval_shape, and the model is not touched.
    before = jax.tree.map(np.asarray, params_of(model))
    jitted = jax.jit(problem.apply_fn)(problem.params, x)
    mapped = jax.vmap(problem.apply_fn, in_axes=(None, 0))(problem.params, x[:, None])[:, 0]
    np.testing.assert_allclose(mapped, jitted, rtol=1e-6)
    assert jax.eval_shape(problem.apply_fn, problem.params, x).shape == (3, NUM_CLASSES)
    jax.tree.map(np.testing.assert_array_equal, params_of(model), before)
    assert [s.path for s in specs] == [("layers", "0"), ("layers", "1")]
    for s in specs:
        back = s.from_matrix(s.to_matrix(layer_params(problem.params, s)))
        jax.tree.map(np.testing.assert_array_equal, back, layer_params(problem.params, s))


def test_non_parameter_state_is_fixed_and_part_of_equality():
    class Normed(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.norm = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.norm(self.dense(x)))

    first, second = Normed(nnx.Rngs(0)), Normed(nnx.Rngs(0))
    first.eval()
    second.eval()
    x = jax.random.normal(jax.random.key(0), (2, 3))
    assert set(params_of(first)) == {"dense", "norm"}  # no batch statistics, no RNG state
    np.testing.assert_allclose(jax.jit(apply_fn_of(first))(params_of(first), x), first(x),
                               rtol=1e-6)
    assert apply_fn_of(first) == apply_fn_of(second)
    second.norm.mean[...] = second.norm.mean[...] + 1.0
    assert apply_fn_of(first) != apply_fn_of(second)
    assert num_outputs_of(first, x) == 4


def test_layer_methods_are_wrapped_only_during_a_capture():
    originals = {(cls, m): cls.__dict__[m] for cls, m in
                 ((nnx.Linear, "__call__"), (nnx.LinearGeneral, "__call__"),
                  (nnx.Conv, "__call__"), (nnx.Embed, "__call__"), (nnx.Embed, "attend"))}
    problem, _ = _problem("mlp")
    seen = {}

    def spy(p, x):
        seen["during"] = nnx.Linear.__dict__["__call__"]
        return problem.apply_fn(p, x)

    output_shapes(spy, problem.params, jnp.asarray(problem.train.inputs[:2]))
    assert seen["during"] is not originals[(nnx.Linear, "__call__")]
    for (cls, m), method in originals.items():
        assert cls.__dict__[m] is method


@pytest.mark.parametrize("name", ["mlp", "cnn", "strided_cnn", "lm"])
def test_layer_gradients_match_a_loop_of_jax_grad(name):
    if name == "strided_cnn":
        model = StridedCNN(nnx.Rngs(1))
        x = jax.random.normal(jax.random.key(0), (5, 6, 2))
        targets, loss = jnp.arange(5) % NUM_CLASSES, softmax_cross_entropy()
        apply_fn, params = apply_fn_of(model), _shift_biases(params_of(model))
    else:
        problem, _ = _problem(name)
        x, targets = jnp.asarray(problem.train.inputs[:5]), jnp.asarray(problem.train.targets[:5])
        apply_fn, params, loss = problem.apply_fn, problem.params, problem.loss
    static = {}

    @jax.jit  # one compilation instead of many eager ones
    def statistics(p, inputs, y):
        captured = layer_statistics(apply_fn, p, inputs, loss_cotangents(loss.per_example, y))
        static.update(specs=captured.specs, calls=captured.calls)
        return captured.a, captured.g

    a, g = statistics(params, x, targets)
    specs = static["specs"]
    check_coverage(params, specs, allow_untracked=name == "lm")
    if name == "lm":
        assert set(specs) == {"embed", "attn/query", "attn/key", "attn/value", "attn/out", "up",
                              "down"}
        assert static["calls"]["embed"] == (LENGTH, LENGTH)  # lookup + attend
        assert specs["attn/out"].in_dim == D_MODEL + 1  # (heads, head_dim) contracted
    grad_one = jax.jit(jax.grad(lambda p, xi, yi: loss.per_example(apply_fn(p, xi), yi)[0]))
    for i in range(x.shape[0]):  # the oracle: one jax.grad per example
        grad_i = grad_one(params, x[i:i + 1], targets[i:i + 1])
        for spec_name, spec in specs.items():
            expected = spec.to_matrix(layer_params(grad_i, spec))
            got = layer_gradients(a[spec_name], g[spec_name])[0, i]
            assert float(jnp.linalg.norm(expected)) > 0
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=spec_name)


def test_unknown_layers_are_reported_by_their_parameters():
    class WithEinsum(nnx.Module):
        def __init__(self, rngs):
            self.mix = nnx.Einsum("bi,io->bo", (3, 4), (4,), rngs=rngs)
            self.blocks = nnx.List([nnx.LayerNorm(4, rngs=rngs)])
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.blocks[0](self.mix(x)))

    model = WithEinsum(nnx.Rngs(0))
    params = params_of(model)
    specs, _, _ = output_shapes(apply_fn_of(model), params, jnp.ones((2, 3)))
    assert set(specs) == {"head"}
    with pytest.raises(ValueError, match="blocks/0/bias, blocks/0/scale, mix/bias, mix/kernel"):
        check_coverage(params, specs, allow_untracked=False)
    assert check_coverage(params, specs, allow_untracked=True) == [
        "blocks/0/bias", "blocks/0/scale", "mix/bias", "mix/kernel"]
    only_unknown = nnx.Einsum("bi,io->bo", (3, 4), rngs=nnx.Rngs(0))
    specs, _, _ = output_shapes(apply_fn_of(only_unknown), params_of(only_unknown),
                                jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="no tracked layers"):
        check_coverage(params_of(only_unknown), specs, allow_untracked=True)


def test_a_hand_written_apply_fn_is_told_how_to_locate_layers():
    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    with pytest.raises(ValueError, match="apply_fn_of"):
        output_shapes(apply_fn, state, jnp.ones((2, 4)))


# ----------------------------------------------------------------------------------------------
# Curvature and scores against the dense oracles
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROBLEMS)
def test_reference_forward_and_flat_order_match_the_model(name):
    problem, specs = _problem(name)
    outputs = np.asarray(problem.apply_fn(problem.params, jnp.asarray(problem.train.inputs)))
    _close(reference_outputs(problem, specs, problem.train), outputs, rtol=1e-5)
    theta = flatten(problem.params, specs)
    for a, b in zip(jax.tree.leaves(unflatten(theta, problem.params, specs)),
                    jax.tree.leaves(problem.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", PROBLEMS)
def test_exact_diagonal_and_identity_blocks_match_the_dense_oracle(name):
    oracle = _curvature_oracle(name)
    size = len(oracle)
    _close(_dense(_fit(name, "exact")), oracle)
    _close(_dense(_fit(name, "exact"), damped=True), oracle + DAMPING * np.eye(size))
    _close(_dense(_fit(name, "diagonal")), np.diag(np.diag(oracle)))
    np.testing.assert_array_equal(_dense(_fit(name, "identity")), np.zeros((size, size)))
    np.testing.assert_array_equal(_dense(_fit(name, "identity"), damped=True), np.eye(size))


@pytest.mark.parametrize("name", PROBLEMS)
def test_kfac_and_ekfac_blocks_match_the_kronecker_oracle(name):
    _, specs = _problem(name)
    kfac, ekfac, oracle = _fit(name, "kfac"), _fit(name, "ekfac"), _curvature_oracle(name)
    factors = _kronecker(name)
    offsets = layer_offsets(specs)
    kfac_blocks, ekfac_blocks = [], []
    for s in specs:
        big_a, big_g = factors[s.name]
        f = kfac.factors[s.name]
        _close((f["eigvecs_A"] * f["eigvals_A"]) @ f["eigvecs_A"].T, big_a, err_msg=f"{s.name}: A")
        _close((f["eigvecs_G"] * f["eigvals_G"]) @ f["eigvecs_G"].T, big_g, err_msg=f"{s.name}: G")
        kfac_blocks.append(np.kron(big_a, big_g))
        # EK-FAC: the Kronecker eigenbasis, with the oracle's diagonal in that basis.
        f = ekfac.factors[s.name]
        qa, qg = np.asarray(f["eigvecs_A"], np.float64), np.asarray(f["eigvecs_G"], np.float64)
        basis = np.kron(qa, qg)
        block = oracle[offsets[s.name], offsets[s.name]]
        expected = np.einsum("pi,pq,qi->i", basis, block, basis)
        _close(np.asarray(f["lambda"]).ravel(), expected, err_msg=f"{s.name}: lambda")
        ekfac_blocks.append(basis @ np.diag(expected) @ basis.T)
    _close(_dense(kfac), block_diagonal(kfac_blocks))
    _close(_dense(ekfac), block_diagonal(ekfac_blocks))


@pytest.mark.parametrize("strategy", ["identity", "exact"])
@pytest.mark.parametrize("name", PROBLEMS)
def test_pairwise_scores_match_a_dense_solve(name, strategy):
    problem, _ = _problem(name)
    curvature = _fit(name, strategy)
    query_grads, train_grads = _gradients(name)
    expected, _ = influence_oracle(_dense(curvature, damped=True), query_grads, train_grads)
    got = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                          problem.train, loss=problem.loss, measurement=_measurement(name),
                          query_batch_size=4, train_batch_size=LM_BATCH if name == "lm" else BATCH)
    assert got.shape == expected.shape == (NUM_QUERIES, NUM_TRAIN)
    _close(got, expected, rtol=2e-3 if strategy == "exact" else 1e-4)


def test_padded_rows_stay_out_of_the_tied_tables_g():
    # For a transposed call (Embed.attend) the g part is the call's input, which is not zero on
    # padded batch rows by itself: K-FAC must mask it.
    problem, _ = _problem("lm")
    curvature = fit_curvature(problem.apply_fn, problem.params, problem.train, strategy="kfac",
                              loss=problem.loss, fisher="empirical", damping=DAMPING,
                              batch_size=BATCH)
    f = curvature.factors["embed"]
    _close((f["eigvecs_G"] * f["eigvals_G"]) @ f["eigvecs_G"].T, _kronecker("lm")["embed"][1])


# ----------------------------------------------------------------------------------------------
# Equivalence with linen, compiled steps
# ----------------------------------------------------------------------------------------------


def test_nnx_and_linen_mlps_with_the_same_weights_give_the_same_factors():
    problem, _ = _problem("mlp")
    linen = LinenMLP()
    linen_params = {"Dense_0": problem.params["layers"]["0"],
                    "Dense_1": problem.params["layers"]["1"]}
    x = jnp.asarray(problem.train.inputs)
    np.testing.assert_array_equal(linen.apply({"params": linen_params}, x),
                                  problem.apply_fn(problem.params, x))
    curvature = _fit("mlp", "ekfac")
    other = fit_curvature(apply_fn_of(linen), linen_params, problem.train, strategy="ekfac",
                          loss=problem.loss, damping=DAMPING, batch_size=BATCH)
    for nnx_name, linen_name in (("layers/0", "Dense_0"), ("layers/1", "Dense_1")):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
                     curvature.factors[nnx_name], other.factors[linen_name])


def test_a_fresh_nnx_apply_fn_does_not_compile_twice():
    problem, _ = _problem("mlp")

    def run(model):
        params = _shift_biases(params_of(model))
        return fit_curvature(apply_fn_of(model), params, problem.train, strategy="kfac",
                             loss=problem.loss, damping=DAMPING, batch_size=BATCH)

    run(MLP(nnx.Rngs(0)))
    events = []

    def listener(name, duration, **kwargs):
        if "backend_compile" in name:
            events.append(name)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        run(MLP(nnx.Rngs(0)))  # a new model object, a new apply_fn
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert events == [], f"the second call compiled {len(events)} program(s)"
