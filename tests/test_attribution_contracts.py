"""Contracts of the attribution drivers: bad input found as a new user would, compiled steps,
Curvature as a pytree, and adding a curvature block in one file."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import monitoring

from tda_jax.attribution import (
    build_score_steps,
    fit_curvature,
    pairwise_scores,
    query_gradients,
    self_scores,
)
from tda_jax.curvature import Curvature, LayerwiseBlock, register_block
from tda_jax.curvature.blocks import get_block
from tda_jax.data import Dataset
from tda_jax.losses import (
    classification_margin,
    mean_squared_error,
    negative_loss,
    softmax_cross_entropy,
)


class _MLP(nn.Module):
    outputs: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.outputs)(nn.tanh(nn.Dense(5)(x)))


def _problem(n=24, outputs=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, outputs, size=n).astype(np.int32)
    model = _MLP(outputs)
    params = model.init(jax.random.key(seed), x[:1])["params"]
    return model, params, Dataset(x, y, outputs)


def _apply(model):
    return lambda p, x: model.apply({"params": p}, x)


LOSS = softmax_cross_entropy()


@pytest.mark.parametrize("bad_label", [3, -1])
def test_out_of_range_labels_are_refused_in_fitting_and_scoring(bad_label):
    model, params, train = _problem()
    targets = train.targets.copy()
    targets[5] = bad_label
    bad = Dataset(train.inputs, targets, 3)
    with pytest.raises(ValueError, match=rf"row 5: {bad_label}"):
        fit_curvature(_apply(model), params, bad, strategy="diagonal", loss=LOSS)
    curvature = fit_curvature(_apply(model), params, train, strategy="diagonal", loss=LOSS)
    with pytest.raises(ValueError, match=r"train.targets .*row 5"):
        pairwise_scores(_apply(model), params, curvature, train, bad, loss=LOSS,
                        measurement=classification_margin)
    with pytest.raises(ValueError, match=r"query.targets .*row 5"):
        pairwise_scores(_apply(model), params, curvature, bad, train, loss=LOSS,
                        measurement=classification_margin)
    with pytest.raises(ValueError, match=r"train.targets .*row 5"):
        self_scores(_apply(model), params, curvature, bad, loss=LOSS)


def test_num_classes_and_regression_targets_are_checked():
    model, params, train = _problem()
    with pytest.raises(ValueError, match="num_classes=10 but the model returns 3 outputs"):
        fit_curvature(_apply(model), params, Dataset(train.inputs, train.targets, 10),
                      strategy="kfac", loss=LOSS)
    floats = Dataset(train.inputs, train.targets.astype(np.float32), None)
    with pytest.raises(ValueError, match="integer class labels"):
        fit_curvature(_apply(model), params, floats, strategy="kfac", loss=LOSS)
    with pytest.raises(ValueError, match="3 outputs"):
        fit_curvature(_apply(model), params, Dataset(train.inputs, np.zeros((24, 2), np.float32),
                                                     None), strategy="kfac",
                      loss=mean_squared_error())


def test_uncalled_loss_factory_and_bad_damping_are_refused():
    model, params, train = _problem()
    with pytest.raises(TypeError, match=r"pass loss=softmax_cross_entropy\(\)"):
        fit_curvature(_apply(model), params, train, strategy="kfac", loss=softmax_cross_entropy)
    for damping in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="damping must be a finite float"):
            fit_curvature(_apply(model), params, train, strategy="ekfac", loss=LOSS, damping=damping)
    with pytest.raises(ValueError, match="identity.*damping"):
        fit_curvature(_apply(model), params, train, strategy="identity", loss=LOSS, damping=0.1)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac", "exact"])
def test_zero_damping_on_constant_features_names_a_singular_preconditioner(strategy):
    model, params, train = _problem()
    inputs = train.inputs.copy()
    inputs[:, 2] = 0.0  # a dead input feature: zero rows/eigenvalues in the first layer's curvature
    data = Dataset(inputs, train.targets, 3)
    with pytest.raises(ValueError, match="singular"):
        fit_curvature(_apply(model), params, data, strategy=strategy, loss=LOSS, damping=0.0)
    fitted = fit_curvature(_apply(model), params, data, strategy=strategy, loss=LOSS)  # default ok
    assert np.all(np.isfinite(self_scores(_apply(model), params, fitted, data, loss=LOSS)))


def test_curvature_of_another_model_is_refused_naming_the_layer():
    model, params, train = _problem()
    curvature = fit_curvature(_apply(model), params, train, strategy="ekfac", loss=LOSS)

    class Wider(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.tanh(nn.Dense(7)(x)))

    wider = Wider()
    wide_params = wider.init(jax.random.key(1), train.inputs[:1])["params"]
    with pytest.raises(ValueError, match=r"layer 'Dense_0'.*\[6, 3\].*\[8, 3\]"):
        pairwise_scores(_apply(wider), wide_params, curvature, train, train, loss=LOSS,
                        measurement=classification_margin)
    with pytest.raises(TypeError, match="curvature must be"):
        self_scores(_apply(model), params, {"not": "a curvature"}, train, loss=LOSS)


def test_nan_measurement_names_the_query_rows():
    model, params, train = _problem()
    curvature = fit_curvature(_apply(model), params, train, strategy="kfac", loss=LOSS)

    def log_of_negative(outputs, targets):
        return jnp.log(outputs[:, 0] - 1e9)  # NaN for every row; declares no target kind

    with pytest.raises(FloatingPointError, match="query batch holding examples 0..7"):
        pairwise_scores(_apply(model), params, curvature, train, train, loss=LOSS,
                        measurement=log_of_negative, query_batch_size=8)


def test_regression_measurement_accepts_real_targets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32)
    model = _MLP(2)
    params = model.init(jax.random.key(0), x[:1])["params"]
    data = Dataset(x, y, None)
    loss = mean_squared_error()
    curvature = fit_curvature(_apply(model), params, data, strategy="ekfac", loss=loss)
    scores = pairwise_scores(_apply(model), params, curvature, data, data, loss=loss,
                             measurement=negative_loss(loss))
    assert scores.shape == (16, 16) and np.all(np.isfinite(scores))


def _count_backend_compiles():
    events = []

    def listener(name, duration, **kwargs):
        if "backend_compile" in name:
            events.append(name)

    monitoring.register_event_duration_secs_listener(listener)
    return events, listener


def test_a_fresh_lambda_does_not_compile_twice():
    model, params, train = _problem(n=20)
    queries = Dataset(train.inputs[:4], train.targets[:4], 3)

    def run():
        apply_fn = lambda p, x: model.apply({"params": p}, x)  # a new function object each call
        curvature = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=LOSS,
                                  batch_size=8)
        return pairwise_scores(apply_fn, params, curvature, queries, train, loss=LOSS,
                               measurement=classification_margin, train_batch_size=8)

    first = run()
    events, listener = _count_backend_compiles()
    try:
        second = run()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    np.testing.assert_array_equal(first, second)
    assert events == [], f"the second call compiled {len(events)} program(s)"


def test_held_score_steps_and_curvature_through_jit():
    model, params, train = _problem(n=20)
    apply_fn = _apply(model)
    curvature = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=LOSS)
    steps = build_score_steps(apply_fn, "ekfac", curvature.specs, loss=LOSS,
                              measurement=classification_margin)
    held = pairwise_scores(apply_fn, params, curvature, train, train, loss=LOSS,
                           measurement=classification_margin, steps=steps)
    fresh = pairwise_scores(apply_fn, params, curvature, train, train, loss=LOSS,
                            measurement=classification_margin)
    np.testing.assert_array_equal(held, fresh)

    @jax.jit
    def doubled_damping_trace(curv: Curvature):
        return jnp.trace(curv.to_dense(damped=True)) - jnp.trace(curv.to_dense())

    expected = sum(float(curvature.damping[s.name]) * s.num_params for s in curvature.specs)
    np.testing.assert_allclose(float(doubled_damping_trace(curvature)), expected, rtol=1e-4)
    leaves = jax.tree.leaves(curvature)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)


def test_a_new_block_plugs_in_with_one_registration():
    class ScaledIdentity(LayerwiseBlock):
        """F = c I per layer, c fixed: the preconditioner is I / (c + damping)."""

        name = "test_scaled_identity"
        passes = ()

        def initial_factors(self, specs):
            return {s.name: {"scale": jnp.float32(3.0), "damping": jnp.float32(1.0)} for s in specs}

        def eigenvalues(self, factors):
            return factors["scale"]

    register_block(ScaledIdentity())
    model, params, train = _problem(n=12)
    apply_fn = _apply(model)
    custom = fit_curvature(apply_fn, params, train, strategy="test_scaled_identity", loss=LOSS)
    identity = fit_curvature(apply_fn, params, train, strategy="identity", loss=LOSS)
    kwargs = dict(loss=LOSS, measurement=classification_margin)
    np.testing.assert_allclose(pairwise_scores(apply_fn, params, custom, train, train, **kwargs),
                               pairwise_scores(apply_fn, params, identity, train, train, **kwargs) / 4,
                               rtol=1e-5, atol=1e-7)
    assert get_block("test_scaled_identity").name == "test_scaled_identity"
    with pytest.raises(ValueError, match="not one of the registered curvature blocks"):
        get_block("nope")


def test_query_super_blocks_and_query_gradients_do_not_change_results():
    model, params, train = _problem(n=22)
    apply_fn = _apply(model)
    curvature = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=LOSS)
    kwargs = dict(loss=LOSS, measurement=classification_margin, train_batch_size=8)
    one = pairwise_scores(apply_fn, params, curvature, train, train, **kwargs)
    per_query = 4 * curvature.num_params
    # Blocks of 3 queries, super-blocks of 2 blocks: 22 queries in 4 super-blocks, the last partial.
    many = pairwise_scores(apply_fn, params, curvature, train, train, query_batch_size=3,
                           max_query_bytes=6 * per_query, **kwargs)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-6 * np.abs(one).max())
    grads = query_gradients(apply_fn, params, train, classification_margin, batch_size=4)
    last = jax.grad(lambda p: classification_margin(apply_fn(p, train.inputs[21:]),
                                                    train.targets[21:])[0])(params)
    assert grads["Dense_1"].shape == (22, 5, 5)
    np.testing.assert_allclose(grads["Dense_1"][21, :4], last["Dense_1"]["kernel"], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(grads["Dense_1"][21, 4], last["Dense_1"]["bias"], rtol=1e-5, atol=1e-7)
