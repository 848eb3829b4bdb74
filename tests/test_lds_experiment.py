"""End-to-end test of experiments/lds with its tiny configuration."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.lds.configs.default import get_config
from experiments.lds.pipeline import run
from tda_jax.io import ArgumentMismatchError

REPO = Path(__file__).resolve().parents[1]
METHODS = {"identity", "diagonal", "kfac", "ekfac", "exact", "ekfac_ensemble"}


def _finite_summary(summary):
    return set(summary) == {"mean", "ci95", "num_queries"} and all(
        math.isfinite(summary[k]) for k in ("mean", "ci95")
    )


def _run_tiny_command(workdir: Path) -> None:
    """The first run goes through main.py in a fresh process, where the tiny config's
    ``fast_compile`` (unoptimized XLA backend) can take effect; it is compile-bound."""
    env = dict(os.environ, TDA_JAX_PROGRESS="0", MPLBACKEND="Agg")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run(
        [sys.executable, "-m", "experiments.lds.main",
         "--config=experiments/lds/configs/default.py:tiny", f"--workdir={workdir}"],
        cwd=REPO, env=env, check=True, timeout=900,
    )


@pytest.mark.slow
def test_tiny_run_writes_results_reuses_stages_and_refuses_changed_settings(tmp_path):
    config = get_config("tiny")
    _run_tiny_command(tmp_path)

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

