"""End-to-end run of the MI-bounds experiment with its tiny config (experiments/mi_bounds)."""

import json
from pathlib import Path

import numpy as np
import pytest
from experiment_runs import config_with, run_main

from experiments.mi_bounds.configs.default import get_config
from tda_jax.io import ArgumentMismatchError

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("ba", "infonce", "iwae_lower", "iwae_upper", "giwae", "ais_lower", "ais_upper",
            "mine_ais")


def _run_tiny(workdir: Path) -> dict:
    run_main("mi_bounds", workdir)
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
    Stage(tmp_path / "gaussian" / f"mi_{level:g}",
          {"gaussian": config.gaussian, "level": level}).mark_complete()
    config.gaussian.num_samples = 17
    with pytest.raises(ArgumentMismatchError, match="num_samples"):
        run_gaussian_level(config, level, tmp_path)


@pytest.mark.parametrize("field, value, expected", [
    ("vae.data.name", "mnist", "'mnist1d', 'digits'"),
    ("gaussian.mi_levels", (4.0, -1.0), "finite MI values > 0"),
    ("gaussian.mi_levels", (), "non-empty"),
    ("gaussian.num_samples", 0, "integer >= 1"),
    ("gaussian.ais.schedule_start", 0.0, "strictly between 0 and 1"),
    ("gaussian.ais.num_tuning_examples", 17, "<= 16"),
    ("gaussian.base", "orthonormal", "'orthogonal', 'gaussian'"),
    ("gaussian.x_dim", 2, "integer >= 4"),
    ("gaussian.noise_std", float("nan"), "finite number > 0"),
    ("gaussian.mine.learning_rate", -0.1, "finite number > 0"),
    ("gaussian.mine.ais.num_chains", 0, "integer >= 1"),
    ("vae.bounds.giwae.num_samples", 0, "integer >= 1"),
    ("vae.latent_dims", (2, 0), "positive integers"),
    ("vae.min_std", 0.0, "finite number > 0"),
    ("vae.train.batch_size", 0, "integer >= 1"),
])
def test_validate_config_names_the_field_and_value(field, value, expected):
    from experiments.mi_bounds.configs.default import get_config
    from experiments.mi_bounds.run import validate_config

    for arg in (None, "tiny"):
        validate_config(get_config(arg))
    with pytest.raises(ValueError) as error:
        validate_config(config_with(get_config, **{field: value}))
    message = str(error.value)
    assert f"config.{field} = {value!r}" in message and expected in message


def test_typo_fails_before_any_stage(tmp_path):
    from experiments.mi_bounds.run import train_and_evaluate, validate_config  # noqa: F401

    config = config_with(get_config, **{"vae.data.name": "mnist"})
    with pytest.raises(ValueError, match="config.vae.data.name = 'mnist'"):
        train_and_evaluate(config, tmp_path)
    assert list(tmp_path.iterdir()) == []


class _Reached(Exception):
    pass


def test_unfinished_stage_restarts_and_overwrite_replaces_finished_work(tmp_path, monkeypatch):
    from experiments.mi_bounds import run as mi_run
    from experiments.mi_bounds.configs.default import get_config
    from tda_jax.io import Stage

    def stop(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(mi_run, "_fit_encoder", stop)  # the first work after the stage opens
    config = get_config("tiny")
    level = config.gaussian.mi_levels[0]
    directory = tmp_path / "gaussian" / f"mi_{level:g}"
    crashed = Stage(directory, {"gaussian": {"num_samples": 3}, "level": level})
    crashed.path("result.json").write_text('{"bounds": ')  # half-written, never marked
    with pytest.raises(_Reached):
        mi_run.train_and_evaluate(config, tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == ["arguments.json"]

    Stage(directory, {"gaussian": {"num_samples": 3}, "level": level},
          overwrite=True).mark_complete()
    with pytest.raises(ArgumentMismatchError, match="num_samples"):
        mi_run.train_and_evaluate(config, tmp_path)
    with pytest.raises(_Reached):
        mi_run.train_and_evaluate(config, tmp_path, overwrite=True)
    assert not (directory / "COMPLETE").exists()


def _fake_gaussian_results():
    names = ("ba", "iwae_lower", "ais_lower", "ais_upper")
    return [{"true_mi_sample": mi, "ais_width": 0.3,
             "bounds": {n: mi - 0.5 + 0.1 * i for i, n in enumerate(names)},
             "stderr": {n: 0.05 * (i + 1) for i, n in enumerate(names)}}
            for mi in (2.0, 4.0)]


def test_gaussian_figure_shows_standard_errors():
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from experiments.mi_bounds.configs.default import get_config
    from experiments.mi_bounds.run import _STYLE, gaussian_figure

    results = _fake_gaussian_results()
    fig = gaussian_figure(results, get_config("tiny"))
    try:
        bounds_axes = fig.axes[0]
        containers = {c.get_label(): c for c in bounds_axes.containers
                      if isinstance(c, ErrorbarContainer)}
        assert len(containers) == len(results[0]["bounds"])
        for name in results[0]["bounds"]:
            container = containers[_STYLE[name][0]]
            segments = container.lines[2][0].get_segments()  # one vertical bar per level
            half_lengths = [0.5 * abs(seg[1][1] - seg[0][1]) for seg in segments]
            np.testing.assert_allclose(half_lengths, [r["stderr"][name] for r in results])
    finally:
        plt.close(fig)


def test_vae_figure_is_titled_with_the_dataset_and_not_clipped():
    import matplotlib.pyplot as plt

    from experiments.mi_bounds.configs.default import get_config
    from experiments.mi_bounds.run import VAE_TABLE_ROWS, vae_table_figure

    entry = {"latent_dim": 2, "ais_width": 0.5,
             "bounds": {n: float(i) for i, n in enumerate(VAE_TABLE_ROWS)}}
    data_config = get_config("tiny").vae.data
    assert data_config.name == "digits"
    fig = vae_table_figure({"latent_2": entry}, data_config)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        titles = [t for t in fig.texts + [ax.title for ax in fig.axes] if t.get_text()]
        assert len(titles) == 1
        title = titles[0]
        assert "digits" in title.get_text() and "MNIST" not in title.get_text()
        box, frame = title.get_window_extent(renderer), fig.bbox
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
    finally:
        plt.close(fig)
