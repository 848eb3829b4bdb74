"""Curvature blocks and influence scores against dense oracles on multi-position layers.

Models (see ``tests/oracles.py``): ``conv`` (a convolution shared over 6 positions), ``token``
(embeddings and a per-token dense layer over 3 tokens, a DenseGeneral head) and ``reused_layer``
(one dense layer called twice). Every block's ``to_dense`` is checked against a GGN built with
``jax.jacobian``/``jax.hessian`` (exact, diagonal, EK-FAC's lambda) or against Kronecker factors
built from a hand-written forward pass (K-FAC); scores are checked against a dense solve with
gradients from ``jax.grad``, in both contraction orders. ``sum_dense`` pins K-FAC's position
conventions with numbers that can be written on paper.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import (
    block_diagonal,
    dense_ggn,
    flatten,
    influence_oracle,
    kronecker_factors,
    layer_offsets,
    make_problem,
    model_specs,
    per_example_grads,
    reference_layer_grads,
    reference_outputs,
    unflatten,
)

from tda_jax.attribution import fit_curvature, pairwise_scores, self_scores
from tda_jax.losses import classification_margin

PROBLEMS = ("conv", "token", "reused_layer")
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac", "exact")
# Largest GGN eigenvalues of the three models are ~1, mean diagonal ~0.04-0.09: a damping of 1e-2
# keeps (F + damping) conditioned to ~1e2, so float32 scores agree with float64 solves to ~1e-5.
DAMPING = 1e-2
BATCH = 16  # 20 training examples: two batches, the second one padded.


@functools.cache
def _problem(name):
    problem = make_problem(name)
    return problem, model_specs(problem)


@functools.cache
def _ggn(name):
    problem, specs = _problem(name)
    return dense_ggn(problem, specs)


@functools.cache
def _fit(name, strategy):
    problem, specs = _problem(name)
    curvature = fit_curvature(problem.apply_fn, problem.params, problem.train, strategy=strategy,
                              loss=problem.loss, damping=None if strategy == "identity" else DAMPING,
                              batch_size=BATCH)
    assert [s.name for s in curvature.specs] == [s.name for s in specs]
    return curvature


@functools.cache
def _kronecker(name):
    problem, specs = _problem(name)
    return kronecker_factors(problem, specs)


@functools.cache
def _gradients(name):
    problem, specs = _problem(name)
    return (per_example_grads(problem, specs, classification_margin, problem.queries),
            per_example_grads(problem, specs, problem.loss.per_example, problem.train))


def _dense(curvature, damped=False):
    return np.asarray(curvature.to_dense(damped=damped), np.float64)


def _close(got, expected, rtol=1e-4, err_msg=""):
    """Entrywise within ``rtol`` of the largest entry (float32 against float64 oracles)."""
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol,
                               atol=rtol * np.abs(expected).max(), err_msg=err_msg)


# --- the oracles agree with each other and with the model ------------------------------------


@pytest.mark.parametrize("name", PROBLEMS)
def test_reference_forward_and_flat_order_match_the_model(name):
    problem, specs = _problem(name)
    assert sum(s.num_params for s in specs) == sum(np.size(v) for v in
                                                   _leaves(problem.params)) <= 400
    outputs = np.asarray(problem.apply_fn(problem.params, jnp.asarray(problem.train.inputs)))
    _close(reference_outputs(problem, specs, problem.train), outputs, rtol=1e-5)
    theta = flatten(problem.params, specs)
    for a, b in zip(_leaves(unflatten(theta, problem.params, specs)), _leaves(problem.params)):
        np.testing.assert_array_equal(a, b)
    # Per-example gradients in the flat order: jax.grad through the Flax model == sum_t a_t g_t^T
    # from the hand-written forward (so the order of the matrix view is the one the oracles use).
    _close(reference_layer_grads(problem, specs, problem.loss.per_example, problem.train),
           _gradients(name)[1], rtol=1e-5)


def _leaves(tree):
    return jax.tree.leaves(tree)


# --- to_dense of every block against the oracles -----------------------------------------------


@pytest.mark.parametrize("name", PROBLEMS)
def test_exact_block_is_the_dense_ggn(name):
    curvature, ggn = _fit(name, "exact"), _ggn(name)
    _close(_dense(curvature), ggn)
    _close(_dense(curvature, damped=True), ggn + DAMPING * np.eye(len(ggn)))


@pytest.mark.parametrize("name", PROBLEMS)
def test_identity_block_is_the_identity_preconditioner(name):
    curvature, size = _fit(name, "identity"), len(_ggn(name))
    np.testing.assert_array_equal(_dense(curvature), np.zeros((size, size)))
    np.testing.assert_array_equal(_dense(curvature, damped=True), np.eye(size))


@pytest.mark.parametrize("name", PROBLEMS)
def test_diagonal_block_is_the_ggn_diagonal(name):
    # diag(E[sum_k DW_k^2]) with DW_k = sum_t a_t g_kt^T is diag(GGN) exactly: positions are summed
    # before squaring.
    curvature, ggn = _fit(name, "diagonal"), _ggn(name)
    _close(_dense(curvature), np.diag(np.diag(ggn)))
    _close(_dense(curvature, damped=True), np.diag(np.diag(ggn) + DAMPING))


@pytest.mark.parametrize("name", PROBLEMS)
def test_ekfac_lambda_is_the_ggn_diagonal_in_the_kronecker_eigenbasis(name):
    problem, specs = _problem(name)
    curvature, ggn = _fit(name, "ekfac"), _ggn(name)
    kfac = _kronecker(name)
    offsets = layer_offsets(specs)
    blocks = []
    for s in specs:
        f = curvature.factors[s.name]
        qa, qg = np.asarray(f["eigvecs_A"], np.float64), np.asarray(f["eigvecs_G"], np.float64)
        # The eigenbasis is K-FAC's: it diagonalises the oracle's A and G.
        for q, m in ((qa, kfac[s.name][0]), (qg, kfac[s.name][1])):
            rotated = q.T @ m @ q
            np.testing.assert_allclose(rotated - np.diag(np.diag(rotated)), 0.0,
                                       atol=1e-5 * np.abs(m).max(),
                                       err_msg=f"{name}/{s.name}: eigenbasis")
        basis = np.kron(qa, qg)  # vec(W) row-major: index i * out + o
        block = ggn[offsets[s.name], offsets[s.name]]
        expected = np.einsum("pi,pq,qi->i", basis, block, basis)
        _close(np.asarray(f["lambda"]).ravel(), expected, err_msg=f"{name}/{s.name}")
        blocks.append(basis @ np.diag(expected) @ basis.T)
    _close(_dense(curvature), block_diagonal(blocks))


@pytest.mark.parametrize("name", PROBLEMS)
def test_kfac_block_is_kron_of_position_averaged_a_and_position_summed_g(name):
    problem, specs = _problem(name)
    curvature = _fit(name, "kfac")
    factors = _kronecker(name)
    blocks = []
    for s in specs:
        f = curvature.factors[s.name]
        a = (f["eigvecs_A"] * f["eigvals_A"]) @ f["eigvecs_A"].T
        g = (f["eigvecs_G"] * f["eigvals_G"]) @ f["eigvecs_G"].T
        _close(a, factors[s.name][0], err_msg=f"{name}/{s.name}: A")
        _close(g, factors[s.name][1], err_msg=f"{name}/{s.name}: G")
        blocks.append(np.kron(*factors[s.name]))
    dense = block_diagonal(blocks)
    _close(_dense(curvature), dense)
    _close(_dense(curvature, damped=True), dense + DAMPING * np.eye(len(dense)))


def test_kfac_averages_a_and_sums_g_over_positions_by_hand():
    # outputs = sum_t (W^T a_t), T = 2, squared error: H = I, so each of the K = 2 expected-Fisher
    # cotangents e_k reaches every position unchanged (g_kt = e_k). Hence
    #   G = E[sum_k sum_t g_kt g_kt^T] = T * I = 2 I      (summed over positions, not averaged)
    #   A = E[mean_t a_t a_t^T]                           (averaged over positions, not summed)
    # and, unlike K-FAC, the GGN is E[(sum_t a_t)(sum_t a_t)^T] (x) I.
    problem, specs = _problem("sum_dense")
    curvature = fit_curvature(problem.apply_fn, problem.params, problem.train, strategy="kfac",
                              loss=problem.loss, damping=DAMPING, batch_size=BATCH)
    x = np.asarray(problem.train.inputs, np.float64)
    a_t = np.concatenate([x, np.ones((*x.shape[:2], 1))], axis=-1)  # [N, T=2, 4]
    big_a = np.einsum("nti,ntj->ij", a_t, a_t) / (len(x) * 2)
    big_g = 2.0 * np.eye(2)
    f = curvature.factors["dense"]
    np.testing.assert_allclose((f["eigvecs_A"] * f["eigvals_A"]) @ f["eigvecs_A"].T, big_a,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((f["eigvecs_G"] * f["eigvals_G"]) @ f["eigvecs_G"].T, big_g,
                               rtol=1e-5, atol=1e-6)
    _close(_dense(curvature), np.kron(big_a, big_g), rtol=1e-5)
    oracle_a, oracle_g = kronecker_factors(problem, specs)["dense"]
    _close(oracle_a, big_a, rtol=1e-6)
    _close(oracle_g, big_g, rtol=1e-6)
    summed = np.einsum("nti,nsj->ij", a_t, a_t) / len(x)
    _close(dense_ggn(problem, specs), np.kron(summed, np.eye(2)), rtol=1e-5)


# --- scores against a dense solve ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["factored", "materialized"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", PROBLEMS)
def test_pairwise_scores_match_a_dense_solve(name, strategy, path):
    problem, _ = _problem(name)
    curvature = _fit(name, strategy)
    query_grads, train_grads = _gradients(name)
    expected, _ = influence_oracle(_dense(curvature, damped=True), query_grads, train_grads)
    got = pairwise_scores(problem.apply_fn, problem.params, curvature, problem.queries,
                          problem.train, loss=problem.loss, measurement=classification_margin,
                          query_batch_size=4, train_batch_size=BATCH,
                          max_gradient_bytes=0 if path == "factored" else 2**30)
    assert got.shape == expected.shape
    _close(got, expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", PROBLEMS)
def test_self_scores_match_a_dense_solve(name, strategy):
    problem, _ = _problem(name)
    curvature = _fit(name, strategy)
    _, train_grads = _gradients(name)
    _, expected = influence_oracle(_dense(curvature, damped=True), train_grads, train_grads)
    got = self_scores(problem.apply_fn, problem.params, curvature, problem.train,
                      loss=problem.loss, batch_size=BATCH)
    _close(got, expected)
