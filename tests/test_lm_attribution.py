"""Influence on language models: sequence outputs, tied embeddings, padding, granularity, query rank.

The model is the library's ``TransformerLM`` (embedding, causal attention through ``DenseGeneral``
projections, LayerNorm, MLP, tied or untied output embedding) at a size where the dense Fisher over
its tracked layers fits in memory. Oracles: per-example gradients from ``jax.grad`` flattened in
the library's documented order (``tests/oracles.py``), the dense GGN / empirical Fisher built from
them, and dense solves for scores.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import Problem, dense_ggn, influence_oracle, layer_offsets, model_specs, per_example_grads

from tda_jax.attribution import fit_curvature, pairwise_scores, self_scores
from tda_jax.capture import layer_gradients, layer_statistics, loss_cotangents
from tda_jax.curvature.fisher import fisher_cotangents
from tda_jax.data import Dataset
from tda_jax.losses import IGNORE, causal_lm_loss, completion_log_prob
from tda_jax.models import TransformerLM

VOCAB, LENGTH, NUM_TRAIN, NUM_QUERIES = 7, 5, 12, 3
DAMPING = 1e-2


def _sequences(rng, n, prompt=False):
    """Token inputs/targets with right padding (lengths 2..5) and, for queries, a masked prompt."""
    lengths = rng.integers(2, LENGTH + 1, size=n)
    tokens = rng.integers(0, VOCAB, size=(n, LENGTH + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1].copy(), tokens[:, 1:].copy()
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.float32)
    targets[mask == 0] = IGNORE
    inputs[mask == 0] = 0
    if prompt:
        targets[:, 0] = IGNORE  # the first target token belongs to the prompt
        targets[np.arange(n), lengths - 1] = tokens[np.arange(n), lengths]
    return inputs, targets, mask


@functools.cache
def _problem(tied: bool) -> tuple[Problem, tuple]:
    model = TransformerLM(vocab_size=VOCAB, max_len=LENGTH, d_model=4, num_heads=2, num_layers=1,
                          d_mlp=6, tie_embeddings=tied)
    rng = np.random.default_rng(3 + tied)
    x, y, m = _sequences(rng, NUM_TRAIN)
    qx, qy, qm = _sequences(rng, NUM_QUERIES, prompt=True)
    params = model.init(jax.random.key(1), jnp.asarray(x[:1]))["params"]
    apply_fn = lambda p, v: model.apply({"params": p}, v)  # noqa: E731
    problem = Problem("lm", model, apply_fn, params, Dataset(x, y, VOCAB, m),
                      Dataset(qx, qy, VOCAB, qm), causal_lm_loss(), None, {})
    return problem, model_specs(problem)


@functools.cache
def _grads(tied: bool):
    problem, specs = _problem(tied)
    return (per_example_grads(problem, specs, completion_log_prob, problem.queries),
            per_example_grads(problem, specs, problem.loss.per_example, problem.train))


@functools.cache
def _fit(tied: bool, strategy: str, fisher: str = "empirical"):
    problem, _ = _problem(tied)
    return fit_curvature(problem.apply_fn, problem.params, problem.train, strategy=strategy,
                         loss=problem.loss, fisher=fisher, batch_size=8,
                         damping=None if strategy == "identity" else DAMPING)


def _close(got, expected, rtol=1e-4):
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol,
                               atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("tied", [False, True])
def test_layer_gradients_of_a_transformer_match_jax_grad(tied):
    # Attention projections (DenseGeneral), MLP, embedding and, when tied, Embed.attend summed
    # with the input embedding's use of the same table.
    problem, specs = _problem(tied)
    batch = problem.train
    captured = layer_statistics(problem.apply_fn, problem.params, jnp.asarray(batch.inputs),
                                loss_cotangents(problem.loss.per_example, jnp.asarray(batch.targets)),
                                jnp.asarray(batch.input_mask))
    offsets = layer_offsets(specs)
    expected = _grads(tied)[1]
    names = {s.name for s in specs}
    assert "embed" in names and any("attn" in n for n in names) and ("head" in names) != tied
    for s in specs:
        got = layer_gradients(captured.a[s.name], captured.g[s.name])[0]
        _close(np.reshape(got, (NUM_TRAIN, -1)), expected[:, offsets[s.name]], rtol=1e-5)
    if tied:
        assert captured.calls["embed"] == (LENGTH, LENGTH)  # lookup + attend, one position each


@pytest.mark.parametrize("tied", [False, True])
def test_exact_block_is_the_empirical_fisher_and_scores_match_dense_solves(tied):
    problem, specs = _problem(tied)
    query_grads, train_grads = _grads(tied)
    fisher = train_grads.T @ train_grads / NUM_TRAIN
    curvature = _fit(tied, "exact")
    _close(curvature.to_dense(), fisher)
    expected, expected_self = influence_oracle(fisher + DAMPING * np.eye(len(fisher)), query_grads,
                                               train_grads)
    kwargs = dict(loss=problem.loss, measurement=completion_log_prob, train_batch_size=8)
    scores = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                             problem.train, **kwargs)
    _close(scores, expected, rtol=2e-3)
    tokens = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                             problem.train, granularity="token", **kwargs)
    assert tokens.shape == (NUM_QUERIES, NUM_TRAIN, LENGTH)
    _close(tokens.sum(-1), scores, rtol=1e-4)
    np.testing.assert_array_equal(tokens[:, problem.train.input_mask == 0], 0.0)  # padding
    modules = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                              problem.train, granularity="module", **kwargs)
    assert modules.shape == (NUM_QUERIES, NUM_TRAIN, len(specs))
    _close(modules.sum(-1), scores, rtol=1e-4)
    own = self_scores(problem.apply_fn, problem.params, curvature, problem.train, loss=problem.loss,
                      batch_size=8)
    _close(own, expected_self, rtol=2e-3)
    own_tokens = self_scores(problem.apply_fn, problem.params, curvature, problem.train,
                             loss=problem.loss, batch_size=8, granularity="token")
    _close(own_tokens.sum(-1), own, rtol=1e-4)


def test_expected_fisher_of_a_sequence_loss_is_the_dense_ggn():
    # Untied (the tied table's transposed use needs one cotangent per example); padding and prompt
    # positions (IGNORE targets) must add nothing.
    problem, specs = _problem(False)
    _close(_fit(False, "exact", "expected").to_dense(), dense_ggn(problem, specs), rtol=2e-4)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac", "diagonal"])
def test_padding_tokens_do_not_reach_the_statistics(strategy):
    problem, _ = _problem(True)
    noisy = np.where(problem.train.input_mask > 0, problem.train.inputs,
                     (problem.train.inputs + 3) % VOCAB).astype(np.int32)
    other = dataclasses.replace(problem, train=problem.train._replace(inputs=noisy))
    first = _fit(True, strategy)
    second = fit_curvature(other.apply_fn, other.params, other.train, strategy=strategy,
                           loss=other.loss, fisher="empirical", batch_size=8, damping=DAMPING)
    for a, b in zip(jax.tree.leaves(first.factors), jax.tree.leaves(second.factors)):
        _close(b, a, rtol=1e-5)


def test_kfac_input_factor_is_averaged_over_real_tokens():
    # Untied embedding layer: a_t is one-hot, so A = diag(frequency of each token among the real
    # input positions); padding positions are not counted in the average.
    problem, _ = _problem(False)
    curvature = _fit(False, "kfac")
    f = curvature.factors["embed"]
    a = (f["eigvecs_A"] * f["eigvals_A"]) @ f["eigvecs_A"].T
    real = problem.train.inputs[problem.train.input_mask > 0]
    _close(a, np.diag(np.bincount(real, minlength=VOCAB) / real.size), rtol=1e-5)


def test_sampled_fisher_keeps_ignored_positions_out():
    problem, _ = _problem(True)
    targets = jnp.asarray(problem.train.targets)
    logits = problem.apply_fn(problem.params, jnp.asarray(problem.train.inputs))
    cot = fisher_cotangents(problem.loss, "sampled", targets, jnp.ones(NUM_TRAIN),
                            key=jax.random.key(0), index=jnp.arange(NUM_TRAIN))(logits)
    assert cot.shape == (1, NUM_TRAIN, LENGTH, VOCAB)
    ignored = np.asarray(targets) == IGNORE
    np.testing.assert_array_equal(np.asarray(cot)[0][ignored], 0.0)
    assert np.all(np.abs(np.asarray(cot)[0][~ignored]).sum(-1) > 0)
    with pytest.raises(ValueError, match="fisher='sampled' or fisher='empirical'"):
        fit_curvature(problem.apply_fn, problem.params, problem.train, strategy="kfac",
                      loss=problem.loss, fisher="expected")


def test_query_rank_is_exact_at_full_rank_and_approximate_below():
    problem, specs = _problem(False)
    curvature = _fit(False, "ekfac")
    kwargs = dict(loss=problem.loss, measurement=completion_log_prob, train_batch_size=8)
    full = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                           problem.train, **kwargs)
    top = max(min(s.in_dim, s.out_dim) for s in specs)
    exact = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                            problem.train, query_rank=top, **kwargs)
    _close(exact, full, rtol=1e-4)
    tokens = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                             problem.train, query_rank=top, granularity="token", **kwargs)
    _close(tokens.sum(-1), full, rtol=1e-4)
    rank1 = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                            problem.train, query_rank=1, **kwargs)
    assert not np.allclose(rank1, full, rtol=1e-3)
    assert np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(rank1, full)]) > 0.5


def test_layer_selection_and_untracked_parameters_are_reported():
    problem, _ = _problem(False)
    curvature = fit_curvature(problem.apply_fn, problem.params, problem.train, strategy="kfac",
                              loss=problem.loss, fisher="empirical", layers="mlp")
    assert [s.name for s in curvature.specs] == ["block_0/mlp/fc1", "block_0/mlp/fc2"]
    untracked = curvature.settings["untracked"]
    assert "pos_embedding" in untracked and "ln_final/scale" in untracked
    assert "embed/embedding" in untracked  # not selected
    scores = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                             problem.train, loss=problem.loss, measurement=completion_log_prob,
                             granularity="module")
    assert scores.shape == (NUM_QUERIES, NUM_TRAIN, 2)
    with pytest.raises(ValueError, match="selects none"):
        fit_curvature(problem.apply_fn, problem.params, problem.train, strategy="kfac",
                      loss=problem.loss, fisher="empirical", layers="nothing_like_this")
    with pytest.raises(ValueError, match="parameters outside tracked layers: .*pos_embedding"):
        fit_curvature(problem.apply_fn, problem.params, problem.train, strategy="kfac",
                      loss=problem.loss, fisher="empirical", allow_untracked=False)


def test_bad_language_model_input_names_the_rows():
    problem, _ = _problem(True)
    train = problem.train
    fit = functools.partial(fit_curvature, problem.apply_fn, problem.params, strategy="identity",
                            loss=problem.loss)
    ids = train.inputs.copy()
    ids[4, 1] = VOCAB
    with pytest.raises(ValueError, match=r"rows \[4\].*outside \[0, 7\)"):
        fit(train._replace(inputs=ids))
    targets = train.targets.copy()
    targets[2, 0] = VOCAB + 1
    with pytest.raises(ValueError, match="row 2 position 0"):
        fit(train._replace(targets=targets))
    empty = problem.queries.targets.copy()
    empty[1] = IGNORE
    curvature = _fit(True, "identity")
    with pytest.raises(ValueError, match=r"rows \[1\] have no token with a loss"):
        pairwise_scores(problem.apply_fn, problem.params, curvature,
                        problem.queries._replace(targets=empty), train, loss=problem.loss,
                        measurement=completion_log_prob)
    longer = Dataset(np.zeros((2, LENGTH + 2), np.int32), np.zeros((2, LENGTH + 2), np.int32), VOCAB)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        fit(longer)
    with pytest.raises(ValueError, match="input_mask has shape"):
        fit(train._replace(input_mask=train.input_mask[:, :2]))


def test_factored_low_rank_contraction_equals_the_expanded_one():
    # The two orders pairwise scoring chooses between for query_rank (by their flop counts).
    from tda_jax.attribution.influence import _low_rank_position_scores, _position_scores

    keys = jax.random.split(jax.random.key(0), 4)
    a, g = jax.random.normal(keys[0], (3, 5, 6)), jax.random.normal(keys[1], (3, 5, 4))
    u, w = jax.random.normal(keys[2], (2, 6, 3)), jax.random.normal(keys[3], (2, 4, 3))
    expanded = _position_scores(jnp.einsum("qir,qor->qio", u, w), a, g)
    _close(_low_rank_position_scores({"u": u, "w": w}, a, g), expanded, rtol=1e-5)
    assert expanded.shape == (2, 3, 5)


def test_low_rank_queries_are_returned_in_layer_coordinates():
    # u w^T must equal Q_A V' Q_G^T for a rank-2 V' in score coordinates; a layer whose rank-r
    # factors would not be smaller keeps V' itself.
    from types import SimpleNamespace

    from tda_jax.attribution.influence import _low_rank
    from tda_jax.capture import LayerSpec

    def spec(name, fan_in, fan_out):
        return LayerSpec(name, "dense", (name,), ("kernel",), (fan_in, fan_out), fan_in, fan_out,
                         False)

    specs = (spec("big", 8, 6), spec("small", 3, 2))
    keys = jax.random.split(jax.random.key(1), 6)
    qa = jnp.linalg.qr(jax.random.normal(keys[0], (8, 8)))[0]
    qg = jnp.linalg.qr(jax.random.normal(keys[1], (6, 6)))[0]
    low = jnp.einsum("qir,qor->qio", jax.random.normal(keys[2], (3, 8, 2)),
                     jax.random.normal(keys[3], (3, 6, 2)))
    small = jax.random.normal(keys[4], (3, 3, 2))
    block = SimpleNamespace(score_basis=lambda s, f: {"big": (qa, qg), "small": (None, None)})
    out = _low_rank(block, specs, None, {"big": low, "small": small}, rank=2)
    _close(jnp.einsum("qir,qor->qio", out["big"]["u"], out["big"]["w"]),
           jnp.einsum("ij,qjk,lk->qil", qa, low, qg), rtol=1e-5)
    assert set(out["small"]) == {"v"}
    np.testing.assert_array_equal(out["small"]["v"], small)


def _trim_problem(monkeypatch):
    """The untied problem with training rows shuffled by length and a trim multiple of 2, so
    batches of 4 are cut to 2, 4 or 5 positions (the model's LENGTH is below the default 8)."""
    import tda_jax.curvature.fit as fit_module

    monkeypatch.setattr(fit_module, "TRIM_MULTIPLE", 2)
    problem, _ = _problem(False)
    order = np.random.default_rng(0).permutation(NUM_TRAIN)
    train = Dataset(*(np.asarray(v)[order] for v in (problem.train.inputs, problem.train.targets)),
                    VOCAB, problem.train.input_mask[order])
    return dataclasses.replace(problem, train=train)


def test_trim_padding_gives_the_same_factors_and_scores(monkeypatch):
    problem = _trim_problem(monkeypatch)
    lengths = problem.train.input_mask.sum(1)
    assert len(set(lengths.tolist())) > 2  # several buckets, in shuffled order
    fit = functools.partial(fit_curvature, problem.apply_fn, problem.params, problem.train,
                            strategy="ekfac", loss=problem.loss, fisher="empirical", batch_size=4,
                            damping=DAMPING)
    plain, trimmed = fit(), fit(trim_padding=True)
    for a, b in zip(jax.tree.leaves(plain.factors), jax.tree.leaves(trimmed.factors)):
        _close(b, a, rtol=1e-5)
    score = functools.partial(pairwise_scores, problem.apply_fn, problem.params, plain,
                              problem.queries, problem.train, loss=problem.loss,
                              measurement=completion_log_prob, train_batch_size=4,
                              query_batch_size=2)
    for kwargs in ({"granularity": "token"}, {"query_rank": 1}):  # token scores sum to sequence
        expected, got = score(**kwargs), score(trim_padding=True, **kwargs)
        assert got.shape == expected.shape
        _close(got, expected, rtol=1e-5)
    self_kwargs = dict(loss=problem.loss, granularity="token", batch_size=4)
    _close(self_scores(problem.apply_fn, problem.params, plain, problem.train, trim_padding=True,
                       **self_kwargs),
           self_scores(problem.apply_fn, problem.params, plain, problem.train, **self_kwargs),
           rtol=1e-5)


def test_trim_padding_refuses_targets_in_trailing_padding():
    problem, _ = _problem(False)
    targets = problem.train.targets.copy()
    row = int(np.flatnonzero(problem.train.input_mask[:, -1] == 0)[0])
    targets[row, -1] = 1  # a loss target after the last real input token
    bad = problem.train._replace(targets=targets)
    with pytest.raises(ValueError, match=rf"rows \[{row}\].*trailing padding"):
        fit_curvature(problem.apply_fn, problem.params, bad, strategy="kfac", loss=problem.loss,
                      fisher="empirical", trim_padding=True)
    with pytest.raises(ValueError, match="input_mask"):
        fit_curvature(problem.apply_fn, problem.params, problem.train._replace(input_mask=None),
                      strategy="kfac", loss=problem.loss, fisher="empirical", trim_padding=True)


@pytest.mark.parametrize("shape", [(3, 5, 9), (3, 9, 5)])
def test_truncate_rank_is_the_truncated_svd(shape):
    from tda_jax.attribution.influence import truncate_rank

    v = np.asarray(jax.random.normal(jax.random.key(2), shape), np.float64)
    u, w = truncate_rank(jnp.asarray(v, jnp.float32), 2)
    left, values, right = np.linalg.svd(v, full_matrices=False)
    expected = (left[..., :2] * values[:, None, :2]) @ right[:, :2]
    _close(np.einsum("qir,qor->qio", u, w), expected, rtol=1e-4)
    u, w = truncate_rank(jnp.asarray(v, jnp.float32), 99)  # full rank: exact
    _close(np.einsum("qir,qor->qio", u, w), v, rtol=1e-4)


def test_low_rank_queries_expanded_once_score_like_the_factored_ones():
    from tda_jax.attribution import build_score_steps

    problem, specs = _problem(False)
    curvature = _fit(False, "ekfac")
    names = tuple(s.name for s in curvature.specs)

    def scores(expand):
        steps = build_score_steps(problem.apply_fn, "ekfac", curvature.specs, loss=problem.loss,
                                  measurement=completion_log_prob, query_rank=1,
                                  expand_low_rank=expand)
        return pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                               problem.train, loss=problem.loss, measurement=completion_log_prob,
                               query_rank=1, train_batch_size=8, steps=steps)

    _close(scores(names), scores(()), rtol=1e-5)
