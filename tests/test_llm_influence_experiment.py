"""End-to-end test of experiments/llm_influence with its tiny configuration: outputs, resuming after
an interrupted stage without redoing finished work, and refusing changed or invalid settings."""

import json
import math
from pathlib import Path

import pytest
from experiment_runs import run_main

from experiments.llm_influence.configs.default import get_config
from experiments.llm_influence.pipeline import run
from tda_jax.io import ArgumentMismatchError

REPO = Path(__file__).resolve().parents[1]
METHODS = {"identity", "kfac", "ekfac"}
FIGURES = ("sparsity.png", "order_flip.png", "query_batching.png", "tfidf.png", "lds.png")


def _summary_ok(summary, low=-math.inf, high=math.inf):
    return (math.isfinite(summary["mean"]) and math.isfinite(summary["ci95"])
            and summary["ci95"] >= 0 and low <= summary["mean"] <= high)


def _check_results(saved: dict, config) -> None:
    assert set(saved["lds"]) == METHODS
    assert all(_summary_ok(s, -1.0, 1.0) for s in saved["lds"].values())
    assert _summary_ok(saved["noise_ceiling"], 0.0, 1.0)

    num_train = saved["settings"]["num_train"]
    sparsity = saved["sparsity"]
    # The top ceil(1% N) of N sorted magnitudes hold at least that fraction of the total.
    assert _summary_ok(sparsity["top1pct_share"], math.ceil(0.01 * num_train) / num_train, 1.0)
    assert _summary_ok(sparsity["tail_exponent"], 0.0)  # sorted decreasing: slope <= 0
    assert set(sparsity["by_method"]) == METHODS

    flip = saved["order_flip"]
    assert _summary_ok(flip["same_order"], 0.0, 1.0) and _summary_ok(flip["flipped"], 0.0, 1.0)
    assert all(_summary_ok(flip["mean_rank"][o], 1.0, num_train) for o in ("same_order", "flipped"))

    batching = saved["query_batching"]
    assert set(batching) == {str(r) for r in config.query_batching.ranks} | {"full"}
    assert batching["full"]["pearson"] == pytest.approx(1.0)
    for values in batching.values():
        assert -1.0 <= values["pearson"] <= 1.0 + 1e-9
        assert values["seconds"] > 0 and values["query_bytes"] > 0
        assert values["training_passes"] >= 1
    low = str(min(config.query_batching.ranks))
    assert batching[low]["query_bytes"] < batching["full"]["query_bytes"]

    tfidf = saved["tfidf"]
    assert set(tfidf) == {str(k) for k in config.tfidf.ks}
    for values in tfidf.values():
        assert 0.0 <= values["recall"] <= 1.0 and values["speedup"] > 0
        assert values["union_size"] <= num_train
        assert values["max_abs_difference_vs_full"] < 1e-4  # filtered scores = unfiltered ones
    assert tfidf[str(max(config.tfidf.ks))]["recall"] >= tfidf[str(min(config.tfidf.ks))]["recall"]

    assert saved["settings"]["num_params"] > 0
    assert {"model", "query_batching", "tfidf", "ground_truth", "total_this_run"} <= set(
        saved["timings_s"])
    assert all(f"scores/{m}" in saved["timings_s"] for m in METHODS)


@pytest.mark.slow
def test_tiny_run_writes_results_resumes_and_refuses_changed_settings(tmp_path):
    config = get_config("tiny")
    run_main("llm_influence", tmp_path)

    saved = json.loads((tmp_path / "results.json").read_text())
    _check_results(saved, config)
    assert saved["stages_reused"] == []
    for figure in FIGURES:
        assert (tmp_path / figure).stat().st_size > 0
    assert (tmp_path / "corpus" / "tokenizer.json").exists()

    # Simulated kill during query batching: the low-rank scores were saved, the full-rank ones
    # were not, and nothing after them was written (no stage marker, no results.json).
    batching = tmp_path / "query_batching"
    rank = config.query_batching.ranks[0]
    for name in ("COMPLETE", "full.npz"):
        (batching / name).unlink()
    (tmp_path / "results.json").unlink()
    finished = [tmp_path / "model" / "params.npz", batching / f"rank_{rank}.npz",
                *[tmp_path / "scores" / m / "scores.npz" for m in METHODS],
                *sorted((tmp_path / "ground_truth").glob("chunk_*.npz"))]
    stamps = {path: path.stat().st_mtime_ns for path in finished}

    again = run(config, tmp_path)
    assert set(again["stages_reused"]) == {"corpus", "model", "ground_truth", "tfidf",
                                           "curvature/ekfac"} | {f"scores/{m}" for m in METHODS}
    assert {path: path.stat().st_mtime_ns for path in finished} == stamps  # not redone
    assert (batching / "COMPLETE").exists() and (batching / "full.npz").exists()
    for key in ("lds", "noise_ceiling", "sparsity", "order_flip", "tfidf"):
        assert again[key] == saved[key]
    # The recomputed full-rank scores are the same numbers (up to float reassociation).
    assert again["query_batching"][str(rank)]["pearson"] == pytest.approx(
        saved["query_batching"][str(rank)]["pearson"], abs=1e-5)

    # A changed setting is refused before any work, and results.json is left as it was.
    before = (tmp_path / "results.json").read_text()
    changed = get_config("tiny")
    changed.train.num_epochs += 1
    with pytest.raises(ArgumentMismatchError, match="num_epochs"):
        run(changed, tmp_path)
    changed = get_config("tiny")
    changed.query_batching.ranks = (1, 2)
    with pytest.raises(ArgumentMismatchError, match="ranks"):
        run(changed, tmp_path)
    changed = get_config("tiny")
    changed.lds.num_subsets += 1
    with pytest.raises(ArgumentMismatchError, match="num_subsets"):
        run(changed, tmp_path)
    assert (tmp_path / "results.json").read_text() == before


@pytest.mark.parametrize("field, value, message", [
    ("tfidf.ks", (0, 5), "config.tfidf.ks"),
    ("tfidf.ks", (5, 10**6), "config.tfidf.ks"),
    ("methods.identity.damping", 1e-3, "config.methods.identity.damping"),
    ("methods.kfac.fisher", "true", "config.methods.kfac.fisher"),
    ("query_batching.num_queries", 10**6, "config.query_batching.num_queries"),
    ("query_batching.ranks", (4, 4), "config.query_batching.ranks"),
    ("sparsity.method", "tracin", "config.sparsity.method"),
    ("sparsity.fit_max_rank", 1, "config.sparsity.fit_min_rank"),
    ("lds.seeds_per_subset", 1, "config.lds.seeds_per_subset"),
    ("model.num_heads", 3, "config.model.d_model"),
    ("corpus.relations", ("capital", "weather"), "config.corpus"),
])
def test_invalid_settings_are_refused_naming_the_field_before_any_work(tmp_path, field, value,
                                                                       message):
    config = get_config("tiny")
    *parents, last = field.split(".")
    target = config
    for part in parents:
        target = target[part]
    target[last] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()
