"""Linear datamodeling score (LDS): does an attribution method predict retraining on subsets?

The LDS (Park et al., 2023, "TRAK") asks whether the sum of an attribution method's scores over a
training subset ``S`` predicts how a query's measurement changes when the model is retrained on
``S`` only. For each query ``q`` and ``S`` random subsets ``S_1 ... S_S`` of equal size,

    predicted[s, q]    = sum_{i in S_s} score[q, i]
    ground_truth[s, q] = measurement of query q by a model retrained on S_s (mean over seeds)
    LDS[q]             = Spearman rank correlation over s of predicted[:, q] and ground_truth[:, q]

and the LDS of a method is the mean of ``LDS[q]`` over queries. Because scores follow the project's
sign convention (positive: training on the example pushes the measurement up), a good method has a
positive LDS. Scores may be scaled by any positive constant (dividing by ``N`` or not) without
changing the LDS.

The measurement is the classification margin for classification (logit of the true class minus the
log-sum-exp of the others) and the loss for regression; whichever is used, the same measurement
must be given to the attribution method and to :func:`retrain_ground_truth`.

Retraining is noisy: two seeds on the same subset give different measurements, which caps the LDS
that any method can reach. :func:`noise_ceiling` estimates that cap from the seeds.

Functions:
  - :func:`sample_subsets`: random equal-size training subsets as boolean masks.
  - :func:`retrain_ground_truth`: vectorized retraining on every (subset, seed) pair, resumable and
    cached in a :class:`tda_jax.io.Stage`.
  - :func:`lds`, :func:`summarize`: per-query LDS and its mean with a 95% confidence interval.
  - :func:`noise_ceiling`: the highest LDS a noise-free predictor could expect given seed noise.
  - :func:`spearman`: column-wise Spearman rank correlation.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from scipy import stats

from tda_jax.io import Stage, fingerprint
from tda_jax.losses import check_targets, target_kind_of
from tda_jax.models import num_outputs_of
from tda_jax.sharding import is_distributed, is_main_process
from tda_jax.training import check_training_data, subset_indices, train_in_chunks

Measurement = Callable[[jax.Array, jax.Array], jax.Array]


class Summary(NamedTuple):
    """Mean over queries with a normal-approximation 95% confidence interval half-width.

    Attributes:
      mean: mean of the finite per-query values.
      ci95: ``1.96 * std / sqrt(n)`` with the sample standard deviation (``ddof=1``) over the
        ``n`` finite per-query values. It reflects the spread over queries only; the subsets and
        retraining seeds are held fixed (they are shared by every method, so comparisons between
        methods on the same ground truth are paired and tighter than this interval suggests).
      num_queries: ``n``, the number of queries with a finite value (a query whose predictions or
        ground truth are constant over subsets has an undefined rank correlation and is left out).
    """

    mean: float
    ci95: float
    num_queries: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci95": self.ci95, "num_queries": self.num_queries}


def sample_subsets(key: jax.Array, num_train: int, num_subsets: int, fraction: float) -> np.ndarray:
    """Draws ``num_subsets`` random training subsets of equal size without replacement.

    Args:
      key: PRNG key.
      num_train: ``N``, the number of training examples.
      num_subsets: ``S``, the number of subsets.
      fraction: subset size as a fraction of ``N``, in ``(0, 1]``; the size is
        ``round(fraction * N)``, at least 1.

    Returns:
      Boolean masks ``[num_subsets, num_train]``; row ``s`` is True on the members of subset ``s``;
      every row has the same number of True entries.
    """
    if num_train < 1:
        raise ValueError(f"num_train must be positive, got {num_train}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be positive, got {num_subsets}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    size = max(1, int(round(fraction * num_train)))
    keys = jax.random.split(key, num_subsets)
    orders = jax.vmap(lambda k: jax.random.permutation(k, num_train))(keys)
    chosen = np.asarray(orders[:, :size])
    masks = np.zeros((num_subsets, num_train), dtype=bool)
    np.put_along_axis(masks, chosen, True, axis=1)
    return masks


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of matching columns (ties get average ranks).

    Args:
      x: ``[num_samples, num_columns]``.
      y: ``[num_samples, num_columns]``.

    Returns:
      ``[num_columns]`` correlations; NaN for a column where ``x`` or ``y`` is constant.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(
            f"spearman expects two arrays of the same 2-D shape [num_samples, num_columns], got "
            f"x {x.shape} and y {y.shape}"
        )
    rx = stats.rankdata(x, axis=0)
    ry = stats.rankdata(y, axis=0)
    rx -= rx.mean(axis=0)
    ry -= ry.mean(axis=0)
    denominator = np.sqrt((rx**2).sum(axis=0) * (ry**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=0) / denominator, np.nan)


def summarize(per_query: np.ndarray) -> Summary:
    """Mean and 95% confidence half-width over queries; see :class:`Summary`.

    Args:
      per_query: ``[num_queries]`` values (NaNs are left out).

    Returns:
      A :class:`Summary`; ``ci95`` is NaN with fewer than two finite values.
    """
    values = np.asarray(per_query, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    n = int(values.size)
    if n == 0:
        return Summary(float("nan"), float("nan"), 0)
    ci95 = 1.96 * values.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return Summary(float(values.mean()), float(ci95), n)


def predicted_subset_sums(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The linear datamodel's prediction ``sum_{i in S_s} score[q, i]``.

    Args:
      scores: ``[num_queries, num_train]`` attribution scores.
      masks: ``[num_subsets, num_train]`` boolean subset masks.

    Returns:
      ``[num_subsets, num_queries]`` predicted sums (float64).
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(
            f"scores [num_queries, num_train] and masks [num_subsets, num_train] must share "
            f"num_train, got scores {scores.shape} and masks {masks.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError(
            f"scores hold {int((~np.isfinite(scores)).sum())} non-finite values; check the "
            "attribution method (damping, curvature) that produced them"
        )
    return masks.astype(np.float64) @ scores.T


def lds(scores: np.ndarray, masks: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """Per-query linear datamodeling score.

    Args:
      scores: ``[num_queries, num_train]``; ``score[q, i] > 0`` means that training on example ``i``
        pushes query ``q``'s measurement up. Any positive rescaling gives the same LDS.
      masks: ``[num_subsets, num_train]`` boolean masks of the retraining subsets.
      ground_truth: ``[num_subsets, num_queries]`` measurements of the models retrained on each
        subset (the mean over retraining seeds), or ``[num_subsets, num_seeds, num_queries]``,
        which is averaged over seeds here.

    Returns:
      ``[num_queries]`` Spearman correlations over subsets between predicted subset sums and the
      ground truth (NaN where either is constant over subsets). Average with :func:`summarize`.
    """
    ground_truth = np.asarray(ground_truth, dtype=np.float64)
    if ground_truth.ndim == 3:
        ground_truth = ground_truth.mean(axis=1)
    predicted = predicted_subset_sums(scores, masks)
    if ground_truth.shape != predicted.shape:
        raise ValueError(
            f"ground_truth must be [num_subsets, num_queries] = {predicted.shape} (from masks "
            f"{np.shape(masks)} and scores {np.shape(scores)}), got {ground_truth.shape}"
        )
    return spearman(predicted, ground_truth)


class NoiseCeiling(NamedTuple):
    """Per-query seed-noise statistics of the retraining ground truth (all ``[num_queries]``).

    Attributes:
      seed_correlation: ``r_1``, the Spearman correlation over subsets between the measurements of
        two single retraining seeds, averaged over all pairs of seeds.
      reliability: ``r_K = K r_1 / (1 + (K - 1) r_1)`` (Spearman-Brown), the expected correlation
        between two independent ``K``-seed means, i.e. the reliability of the ground truth that
        :func:`lds` uses; clipped to ``[0, 1]``.
      ceiling: ``sqrt(r_K)``, the expected correlation between the ``K``-seed mean and its own
        noise-free value (the measurement averaged over infinitely many seeds). A method whose
        prediction equals the noise-free value up to a monotone map would reach about this LDS; no
        method should expect to exceed it.
    """

    seed_correlation: np.ndarray
    reliability: np.ndarray
    ceiling: np.ndarray


def noise_ceiling(ground_truth: np.ndarray) -> NoiseCeiling:
    """The LDS ceiling set by retraining noise, from the spread between seeds.

    Under the classical model ``measurement = true value + independent seed noise``, the correlation
    between two single seeds is ``r_1 = var(true) / (var(true) + var(noise))``; averaging ``K``
    seeds shrinks the noise to ``var(noise) / K``, giving the Spearman-Brown reliability ``r_K``
    and the ceiling ``sqrt(r_K)``. Rank correlations are used in place of Pearson ones (as the LDS
    does), which makes these formulas approximate.

    Args:
      ground_truth: ``[num_subsets, num_seeds, num_queries]`` with ``num_seeds >= 2``.

    Returns:
      A :class:`NoiseCeiling` of ``[num_queries]`` arrays; average ``ceiling`` with
      :func:`summarize`.
    """
    ground_truth = np.asarray(ground_truth, dtype=np.float64)
    if ground_truth.ndim != 3 or ground_truth.shape[1] < 2:
        raise ValueError(
            "noise_ceiling needs ground_truth [num_subsets, num_seeds, num_queries] with at least "
            f"two seeds, got shape {ground_truth.shape}"
        )
    num_seeds = ground_truth.shape[1]
    pairs = list(itertools.combinations(range(num_seeds), 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        r1 = np.nanmean(
            np.stack([spearman(ground_truth[:, a], ground_truth[:, b]) for a, b in pairs]), axis=0
        )
        reliability = num_seeds * r1 / (1.0 + (num_seeds - 1) * r1)
    reliability = np.where(np.isfinite(r1), np.clip(reliability, 0.0, 1.0), np.nan)
    reliability = np.where(r1 <= 0, 0.0, reliability)
    return NoiseCeiling(r1, reliability, np.sqrt(reliability))


# --------------------------------------------------------------------------------------------------
# Ground truth by retraining.


def _config_dict(config: Any) -> Any:
    if hasattr(config, "_asdict"):
        return dict(config._asdict())
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return config


def retrain_ground_truth(
    key: jax.Array,
    model,
    train,
    queries,
    masks: np.ndarray,
    *,
    seeds_per_subset: int,
    config,
    measurement: Measurement,
    directory: str | os.PathLike | None = None,
    models_per_chunk: int = 64,
    arguments: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Retrains a model on every subset with several seeds and measures the queries.

    All ``num_subsets * seeds_per_subset`` models are trained by the one retraining driver,
    :func:`tda_jax.training.train_in_chunks` (as :func:`tda_jax.training.train_many` trains them),
    in chunks of ``models_per_chunk`` models that share one compiled program (the last chunk is
    padded so nothing recompiles); only the queries' measurements are kept. Model
    ``m = s * seeds + j`` (subset ``s``, seed ``j``) uses ``jax.random.split(key, num_models)[m]``,
    so results do not depend on the chunk size.

    In a multi-process run (``jax.distributed``) the models of each chunk are split over the
    global ``"data"`` mesh (every process trains its devices' share), every process returns all
    the measurements, and process 0 writes the stage.

    With ``directory``, the work is a :class:`tda_jax.io.Stage`: each finished chunk is saved at
    once (an interrupted run resumes, losing at most one chunk), a finished stage is reused, and a
    directory made with other settings (key, data, masks, seeds, training config, measurement, chunk
    size, ``arguments``) raises :class:`tda_jax.io.ArgumentMismatchError`.

    Args:
      key: PRNG key for initialization and shuffling of the retrained models.
      model: a Flax linen module; ``model.apply(variables, inputs) -> outputs`` with the variables
        that :func:`tda_jax.training.train_many` returns (the full ``model.init`` dict; see
        :mod:`tda_jax.models.apply` for the attribution side).
      train: the full training :class:`tda_jax.data.Dataset` (``N`` examples).
      queries: the query :class:`tda_jax.data.Dataset` (``Q`` examples).
      masks: ``[num_subsets, N]`` boolean masks of equal row sums (see :func:`sample_subsets`).
      seeds_per_subset: retraining seeds per subset (``>= 1``; ``>= 2`` for :func:`noise_ceiling`).
      config: :class:`tda_jax.training.TrainConfig`.
      measurement: ``measurement(outputs [Q, ...], targets [Q, ...]) -> [Q]``; the classification
        margin or the per-example regression loss, the same the attribution method uses.
      directory: stage directory for caching and resuming, or None to keep nothing.
      models_per_chunk: models trained together in one vectorized program.
      arguments: extra JSON-serialisable settings recorded with the stage (e.g. how the model and
        data were made), checked on rerun.

    Returns:
      ``[num_subsets, seeds_per_subset, Q]`` float32 measurements.

    Raises:
      ValueError: on unequal or mis-shaped masks, or training / query targets that do not suit
        the loss, the measurement or the model (labels outside ``[0, C)``, naming the rows).
      FloatingPointError: naming the first model with a non-finite loss or measurement.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != len(train.inputs):
        raise ValueError(
            f"masks must be [num_subsets, num_train={len(train.inputs)}], got {masks.shape}"
        )
    sizes = masks.sum(axis=1)
    if not (sizes == sizes[0]).all() or sizes[0] == 0:
        raise ValueError(
            f"masks must select equal, non-zero numbers of examples (train_many vectorizes over "
            f"equal subset sizes), got sizes from {sizes.min()} to {sizes.max()}"
        )
    if seeds_per_subset < 1 or models_per_chunk < 1:
        raise ValueError(
            f"seeds_per_subset and models_per_chunk must be positive, got {seeds_per_subset} and "
            f"{models_per_chunk}"
        )
    check_training_data(model, train, config.loss, name="train")
    kind = target_kind_of(measurement)
    if kind is not None:
        num_outputs = num_outputs_of(model, np.asarray(queries.inputs[:1]))
        check_targets(queries.targets, num_outputs, kind, role="queries.targets")
    num_subsets = masks.shape[0]
    num_models = num_subsets * seeds_per_subset
    chunk = min(models_per_chunk, num_models)
    if is_distributed():  # chunks are split over every device; the stage records the real size
        chunk = -(-chunk // jax.device_count()) * jax.device_count()
    model_keys = jax.random.split(key, num_models)
    subset_of_model = np.repeat(np.arange(num_subsets), seeds_per_subset)

    stage = None
    if directory is not None:
        stage = Stage(
            directory,
            {
                "key": fingerprint(jax.random.key_data(key)),
                "model": repr(model),
                "train": fingerprint(train.inputs, train.targets),
                "queries": fingerprint(queries.inputs, queries.targets),
                "masks": fingerprint(masks),
                "num_subsets": num_subsets,
                "seeds_per_subset": seeds_per_subset,
                "train_config": _config_dict(config),
                "measurement": getattr(measurement, "__name__", repr(measurement)),
                "models_per_chunk": chunk,
                "extra": dict(arguments or {}),
            },
        )
        if stage.is_complete():
            return stage.load_arrays("ground_truth")["measurements"]

    start_time = time.perf_counter()
    indices = subset_indices(masks, masks.shape[1])[subset_of_model]  # [num_models, subset size]
    measure_chunk = jax.jit(jax.vmap(lambda params: {
        "measurements": measurement(model.apply(params, queries.inputs), queries.targets)}))
    values = train_in_chunks(model_keys, model, train, indices, config, models_per_chunk=chunk,
                             summarize=measure_chunk, stage=stage,
                             desc="retraining (chunks)")["measurements"]
    measurements = values.astype(np.float32).reshape(num_subsets, seeds_per_subset, -1)
    if stage is not None:
        stage.save_arrays("ground_truth", {"measurements": measurements})
        if is_main_process():
            (stage.path("timing.json")).write_text(
                json.dumps({"seconds": time.perf_counter() - start_time}) + "\n"
            )
        stage.mark_complete()
    return measurements

