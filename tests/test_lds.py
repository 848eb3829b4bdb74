"""Tests of the linear datamodeling score against oracles with known answers."""

import jax
import numpy as np
import pytest
from scipy import stats

from tda_jax.data import Dataset
from tda_jax.evaluation import (
    lds,
    noise_ceiling,
    predicted_subset_sums,
    retrain_ground_truth,
    sample_subsets,
    spearman,
    summarize,
)
from tda_jax.io import ArgumentMismatchError
from tda_jax.losses import classification_margin
from tda_jax.models import MLP
from tda_jax.training import TrainConfig, train_many


def _linear_world(seed=0, num_train=60, num_queries=30, num_subsets=200, fraction=0.5):
    """Random subsets and a true linear datamodel ``theta [Q, N]``."""
    rng = np.random.default_rng(seed)
    masks = sample_subsets(jax.random.key(seed), num_train, num_subsets, fraction)
    theta = rng.normal(size=(num_queries, num_train))
    return rng, masks, theta


def test_sample_subsets_shapes_sizes_and_determinism():
    masks = sample_subsets(jax.random.key(0), 101, 40, 0.5)
    assert masks.shape == (40, 101) and masks.dtype == bool
    np.testing.assert_array_equal(masks.sum(axis=1), np.full(40, 50))  # round(50.5) == 50
    np.testing.assert_array_equal(masks, sample_subsets(jax.random.key(0), 101, 40, 0.5))
    assert len({row.tobytes() for row in masks}) == 40  # distinct subsets
    # Each example is included with probability 1/2: inclusion counts ~ Binomial(40, 1/2).
    inclusion = masks.mean(axis=0)
    assert abs(inclusion.mean() - 50 / 101) < 1e-12
    assert masks.any(axis=0).all()
    assert sample_subsets(jax.random.key(1), 10, 3, 0.3).sum(axis=1).tolist() == [3, 3, 3]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_train=0, num_subsets=2, fraction=0.5),
        dict(num_train=5, num_subsets=0, fraction=0.5),
        dict(num_train=5, num_subsets=2, fraction=0.0),
        dict(num_train=5, num_subsets=2, fraction=1.5),
    ],
)
def test_sample_subsets_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_subsets(jax.random.key(0), **kwargs)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(30, 6)).astype(float)  # many ties
    y = x + rng.normal(size=(30, 6)) * 2
    y[:, 0] = np.round(y[:, 0])
    expected = [stats.spearmanr(x[:, j], y[:, j]).statistic for j in range(6)]
    np.testing.assert_allclose(spearman(x, y), expected, rtol=1e-12)


def test_spearman_constant_column_is_nan():
    x = np.stack([np.arange(5.0), np.ones(5)], axis=1)
    result = spearman(x, x)
    assert result[0] == pytest.approx(1.0) and np.isnan(result[1])


def test_lds_is_one_for_the_true_linear_datamodel_and_invariant_to_monotone_maps():
    rng, masks, theta = _linear_world()
    bias = rng.normal(size=theta.shape[0])
    ground_truth = masks @ theta.T + bias
    np.testing.assert_allclose(lds(theta, masks, ground_truth), 1.0, atol=1e-12)
    # Spearman only sees ranks: a monotone map of the outputs and a positive rescale change nothing.
    np.testing.assert_allclose(lds(3.0 * theta, masks, np.exp(ground_truth / 10)), 1.0, atol=1e-12)
    # The opposite sign convention gives -1.
    np.testing.assert_allclose(lds(-theta, masks, ground_truth), -1.0, atol=1e-12)
    # Seeds axis: [S, seeds, Q] is averaged over seeds.
    stacked = np.stack([ground_truth - 1.0, ground_truth + 1.0], axis=1)
    np.testing.assert_allclose(lds(theta, masks, stacked), 1.0, atol=1e-12)


def test_predicted_subset_sums_is_the_masked_sum():
    rng, masks, theta = _linear_world(num_subsets=5)
    predicted = predicted_subset_sums(theta, masks)
    for s in range(5):
        np.testing.assert_allclose(predicted[s], theta[:, masks[s]].sum(axis=1), rtol=1e-12)


