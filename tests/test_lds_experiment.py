"""End-to-end test of experiments/lds with its tiny configuration."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from experiment_runs import config_with, run_main

from experiments.lds.configs.default import get_config
from experiments.lds.pipeline import run
from tda_jax.io import ArgumentMismatchError

REPO = Path(__file__).resolve().parents[1]
METHODS = {"identity", "diagonal", "kfac", "ekfac", "exact", "ekfac_ensemble"}


def _finite_summary(summary):
    return set(summary) == {"mean", "ci95", "num_queries"} and all(
        math.isfinite(summary[k]) for k in ("mean", "ci95")
    )


@pytest.mark.slow
def test_tiny_run_writes_results_reuses_stages_and_refuses_changed_settings(tmp_path):
    config = get_config("tiny")
    run_main("lds", tmp_path)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["lds"]) == METHODS
    assert all(_finite_summary(s) for s in saved["lds"].values())
    assert _finite_summary(saved["noise_ceiling"])
    assert 0.0 <= saved["noise_ceiling"]["mean"] <= 1.0
    assert saved["skipped"] == {}
    assert {"ground_truth", "models", "total_this_run"} <= set(saved["timings_s"])
    assert all(f"scores/{m}" in saved["timings_s"] for m in METHODS)
    assert saved["settings"]["num_params"] > 0
    assert saved["stages_reused"] == []
    assert (tmp_path / "lds.png").stat().st_size > 0

    # A rerun (in this process) reuses every stage and reproduces the numbers.
    again = run(config, tmp_path)
    assert set(again["stages_reused"]) == {"ground_truth", "models"} | {
        f"scores/{m}" for m in METHODS
    }
    assert again["lds"] == saved["lds"]
    assert again["noise_ceiling"] == saved["noise_ceiling"]

    # A changed setting is refused before any work, and results.json is left as it was.
    before = (tmp_path / "results.json").read_text()
    changed = get_config("tiny")
    changed.train.num_epochs += 1
    with pytest.raises(ArgumentMismatchError, match="num_epochs"):
        run(changed, tmp_path)
    changed = get_config("tiny")
    changed.methods.ekfac.damping = 1e-3
    with pytest.raises(ArgumentMismatchError, match="damping"):
        run(changed, tmp_path)
    assert (tmp_path / "results.json").read_text() == before

    # Above the parameter threshold the exact method is skipped with its reason; the other stages
    # are reused (nothing else depends on the threshold).
    config.exact_max_params = 10
    skipping = run(config, tmp_path)
    assert set(skipping["lds"]) == METHODS - {"exact"}
    assert "exact_max_params" in skipping["skipped"]["exact"]
    assert skipping["lds"]["ekfac"] == saved["lds"]["ekfac"]



@pytest.mark.parametrize("field, value, expected", [
    ("methods.kfac.strategy", "kfca", "one of ("),
    ("methods.ekfac.fisher", "true", "'expected', 'sampled', 'empirical'"),
    ("methods.kfac.damping", -1e-3, "finite number >= 0"),
    ("methods.kfac.damping", float("inf"), "finite number >= 0"),
    ("methods.identity.damping", 1e-3, "no curvature"),
    ("methods.ekfac_ensemble.ensemble_size", 0, "integer >= 1"),
    ("lds.fraction", 1.0, "strictly between 0 and 1"),
    ("lds.fraction", 0.0, "strictly between 0 and 1"),
    ("lds.num_subsets", 1, "integer >= 2"),
    ("lds.seeds_per_subset", 0, "integer >= 1"),
    ("train.batch_size", -64, "integer >= 1"),
    ("train.learning_rate", 0.0, "> 0"),
    ("train.optimizer", "adam", "'adamw', 'sgd'"),
    ("data.name", "mnist", "'mnist1d'"),
    ("model.name", "cnn", "'mlp'"),
    ("model.hidden_sizes", (16, 0), "positive integers"),
    ("num_queries", 101, "<= 100"),
    ("curvature_batch_size", 0, "integer >= 1"),
])
def test_validate_config_names_the_field_and_value(field, value, expected):
    from experiments.lds.pipeline import validate_config

    for arg in (None, "tiny", "exact"):
        validate_config(get_config(arg))
    with pytest.raises(ValueError) as error:
        validate_config(config_with(get_config, **{field: value}))
    message = str(error.value)
    assert f"config.{field} = {value!r}" in message and expected in message


def test_validate_config_refuses_unknown_fields():
    from experiments.lds.pipeline import validate_config

    config = get_config("tiny")
    config.methods.kfac.dampnig = 1e-3
    with pytest.raises(ValueError, match=r"config.methods.kfac has unknown field\(s\) \['dampnig'\]"):
        validate_config(config)


def test_misspelled_strategy_fails_before_any_stage(tmp_path):
    from experiments.lds.pipeline import validate_config  # noqa: F401 (absent before the fix)

    with pytest.raises(ValueError, match="config.methods.kfac.strategy = 'kfca'"):
        run(config_with(get_config, **{"methods.kfac.strategy": "kfca"}), tmp_path)
    assert list(tmp_path.iterdir()) == []


class _ReachedGroundTruth(Exception):
    pass


def test_unfinished_stages_restart_and_overwrite_replaces_finished_ones(tmp_path, monkeypatch):
    """Stages are opened (and their arguments settled) before the ground truth; the models and
    score stages here stand for every stage of the run."""
    import jax
    import numpy as np

    from experiments.lds import pipeline
    from tda_jax.data import Dataset
    from tda_jax.io import Stage

    train = Dataset(np.zeros((10, 2), np.float32), np.zeros(10, np.int32), 2)
    problem = SimpleNamespace(
        num_params=100, train=train, subset_key=jax.random.key(0), loss=SimpleNamespace(name="ce"),
        measurement=pipeline.losses.classification_margin, common={"seed": 0, "now": 1},
        query_arguments={"num_queries": 2})
    monkeypatch.setattr(pipeline, "make_problem", lambda config: problem)

    def stop(*args, **kwargs):
        raise _ReachedGroundTruth

    monkeypatch.setattr(pipeline, "ground_truth_stage", stop)
    config = get_config("tiny")
    # A crashed run with other settings: nothing finished, so it is restarted without a flag.
    crashed = Stage(tmp_path / "models", {"seed": 0, "before": 1})
    (crashed.path("timing.json")).write_text("{}")
    with pytest.raises(_ReachedGroundTruth):
        run(config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["arguments.json"]

    # Finished work with other settings is refused, and replaced with overwrite=True.
    finished = Stage(tmp_path / "scores" / "kfac", {"method": "old"})
    finished.save_arrays("member_0", {"scores": np.zeros((2, 10))})
    finished.mark_complete()
    with pytest.raises(ArgumentMismatchError, match="member_0.npz"):
        run(config, tmp_path)
    assert finished.is_complete()
    with pytest.raises(_ReachedGroundTruth):
        run(config, tmp_path, overwrite=True)
    assert not finished.is_complete() and finished.finished_work() == []
