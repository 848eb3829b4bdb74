"""Curvature and influence scores against dense oracles built with plain jax.grad / jax.jacobian."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy.stats import spearmanr

from tda_jax.attribution import fit_curvature, pairwise_scores, self_scores
from tda_jax.data import Dataset
from tda_jax.io import ArgumentMismatchError
from tda_jax.losses import classification_margin, mean_squared_error, softmax_cross_entropy
from tda_jax.sharding import make_data_mesh


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(6)(x)))


def _classification_problem(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.argmax(x[:, :3] + 0.5 * rng.normal(size=(n, 3)), axis=1)).astype(np.int32)
    model = MLP()
    params = model.init(jax.random.key(seed), x[:1])["params"]
    return model, params, Dataset(x, y, 3)


def _dense_ggn(apply_fn, params, data, loss_name):
    """The oracle: (1/N) sum_i J_i^T H_i J_i over the raveled params (no capture code involved)."""
    flat, unravel = ravel_pytree(params)

    def outputs(vec, x):
        return apply_fn(unravel(vec), x[None])[0]

    inputs = jnp.asarray(data.inputs)
    jacs = np.asarray(jax.vmap(jax.jacobian(outputs), in_axes=(None, 0))(flat, inputs), np.float64)
    if loss_name == "ce":
        probs = np.asarray(jax.nn.softmax(jax.vmap(outputs, in_axes=(None, 0))(flat, inputs)),
                           np.float64)
        hess = np.stack([np.diag(p) - np.outer(p, p) for p in probs])
    else:
        hess = np.broadcast_to(np.eye(jacs.shape[1]), (len(jacs), jacs.shape[1], jacs.shape[1]))
    total = np.einsum("nci,ncd,ndj->ij", jacs, hess, jacs)
    return total / len(data.inputs), unravel, flat


def _oracle_scores(apply_fn, params, curv_matrix, queries, train, loss, measurement):
    def grads_of(fn, data):
        def one(x, y):
            return ravel_pytree(jax.grad(lambda p: fn(apply_fn(p, x[None]), y[None])[0])(params))[0]

        return np.asarray(jax.vmap(one)(jnp.asarray(data.inputs), jnp.asarray(data.targets)),
                          np.float64)

    gq = grads_of(measurement, queries)
    gt = grads_of(loss.per_example, train)
    solved = np.linalg.solve(curv_matrix, gt.T)
    return -gq @ solved, np.einsum("ip,pi->i", gt, solved)


def test_exact_strategy_matches_dense_ggn_oracle():
    model, params, train = _classification_problem()
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    loss = softmax_cross_entropy()
    damping = 1e-2
    curv = fit_curvature(apply_fn, params, train, strategy="exact", loss=loss, damping=damping,
                         batch_size=16)
    ggn, _, flat = _dense_ggn(apply_fn, params, train, "ce")
    queries = Dataset(train.inputs[:5], train.targets[:5], 3)
    expected, expected_self = _oracle_scores(apply_fn, params, ggn + damping * np.eye(flat.size),
                                             queries, train, loss, classification_margin)
    got = pairwise_scores(apply_fn, params, curv, queries, train, loss=loss,
                          measurement=classification_margin, train_batch_size=16)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    got_self = self_scores(apply_fn, params, curv, train, loss=loss, batch_size=16)
    np.testing.assert_allclose(got_self, expected_self, rtol=2e-3)


def test_identity_equals_negative_gradient_dot_products():
    model, params, train = _classification_problem()
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    loss = softmax_cross_entropy()
    curv = fit_curvature(apply_fn, params, train, strategy="identity", loss=loss)
    queries = Dataset(train.inputs[:4], train.targets[:4], 3)
    flat = ravel_pytree(params)[0]
    expected, expected_self = _oracle_scores(apply_fn, params, np.eye(flat.size), queries, train,
                                             loss, classification_margin)
    got = pairwise_scores(apply_fn, params, curv, queries, train, loss=loss,
                          measurement=classification_margin, train_batch_size=20)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(self_scores(apply_fn, params, curv, train, loss=loss),
                               expected_self, rtol=1e-4)


def test_kfac_and_ekfac_are_exact_for_a_linear_regression_layer():
    # One linear layer with squared error and the expected Fisher: G = I exactly, so the curvature
    # is E[a a^T] (x) I and both K-FAC and EK-FAC equal the dense GGN.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.normal(size=(40, 2)).astype(np.float32)
    train = Dataset(x, y, None)
    model = nn.Dense(2)
    params = model.init(jax.random.key(0), x[:1])["params"]
    apply_fn = lambda p, v: model.apply({"params": p}, v)
    loss = mean_squared_error()
    measurement = lambda out, tgt: -loss.per_example(out, tgt)
    damping = 1e-3
    ggn, _, flat = _dense_ggn(apply_fn, params, train, "mse")
    queries = Dataset(x[:6], y[:6], None)
    expected, expected_self = _oracle_scores(apply_fn, params, ggn + damping * np.eye(flat.size),
                                             queries, train, loss, measurement)
    for strategy in ("kfac", "ekfac"):
        curv = fit_curvature(apply_fn, params, train, strategy=strategy, loss=loss, damping=damping)
        got = pairwise_scores(apply_fn, params, curv, queries, train, loss=loss,
                              measurement=measurement)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max(),
                                   err_msg=strategy)
        np.testing.assert_allclose(self_scores(apply_fn, params, curv, train, loss=loss),
                                   expected_self, rtol=1e-3, err_msg=strategy)


def test_diagonal_and_ekfac_eigenvalues_match_the_dense_ggn():
    model, params, train = _classification_problem()
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    loss = softmax_cross_entropy()
    ggn, unravel, flat = _dense_ggn(apply_fn, params, train, "ce")
    diag_tree = unravel(jnp.asarray(np.diag(ggn), jnp.float32))
    curv = fit_curvature(apply_fn, params, train, strategy="diagonal", loss=loss, batch_size=20)
    for spec in curv.specs:
        layer = {k: diag_tree[spec.path[0]][k] for k in spec.param_names}
        np.testing.assert_allclose(curv.factors[spec.name]["diagonal"], spec.to_matrix(layer),
                                   rtol=1e-3, atol=1e-6)
    # EK-FAC's lambda is the diagonal of the layer's GGN block in the Kronecker eigenbasis.
    ekfac = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss, batch_size=20)
    spec = ekfac.specs[-1]  # last layer "Dense_1"
    f = ekfac.factors[spec.name]
    basis = np.kron(f["eigvecs_A"], f["eigvecs_G"]).astype(np.float64)  # rows (in, out) order
    index_tree = unravel(jnp.arange(flat.size, dtype=jnp.float32))
    idx = np.asarray(spec.to_matrix({k: index_tree[spec.path[0]][k] for k in spec.param_names}),
                     dtype=int).ravel()
    block = ggn[np.ix_(idx, idx)]
    expected = np.einsum("pi,pq,qi->i", basis, block, basis).reshape(spec.in_dim, spec.out_dim)
    np.testing.assert_allclose(f["lambda"], expected, rtol=1e-3, atol=1e-6)


@pytest.mark.standard_promotion  # trains with optax, whose adam is not strict-promotion clean
def test_ekfac_ranks_like_the_exact_block_diagonal_ggn_on_a_trained_mlp():
    model, params, train = _classification_problem(n=256, seed=3)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    loss = softmax_cross_entropy()
    opt = optax.adam(0.02)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(lambda q: loss.per_example(apply_fn(q, train.inputs),
                                                    train.targets).mean())(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(100):
        params, state = step(params, state)
    queries = Dataset(train.inputs[:5], train.targets[:5], 3)
    ggn, _, flat = _dense_ggn(apply_fn, params, train, "ce")
    damping = 1e-2
    # ravel_pytree orders Dense_0 (bias, kernel) then Dense_1: zero the cross-layer blocks.
    n0 = sum(v.size for v in jax.tree.leaves(params["Dense_0"]))
    block = ggn.copy()
    block[:n0, n0:] = 0
    block[n0:, :n0] = 0
    eye = damping * np.eye(flat.size)
    exact = _oracle_scores(apply_fn, params, ggn + eye, queries, train, loss,
                           classification_margin)[0]
    block_exact = _oracle_scores(apply_fn, params, block + eye, queries, train, loss,
                                 classification_margin)[0]
    rho = {}
    for strategy in ("ekfac", "kfac", "diagonal", "identity"):
        curv = fit_curvature(apply_fn, params, train, strategy=strategy, loss=loss,
                             damping=None if strategy == "identity" else damping, batch_size=128)
        scores = pairwise_scores(apply_fn, params, curv, queries, train, loss=loss,
                                 measurement=classification_margin, train_batch_size=128)
        rho[strategy] = np.mean([spearmanr(scores[q], exact[q])[0] for q in range(5)])
        if strategy == "ekfac":
            assert np.mean([spearmanr(scores[q], block_exact[q])[0] for q in range(5)]) > 0.8
    # Measured: ekfac 0.61, kfac 0.58, diagonal 0.46, identity 0.41 against the full GGN.
    assert rho["ekfac"] > rho["diagonal"] + 0.05 > rho["identity"] + 0.05
    assert rho["ekfac"] >= rho["kfac"] - 0.02


def test_batch_chunk_and_device_count_do_not_change_results():
    model, params, train = _classification_problem(n=50)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    loss = softmax_cross_entropy()
    queries = Dataset(train.inputs[:6], train.targets[:6], 3)
    runs = []
    for batch_size, query_batch, devices in ((50, 6, 1), (12, 4, 1), (16, 5, 4)):
        mesh = make_data_mesh(devices)
        curv = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss,
                             batch_size=batch_size, mesh=mesh)
        scores = pairwise_scores(apply_fn, params, curv, queries, train, loss=loss,
                                 measurement=classification_margin, query_batch_size=query_batch,
                                 train_batch_size=batch_size, mesh=mesh)
        runs.append((curv, scores))
    (base, base_scores) = runs[0]
    for curv, scores in runs[1:]:
        for spec in base.specs:
            for name in ("eigvals_A", "eigvals_G", "lambda"):
                np.testing.assert_allclose(curv.factors[spec.name][name],
                                           base.factors[spec.name][name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(scores, base_scores, rtol=1e-3,
                                   atol=1e-4 * np.abs(base_scores).max())


def test_sampled_fisher_is_invariant_to_batching_and_approaches_expected():
    model, params, train = _classification_problem(n=40)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    loss = softmax_cross_entropy()
    key = jax.random.key(7)
    a = fit_curvature(apply_fn, params, train, strategy="diagonal", loss=loss, fisher="sampled",
                      key=key, num_samples=200, batch_size=40)
    b = fit_curvature(apply_fn, params, train, strategy="diagonal", loss=loss, fisher="sampled",
                      key=key, num_samples=200, batch_size=16, mesh=make_data_mesh(4))
    exact = fit_curvature(apply_fn, params, train, strategy="diagonal", loss=loss)
    for spec in a.specs:
        da, db = a.factors[spec.name]["diagonal"], b.factors[spec.name]["diagonal"]
        np.testing.assert_allclose(da, db, rtol=1e-4, atol=1e-7)
        de = exact.factors[spec.name]["diagonal"]
        # 200 samples per example x 40 examples: relative error of the total a few percent.
        assert abs(da.sum() / de.sum() - 1) < 0.1


def test_empirical_fisher_matches_outer_products_of_gradients():
    model, params, train = _classification_problem(n=30)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    loss = softmax_cross_entropy()
    grads = np.stack([np.asarray(ravel_pytree(jax.grad(
        lambda p, x=x, y=y: loss.per_example(apply_fn(p, x[None]), y[None])[0])(params))[0])
        for x, y in zip(train.inputs, train.targets)]).astype(np.float64)
    fisher = grads.T @ grads / len(grads)
    curv = fit_curvature(apply_fn, params, train, strategy="exact", loss=loss, fisher="empirical",
                         damping=0.0 + 1e-3)
    chol = np.asarray(curv.factors["cholesky"], np.float64)
    # Same ordering? compare spectra, which do not depend on the parameter ordering.
    got = np.linalg.eigvalsh(chol @ chol.T - 1e-3 * np.eye(len(chol)))
    np.testing.assert_allclose(got, np.linalg.eigvalsh(fisher), atol=1e-5)


def test_bad_inputs_raise_clear_errors(tmp_path):
    model, params, train = _classification_problem(n=20)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    loss = softmax_cross_entropy()
    with pytest.raises(ValueError, match="empty"):
        fit_curvature(apply_fn, params, Dataset(train.inputs[:0], train.targets[:0], 3),
                      strategy="kfac", loss=loss)
    with pytest.raises(ValueError, match="inputs of shape"):
        fit_curvature(apply_fn, params, Dataset(train.inputs[:, :3], train.targets, 3),
                      strategy="kfac", loss=loss)
    with pytest.raises(ValueError, match="strategy"):
        fit_curvature(apply_fn, params, train, strategy="kfc", loss=loss)
    with pytest.raises(ValueError, match="fisher"):
        fit_curvature(apply_fn, params, train, strategy="kfac", loss=loss, fisher="true")
    bad = train.inputs.copy()
    bad[7, 1] = np.nan
    with pytest.raises(FloatingPointError, match="examples 0..19"):
        fit_curvature(apply_fn, params, Dataset(bad, train.targets, 3), strategy="diagonal",
                      loss=loss, batch_size=32)
    stage = tmp_path / "factors"
    first = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss, stage_dir=stage)
    again = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss, stage_dir=stage)
    np.testing.assert_array_equal(first.factors["Dense_0"]["lambda"],
                                  again.factors["Dense_0"]["lambda"])
    with pytest.raises(ArgumentMismatchError, match="damping"):
        fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss, damping=0.5,
                      stage_dir=stage)


def test_blocked_cholesky_matches_lapack():
    from tda_jax.curvature.blocks import blocked_cholesky

    rng = np.random.default_rng(0)
    a = rng.normal(size=(37, 50))
    m = a @ a.T + np.eye(37)
    np.testing.assert_allclose(blocked_cholesky(m.copy(), block=8), np.linalg.cholesky(m),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.standard_promotion  # trains with optax
def test_public_api_composes_like_the_readme():
    import tda_jax
    from tda_jax.data import load_digits, subset
    from tda_jax.models import MLP
    from tda_jax.training import TrainConfig, train

    train_set, test_set = load_digits(seed=0)
    train_set = subset(train_set, np.arange(300))
    model = MLP(hidden_sizes=(16,), num_outputs=10)
    params = train(jax.random.key(0), model, None, train_set, TrainConfig(num_epochs=3))
    apply_fn = model.apply  # (variables, inputs) -> logits; the model is not modified
    loss = tda_jax.softmax_cross_entropy()
    curvature = tda_jax.fit_curvature(apply_fn, params, train_set, strategy="ekfac", loss=loss)
    queries = subset(test_set, np.arange(8))
    scores = tda_jax.pairwise_scores(apply_fn, params, curvature, queries, train_set, loss=loss,
                                     measurement=tda_jax.classification_margin)
    self_influence = tda_jax.self_scores(apply_fn, params, curvature, train_set, loss=loss)
    assert scores.shape == (8, 300) and self_influence.shape == (300,)
    assert np.all(np.isfinite(scores)) and np.all(self_influence >= 0)
    # A query's own training copy is among its most helpful examples on average.
    own = tda_jax.pairwise_scores(apply_fn, params, curvature, subset(train_set, np.arange(8)),
                                  train_set, loss=loss, measurement=tda_jax.classification_margin)
    ranks = [(own[q] > own[q, q]).sum() for q in range(8)]
    assert np.median(ranks) < 15


def test_factored_and_materialized_score_contractions_agree():
    model, params, train = _classification_problem(n=30)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    loss = softmax_cross_entropy()
    queries = Dataset(train.inputs[:4], train.targets[:4], 3)
    curv = fit_curvature(apply_fn, params, train, strategy="kfac", loss=loss)
    kwargs = dict(loss=loss, measurement=classification_margin, train_batch_size=16)
    fast = pairwise_scores(apply_fn, params, curv, queries, train, **kwargs)
    factored = pairwise_scores(apply_fn, params, curv, queries, train, max_gradient_bytes=0,
                               **kwargs)
    np.testing.assert_allclose(factored, fast, rtol=1e-4, atol=1e-5 * np.abs(fast).max())