def test_random_scores_give_zero_within_the_confidence_interval():
    rng, masks, theta = _linear_world(seed=1, num_train=2000, num_queries=200, num_subsets=50)
    ground_truth = masks @ theta.T
    summary = summarize(lds(rng.normal(size=theta.shape), masks, ground_truth))
    assert summary.num_queries == 200
    # Under independence Spearman over S subsets has sd ~ 1/sqrt(S - 1); the CI must match that.
    # (Random scores still correlate with theta by ~1/sqrt(N) per query, hence the large N.)
    expected_ci = 1.96 / np.sqrt(50 - 1) / np.sqrt(200)
    assert 0.8 * expected_ci < summary.ci95 < 1.2 * expected_ci
    assert abs(summary.mean) < 1.5 * summary.ci95  # about 3 standard errors


def test_lds_of_noisy_truth_matches_the_noise_ceiling():
    """A noise-free predictor reaches the ceiling; single-seed correlation and reliability too.

    ``ground_truth[s, k, q] = T[s, q] + noise`` with ``var(noise) = var(T)``, so one seed's
    reliability is ``r_1 = 1/2`` and a 4-seed mean's is ``r_4 = 4/5`` (Spearman-Brown). For Gaussian
    variables Spearman's correlation is ``(6 / pi) arcsin(rho / 2)`` of the Pearson ``rho``.
    """
    rng, masks, theta = _linear_world(seed=2, num_train=80, num_queries=60, num_subsets=400)
    truth = masks @ theta.T
    truth_sd = truth.std(axis=0)
    num_seeds = 4
    noise = rng.normal(size=(truth.shape[0], num_seeds, truth.shape[1])) * truth_sd
    ground_truth = truth[:, None, :] + noise

    def to_spearman(rho):
        return 6 / np.pi * np.arcsin(rho / 2)

    ceiling = noise_ceiling(ground_truth)
    seed_corr = summarize(ceiling.seed_correlation)
    assert abs(seed_corr.mean - to_spearman(0.5)) < max(seed_corr.ci95, 0.01)
    reliability = summarize(ceiling.reliability)
    assert abs(reliability.mean - 0.8) < 0.02
    ceiling_summary = summarize(ceiling.ceiling)
    assert abs(ceiling_summary.mean - np.sqrt(0.8)) < 0.02
    # The noise-free linear datamodel scores (nearly) the ceiling; a factor-2 error in the noise
    # variance or skipping the Spearman-Brown step would move the ceiling by > 0.05.
    oracle = summarize(lds(theta, masks, ground_truth))
    assert abs(oracle.mean - ceiling_summary.mean) < 0.02
    assert abs(oracle.mean - to_spearman(np.sqrt(0.8))) < 0.02


def test_noise_ceiling_is_one_without_noise_and_zero_for_pure_noise():
    rng, masks, theta = _linear_world(seed=3, num_subsets=100)
    truth = masks @ theta.T
    exact = noise_ceiling(np.repeat(truth[:, None, :], 3, axis=1))
    np.testing.assert_allclose(exact.ceiling, 1.0)
    pure_noise = noise_ceiling(rng.normal(size=(100, 2, theta.shape[0])))
    assert summarize(pure_noise.ceiling).mean < 0.3  # sqrt of clipped noise correlations
    assert abs(summarize(pure_noise.seed_correlation).mean) < 0.1


def test_summarize_skips_nan_and_uses_normal_interval():
    summary = summarize(np.array([0.1, 0.3, np.nan, 0.5]))
    assert summary.num_queries == 3
    assert summary.mean == pytest.approx(0.3)
    assert summary.ci95 == pytest.approx(1.96 * 0.2 / np.sqrt(3))
    assert set(summary.to_dict()) == {"mean", "ci95", "num_queries"}


def test_bad_shapes_raise_value_errors():
    _, masks, theta = _linear_world(num_subsets=10)
    with pytest.raises(ValueError, match="num_train"):
        lds(theta[:, :-1], masks, np.zeros((10, theta.shape[0])))
    with pytest.raises(ValueError, match="ground_truth"):
        lds(theta, masks, np.zeros((9, theta.shape[0])))
    with pytest.raises(ValueError, match="non-finite"):
        lds(np.full_like(theta, np.nan), masks, np.zeros((10, theta.shape[0])))
    with pytest.raises(ValueError, match="two seeds"):
        noise_ceiling(np.zeros((10, 1, 3)))
    with pytest.raises(ValueError, match="same 2-D shape"):
        spearman(np.zeros((3, 2)), np.zeros((3, 3)))


# --------------------------------------------------------------------------------------------------
# Retraining ground truth (one small compiled program per call; kept to three compiles).


