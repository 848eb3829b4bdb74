"""LAFTR function-space distances against oracles: exact cases, the stochastic-gate expectation,
the true FSD on a trained MLP, and the baselines' quadratics against dense Jacobians."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

from tda_jax import data, fsd, models, training
from tda_jax.data import Dataset


def _gaussian_data(key, n=300, d=6, classes=3, shift=0.0):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, d)) * jnp.linspace(0.5, 1.5, d) + shift
    y = jax.random.randint(ky, (n,), 0, classes)
    return Dataset(np.asarray(x, np.float32), np.asarray(y, np.int32), classes)


def _perturb(key, params, scale):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def _init(model, key, d):
    return model.init(key, jnp.zeros((1, d)))["params"]


def test_forward_matches_model_and_summary_matches_numpy():
    d = 6
    model = models.MLP(hidden_sizes=(5, 4), num_outputs=3)
    p0 = _init(model, jax.random.key(0), d)
    train = _gaussian_data(jax.random.key(1), n=53)
    layers = fsd.mlp_layers(p0, (d, 5, 4, 3))
    out, pre = fsd.network.forward(layers, jnp.asarray(train.inputs))
    np.testing.assert_allclose(out, model.apply({"params": p0}, train.inputs), atol=1e-5)
    # Chunked one-pass summary (batch 7: padded last chunk) = dense numpy oracle, per class.
    s = fsd.summarize(model, p0, train, per_class=True, batch_size=7)
    x, y = train.inputs.astype(np.float64), train.targets
    for k in range(3):
        xk = x[y == k]
        np.testing.assert_allclose(s.weights[k], len(xk) / len(x), rtol=1e-6)
        np.testing.assert_allclose(s.mean[k], xk.mean(0), atol=1e-5)
        np.testing.assert_allclose(s.cov[k], np.cov(xk.T, bias=True), atol=1e-4)
        for i in range(2):
            np.testing.assert_allclose(s.rates[i][k], (np.asarray(pre[i])[y == k] > 0).mean(0),
                                       atol=1e-6)
    assert s.num_stored() == 3 * (5 + 4 + d + d * (d + 1) // 2 + 1)


def test_linear_network_is_exact():
    """No hidden layer, or ReLU units that are always on: the moment variant is the true FSD."""
    d = 6
    train = _gaussian_data(jax.random.key(2))
    x = jnp.asarray(train.inputs)
    for hidden, bias in (((), 0.0), ((8, 5), 50.0)):
        model = models.MLP(hidden_sizes=hidden, num_outputs=3)
        p0 = _init(model, jax.random.key(3), d)
        # Large positive biases keep every unit active on the data (mu = 1: a linear network).
        p0 = {k: {"kernel": v["kernel"], "bias": v["bias"] + (bias if k != f"Dense_{len(hidden)}"
                                                               else 0.0)}
              for k, v in p0.items()}
        p1 = _perturb(jax.random.key(4), p0, 0.3)
        for per_class in ((False, True) if not hidden else (True,)):
            s = fsd.summarize(model, p0, train, per_class=per_class)
            if hidden:
                assert all(float(jnp.min(r)) == 1.0 for r in s.rates)
            truth = fsd.true_fsd(fsd.HeadApply(model), p0, p1, x)
            # Chunked evaluation (lax.map over chunks of 7, remainder added) is the same mean.
            np.testing.assert_allclose(
                fsd.true_fsd(fsd.HeadApply(model), p0, p1, x, batch_size=7), truth, rtol=1e-5)
            est = fsd.laftr_fsd(s, p0, p1, variant="moment")
            np.testing.assert_allclose(est, truth, rtol=2e-4)
            # The single-layer K-FAC quadratic with the squared error is exact too (G = A (x) I).
    model = models.MLP(hidden_sizes=(), num_outputs=3)
    p0 = _init(model, jax.random.key(3), d)
    p1 = _perturb(jax.random.key(4), p0, 0.3)
    kfac = fsd.fit_quadratic(model, p0, train, strategy="kfac", distance="sq")
    np.testing.assert_allclose(fsd.quadratic_fsd(kfac, p0, p1),
                               fsd.true_fsd(fsd.HeadApply(model), p0, p1, x), rtol=1e-4)


def test_deterministic_equals_true_fsd_when_gates_do_not_flip():
    d = 6
    train = _gaussian_data(jax.random.key(5))
    x = jnp.asarray(train.inputs)
    model = models.MLP(hidden_sizes=(16,), num_outputs=3)
    p0 = _init(model, jax.random.key(6), d)
    s = fsd.summarize(model, p0, train)
    pre0 = x @ p0["Dense_0"]["kernel"] + p0["Dense_0"]["bias"]
    margin = float(jnp.min(jnp.abs(pre0)))
    for flips_expected in (False, True):
        p1 = _perturb(jax.random.key(7), p0, 0.3)
        hidden = _perturb(jax.random.key(8), p0["Dense_0"], 1.0)
        change = x @ (hidden["kernel"] - p0["Dense_0"]["kernel"]) + hidden["bias"] - p0[
            "Dense_0"]["bias"]
        # Without flips: the hidden change is scaled to half the smallest |pre-activation|.
        factor = 0.5 * margin / float(jnp.max(jnp.abs(change))) if not flips_expected else 0.5
        p1["Dense_0"] = jax.tree.map(lambda a, b: a + factor * (b - a), p0["Dense_0"], hidden)
        pre1 = x @ p1["Dense_0"]["kernel"] + p1["Dense_0"]["bias"]
        flips = bool(jnp.any((pre0 > 0) != (pre1 > 0)))
        assert flips == flips_expected
        for distance in ("sq", "kl"):
            truth = fsd.true_fsd(fsd.HeadApply(model), p0, p1, x, distance=distance)
            det = fsd.laftr_fsd(s, p0, p1, variant="deterministic", distance=distance, inputs=x)
            if flips:
                assert abs(float(det) / float(truth) - 1) > 1e-2
            else:
                np.testing.assert_allclose(det, truth, rtol=1e-4)


def test_moment_variant_is_the_expectation_of_the_bernoulli_estimator():
    """Two hidden layers, per class: closed form vs Monte Carlo mean (fixed keys, 4 s.e.)."""
    d = 6
    train = _gaussian_data(jax.random.key(8), shift=0.3)
    model = models.MLP(hidden_sizes=(7, 5), num_outputs=3)
    p0 = _init(model, jax.random.key(9), d)
    p1 = _perturb(jax.random.key(10), p0, 0.2)
    s = fsd.summarize(model, p0, train, per_class=True)
    est = jax.jit(lambda k: fsd.laftr_fsd(s, p0, p1, variant="bernoulli", key=k,
                                          num_samples=4000))
    draws = np.array([float(est(k)) for k in jax.random.split(jax.random.key(11), 16)])
    moment = float(fsd.laftr_fsd(s, p0, p1, variant="moment"))
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert abs(draws.mean() - moment) < 4 * se + 1e-6, (draws.mean(), moment, se)
    assert se < 0.02 * moment  # the check has power against a few-percent bug
    # KL: the moment variant is its second-order expansion; small perturbations agree.
    p_small = _perturb(jax.random.key(12), p0, 0.01)
    kl_moment = float(fsd.laftr_fsd(s, p0, p_small, variant="moment", distance="kl"))
    truth = float(fsd.true_fsd(fsd.HeadApply(model), p0, p_small, train.inputs, distance="kl"))
    sq = float(fsd.laftr_fsd(s, p0, p_small, variant="moment", distance="sq"))
    assert 0.3 < kl_moment / truth < 3.0 and abs(kl_moment - sq) > 0.1 * kl_moment


def test_diagonal_quadratic_matches_dense_ggn_diagonal():
    d = 6
    train = _gaussian_data(jax.random.key(13), n=40)
    model = models.MLP(hidden_sizes=(4,), num_outputs=3)
    p0 = _init(model, jax.random.key(14), d)
    p1 = _perturb(jax.random.key(15), p0, 0.1)
    flat0, unravel = jax.flatten_util.ravel_pytree(p0)
    delta = jax.flatten_util.ravel_pytree(p1)[0] - flat0
    jac = jax.vmap(lambda x: jax.jacobian(lambda f: model.apply({"params": unravel(f)},
                                                                 x[None])[0])(flat0))(
        jnp.asarray(train.inputs))  # [n, C, P]
    logits = model.apply({"params": p0}, train.inputs)
    for distance, hess in (("sq", jnp.broadcast_to(jnp.eye(3), (40, 3, 3))),
                           ("kl", fsd.softmax_hessian(logits))):
        ggn_diag = jnp.einsum("ncp,ncd,ndp->p", jac, hess, jac) / 40
        diag = fsd.fit_quadratic(model, p0, train, strategy="diagonal", distance=distance)
        np.testing.assert_allclose(fsd.quadratic_fsd(diag, p0, p1),
                                   0.5 * jnp.sum(ggn_diag * delta ** 2), rtol=1e-4)


@pytest.fixture(scope="module")
def trained_mlp():
    train, _ = data.load_mnist1d(600, 10)
    model = models.MLP(hidden_sizes=(32, 32), num_outputs=10)
    config = training.TrainConfig(num_epochs=15, batch_size=100, learning_rate=3e-3)
    params = training.train(jax.random.key(0), model, None, train, config)["params"]
    return model, params, train


def test_spearman_on_random_perturbations_of_a_trained_mlp(trained_mlp):
    """Random perturbations (sizes over one decade) spread differently over the layers."""
    model, p0, train = trained_mlp
    s = fsd.summarize(model, p0, train, per_class=True)
    diag = fsd.fit_quadratic(model, p0, train, strategy="diagonal")
    names = sorted(p0)
    true = jax.jit(lambda p1: fsd.true_fsd(fsd.HeadApply(model), p0, p1, train.inputs))
    approx = jax.jit(lambda p1: fsd.laftr_fsd(s, p0, p1))
    quadratic = jax.jit(lambda p1: fsd.quadratic_fsd(diag, p0, p1))
    truth, laftr, ewc = [], [], []
    rng = np.random.default_rng(0)
    for i in range(24):
        weights = rng.dirichlet(np.ones(len(names)))
        scale = 10 ** rng.uniform(-2, -1)
        key = jax.random.key(100 + i)
        p1 = {}
        for name, w, k in zip(names, weights, jax.random.split(key, len(names))):
            p1[name] = _perturb(k, p0[name], scale * float(np.sqrt(w)))
        truth.append(float(true(p1)))
        laftr.append(float(approx(p1)))
        ewc.append(float(quadratic(p1)))
    rho_laftr = spearmanr(laftr, truth)[0]
    rho_ewc = spearmanr(ewc, truth)[0]
    assert rho_laftr >= 0.9 and rho_laftr > rho_ewc, (rho_laftr, rho_ewc)


def test_bad_inputs_are_named():
    d = 6
    train = _gaussian_data(jax.random.key(16), n=20)
    model = models.MLP(hidden_sizes=(4,), num_outputs=3)
    p0 = _init(model, jax.random.key(17), d)
    with pytest.raises(ValueError, match="supported activations: relu.*'tanh'"):
        fsd.summarize(models.MLP(hidden_sizes=(4,), num_outputs=3, activation=nn.tanh), p0, train)
    with pytest.raises(TypeError, match="MLP"):
        fsd.summarize(models.CNN1D(num_outputs=3), p0, train)
    s = fsd.summarize(model, p0, train)
    other = _init(models.MLP(hidden_sizes=(4, 4), num_outputs=3), jax.random.key(0), d)
    with pytest.raises(ValueError, match="another architecture"):
        fsd.laftr_fsd(s, p0, other)
    wide = _init(models.MLP(hidden_sizes=(4,), num_outputs=3), jax.random.key(0), d + 2)
    with pytest.raises(ValueError, match=r"params1\['Dense_0'\].*input dimension"):
        fsd.laftr_fsd(s, p0, wide)
    with pytest.raises(ValueError, match="inputs have 8 features"):
        fsd.laftr_fsd(s, p0, p0, variant="deterministic", inputs=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="variant"):
        fsd.laftr_fsd(s, p0, p0, variant="mc")
    with pytest.raises(ValueError, match="key="):
        fsd.laftr_fsd(s, p0, p0, variant="bernoulli")
    with pytest.raises(ValueError, match="distance"):
        fsd.laftr_fsd(s, p0, p0, distance="l1")


def test_laftr_hessian_and_pbrf_scores_match_dense_oracles():
    """No hidden layer + "sq": the LAFTR Hessian is the exact GGN J^T J of the data; PBRF scores
    are -grad m^T (H + lambda I)^{-1} grad L with lambda = 0.1 tr(H) / P."""
    from jax.flatten_util import ravel_pytree

    from tda_jax import losses
    d = 6
    train = _gaussian_data(jax.random.key(18), n=30)
    model = models.MLP(hidden_sizes=(), num_outputs=3)
    p0 = _init(model, jax.random.key(19), d)
    s = fsd.summarize(model, p0, train)
    hess = fsd.laftr_hessian(s, p0, distance="sq", chunk=8)
    flat, unravel = ravel_pytree(p0)
    f = lambda v, x: model.apply({"params": unravel(v)}, x)  # noqa: E731
    jac = jax.vmap(lambda x: jax.jacobian(lambda v: f(v, x[None])[0])(flat))(
        jnp.asarray(train.inputs))
    np.testing.assert_allclose(hess, jnp.einsum("ncp,ncq->pq", jac, jac) / 30, atol=1e-4)
    ce = losses.softmax_cross_entropy()
    queries = Dataset(train.inputs[:4], train.targets[:4], 3)
    scores = fsd.pbrf_scores(fsd.HeadApply(model), p0, hess, queries, train, loss=ce,
                             measurement=losses.classification_margin)
    gq = jax.vmap(lambda x, y: jax.grad(lambda v: losses.classification_margin(
        f(v, x[None]), y[None])[0])(flat))(jnp.asarray(queries.inputs), queries.targets)
    gt = jax.vmap(lambda x, y: jax.grad(lambda v: ce.per_example(f(v, x[None]), y[None])[0])(
        flat))(jnp.asarray(train.inputs), train.targets)
    h = np.asarray(hess, np.float64)
    damped = h + 0.1 * np.trace(h) / h.shape[0] * np.eye(h.shape[0])
    expected = -np.asarray(gq, np.float64) @ np.linalg.solve(damped, np.asarray(gt, np.float64).T)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-5)
    self_inf = fsd.pbrf_self_influence(fsd.HeadApply(model), p0, hess, train, loss=ce)
    gt64 = np.asarray(gt, np.float64)
    np.testing.assert_allclose(self_inf, np.sum(gt64 * np.linalg.solve(damped, gt64.T).T, 1),
                               rtol=1e-3)
