"""Figures for attribution evaluations (matplotlib, drawn off-screen with the Agg canvas)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def plot_lds_bars(
    summaries: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    noise_ceiling: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Bar chart of each method's mean LDS with 95% confidence error bars.

    Args:
      summaries: method name -> ``{"mean": float, "ci95": float}`` (e.g.
        :meth:`tda_jax.evaluation.Summary.to_dict`), drawn in the given order.
      path: where to write the PNG.
      noise_ceiling: optional ``{"mean", "ci95"}`` drawn as a dashed line with a shaded band.
      title: optional figure title.

    Returns:
      The path written.
    """
    # The Agg canvas draws without pyplot, so no global backend is set for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(summaries)
    means = [summaries[n]["mean"] for n in names]
    errors = [summaries[n]["ci95"] for n in names]
    figure = Figure(figsize=(1.2 * len(names) + 2.0, 3.6), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = range(len(names))
    axes.bar(positions, means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8,
             label="LDS (95% CI over queries)")
    for x, (mean, error) in enumerate(zip(means, errors, strict=True)):
        axes.text(x, mean + (error if error == error else 0.0) + 0.01, f"{mean:.2f}",
                  ha="center", va="bottom", fontsize=8)
    if noise_ceiling is not None:
        level, band = noise_ceiling["mean"], noise_ceiling.get("ci95", 0.0)
        axes.axhline(level, color="tab:red", linestyle="--", linewidth=1.2,
                     label=f"noise ceiling ({level:.2f})")
        axes.axhspan(level - band, level + band, color="tab:red", alpha=0.12)
    axes.axhline(0.0, color="black", linewidth=0.6)
    # Headroom above the tallest bar or the ceiling band, so the legend covers neither.
    tops = [m + (e if e == e else 0.0) for m, e in zip(means, errors, strict=True)]
    if noise_ceiling is not None:
        tops.append(noise_ceiling["mean"] + noise_ceiling.get("ci95", 0.0))
    axes.set_ylim(min(0.0, *means) - 0.02, max([0.1, *tops]) * 1.3)
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, rotation=20, ha="right")
    axes.set_ylabel("linear datamodeling score")
    if title:
        axes.set_title(title, fontsize=10)
    axes.legend(loc="upper left", fontsize=8, ncols=2)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