@pytest.mark.slow
def test_retrain_ground_truth_matches_train_many_resumes_and_refuses_other_settings(tmp_path):
    rng = np.random.default_rng(0)
    train = Dataset(rng.normal(size=(40, 5)).astype(np.float32),
                    rng.integers(0, 3, size=40).astype(np.int32), 3)
    queries = Dataset(rng.normal(size=(6, 5)).astype(np.float32),
                      rng.integers(0, 3, size=6).astype(np.int32), 3)
    model = MLP(hidden_sizes=(4,), num_outputs=3)
    config = TrainConfig(num_epochs=2, batch_size=8, learning_rate=1e-2)
    masks = sample_subsets(jax.random.key(1), 40, 3, 0.5)
    key = jax.random.key(2)
    kwargs = dict(seeds_per_subset=2, config=config, measurement=classification_margin,
                  models_per_chunk=4)  # 6 models: chunks of 4 and 2 (padded)
    ground_truth = retrain_ground_truth(key, model, train, queries, masks, directory=tmp_path,
                                        **kwargs)
    assert ground_truth.shape == (3, 2, 6) and ground_truth.dtype == np.float32
    assert np.isfinite(ground_truth).all()

    # Oracle: model m = s * seeds + j is train_many's model with key split(key, 6)[m] on masks[s].
    pick = np.array([1, 4])  # (subset 0, seed 1) and (subset 2, seed 0)
    params = train_many(jax.random.split(key, 6)[pick], model, train,
                        masks[pick // 2], config)
    for row, m in enumerate(pick):
        one = jax.tree.map(lambda leaf, row=row: leaf[row], params)
        expected = classification_margin(model.apply(one, queries.inputs), queries.targets)
        np.testing.assert_allclose(ground_truth[m // 2, m % 2], expected, rtol=1e-4, atol=1e-4)

    # A finished stage is reused as is.
    again = retrain_ground_truth(key, model, train, queries, masks, directory=tmp_path, **kwargs)
    np.testing.assert_array_equal(again, ground_truth)
    # An interrupted run (second chunk and final output missing) recomputes only what is missing.
    for name in ("COMPLETE", "ground_truth.npz", "chunk_00001.npz"):
        (tmp_path / name).unlink()
    first_chunk_mtime = (tmp_path / "chunk_00000.npz").stat().st_mtime_ns
    resumed = retrain_ground_truth(key, model, train, queries, masks, directory=tmp_path,
                                   **kwargs)
    np.testing.assert_allclose(resumed, ground_truth, rtol=1e-6, atol=1e-6)
    assert (tmp_path / "chunk_00000.npz").stat().st_mtime_ns == first_chunk_mtime
    # Other settings are refused, naming the difference.
    with pytest.raises(ArgumentMismatchError, match="seeds_per_subset"):
        retrain_ground_truth(key, model, train, queries, masks, directory=tmp_path,
                             **{**kwargs, "seeds_per_subset": 3})
    with pytest.raises(ArgumentMismatchError, match="masks"):
        retrain_ground_truth(key, model, train, queries, ~masks, directory=tmp_path, **kwargs)


def test_retrain_ground_truth_rejects_unequal_subsets():
    train = Dataset(np.zeros((4, 2), np.float32), np.zeros(4, np.int32), 2)
    masks = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    with pytest.raises(ValueError, match="equal"):
        retrain_ground_truth(jax.random.key(0), MLP((2,), 2), train, train, masks,
                             seeds_per_subset=1, config=TrainConfig(num_epochs=1),
                             measurement=classification_margin)


@pytest.mark.parametrize("bad_label", [3, -1])
def test_retrain_ground_truth_rejects_out_of_range_labels(bad_label):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, size=10).astype(np.int32)
    targets[4] = bad_label
    train = Dataset(rng.normal(size=(10, 2)).astype(np.float32), targets, 3)
    good = Dataset(train.inputs, np.zeros(10, np.int32), 3)
    masks = np.ones((1, 10), dtype=bool)
    kwargs = dict(seeds_per_subset=1, config=TrainConfig(num_epochs=1),
                  measurement=classification_margin)
    with pytest.raises(ValueError, match=rf"train.targets .*row 4: {bad_label}"):
        retrain_ground_truth(jax.random.key(0), MLP((2,), 3), train, good, masks, **kwargs)
    with pytest.raises(ValueError, match=rf"queries.targets .*row 4: {bad_label}"):
        retrain_ground_truth(jax.random.key(0), MLP((2,), 3), good, train, masks, **kwargs)
