"""End-to-end run of the MI-bounds experiment with its tiny config (experiments/mi_bounds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tda_jax.io import ArgumentMismatchError

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("ba", "infonce", "iwae_lower", "iwae_upper", "giwae", "ais_lower", "ais_upper",
            "mine_ais")


def _run_tiny(workdir: Path) -> dict:
    env = dict(os.environ)
    env["TDA_JAX_PROGRESS"] = "0"
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.mi_bounds.main",
            "--config=experiments/mi_bounds/configs/default.py:tiny",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=env,
        check=True,
        timeout=900,
    )
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_tiny_run_writes_results_and_resumes(tmp_path):
    results = _run_tiny(tmp_path)
    assert set(results) >= {"gaussian", "vae"}
    assert len(results["gaussian"]) >= 1
    for level in results["gaussian"]:
        assert {"true_mi", "true_mi_sample", "bounds"} <= set(level)
        assert set(REQUIRED) <= set(level["bounds"])
        assert level["bounds"]["ais_lower"] <= level["bounds"]["ais_upper"]
        assert level["bounds"]["infonce"] <= level["info"]["infonce_log_k"] + 1e-5
    assert results["vae"]
    for entry in results["vae"].values():
        assert set(REQUIRED) <= set(entry["bounds"])
    for name in ("gaussian_bounds.png", "vae_bounds.png", "vae_table.md"):
        assert (tmp_path / name).stat().st_size > 0
    # A rerun reuses every finished stage (nothing is recomputed or overwritten).
    stage_file = next((tmp_path / "gaussian").glob("*/result.json"))
    mtime = stage_file.stat().st_mtime_ns
    again = _run_tiny(tmp_path)
    assert stage_file.stat().st_mtime_ns == mtime
    assert again["gaussian"] == results["gaussian"]
    assert again["vae"] == results["vae"]


def test_stage_refuses_mismatched_settings(tmp_path):
    from experiments.mi_bounds.configs.default import get_config
    from experiments.mi_bounds.run import run_gaussian_level
    from tda_jax.io import Stage

    config = get_config("tiny")
    level = config.gaussian.mi_levels[0]
    Stage(tmp_path / "gaussian" / f"mi_{level:g}", {"gaussian": config.gaussian, "level": level})
    config.gaussian.num_samples = 17
    with pytest.raises(ArgumentMismatchError, match="num_samples"):
        run_gaussian_level(config, level, tmp_path)
