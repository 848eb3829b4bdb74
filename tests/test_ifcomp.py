"""IF-COMP (tda_jax.complexity) against oracles.

* The output-space kernel ``K(x) = J (G + lambda I)^{-1} J^T`` equals the dense computation with
  ``jax.jacobian`` and the curvature's own dense matrix (EK-FAC and exact, MLP and a conv model
  whose layers see several positions).
* Linear model with squared loss: ``K`` has the closed form ``a^T (A + lambda)^{-1} a I`` and the
  linearized response is the exact minimiser's response (closed form) to first order in ``eps``;
  the exact response is ``-eps K (I + eps K)^{-1} r`` for any ``eps``.
* Brute force: on a tiny MLP every (test point, label) proximal objective is minimised with the
  optax loop; IF-COMP's complexity has Spearman >= 0.8 with the brute-force one.
* Bad input: temperature/epsilon <= 0, label sets that do not match the outputs, regression.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import oracles
import pytest
from scipy.stats import spearmanr

from tda_jax import attribution, losses, models, training
from tda_jax.complexity import (
    brute_force_pnml,
    ifcomp,
    labelled_complexity,
    linearized_response,
    output_kernels,
    pnml_from_kernels,
)
from tda_jax.data import Dataset

NUM_CLASSES = 3


def _blobs(num: int, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    centers = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], np.float32)
    labels = rng.integers(0, NUM_CLASSES, num).astype(np.int32)
    inputs = (centers[labels] + scale * rng.normal(size=(num, 2))).astype(np.float32)
    return inputs, labels


@pytest.fixture(scope="module")
def tiny_classifier():
    """A tanh MLP (2 -> 8 -> 3) trained to convergence on 60 points of three blobs."""
    inputs, labels = _blobs(60, seed=0)
    train = Dataset(inputs, labels, NUM_CLASSES)
    model = models.MLP(hidden_sizes=(8,), num_outputs=NUM_CLASSES, activation=jnp.tanh)
    config = training.TrainConfig(num_epochs=200, batch_size=60, learning_rate=3e-2,
                                  weight_decay=0.0)
    variables = training.train(jax.random.key(0), model, None, train, config)
    test = (1.8 * np.random.default_rng(1).normal(size=(20, 2))).astype(np.float32)
    return models.apply_fn_of(model), variables["params"], train, test


def _dense_kernels(apply_fn, params, curvature, inputs):
    """``J (C_damped)^{-1} J^T`` with ``J`` from ``jax.jacobian`` on the flat matrix-view params."""
    specs = curvature.specs
    theta = oracles.flatten(params, specs)
    damped = np.asarray(curvature.to_dense(damped=True), np.float64)

    def outputs(vec, x):
        return apply_fn(oracles.unflatten(vec, params, specs), x[None])[0]

    jac = np.asarray(jax.vmap(jax.jacobian(outputs), in_axes=(None, 0))(theta, jnp.asarray(inputs)),
                     np.float64)  # [N, C, P]
    solved = np.linalg.solve(damped, np.transpose(jac, (2, 0, 1)).reshape(damped.shape[0], -1))
    solved = solved.reshape(damped.shape[0], jac.shape[0], jac.shape[1])
    return np.einsum("ncp,pnd->ncd", jac, solved)


@pytest.mark.parametrize("strategy", ["ekfac", "exact"])
def test_kernel_matches_dense_oracle_on_mlp(tiny_classifier, strategy):
    apply_fn, params, train, test = tiny_classifier
    curvature = attribution.fit_curvature(apply_fn, params, train, strategy=strategy,
                                          loss=losses.softmax_cross_entropy(), damping=0.3)
    # batch_size 8 over 20 points: the last batch is padded.
    logits, kernels = output_kernels(apply_fn, params, curvature, test, batch_size=8)
    expected = _dense_kernels(apply_fn, params, curvature, test)
    np.testing.assert_allclose(logits, np.asarray(apply_fn(params, jnp.asarray(test))), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(kernels, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    np.testing.assert_allclose(kernels, np.swapaxes(kernels, 1, 2), atol=1e-3 * np.abs(kernels).max())


def test_kernel_matches_dense_oracle_with_positions():
    """A conv layer shared over 6 positions: per-position a, g summed before preconditioning."""
    problem = oracles.make_problem("conv")
    curvature = attribution.fit_curvature(problem.apply_fn, problem.params, problem.train,
                                          strategy="ekfac", loss=problem.loss, damping=0.1)
    _, kernels = output_kernels(problem.apply_fn, problem.params, curvature, problem.queries)
    expected = _dense_kernels(problem.apply_fn, problem.params, curvature, problem.queries.inputs)
    np.testing.assert_allclose(kernels, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_pnml_from_kernels_follows_the_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4)).astype(np.float32) * 2
    roots = rng.normal(size=(5, 4, 4)).astype(np.float32)
    kernels = np.einsum("ncd,ned->nce", roots, roots)
    eps, temperature = 0.3, 1.7
    result = pnml_from_kernels(logits, kernels, temperature=temperature, epsilon=eps)
    for n in range(5):
        z = np.exp(logits[n] / temperature - np.max(logits[n] / temperature))
        boltzmann = z / z.sum()
        for y in range(4):
            shifted = logits[n] - eps * kernels[n] @ ((boltzmann - np.eye(4)[y]) / temperature)
            p = np.exp(shifted - shifted.max())
            assert result.hindsight[n, y] == pytest.approx(p[y] / p.sum(), rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(result.complexity, np.log(result.hindsight.sum(1)), rtol=1e-5)
    np.testing.assert_allclose(result.pnml.sum(1), 1.0, rtol=1e-5)
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # Without a response (K = 0) the pNML is the softmax and the complexity zero.
    still = pnml_from_kernels(logits, 0 * kernels, temperature=temperature, epsilon=eps)
    np.testing.assert_allclose(still.pnml, softmax, rtol=1e-5)
    np.testing.assert_allclose(still.complexity, 0.0, atol=1e-6)
    # A label subset normalizes over those labels only.
    sub = pnml_from_kernels(logits, kernels, temperature=temperature, epsilon=eps, labels=[3, 1])
    np.testing.assert_allclose(sub.hindsight, result.hindsight[:, [3, 1]], rtol=1e-6)
    np.testing.assert_allclose(sub.complexity, np.log(result.hindsight[:, [3, 1]].sum(1)),
                               rtol=1e-5)
    observed = np.array([0, 1, 2, 3, 0])
    np.testing.assert_allclose(labelled_complexity(result, observed),
                               -np.log(result.pnml[np.arange(5), observed]), rtol=1e-5)


def test_linear_model_with_squared_loss_matches_closed_form():
    """f(x) = W^T x + b: G = A (x) I with A = mean a a^T (a = [x, 1]), exactly what EK-FAC fits."""
    rng = np.random.default_rng(3)
    num, dim, out = 40, 3, 2
    inputs = rng.normal(size=(num, dim)).astype(np.float32)
    targets = rng.normal(size=(num, out)).astype(np.float32)
    train = Dataset(inputs, targets, None)
    model = models.MLP(hidden_sizes=(), num_outputs=out)
    params = model.init(jax.random.key(1), jnp.asarray(inputs[:1]))["params"]
    apply_fn = models.apply_fn_of(model)
    damping = 0.2
    curvature = attribution.fit_curvature(apply_fn, params, train, strategy="ekfac",
                                          loss=losses.mean_squared_error(), damping=damping)
    test_x = rng.normal(size=(6, dim)).astype(np.float32)
    test_y = rng.normal(size=(6, out)).astype(np.float32)
    logits, kernels = output_kernels(apply_fn, params, curvature, test_x)

    a_train = np.concatenate([inputs, np.ones((num, 1), np.float32)], 1).astype(np.float64)
    a_test = np.concatenate([test_x, np.ones((6, 1), np.float32)], 1).astype(np.float64)
    second = a_train.T @ a_train / num + damping * np.eye(dim + 1)
    scalar = np.einsum("ni,ij,nj->n", a_test, np.linalg.inv(second), a_test)
    np.testing.assert_allclose(kernels, scalar[:, None, None] * np.eye(out), rtol=1e-4, atol=1e-5)

    # Exact minimiser of (1/N) sum 0.5||f(x_i) - f_s(x_i)||^2 + eps 0.5||f(x) - y||^2
    # + lambda/2 ||theta - theta_s||^2, in parameter space (theta = vec([W; b]), row-major).
    residual = logits.astype(np.float64) - test_y  # grad_f of the squared loss at f_s
    gram = np.kron(second - damping * np.eye(dim + 1), np.eye(out))
    for n in range(6):
        jac = np.kron(a_test[n][None, :], np.eye(out))  # [out, (dim + 1) out]
        for eps in (1e-4, 0.5):
            hessian = gram + damping * np.eye(gram.shape[0]) + eps * jac.T @ jac
            exact = jac @ np.linalg.solve(hessian, -eps * jac.T @ residual[n])
            linear = np.asarray(linearized_response(kernels[n][None], residual[n][None], eps))[0]
            woodbury = -eps * kernels[n] @ np.linalg.solve(np.eye(out) + eps * kernels[n],
                                                           residual[n])
            np.testing.assert_allclose(woodbury, exact, rtol=1e-4, atol=1e-7)
            if eps < 1e-3:  # first order in eps: the linearized response is the exact one
                np.testing.assert_allclose(linear, exact, rtol=1e-3, atol=1e-9)


@pytest.mark.slow
def test_spearman_against_brute_force_pnml(tiny_classifier):
    apply_fn, params, train, test = tiny_classifier
    damping, eps, temperature = 1.0, 0.05, 2.0
    curvature = attribution.fit_curvature(apply_fn, params, train, strategy="ekfac",
                                          loss=losses.softmax_cross_entropy(), damping=damping)
    approx = ifcomp(apply_fn, params, curvature, test, temperature=temperature, epsilon=eps,
                    loss=losses.softmax_cross_entropy())
    exact, grad_norms = brute_force_pnml(apply_fn, params, train.inputs, test,
                                         temperature=temperature, epsilon=eps, damping=damping,
                                         num_steps=300, learning_rate=5e-2)
    assert grad_norms.max() < 1e-4  # every refit converged
    assert np.ptp(exact.complexity) > 0.05  # the points differ
    rho = spearmanr(approx.complexity, exact.complexity)[0]
    assert rho >= 0.8, rho
    # Per (point, label) hindsight probabilities agree too.
    assert spearmanr(approx.hindsight.ravel(), exact.hindsight.ravel())[0] >= 0.9


def test_bad_input_is_refused(tiny_classifier):
    apply_fn, params, train, test = tiny_classifier
    curvature = attribution.fit_curvature(apply_fn, params, train, strategy="ekfac",
                                          loss=losses.softmax_cross_entropy(), damping=1.0)

    def run(**kwargs):
        options = {"temperature": 1.0, "epsilon": 0.1, **kwargs}
        data = options.pop("data", test)
        return ifcomp(apply_fn, params, curvature, data, **options)

    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            run(temperature=temperature)
    with pytest.raises(TypeError, match="temperature"):
        run(temperature="hot")
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        run(epsilon=0.0)
    with pytest.raises(ValueError, match=r"labels\[1\] = 3 is not a class .* 3 classes"):
        run(labels=[0, 3])
    with pytest.raises(ValueError, match="repeats the class"):
        run(labels=[1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        run(labels=[])
    with pytest.raises(ValueError, match="integer class indices"):
        run(labels=[0.0, 1.0])
    with pytest.raises(ValueError, match="num_classes=10 but the model has 3 outputs"):
        run(data=Dataset(test, np.zeros(len(test), np.int32), 10))
    with pytest.raises(ValueError, match="regression targets"):
        run(data=Dataset(test, np.zeros((len(test), 3), np.float32), None))
    with pytest.raises(ValueError, match="squared_error.*regression model has no finite label"):
        run(loss=losses.mean_squared_error())
    result = run()
    with pytest.raises(ValueError, match=r"observed\[0\] = 5 is not one of the candidate labels"):
        labelled_complexity(result, np.full(len(test), 5))
    with pytest.raises(ValueError, match="observed must be"):
        labelled_complexity(result, np.zeros(3, np.int32))
