"""Tests of tda_jax.training: losses, train, vectorized train_many, checkpoints, evaluate."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.data import Dataset, batches_in_order, load_digits, make_synthetic_regression, subset
from tda_jax.io import ArgumentMismatchError
from tda_jax.losses import mean_squared_error, softmax_cross_entropy
from tda_jax.models import MLP
from tda_jax.optimization import run_steps
from tda_jax.sharding import make_data_mesh
from tda_jax.training import (
    TrainConfig,
    cross_entropy_per_example,
    evaluate,
    load_data_order,
    load_params,
    make_train_step,
    masked_mean,
    saved_steps,
    squared_error_per_example,
    train,
    train_many,
)
from tda_jax.training.step import jitted_train_step

FAST = TrainConfig(num_epochs=2, batch_size=64, learning_rate=3e-3)


@pytest.fixture(scope="module")
def digits():
    return load_digits(test_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def small_digits(digits):
    return subset(digits[0], np.arange(200))


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def test_per_example_losses_match_closed_forms():
    logits = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    labels = jnp.array([1, 0])
    expected = -np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))[[0, 1], [1, 0]]
    np.testing.assert_allclose(cross_entropy_per_example(logits, labels), expected, rtol=1e-6)
    outputs, targets = jnp.array([[1.0, 2.0], [0.0, 0.0]]), jnp.array([[0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_allclose(squared_error_per_example(outputs, targets), [2.5, 12.5])
    # Padding rows (mask 0) never count, however large their loss.
    np.testing.assert_allclose(masked_mean(jnp.array([1.0, 3.0, 1e30]), jnp.array([1, 1, 0])), 2.0)


def test_padded_batch_loss_equals_unpadded(small_digits):
    model = MLP((8,), 10)
    step = make_train_step(model, FAST)
    params, _ = step.init(jax.random.PRNGKey(0), small_digits.inputs[:1])
    x, y = small_digits.inputs[:5], small_digits.targets[:5]
    exact = step.batch_loss(params, {"inputs": x, "targets": y, "mask": np.ones(5, np.float32)})
    padded = {"inputs": np.concatenate([x, np.repeat(x[:1], 3, 0)]),
              "targets": np.concatenate([y, np.repeat(y[:1], 3)]),
              "mask": np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)}
    np.testing.assert_allclose(step.batch_loss(params, padded), exact, rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match=r"softmax_cross_entropy\(\)"):
        TrainConfig(loss=softmax_cross_entropy)  # the factory, uncalled


def test_config_takes_loss_objects_and_resolves_names_once():
    # One loss vocabulary: a config name resolves to the library's Loss object.
    by_name, by_object = TrainConfig(loss="cross_entropy"), TrainConfig(loss=softmax_cross_entropy())
    assert by_name == by_object and hash(by_name) == hash(by_object)
    assert by_name.loss == softmax_cross_entropy()
    assert TrainConfig(loss="mse").loss == mean_squared_error()
    assert by_name.to_dict()["loss"] == "softmax_cross_entropy"
    json.dumps(by_name.to_dict())  # saved beside checkpoints


def test_run_steps_checks_once_per_chunk_and_names_the_step():
    calls = []

    def step(state, x):
        return state + x, jnp.log(jnp.asarray(x, jnp.float32))  # log(0) = -inf at x == 0

    def on_check(done, state):
        calls.append((done, int(state)))

    state, values = run_steps(step, 0, [1, 2, 3, 4, 5], num_steps=5, check_every=2, check_at=(3,),
                              on_check=on_check)
    assert state == 15 and values.shape == (5,)
    np.testing.assert_allclose(values, np.log([1, 2, 3, 4, 5]), rtol=1e-6)
    assert calls == [(2, 3), (3, 6), (4, 10), (5, 15)]
    with pytest.raises(FloatingPointError, match=r"at step 12 \(here\)"):
        run_steps(step, 0, [1, 1, 0, 1], num_steps=4, first_step=10, check_every=100,
                  describe_step=lambda s: " (here)")


def test_train_reduces_loss_and_learns_digits(digits):
    train_data, test_data = digits
    model = MLP((32,), 10)
    config = TrainConfig(num_epochs=6, batch_size=64, learning_rate=3e-3)
    init_params = model.init(jax.random.PRNGKey(1), train_data.inputs[:1])
    params = train(jax.random.PRNGKey(0), model, init_params, train_data, config)
    before, after = evaluate(model, init_params, test_data), evaluate(model, params, test_data)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.85  # chance is 0.1
    # Deterministic by key.
    again = train(jax.random.PRNGKey(0), model, init_params, train_data, config)
    assert _max_diff(params, again) == 0.0


def test_train_regression_recovers_least_squares():
    train_data, _ = make_synthetic_regression(num_train=256, input_dim=4, output_dim=2, seed=0)
    model = MLP((), 2)  # a linear model: the optimum is the least-squares solution
    config = TrainConfig(num_epochs=400, batch_size=256, learning_rate=3e-2, weight_decay=0.0,
                         loss="mse")
    params = train(jax.random.PRNGKey(0), model, None, train_data, config)
    design = np.c_[train_data.inputs, np.ones(256)]
    solution, *_ = np.linalg.lstsq(design, train_data.targets, rcond=None)
    dense = params["params"]["Dense_0"]
    np.testing.assert_allclose(dense["kernel"], solution[:4], atol=2e-3)
    np.testing.assert_allclose(dense["bias"], solution[4], atol=2e-3)
    result = evaluate(model, params, train_data)
    residual = train_data.targets - design @ solution
    np.testing.assert_allclose(result["loss"], 0.5 * np.mean(np.sum(residual**2, 1)), rtol=1e-2)
    assert np.isnan(result["accuracy"])


def test_evaluate_matches_direct_computation(small_digits):
    model = MLP((8,), 10)
    params = model.init(jax.random.PRNGKey(0), small_digits.inputs[:1])
    logits = model.apply(params, small_digits.inputs)
    result = evaluate(model, params, small_digits, batch_size=64)  # 200 rows: last batch padded
    expected_loss = np.mean(cross_entropy_per_example(logits, small_digits.targets))
    np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)
    assert result["accuracy"] == np.mean(np.argmax(logits, 1) == small_digits.targets)


def test_train_many_equals_sequential_training(small_digits):
    model = MLP((16,), 10)
    config = TrainConfig(num_epochs=3, batch_size=32, learning_rate=1e-2)
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 200), bool)
    for row in masks:
        row[rng.choice(200, 70, replace=False)] = True  # 70 = 2 batches of 32 + a padded one
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    stacked = train_many(keys, model, small_digits, masks, config, models_per_chunk=2)
    assert stacked["params"]["Dense_0"]["kernel"].shape == (3, 64, 16)
    for m in range(3):
        single = train(keys[m], model, None, subset(small_digits, masks[m]), config)
        assert _max_diff(jax.tree.map(lambda leaf: leaf[m], stacked), single) < 1e-5
    # Models trained on different subsets differ.
    assert _max_diff(jax.tree.map(lambda leaf: leaf[0], stacked),
                     jax.tree.map(lambda leaf: leaf[1], stacked)) > 1e-3


@pytest.mark.slow
def test_train_many_does_not_depend_on_mesh(small_digits):
    model = MLP((8,), 10)
    config = TrainConfig(num_epochs=2, batch_size=32, learning_rate=1e-2)
    masks = np.zeros((3, 200), bool)
    masks[0, :60], masks[1, 50:110], masks[2, 140:] = True, True, True
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    single = train_many(keys, model, small_digits, masks, config)
    # 3 models over 2 devices: the chunk is padded to 4. Zero-initialized biases are
    # device-invariant, so this also checks that no gradient is summed across devices.
    sharded = train_many(keys, model, small_digits, masks, config, mesh=make_data_mesh(2))
    assert _max_diff(sharded, single) < 1e-6


def test_train_many_rejects_bad_masks(small_digits):
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    masks = np.zeros((2, 200), bool)
    masks[0, :10], masks[1, :12] = True, True
    with pytest.raises(ValueError, match="same size"):
        train_many(keys, MLP((4,), 10), small_digits, masks, FAST)
    with pytest.raises(ValueError, match="shape"):
        train_many(keys, MLP((4,), 10), small_digits, masks[:, :50], FAST)
    with pytest.raises(ValueError, match="one key per model"):
        train_many(keys[:1], MLP((4,), 10), small_digits, np.ones((2, 200), bool), FAST)


def test_non_finite_loss_raises(small_digits):
    inputs = small_digits.inputs.copy()
    inputs[17] = np.nan
    bad = Dataset(inputs, small_digits.targets, 10)
    with pytest.raises(FloatingPointError, match=r"step \d+ \(epoch 0"):
        train(jax.random.PRNGKey(0), MLP((4,), 10), None, bad, FAST)
    masks = np.ones((1, 200), bool)
    with pytest.raises(FloatingPointError, match="model 0"):
        train_many(jax.random.split(jax.random.PRNGKey(0), 1), MLP((4,), 10), bad, masks,
                   FAST.replace(num_epochs=1))


def test_empty_or_mistyped_data_raises():
    empty = Dataset(np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), 3)
    with pytest.raises(ValueError, match="empty"):
        train(jax.random.PRNGKey(0), MLP((4,), 3), None, empty, FAST)
    regression, _ = make_synthetic_regression(num_train=8, num_test=1)
    with pytest.raises(ValueError, match="float .*regression targets.*classification loss"):
        train(jax.random.PRNGKey(0), MLP((4,), 1), None, regression, FAST)
    with pytest.raises(ValueError, match="float .*regression targets.*classification loss"):
        train_many(jax.random.split(jax.random.PRNGKey(0), 1), MLP((4,), 1), regression,
                   np.ones((1, 8), bool), FAST)


@pytest.mark.parametrize("bad_label", [10, -1])
def test_out_of_range_labels_raise_naming_rows(small_digits, bad_label):
    targets = small_digits.targets.copy()
    targets[[3, 150]] = bad_label
    bad = Dataset(small_digits.inputs, targets, 10)
    match = rf"outside \[0, 10\).*row 3: {bad_label}, row 150: {bad_label}"
    with pytest.raises(ValueError, match=match):
        train(jax.random.PRNGKey(0), MLP((4,), 10), None, bad, FAST)
    with pytest.raises(ValueError, match=match):
        train_many(jax.random.split(jax.random.PRNGKey(0), 2), MLP((4,), 10), bad,
                   np.ones((2, 200), bool), FAST)


def test_num_classes_must_match_model_outputs(small_digits):
    with pytest.raises(ValueError, match=r"num_classes is 10 but .* has 7 outputs.*num_outputs=10"):
        train(jax.random.PRNGKey(0), MLP((4,), 7), None, small_digits, FAST)
    with pytest.raises(ValueError, match="has 7 outputs"):
        train_many(jax.random.split(jax.random.PRNGKey(0), 1), MLP((4,), 7), small_digits,
                   np.ones((1, 200), bool), FAST)


def test_saved_data_order_replays_the_run_bitwise(small_digits, tmp_path):
    # The data order saved beside the checkpoints is what TracIn and resumption read: replaying
    # it from the initial checkpoint with the same step must give the final checkpoint exactly.
    # (An order saved one epoch off, or read back shifted, fails here.)
    model = MLP((8,), 10)
    config = TrainConfig(num_epochs=3, batch_size=64, learning_rate=3e-3)
    train(jax.random.PRNGKey(6), model, None, small_digits, config, checkpoint_steps=(0,),
          checkpoint_dir=tmp_path)
    order = load_data_order(tmp_path)
    params = load_params(tmp_path, 0)
    jitted = jitted_train_step(model, config)
    opt_state = jitted.train_step.init_opt_state(params)
    for epoch_order in order["epochs"]:
        for batch in batches_in_order(small_digits, epoch_order, order["batch_size"]):
            batch = {k: batch[k] for k in ("inputs", "targets", "mask")}
            params, opt_state, _ = jitted.step(params, opt_state, batch)
    assert _max_diff(params, load_params(tmp_path)) == 0.0


def test_checkpoints_save_resume_and_refuse_mismatch(small_digits, tmp_path):
    model = MLP((8,), 10)
    config = TrainConfig(num_epochs=3, batch_size=64, learning_rate=3e-3)  # 4 steps per epoch
    key = jax.random.PRNGKey(5)
    reference = train(key, model, None, small_digits, config)

    directory = tmp_path / "run"
    params = train(key, model, None, small_digits, config, checkpoint_steps=(0, 5, 8),
                   checkpoint_dir=directory)
    assert _max_diff(params, reference) == 0.0
    assert saved_steps(directory) == [0, 5, 8, 12]
    init = model.init(jax.random.split(key)[0], small_digits.inputs[:1])
    assert _max_diff(load_params(directory, 0), init) == 0.0
    assert _max_diff(load_params(directory), reference) == 0.0
    order = load_data_order(directory)
    assert order["epochs"].shape == (3, 200) and order["steps_per_epoch"] == 4
    for epoch_order in order["epochs"]:
        np.testing.assert_array_equal(np.sort(epoch_order), np.arange(200))
    assert json.loads((directory / "arguments.json").read_text())["config"]["num_epochs"] == 3

    # A finished run is loaded, not retrained.
    assert _max_diff(train(key, model, None, small_digits, config, checkpoint_steps=(0, 5, 8),
                           checkpoint_dir=directory), reference) == 0.0

    # Simulate an interruption after step 5 (mid-epoch): drop the later checkpoints, resume.
    for step in (8, 12):
        shutil.rmtree(directory / "checkpoints" / str(step))
    (directory / "COMPLETE").unlink()
    resumed = train(key, model, None, small_digits, config, checkpoint_steps=(0, 5, 8),
                    checkpoint_dir=directory)
    # Resuming (on the saved data order) equals the uninterrupted run bitwise.
    assert _max_diff(resumed, reference) == 0.0
    assert saved_steps(directory) == [0, 5, 8, 12]

    with pytest.raises(ArgumentMismatchError, match="learning_rate"):
        train(key, model, None, small_digits, config.replace(learning_rate=1e-2),
              checkpoint_steps=(0, 5, 8), checkpoint_dir=directory)
    with pytest.raises(ValueError, match="checkpoint_steps"):
        train(key, model, None, small_digits, config, checkpoint_steps=(13,),
              checkpoint_dir=tmp_path / "other")
