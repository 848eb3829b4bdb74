"""Stages (tda_jax.io): which work is protected, reuse after a crash, overwrite, corrupt files,
atomic writes and file modes."""

import json
import logging
import os
import stat

import ml_dtypes
import numpy as np
import pytest

from tda_jax import io as tio
from tda_jax.io import ArgumentMismatchError, Stage, write_json


def _files(directory):
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_stage_without_finished_work_is_reused_with_new_arguments(tmp_path, caplog):
    # A run that crashed (or had a config typo) before finishing anything: side files, a
    # half-written temporary, a dtype record whose .npz never appeared, an empty checkpoint dir.
    stage = Stage(tmp_path, {"learning_rate": 10.0, "epochs": 3})
    write_json(stage.path("data_order.json"), {"epochs": []})
    stage.path(".params.npz.1a2b.tmp").write_bytes(b"PK\x03")
    write_json(stage.path("params.dtypes.json"), {"w": "float32"})
    (tmp_path / "checkpoints").mkdir()
    assert stage.finished_work() == []

    with caplog.at_level(logging.WARNING, logger="tda_jax.io.stages"):
        again = Stage(tmp_path, {"learning_rate": 0.1, "epochs": 3})
    assert _files(tmp_path) == ["arguments.json"]
    assert json.loads(again.path("arguments.json").read_text()) == {"epochs": 3,
                                                                    "learning_rate": 0.1}
    logged = caplog.text
    assert "stale partial files" in logged and "learning_rate" in logged
    assert "data_order.json" in logged


@pytest.mark.parametrize("finish", ["marker", "part", "nested_stage", "checkpoint"])
def test_finished_work_is_protected_and_the_error_says_how_to_overwrite(tmp_path, finish):
    stage = Stage(tmp_path, {"damping": 0.1, "strategy": "ekfac"})
    if finish == "marker":
        stage.mark_complete()
        expected = "COMPLETE"
    elif finish == "part":
        stage.save_arrays("chunk_00000", {"x": np.arange(3)})
        expected = "chunk_00000.npz"
    elif finish == "nested_stage":
        Stage(tmp_path / "statistics", {"pass": 1}).mark_complete()
        expected = "statistics/COMPLETE"
    else:  # a finished orbax step (renamed from its temporary name when written)
        (tmp_path / "checkpoints" / "5").mkdir(parents=True)
        expected = "checkpoints/5/"
    assert stage.finished_work() == [expected]
    before = _files(tmp_path)

    with pytest.raises(ArgumentMismatchError) as error:
        Stage(tmp_path, {"damping": 0.5, "strategy": "ekfac"})
    message = str(error.value)
    assert "damping: saved 0.1, now 0.5" in message and "strategy" not in message
    assert expected in message and "overwrite=True" in message and "--overwrite" in message
    assert _files(tmp_path) == before  # nothing touched

    # The same arguments reuse it.
    assert Stage(tmp_path, {"strategy": "ekfac", "damping": 0.1}).finished_work() == [expected]


def test_overwrite_replaces_finished_work_and_logs_it(tmp_path, caplog):
    stage = Stage(tmp_path, {"a": 1})
    stage.save_arrays("part", {"x": np.ones(2)})
    stage.mark_complete()

    # Equal arguments: overwrite changes nothing.
    assert Stage(tmp_path, {"a": 1}, overwrite=True).is_complete()

    with caplog.at_level(logging.WARNING, logger="tda_jax.io.stages"):
        replaced = Stage(tmp_path, {"a": 2}, overwrite=True)
    assert not replaced.is_complete() and replaced.finished_work() == []
    assert _files(tmp_path) == ["arguments.json"]
    assert "overwrite requested" in caplog.text and "part.npz" in caplog.text

    # allow_overwrite reaches stages opened without an explicit overwrite (library functions).
    replaced.mark_complete()
    with pytest.raises(ArgumentMismatchError):
        Stage(tmp_path, {"a": 3})
    with tio.allow_overwrite():
        replaced = Stage(tmp_path, {"a": 3})
        assert replaced.arguments == {"a": 3} and not replaced.is_complete()
        replaced.mark_complete()
        with pytest.raises(ArgumentMismatchError):
            Stage(tmp_path, {"a": 4}, overwrite=False)  # an explicit False wins
    with pytest.raises(ArgumentMismatchError):
        Stage(tmp_path, {"a": 5})  # the block has ended


