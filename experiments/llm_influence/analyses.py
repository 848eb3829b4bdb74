"""The analyses of the experiment as pure functions of score matrices, plus a memory sampler.

Every function takes scores ``[num_queries, num_train]`` in the library's sign convention (positive:
training on the sequence raises the query's completion log-probability) and returns per-query
values, which :func:`tda_jax.evaluation.summarize` turns into a mean with a 95% CI over queries.
"""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np


def _check_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"{name} must be a non-empty [num_queries, num_train] array, got shape "
                         f"{scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(scores)).sum())} non-finite values")
    return scores


def sorted_magnitudes(scores: np.ndarray) -> np.ndarray:
    """``[Q, N]`` |score| of each query in decreasing order (column ``r - 1`` is rank ``r``)."""
    return -np.sort(-np.abs(_check_scores(scores)), axis=1)


def tail_exponents(scores: np.ndarray, min_rank: int, max_rank: int) -> np.ndarray:
    """Power-law exponent of each query's sorted |score| over ranks ``min_rank..max_rank``.

    Fits ``log10 |score|_(r) = c - alpha log10 r`` by least squares over the ranks
    ``r = min_rank..max_rank`` (1 = largest magnitude) with a non-zero magnitude, and returns
    ``alpha`` (larger: influence concentrated on fewer sequences; 0: flat).

    Returns:
      ``[Q]`` exponents; NaN for a query with fewer than two non-zero magnitudes in the range.
    """
    magnitudes = sorted_magnitudes(scores)
    if not 1 <= min_rank < max_rank <= magnitudes.shape[1]:
        raise ValueError(f"need 1 <= min_rank < max_rank <= num_train={magnitudes.shape[1]}, got "
                         f"min_rank={min_rank}, max_rank={max_rank}")
    ranks = np.arange(min_rank, max_rank + 1)
    window = magnitudes[:, min_rank - 1:max_rank]
    alphas = np.full(len(magnitudes), np.nan)
    for q, values in enumerate(window):
        keep = values > 0
        if keep.sum() >= 2:
            slope = np.polyfit(np.log10(ranks[keep]), np.log10(values[keep]), 1)[0]
            alphas[q] = -slope
    return alphas


def top_share(scores: np.ndarray, fraction: float) -> np.ndarray:
    """``[Q]`` share of each query's total |score| held by its top ``ceil(fraction x N)`` sequences
    (NaN where every score is 0)."""
    magnitudes = sorted_magnitudes(scores)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    top = max(1, math.ceil(fraction * magnitudes.shape[1]))
    total = magnitudes.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, magnitudes[:, :top].sum(axis=1) / total, np.nan)


def descending_ranks(scores: np.ndarray) -> np.ndarray:
    """``[Q, N]`` rank of every training sequence per query: 1 for the highest score (most
    positive influence), ties broken by lower index."""
    scores = _check_scores(scores)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None], axis=1)
    return ranks


def fact_row_influence(scores: np.ndarray, row_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How much of each query's influence comes from the sequences that state its fact.

    Args:
      scores: ``[Q, N]`` influence scores.
      row_mask: ``[Q, N]`` bool, True on the sequences stating query ``q``'s fact.

    Returns:
      ``(share, mean_rank)``, each ``[Q]``: ``share`` is ``sum_{fact rows} max(score, 0) /
      sum_{all rows} max(score, 0)`` (NaN when no score is positive); ``mean_rank`` the mean over
      the fact rows of their rank by decreasing score (1 = most influential; about ``(N + 1) / 2``
      for rows unrelated to the query).
    """
    scores = _check_scores(scores)
    row_mask = np.asarray(row_mask, bool)
    if row_mask.shape != scores.shape:
        raise ValueError(f"row_mask must have the shape of scores {scores.shape}, got "
                         f"{row_mask.shape}")
    if not row_mask.any(axis=1).all():
        raise ValueError("every query needs at least one fact row (row_mask has an empty row)")
    positive = np.maximum(scores, 0.0)
    total = positive.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, (positive * row_mask).sum(axis=1) / total, np.nan)
    ranks = descending_ranks(scores)
    mean_rank = (ranks * row_mask).sum(axis=1) / row_mask.sum(axis=1)
    return share, mean_rank


def control_share(scores: np.ndarray, row_mask: np.ndarray, control_mask: np.ndarray) -> np.ndarray:
    """``[Q]`` share of positive influence the fact rows would hold if each were as influential as
    the average *control* row: ``(sum_{control} max(score, 0) / sum_{all} max(score, 0)) x
    (#fact rows / #control rows)``; NaN for a query without control rows or positive scores.

    With control rows that mention the same entity but state other facts, a fact share near this
    control means the fact's rows matter only as mentions of the entity, not as the fact.
    """
    scores = _check_scores(scores)
    row_mask, control_mask = np.asarray(row_mask, bool), np.asarray(control_mask, bool)
    if row_mask.shape != scores.shape or control_mask.shape != scores.shape:
        raise ValueError(f"row_mask and control_mask must have the shape of scores {scores.shape}, "
                         f"got {row_mask.shape} and {control_mask.shape}")
    positive = np.maximum(scores, 0.0)
    total = positive.sum(axis=1)
    count = control_mask.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_row = np.where((total > 0) & (count > 0),
                           (positive * control_mask).sum(axis=1) / total / count, np.nan)
    return per_row * row_mask.sum(axis=1)


def pearson_per_query(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[Q]`` Pearson correlation of rows ``a[q]`` and ``b[q]`` (NaN where one is constant)."""
    a, b = _check_scores(a, "a"), _check_scores(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have equal shapes, got {a.shape} and {b.shape}")
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def recall_per_query(best: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``[Q]`` fraction of each query's rows ``best[q]`` (e.g. its top-10 by score, from
    :func:`tda_jax.attribution.top_rows`) found among ``candidates[q]``."""
    best, candidates = np.asarray(best), np.asarray(candidates)
    if best.ndim != 2 or candidates.ndim != 2 or best.shape[0] != candidates.shape[0]:
        raise ValueError(f"best [Q, top] and candidates [Q, k] must share Q, got {best.shape} and "
                         f"{candidates.shape}")
    return np.array([np.isin(b, c).mean() for b, c in zip(best, candidates, strict=True)])


class PeakMemory:
    """Peak resident set size (RSS) above the starting RSS while the ``with`` block runs.

    A daemon thread reads ``/proc/self/statm`` every ``interval`` seconds (Linux); elsewhere
    ``increase_mb`` stays None. Short-lived allocations between samples can be missed, and memory
    the allocator kept from earlier work is reused without raising the RSS, so this is a lower
    bound on the block's own peak.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.increase_mb: float | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._stop = threading.Event()
        self._peak = 0
        self._start = None

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def _watch(self) -> None:
        while not self._stop.is_set():
            value = self._rss()
            if value is not None:
                self._peak = max(self._peak, value)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._start = self._rss()
        if self._start is not None:
            self._peak = self._start
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        end = self._rss() or self._start
        self.increase_mb = (max(self._peak, end) - self._start) / 2**20
