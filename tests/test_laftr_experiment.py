"""End-to-end test of experiments/laftr with its tiny configuration (the results.json contract)."""

import math

import pytest
from experiment_runs import config_with, run_tiny_results

from experiments.laftr.configs.default import get_config
from experiments.laftr.pipeline import run, validate_config
from tda_jax.io import ArgumentMismatchError

METHODS = {"finetune", "ewc", "kfac", "coreset", "laftr"}


def _finite(*values):
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny_results("laftr", tmp_path_factory)


@pytest.mark.slow
def test_tiny_run_writes_the_results_contract(tiny_run):
    workdir, saved = tiny_run
    assert {"laftr", "ewc", "kfac", "coreset"} <= set(saved["fsd"])
    for entry in saved["fsd"].values():
        assert _finite(entry["spearman"], entry["relative_error"])
        assert -1.0 <= entry["spearman"] <= 1.0 and entry["relative_error"] >= 0.0
    for bench in ("split", "permuted"):
        assert set(saved["continual"][bench]) == METHODS
        for entry in saved["continual"][bench].values():
            assert _finite(entry["mean"], entry["ci95"]) and 0.0 <= entry["mean"] <= 1.0
    assert _finite(saved["influence"]["lds"]["mean"], saved["influence"]["lds"]["ci95"])
    assert _finite(saved["influence"]["lds_ekfac"]["mean"])
    assert 0.0 <= saved["mislabel"]["auroc"] <= 1.0
    for figure in ("fsd.png", "continual.png", "influence.png"):
        assert (workdir / figure).stat().st_size > 0


@pytest.mark.slow
def test_rerun_reuses_stages_and_refuses_changed_settings(tiny_run):
    workdir, saved = tiny_run
    again = run(get_config("tiny"), workdir)
    assert again["fsd"] == saved["fsd"] and again["continual"] == saved["continual"]
    changed = get_config("tiny")
    changed.fsd.num_epochs += 1
    with pytest.raises(ArgumentMismatchError, match="num_epochs"):
        run(changed, workdir)


def test_bad_config_values_are_named_before_any_work():
    with pytest.raises(ValueError, match="fsd.distance"):
        validate_config(config_with(get_config, **{"fsd.distance": "l2"}))
    with pytest.raises(ValueError, match="continual.laftr_variant"):
        validate_config(config_with(get_config, **{"continual.laftr_variant": "mc"}))
    with pytest.raises(ValueError, match="fsd.max_size"):
        validate_config(config_with(get_config, **{"fsd.max_size": 1e-4}))
    with pytest.raises(ValueError, match="continual.split.penalty"):
        validate_config(config_with(get_config, **{"continual.split.penalty.laftr": -1.0}))