def test_unreadable_saved_arguments(tmp_path):
    stage = Stage(tmp_path, {"a": 1})
    stage.path("arguments.json").write_text('{"a": ')
    Stage(tmp_path, {"a": 1})  # nothing finished: started afresh
    assert json.loads(stage.path("arguments.json").read_text()) == {"a": 1}
    stage.mark_complete()
    stage.path("arguments.json").write_text('{"a": ')
    with pytest.raises(ArgumentMismatchError, match="arguments.json is unreadable"):
        Stage(tmp_path, {"a": 1})


@pytest.mark.parametrize("keep", [0, 20, 0.6])
def test_truncated_npz_names_the_file_the_stage_and_what_to_do(tmp_path, keep):
    stage = Stage(tmp_path / "scores", {"a": 1})
    stage.save_arrays("member_0", {"scores": np.arange(1000.0)})
    stage.mark_complete()
    path = stage.path("member_0.npz")
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError) as error:
        stage.load_arrays("member_0")
    message = str(error.value)
    assert str(path) in message and f"stage {stage.directory}" in message
    assert "truncated or corrupt" in message
    assert "Delete this file and the stage's COMPLETE marker" in message


def test_corrupt_json_names_the_file(tmp_path):
    stage = Stage(tmp_path, {"a": 1})
    stage.path("result.json").write_text('{"bounds": [1.0, ')
    with pytest.raises(tio.CorruptStageFileError, match="result.json.*truncated or corrupt"):
        stage.load_json("result.json")


def test_outputs_have_the_usual_mode(tmp_path, umask_022):
    write_json(tmp_path / "results.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
    stage = Stage(tmp_path / "stage", {"a": 1})
    stage.save_arrays("part", {"x": np.ones(2)})
    stage.mark_complete()
    tio.write_npz(tmp_path / "arrays.npz", {"x": np.ones(2)})
    reference = tmp_path / "plain.txt"
    reference.write_text("")  # what a plain open() gives under this umask
    for path in (tmp_path / "results.json", stage.path("arguments.json"), stage.path("part.npz"),
                 stage.path("part.dtypes.json"), stage.path("COMPLETE"), tmp_path / "arrays.npz"):
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode) == 0o644


def test_outputs_respect_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_json(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o600


def test_interrupted_writes_leave_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    write_json(tmp_path / "results.json", {"a": 1})
    stage = Stage(tmp_path / "stage", {"a": 1})
    stage.save_arrays("part", {"x": np.zeros(3)})
    before = _files(tmp_path)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json(tmp_path / "results.json", {"a": 2})

    def interrupted_savez(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.undo()
    monkeypatch.setattr(np, "savez", interrupted_savez)
    with pytest.raises(KeyboardInterrupt):
        stage.save_arrays("part", {"x": np.ones(3)})
    monkeypatch.undo()

    assert _files(tmp_path) == before
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    np.testing.assert_array_equal(stage.load_arrays("part")["x"], np.zeros(3))


def test_extension_dtypes_round_trip(tmp_path):
    stage = Stage(tmp_path, {"a": 1})
    values = np.linspace(-2, 2, 5).astype(ml_dtypes.bfloat16)
    stage.save_arrays("params", {"w": values, "b": np.arange(3, dtype=np.int8)})
    loaded = stage.load_arrays("params")
    assert loaded["w"].dtype == values.dtype and loaded["b"].dtype == np.int8
    np.testing.assert_array_equal(loaded["w"], values)


def test_an_array_store_with_finished_chunks_is_finished_work(tmp_path):
    store_module = pytest.importorskip("tda_jax.io.store")
    stage = Stage(tmp_path, {"a": 1})
    store = store_module.ArrayStore.create(stage.path("scores"), shape=(4, 3), dtype="float32",
                                           chunks=2, arguments={"a": 1})
    assert stage.finished_work() == []  # created, nothing written yet
    chunk = store.missing_chunks()[0]
    store.write_chunk(chunk, np.ones((2, 3), np.float32))
    store.close()
    assert stage.finished_work() == ["scores/header.json"]
    with pytest.raises(ArgumentMismatchError, match="scores/header.json"):
        Stage(tmp_path, {"a": 2})
