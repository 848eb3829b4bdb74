"""Figures of the experiment (matplotlib drawn off-screen with the Agg canvas, PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure(columns: int, width: float = 4.2, height: float = 3.6):
    # The Agg canvas draws without pyplot, so no global backend is set for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height), dpi=150)
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, columns, i + 1) for i in range(columns)]


def _save(figure, path: Path, title: str | None) -> Path:
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _bars(axes, labels: Sequence[str], summaries: Sequence[Mapping[str, float]], color="tab:blue",
          offset: float = 0.0, width: float = 0.7, label: str | None = None) -> None:
    positions = np.arange(len(labels)) + offset
    means = [s["mean"] for s in summaries]
    errors = [s["ci95"] for s in summaries]
    axes.bar(positions, means, width=width, yerr=errors, capsize=4, color=color, alpha=0.85,
             label=label)


def plot_sparsity(path: Path, curves: Mapping[str, np.ndarray], fit: Mapping[str, float],
                  shares: Mapping[str, Mapping[str, float]],
                  exponents: Mapping[str, Mapping[str, float]], top_fraction: float,
                  title: str | None = None) -> Path:
    """Left: per-query sorted |score| as a share of the query's total |influence| against rank
    (log-log), median over queries with the 25-75% band, and the fitted power law of the analysis
    method. Middle / right: share held by the top ``top_fraction`` of sequences and the tail
    exponent per method (95% CI over queries).

    Args:
      curves: method -> ``[Q, N]`` sorted magnitudes.
      fit: ``{"method", "min_rank", "max_rank", "exponent", "intercept"}`` of the median curve fit
        to draw (``log10 share = intercept - exponent log10 rank``).
      shares, exponents: method -> ``{"mean", "ci95"}``.
    """
    figure, (curve_axes, share_axes, exponent_axes) = _figure(3)
    palette = {"identity": "tab:gray", "diagonal": "tab:green", "kfac": "tab:orange",
               "ekfac": "tab:blue", "exact": "tab:red"}
    spare = iter(("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"))
    colors = {name: palette.get(name) or next(spare, "black") for name in curves}
    for name, magnitudes in curves.items():
        normalised = magnitudes / magnitudes.sum(axis=1, keepdims=True)
        ranks = np.arange(1, normalised.shape[1] + 1)
        low, median, high = np.percentile(normalised, [25, 50, 75], axis=0)
        curve_axes.plot(ranks, median, color=colors[name], label=f"{name} (median)")
        curve_axes.fill_between(ranks, low, high, color=colors[name], alpha=0.2)
    ranks = np.arange(fit["min_rank"], fit["max_rank"] + 1)
    curve_axes.plot(ranks, 10 ** (fit["intercept"] - fit["exponent"] * np.log10(ranks)), "k--",
                    linewidth=1.0,
                    label=f"{fit['method']} fit: rank^-{fit['exponent']:.2f}")
    curve_axes.set_xscale("log")
    curve_axes.set_yscale("log")
    curve_axes.set_xlabel("rank of training sequence by |influence|")
    curve_axes.set_ylabel("|influence| / total |influence| of the query")
    curve_axes.legend(fontsize=7)
    names = list(shares)
    _bars(share_axes, names, [shares[n] for n in names])
    share_axes.axhline(top_fraction, color="tab:red", linestyle="--", linewidth=1,
                       label=f"uniform ({top_fraction:.0%})")
    share_axes.set_xticks(range(len(names)), names)
    share_axes.set_ylabel(f"share of |influence| in top {top_fraction:.0%} of sequences")
    share_axes.set_xlabel("method (mean, 95% CI over queries)")
    share_axes.legend(fontsize=7)
    _bars(exponent_axes, names, [exponents[n] for n in names], color="tab:purple")
    exponent_axes.set_xticks(range(len(names)), names)
    exponent_axes.set_ylabel(f"tail exponent alpha (ranks {fit['min_rank']}-{fit['max_rank']})")
    exponent_axes.set_xlabel("method (mean, 95% CI over queries)")
    return _save(figure, path, title)


def plot_order_flip(path: Path, share: Mapping[str, Mapping[str, Mapping[str, float]]],
                    rank: Mapping[str, Mapping[str, Mapping[str, float]]],
                    control: Mapping[str, Mapping[str, Mapping[str, float]]], chance_share: float,
                    chance_rank: float, title: str | None = None) -> Path:
    """Share of positive influence held by the fact's own sequences (left; hatched: the
    same-entity control) and their mean rank (right), same-order vs flipped queries, per method
    (95% CI over queries).

    Args:
      share, rank, control: method -> {"same_order", "flipped"} -> ``{"mean", "ci95"}``.
      chance_share: expected share of randomly placed rows (mean fact rows / N).
      chance_rank: expected mean rank of randomly placed rows, ``(N + 1) / 2``.
    """
    figure, (share_axes, rank_axes) = _figure(2)
    names = list(share)
    share_label = "share of positive influence\nheld by the fact's sequences"
    rank_label = "mean rank of the fact's sequences\n(1 = most influential)"
    for axes, values, chance, label in ((share_axes, share, chance_share, share_label),
                                        (rank_axes, rank, chance_rank, rank_label)):
        controls = axes is share_axes
        width = 0.2 if controls else 0.38
        groups = ((-0.3, "same_order", "tab:blue"), (0.1, "flipped", "tab:orange")) if controls \
            else ((-0.2, "same_order", "tab:blue"), (0.2, "flipped", "tab:orange"))
        for offset, order, color in groups:
            _bars(axes, names, [values[n][order] for n in names], color=color, offset=offset,
                  width=width, label=order.replace("_", " "))
            if controls:
                positions = np.arange(len(names)) + offset + width
                axes.bar(positions, [control[n][order]["mean"] for n in names], width=width,
                         yerr=[control[n][order]["ci95"] for n in names], capsize=3,
                         color="white", edgecolor=color, hatch="//",
                         label=f"{order.replace('_', ' ')}: same-entity control")
        axes.axhline(chance, color="tab:red", linestyle="--", linewidth=1, label="no relation")
        axes.set_xticks(np.arange(len(names)) - (0.05 if controls else 0.0), names)
        axes.set_xlabel("method (mean, 95% CI over queries)")
        axes.set_ylabel(label)
        if controls:  # headroom for the legend above the bars
            tops = [values[n][o]["mean"] + values[n][o]["ci95"] for n in names
                    for o in ("same_order", "flipped")]
            axes.set_ylim(0.0, 1.45 * max(tops + [chance]))
        axes.legend(fontsize=6, ncols=2, loc="upper right")
    rank_axes.set_yscale("log")
    low, high = rank_axes.get_ylim()
    rank_axes.set_ylim(low, high * 3)  # headroom for the legend
    return _save(figure, path, title)


def plot_query_batching(path: Path, results: Mapping[str, Mapping[str, float]],
                        title: str | None = None) -> Path:
    """Pearson correlation with full-rank scores, seconds, and query memory against the query rank
    (``"full"`` drawn at the right end).

    Args:
      results: rank (``"1"``, ``"4"``, ..., ``"full"``) -> ``{"pearson", "pearson_ci95",
        "seconds", "query_bytes", "peak_rss_increase_mb"}``.
    """
    figure, (pearson_axes, time_axes, memory_axes) = _figure(3)
    labels = list(results)
    x = np.arange(len(labels))
    pearson = [results[k]["pearson"] for k in labels]
    errors = [results[k]["pearson_ci95"] for k in labels]
    pearson_axes.errorbar(x, pearson, yerr=errors, marker="o", capsize=4)
    pearson_axes.set_ylabel("Pearson r with full-rank scores\n(mean, 95% CI over queries)")
    time_axes.plot(x, [results[k]["seconds"] for k in labels], marker="o", color="tab:green")
    time_axes.set_ylabel("seconds to score (compiled, one run)")
    memory_axes.plot(x, [results[k]["query_bytes"] / 2**20 for k in labels], marker="o",
                     label="preconditioned queries held (MiB)")
    rss = [results[k]["peak_rss_increase_mb"] for k in labels]
    if all(v is not None for v in rss):
        memory_axes.plot(x, rss, marker="s", label="peak RSS increase (MiB, sampled)")
    memory_axes.set_yscale("log")
    memory_axes.set_ylabel("memory (MiB)")
    memory_axes.legend(fontsize=7)
    for axes in (pearson_axes, time_axes, memory_axes):
        axes.set_xticks(x, labels)
        axes.set_xlabel("query rank r")
    return _save(figure, path, title)


def plot_tfidf(path: Path, results: Mapping[str, Mapping[str, float]], top: int, num_train: int,
               title: str | None = None) -> Path:
    """Recall@k of the unfiltered top-``top`` sequences among the k TF-IDF candidates (left) and the
    measured and ideal speed-up of scoring only the candidate union (right), against k.

    Args:
      results: k -> ``{"recall", "recall_ci95", "speedup", "union_size"}``.
    """
    figure, (recall_axes, speed_axes) = _figure(2)
    ks = [int(k) for k in results]
    rows = [results[str(k)] for k in ks]
    recall_axes.errorbar(ks, [r["recall"] for r in rows], yerr=[r["recall_ci95"] for r in rows],
                         marker="o", capsize=4, label="TF-IDF candidates")
    recall_axes.plot(ks, [min(1.0, k / num_train) for k in ks], "k:", label="random k rows")
    recall_axes.set_xscale("log")
    recall_axes.set_ylim(0, 1.05)
    recall_axes.set_xlabel("k (candidates per query)")
    recall_axes.set_ylabel(f"recall of the unfiltered top-{top}\n(mean, 95% CI over queries)")
    recall_axes.legend(fontsize=7)
    speed_axes.plot(ks, [r["speedup"] for r in rows], marker="o", label="measured")
    speed_axes.plot(ks, [num_train / r["union_size"] for r in rows], "k:",
                    label="N / |candidate union|")
    speed_axes.set_xscale("log")
    speed_axes.set_yscale("log")
    speed_axes.set_xlabel("k (candidates per query)")
    speed_axes.set_ylabel("speed-up of scoring the candidate union\nvs all sequences")
    speed_axes.legend(fontsize=7)
    return _save(figure, path, title)
