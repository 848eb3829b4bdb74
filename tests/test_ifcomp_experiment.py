"""End-to-end test of experiments/ifcomp with its tiny configuration, and its config checks."""

import math

import pytest
from experiment_runs import config_with, run_tiny_results

from experiments.ifcomp.configs.default import get_config
from experiments.ifcomp.pipeline import run, validate_config
from tda_jax.io import ArgumentMismatchError

CALIBRATION = {"softmax", "temperature", "ensemble", "ifcomp", "laplace"}
MISLABEL = {"ifcomp", "loss", "self_influence"}
OOD = {"ifcomp", "msp", "energy", "mahalanobis"}


def _finite(*values):
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny_results("ifcomp", tmp_path_factory)


@pytest.mark.slow
def test_tiny_run_writes_the_results_contract(tiny_run):
    workdir, saved = tiny_run
    shifts = [entry["shift"] for entry in saved["calibration"]]
    assert shifts == list(get_config("tiny").calibration.shifts) and len(shifts) >= 5
    for entry in saved["calibration"]:
        assert set(entry["methods"]) == CALIBRATION
        for values in entry["methods"].values():
            assert _finite(values["ece"], values["nll"], values["ece_ci95"], values["nll_ci95"])
            assert 0.0 <= values["ece"] <= 1.0 and values["nll"] > 0.0
    for task, methods in (("mislabel", MISLABEL), ("ood", OOD)):
        assert set(saved[task]) == methods
        for values in saved[task].values():
            assert _finite(values["auroc"], values["ci95"])
            assert 0.0 <= values["auroc"] <= 1.0 and values["ci95"] > 0.0
    rho = saved["oracle"]["spearman_vs_brute_force"]
    assert _finite(rho) and -1.0 <= rho <= 1.0
    # Mislabelled training points have a higher loss than clean ones even in the tiny run.
    assert saved["mislabel"]["loss"]["auroc"] > 0.55
    assert saved["stages_reused"] == []
    for figure in ("calibration.png", "detection.png"):
        assert (workdir / figure).stat().st_size > 0


@pytest.mark.slow
def test_rerun_reuses_stages_and_refuses_changed_settings(tiny_run):
    workdir, saved = tiny_run
    again = run(get_config("tiny"), workdir)
    assert set(again["stages_reused"]) == {"models", "calibration", "mislabel", "ood", "oracle"}
    assert again["mislabel"] == saved["mislabel"] and again["ood"] == saved["ood"]
    assert again["calibration"] == saved["calibration"]
    before = (workdir / "results.json").read_text()
    changed = get_config("tiny")
    changed.mislabel.fraction = 0.3
    with pytest.raises(ArgumentMismatchError, match="fraction"):
        run(changed, workdir)
    assert (workdir / "results.json").read_text() == before


@pytest.mark.parametrize("field, value, expected", [
    ("ifcomp.temperatures", (1.0, 0.0), "finite numbers > 0"),
    ("ifcomp.epsilons", (), "non-empty list"),
    ("ifcomp.damping", -1.0, "finite number >= 0"),
    ("calibration.shifts", (0.0, 0.5, 1.0, 2.0), "at least 5 distinct"),
    ("calibration.shifts", (0.0, 0.5, 1.0, 2.0, -1.0), "at least 5 distinct"),
    ("calibration.ece_bins", 1, "integer >= 2"),
    ("calibration.ensemble_size", 1, "integer >= 2"),
    ("mislabel.fraction", 1.0, "strictly between 0 and 1"),
    ("ood.num_in_classes", 10, "<= 9"),
    ("oracle.temperature", 0.0, "> 0"),
    ("oracle.activation", "gelu", "one of ('relu', 'tanh')"),
    ("oracle.num_train", 100_000, "<= data.num_train"),
    ("train.optimizer", "adam", "one of"),
])
def test_validate_config_names_the_bad_field(field, value, expected):
    config = config_with(get_config, "tiny", **{field: value})
    with pytest.raises(ValueError, match=f"config.{field}") as error:
        validate_config(config)
    assert expected in str(error.value)


def test_validate_config_refuses_unknown_fields_and_accepts_defaults():
    validate_config(get_config())
    validate_config(get_config("tiny"))
    config = get_config("tiny")
    config.ifcomp.temprature = 1.0
    with pytest.raises(ValueError, match="unknown field.*temprature"):
        validate_config(config)
