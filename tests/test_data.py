"""Tests of tda_jax.data: loaders (determinism, shapes), subsets and padded, masked batching."""

import jax
import numpy as np
import pytest

from tda_jax.data import (
    Dataset,
    batch_iterator,
    load_digits,
    load_mnist1d,
    make_synthetic_regression,
    num_batches,
    num_examples,
    subset,
)


def _toy(n=10):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return Dataset(x, np.arange(n, dtype=np.int32) % 4, 4)


def test_mnist1d_shapes_standardized_and_deterministic():
    state = np.random.get_state()  # noqa: NPY002
    train, test = load_mnist1d()
    after = np.random.get_state()  # noqa: NPY002
    # The generator seeds numpy's global state; loading must leave the caller's state alone.
    assert np.array_equal(state[1], after[1]) and state[2] == after[2]
    assert train.inputs.shape == (4000, 40) and train.inputs.dtype == np.float32
    assert test.inputs.shape == (1000, 40) and test.targets.shape == (1000,)
    assert train.targets.dtype == np.int32 and train.num_classes == 10
    assert set(np.unique(train.targets)) == set(range(10))
    all_x = np.concatenate([train.inputs, test.inputs])
    assert abs(all_x.mean()) < 1e-3 and abs(all_x.std() - 1) < 1e-3
    again, _ = load_mnist1d()
    np.testing.assert_array_equal(train.inputs, again.inputs)
    np.testing.assert_array_equal(train.targets, again.targets)
    other, _ = load_mnist1d(seed=1)
    assert not np.allclose(other.inputs, train.inputs)
    small, small_test = load_mnist1d(num_train=100, num_test=50)
    np.testing.assert_array_equal(small.inputs, train.inputs[:100])
    np.testing.assert_array_equal(small_test.inputs, train.inputs[100:150])


def test_mnist1d_more_examples_than_default_generator():
    train, test = load_mnist1d(num_train=5200, num_test=300)
    assert num_examples(train) == 5200 and num_examples(test) == 300


def test_digits_shapes_scaling_and_split():
    train, test = load_digits(test_fraction=0.25, seed=3)
    assert num_examples(train) + num_examples(test) == 1797
    assert abs(num_examples(test) - 0.25 * 1797) <= 1
    assert train.inputs.shape[1:] == (64,) and train.inputs.dtype == np.float32
    assert train.inputs.min() >= 0 and train.inputs.max() <= 1
    image_train, _ = load_digits(test_fraction=0.25, seed=3, image=True)
    assert image_train.inputs.shape[1:] == (8, 8, 1)
    np.testing.assert_array_equal(image_train.inputs.reshape(-1, 64), train.inputs)
    again, _ = load_digits(test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(again.inputs, train.inputs)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def test_synthetic_regression_matches_its_noise_level():
    train, test = make_synthetic_regression(num_train=4000, num_test=10, input_dim=5,
                                            output_dim=2, noise=0.3, seed=1)
    assert train.inputs.shape == (4000, 5) and train.targets.shape == (4000, 2)
    assert train.targets.dtype == np.float32 and train.num_classes is None
    # Oracle: the least-squares residual of a linear-Gaussian model estimates the noise scale.
    weights, *_ = np.linalg.lstsq(train.inputs, train.targets, rcond=None)
    residual_std = np.std(train.targets - train.inputs @ weights)
    assert abs(residual_std - 0.3) < 0.3 * 0.05
    again, _ = make_synthetic_regression(num_train=4000, num_test=10, input_dim=5, output_dim=2,
                                         noise=0.3, seed=1)
    np.testing.assert_array_equal(again.targets, train.targets)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10, 16])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_have_fixed_shape_and_cover_each_example_once(batch_size, shuffle):
    data = _toy(10)
    key = jax.random.PRNGKey(7) if shuffle else None
    batches = list(batch_iterator(data, batch_size, key))
    assert len(batches) == num_batches(data, batch_size) == -(-10 // batch_size)
    for b in batches:
        assert b["inputs"].shape == (batch_size, 3) and b["targets"].shape == (batch_size,)
        assert b["mask"].shape == (batch_size,) and b["mask"].dtype == np.float32
        assert b["index"].dtype == np.int32
        real = b["index"] >= 0
        np.testing.assert_array_equal(b["mask"], real.astype(np.float32))
        np.testing.assert_array_equal(b["inputs"][real], data.inputs[b["index"][real]])
        np.testing.assert_array_equal(b["targets"][real], data.targets[b["index"][real]])
        # Padding repeats row 0 and is masked out.
        np.testing.assert_array_equal(b["inputs"][~real], np.broadcast_to(
            data.inputs[0], b["inputs"][~real].shape))
    index = np.concatenate([b["index"] for b in batches])
    assert sum(float(b["mask"].sum()) for b in batches) == 10
    np.testing.assert_array_equal(np.sort(index[index >= 0]), np.arange(10))
    if not shuffle:
        np.testing.assert_array_equal(index[index >= 0], np.arange(10))


def test_shuffling_is_determined_by_key():
    data = _toy(50)

    def order(key):
        return np.concatenate([b["index"] for b in batch_iterator(data, 8, key)])

    np.testing.assert_array_equal(order(jax.random.PRNGKey(1)), order(jax.random.PRNGKey(1)))
    assert not np.array_equal(order(jax.random.PRNGKey(1)), order(jax.random.PRNGKey(2)))
    assert not np.array_equal(order(jax.random.PRNGKey(1))[:50], np.arange(50))


def test_drop_remainder():
    data = _toy(10)
    batches = list(batch_iterator(data, 4, drop_remainder=True))
    assert len(batches) == num_batches(data, 4, drop_remainder=True) == 2
    assert all(b["mask"].all() for b in batches)


def test_bad_inputs_raise():
    empty = Dataset(np.zeros((0, 3), np.float32), np.zeros((0,), np.int32), 2)
    with pytest.raises(ValueError, match="empty"):
        next(iter(batch_iterator(empty, 4)))
    with pytest.raises(ValueError, match="batch_size"):
        batch_iterator(_toy(), 0)
    mismatched = Dataset(np.zeros((5, 3), np.float32), np.zeros((4,), np.int32), 2)
    with pytest.raises(ValueError, match="leading axis"):
        num_examples(mismatched)


def test_subset_by_indices_and_mask():
    data = _toy(10)
    picked = subset(data, np.array([3, 1]))
    np.testing.assert_array_equal(picked.targets, data.targets[[3, 1]])
    mask = np.zeros(10, bool)
    mask[[2, 5]] = True
    np.testing.assert_array_equal(subset(data, mask).inputs, data.inputs[[2, 5]])
    assert subset(data, mask).num_classes == 4
    with pytest.raises(ValueError, match="shape"):
        subset(data, np.ones(3, bool))
