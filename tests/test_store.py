"""Array stores (tda_jax.io.store) and resumable pipelines: curvature stages and stored scores survive
SIGKILL at any point and finish bitwise equal to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from tda_jax.attribution import fit_curvature, pairwise_scores, self_scores
from tda_jax.data import Dataset
from tda_jax.io import ArgumentMismatchError, ArrayStore, StoreCorruptError
from tda_jax.io.store import DATA_FILE, HEADER_FILE
from tda_jax.losses import classification_margin, negative_loss, softmax_cross_entropy

ROOT = Path(__file__).resolve().parents[1]


def _values(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_round_trip_partial_chunks_and_reopen(tmp_path):
    values = _values((7, 5, 2))
    store = ArrayStore.create(tmp_path / "s", values.shape, "float32", (3, 2), {"kind": "test"})
    assert store.grid == (3, 3) and store.num_chunks == 9 and not store.complete
    assert store.chunk_region((2, 2)) == (slice(6, 7), slice(4, 5))
    done = [(0, 0), (0, 1), (2, 2), (1, 1)]
    for chunk in done:
        store.write_chunk(chunk, values[store.chunk_region(chunk)])
    assert all(store.is_complete(c) for c in done) and not store.is_complete((1, 0))
    assert store.missing_chunks() == [c for c in store.chunk_ids() if c not in done]
    np.testing.assert_array_equal(store.read(rows=slice(0, 3), cols=slice(0, 4)), values[:3, :4])
    np.testing.assert_array_equal(store.read(rows=[5, 3], cols=[3, 2]), values[[5, 3]][:, [3, 2]])
    np.testing.assert_array_equal(store.read(rows=5, cols=3), values[5, 3])
    np.testing.assert_array_equal(store[0:3, 1:4, 1], values[0:3, 1:4, 1])
    with pytest.raises(ValueError, match=r"not completed chunks \[\(1, 0\)\]"):
        store.read(rows=4, cols=slice(0, 2))
    with pytest.raises(ValueError, match="not completed chunks"):
        np.asarray(store)
    np.testing.assert_array_equal(store.read(rows=4, allow_incomplete=True)[:2], 0.0)
    with pytest.raises(ValueError, match="already complete"):
        store.write_chunk((0, 0), values[:3, :2])
    with pytest.raises(ValueError, match=r"shape \(3, 2, 2\)"):
        store.write_chunk((1, 0), values[:2, :2])
    with pytest.raises(IndexError, match="chunk grid"):
        store.write_chunk(3, values[:3, :2])

    reopened = ArrayStore.open(tmp_path / "s")  # another handle sees the recorded chunks
    assert reopened.missing_chunks() == store.missing_chunks()
    with pytest.raises(ValueError, match="read-only"):
        reopened.write_chunk((1, 0), values[3:6, :2])
    writer = ArrayStore.open(tmp_path / "s", mode="r+")
    for chunk in writer.missing_chunks():
        writer.write_chunk(chunk, values[writer.chunk_region(chunk)])
    assert writer.complete and not reopened.complete
    reopened.refresh()
    assert reopened.complete
    np.testing.assert_array_equal(np.asarray(reopened), values)
    # Plain .npy and plain JSON: readable without this module, no pickle.
    np.testing.assert_array_equal(np.load(tmp_path / "s" / DATA_FILE, allow_pickle=False), values)
    header = json.loads((tmp_path / "s" / HEADER_FILE).read_text())
    assert header["complete"] and header["complete_chunks"] == [[0, 9]]

    rows = ArrayStore.create(tmp_path / "rows", (10, 3), "bfloat16", 4, {})  # gradient-store shape
    assert rows.grid == (3,) and rows.missing_chunks() == [0, 1, 2]
    rows.write_chunk(2, np.ones((2, 3), np.float32))
    assert rows.read(rows=slice(8, 10)).dtype.name == "bfloat16"
    with pytest.raises(TypeError, match="no objects"):
        ArrayStore.create(tmp_path / "obj", (2,), object, 1, {})


def test_other_arguments_are_refused_by_name_unless_overwrite(tmp_path):
    path = tmp_path / "s"
    store = ArrayStore.create(path, (4, 3), "float32", 2, {"params": "abc", "rank": 2})
    store.write_chunk(0, np.ones((2, 3), np.float32))
    same = ArrayStore.create(path, (4, 3), "float32", (2,), {"rank": 2, "params": "abc"})
    assert same.is_complete(0) and same.missing_chunks() == [1]  # resumed, not recreated
    with pytest.raises(ArgumentMismatchError) as error:
        ArrayStore.create(path, (4, 3), "float32", 2, {"params": "xyz", "rank": 2})
    assert "arguments.params: saved 'abc', now 'xyz'" in str(error.value)
    assert "rank" not in str(error.value)
    with pytest.raises(ArgumentMismatchError) as error:
        ArrayStore.create(path, (4, 3), "float64", 1, {"params": "abc", "rank": 2})
    assert "chunks: saved [2], now [1]" in str(error.value) and "dtype: saved 'float32'" in \
        str(error.value) and "arguments" not in str(error.value).split("\n", 1)[1]
    with pytest.raises(ArgumentMismatchError, match="shape"):
        ArrayStore.create(path, (5, 3), "float32", 2, {"params": "abc", "rank": 2})
    with pytest.raises(ArgumentMismatchError, match="arguments.rank"):
        same.check_arguments({"params": "abc", "rank": 3})
    fresh = ArrayStore.create(path, (4, 3), "float32", 2, {"params": "xyz", "rank": 2},
                              overwrite=True)
    assert fresh.missing_chunks() == [0, 1]
    assert ArrayStore.open(path).arguments == {"params": "xyz", "rank": 2}
    # Nothing finished yet: a store with other settings is replaced, nothing is lost.
    replaced = ArrayStore.create(path, (6, 3), "float32", 3, {"params": "new"})
    assert replaced.missing_chunks() == [0, 1] and replaced.shape == (6, 3)


def test_corrupt_or_missing_files_are_named(tmp_path):
    path = tmp_path / "s"
    ArrayStore.create(path, (4, 3), "float32", 2, {"a": 1})
    (path / HEADER_FILE).write_text('{"format": "tda_jax.ArrayStore", "shape": [4')
    for call in (lambda: ArrayStore.open(path), lambda: ArrayStore.create(path, (4, 3), "float32",
                                                                          2, {"a": 1})):
        with pytest.raises(StoreCorruptError, match=str(path / HEADER_FILE)):
            call()
    store = ArrayStore.create(path, (4, 3), "float32", 2, {"a": 1}, overwrite=True)
    assert store.missing_chunks() == [0, 1]
    (path / HEADER_FILE).write_text('{"shape": [4, 3]}')
    with pytest.raises(StoreCorruptError, match="not an array store header"):
        ArrayStore.open(path)
    ArrayStore.create(path, (4, 3), "float32", 2, {"a": 1}, overwrite=True)
    with open(path / DATA_FILE, "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreCorruptError, match=str(path / DATA_FILE)):
        ArrayStore.open(path)
    (path / DATA_FILE).unlink()
    with pytest.raises(StoreCorruptError, match="no data file"):
        ArrayStore.open(path)
    with pytest.raises(FileNotFoundError, match="no array store"):
        ArrayStore.open(tmp_path / "nowhere")


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


def _problem(num_train=96, num_queries=10):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_train + num_queries, 4)).astype(np.float32)
    y = np.argmax(x[:, :3] + 0.5 * rng.normal(size=(len(x), 3)), axis=1).astype(np.int32)
    model = _MLP()
    params = model.init(jax.random.key(0), x[:1])["params"]
    apply_fn = lambda p, inputs: model.apply({"params": p}, inputs)
    return apply_fn, params, Dataset(x[:num_train], y[:num_train], 3), \
        Dataset(x[num_train:], y[num_train:], 3)


def test_stored_scores_equal_in_memory_and_resume_only_missing_chunks(tmp_path, monkeypatch):
    apply_fn, params, train, queries = _problem()
    loss = softmax_cross_entropy()
    curvature = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss, batch_size=32)
    # 67 parameters x 4 bytes: super-blocks of 4 queries (3 rows of chunks), 1 batch per chunk.
    kwargs = dict(loss=loss, measurement=classification_margin, query_batch_size=2,
                  train_batch_size=32, max_query_bytes=4 * 67 * 4)
    expected = pairwise_scores(apply_fn, params, curvature, queries, train, **kwargs)

    real_write = ArrayStore.write_chunk
    written = []

    def crash_after_four(self, chunk, values):
        if len(written) == 4:
            raise KeyboardInterrupt("simulated crash")
        written.append(chunk)
        real_write(self, chunk, values)

    monkeypatch.setattr(ArrayStore, "write_chunk", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        pairwise_scores(apply_fn, params, curvature, queries, train, store=tmp_path / "scores",
                        store_chunk_batches=1, **kwargs)
    monkeypatch.setattr(ArrayStore, "write_chunk", real_write)
    partial = ArrayStore.open(tmp_path / "scores")
    assert partial.chunks == (4, 32) and partial.grid == (3, 3)
    assert partial.missing_chunks() == [c for c in partial.chunk_ids() if c not in written]

    computed = []
    monkeypatch.setattr(ArrayStore, "write_chunk",
                        lambda self, chunk, values: (computed.append(chunk),
                                                     real_write(self, chunk, values)))
    # Other batch sizes on resume: the store keeps its layout (4 queries x 32 examples per chunk).
    store = pairwise_scores(apply_fn, params, curvature, queries, train, store=tmp_path / "scores",
                            **{**kwargs, "train_batch_size": 16, "query_batch_size": 3})
    assert computed == partial.missing_chunks() and store.complete
    # Other query block sizes may reassociate float sums (batched matmuls): equal to float32 noise.
    np.testing.assert_allclose(np.asarray(store), expected, rtol=1e-5, atol=1e-5)
    computed.clear()
    again = pairwise_scores(apply_fn, params, curvature, queries, train, store=tmp_path / "scores",
                            steps="unused when every chunk is complete", **kwargs)
    assert computed == [] and again.complete

    with pytest.raises(ArgumentMismatchError, match="measurement"):
        pairwise_scores(apply_fn, params, curvature, queries, train, store=tmp_path / "scores",
                        **{**kwargs, "measurement": negative_loss(loss)})
    other_params = jax.tree.map(lambda p: p + 1.0, params)
    with pytest.raises(ArgumentMismatchError, match="params_fingerprint"):
        pairwise_scores(apply_fn, other_params, curvature, queries, train,
                        store=tmp_path / "scores", **kwargs)

    module = pairwise_scores(apply_fn, params, curvature, queries, train, granularity="module",
                             store=tmp_path / "m", store_chunk_batches=2, **kwargs)
    assert module.shape == (10, 96, 2) and module.chunks == (4, 64)
    np.testing.assert_allclose(module.read().sum(-1), expected, rtol=1e-5, atol=1e-6)


# A pipeline (EK-FAC fit with a stage directory, then stored scores) that can stop itself at a
# named point: it writes ``ready`` and sleeps until the test SIGKILLs it.
_PIPELINE = textwrap.dedent('''
    import sys, time
    from pathlib import Path

    import jax
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_compilation_cache_dir", sys.argv[3])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from tda_jax.attribution import fit_curvature, pairwise_scores
    from tda_jax.curvature import fit as fit_module
    from tda_jax.curvature.blocks import get_block
    from tda_jax.io import ArrayStore, fingerprint
    from tda_jax.losses import classification_margin, softmax_cross_entropy
    sys.path.insert(0, sys.argv[4])
    from test_store import _problem

    work, point = Path(sys.argv[1]), sys.argv[2]
    count = {"calls": 0, "pass": ""}

    def stop_here():
        (work / "ready").write_text(point)
        time.sleep(600)

    if point in ("covariance", "lambda"):  # inside the pass, after its first batch
        run_pass, accumulate = fit_module.run_pass, fit_module._accumulate

        def counting_run_pass(*args, desc, **kwargs):
            count["pass"], count["calls"] = desc, 0
            return run_pass(*args, desc=desc, **kwargs)

        def stopping_accumulate(*args):
            count["calls"] += 1
            if count["pass"].endswith(point) and count["calls"] == 2:
                stop_here()
            return accumulate(*args)

        fit_module.run_pass, fit_module._accumulate = counting_run_pass, stopping_accumulate
    elif point == "eigh":  # between the two layers' eigendecompositions
        block = get_block("ekfac")
        layer_finalize = block.layer_finalize

        def stopping_finalize(pass_name, *args):
            if pass_name == "covariance":
                count["calls"] += 1
                if count["calls"] == 2:
                    stop_here()
            return layer_finalize(pass_name, *args)

        block.layer_finalize = stopping_finalize
    elif point == "scores":  # computing the third chunk (after two recorded)
        write_chunk = ArrayStore.write_chunk

        def stopping_write(self, chunk, values):
            count["calls"] += 1
            if count["calls"] == 3:
                stop_here()
            write_chunk(self, chunk, values)

        ArrayStore.write_chunk = stopping_write
    elif point == "record":  # a chunk's data flushed, its header record not yet written
        record = ArrayStore._record

        def stopping_record(self, number):
            stop_here()
            record(self, number)

        ArrayStore._record = stopping_record

    apply_fn, params, train, queries = _problem()
    loss = softmax_cross_entropy()
    curvature = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss, batch_size=32,
                              stage_dir=str(work / "curvature"))
    store = pairwise_scores(apply_fn, params, curvature, queries, train, loss=loss,
                            measurement=classification_margin, query_batch_size=2,
                            train_batch_size=32, max_query_bytes=4 * 67 * 4,
                            store=work / "scores", store_chunk_batches=1)
    (work / "factors.txt").write_text(fingerprint(curvature.factors))
    (work / "done").write_text(str(store.complete))
''')


def _run_pipeline(work: Path, point: str, script: Path) -> None:
    """Runs the pipeline; with a kill point, SIGKILLs it once it reports reaching that point."""
    work.mkdir(exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TDA_JAX_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    cache = os.environ.get("TDA_JAX_TEST_CACHE", str(ROOT / ".pytest_cache" / "jax"))
    process = subprocess.Popen([sys.executable, str(script), str(work), point, cache,
                                str(ROOT / "tests")], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ready = work / "ready"
    deadline = time.monotonic() + 120
    while point != "none" and not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"pipeline never reached {point!r}:\n"
                                 f"{process.communicate()[0].decode()[-3000:]}")
        time.sleep(0.02)
    if point != "none":
        os.kill(process.pid, signal.SIGKILL)
        ready.unlink()
    output = process.communicate(timeout=120)[0].decode()
    if point == "none":
        assert process.returncode == 0, output[-3000:]
    else:
        assert process.returncode == -signal.SIGKILL, output[-3000:]


@pytest.mark.slow
def test_sigkill_at_any_stage_then_rerun_is_bitwise_equal(tmp_path):
    script = tmp_path / "pipeline.py"
    script.write_text(_PIPELINE)
    reference = tmp_path / "reference"
    _run_pipeline(reference, "none", script)

    work = tmp_path / "killed"
    stage = work / "curvature"
    _run_pipeline(work, "covariance", script)
    assert not (stage / "covariance.npz").exists() and not (work / "scores").exists()
    _run_pipeline(work, "eigh", script)  # reruns covariance, dies in its eigendecompositions
    assert (stage / "covariance.npz").exists() and not (stage / "lambda.npz").exists()
    _run_pipeline(work, "lambda", script)
    assert not (stage / "lambda.npz").exists() and not (stage / "COMPLETE").exists()
    _run_pipeline(work, "scores", script)
    assert (stage / "COMPLETE").exists()
    assert len(ArrayStore.open(work / "scores").missing_chunks()) == 9 - 2
    _run_pipeline(work, "record", script)  # the chunk in flight is lost, nothing else
    assert len(ArrayStore.open(work / "scores").missing_chunks()) == 9 - 2
    _run_pipeline(work, "none", script)

    assert (work / "done").read_text() == "True"
    assert (work / "factors.txt").read_text() == (reference / "factors.txt").read_text()
    got = ArrayStore.open(work / "scores").read()
    expected = ArrayStore.open(reference / "scores").read()
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


_SELF_PIPELINE = textwrap.dedent('''
    import sys, time
    from pathlib import Path

    import jax
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_compilation_cache_dir", sys.argv[3])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from tda_jax.attribution import fit_curvature, self_scores
    from tda_jax.io import ArrayStore
    from tda_jax.losses import softmax_cross_entropy
    sys.path.insert(0, sys.argv[4])
    from test_store import _problem

    work = Path(sys.argv[1])
    write_chunk, calls = ArrayStore.write_chunk, []

    def stopping_write(self, chunk, values):  # computing the third chunk (after two recorded)
        calls.append(chunk)
        if len(calls) == 3:
            (work / "ready").write_text("self")
            time.sleep(600)
        write_chunk(self, chunk, values)

    ArrayStore.write_chunk = stopping_write
    apply_fn, params, train, _ = _problem()
    loss = softmax_cross_entropy()
    curvature = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss, batch_size=32)
    self_scores(apply_fn, params, curvature, train, loss=loss, batch_size=16,
                store=work / "self", store_chunk_batches=1)
''')


def test_self_scores_store_resumes_after_sigkill_bitwise(tmp_path, monkeypatch):
    script = tmp_path / "self_pipeline.py"
    script.write_text(_SELF_PIPELINE)
    work = tmp_path / "killed"
    _run_pipeline(work, "self", script)  # SIGKILLed while computing its third chunk
    partial = ArrayStore.open(work / "self")
    assert partial.shape == (96,) and partial.chunks == (16,)
    assert partial.missing_chunks() == [2, 3, 4, 5]

    apply_fn, params, train, _ = _problem()
    loss = softmax_cross_entropy()
    curvature = fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss, batch_size=32)
    expected = self_scores(apply_fn, params, curvature, train, loss=loss, batch_size=16)
    real_write, computed = ArrayStore.write_chunk, []
    monkeypatch.setattr(ArrayStore, "write_chunk", lambda self, chunk, values: (
        computed.append(chunk), real_write(self, chunk, values)))
    # Another batch size on resume: the store keeps its layout (16 examples per chunk).
    store = self_scores(apply_fn, params, curvature, train, loss=loss, batch_size=8,
                        store=work / "self", store_chunk_batches=5)
    assert computed == [2, 3, 4, 5] and store.complete and store.chunks == (16,)
    got = np.asarray(store)
    np.testing.assert_array_equal(got[:32].view(np.uint32), expected[:32].view(np.uint32))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    again = self_scores(apply_fn, params, curvature, train, loss=loss, batch_size=16,
                        store=work / "self", steps="unused when every chunk is complete")
    np.testing.assert_array_equal(np.asarray(again), got)

    module = self_scores(apply_fn, params, curvature, train, loss=loss, granularity="module",
                         batch_size=16, store=tmp_path / "module", store_chunk_batches=4)
    assert module.shape == (96, 2) and module.chunks == (64,)
    np.testing.assert_allclose(module.read().sum(-1), expected, rtol=1e-5)
    with pytest.raises(ArgumentMismatchError, match="params_fingerprint"):
        self_scores(apply_fn, jax.tree.map(lambda p: p + 1.0, params), curvature, train, loss=loss,
                    store=work / "self")
    with pytest.raises(ValueError, match="store_chunk_batches must be a positive integer"):
        self_scores(apply_fn, params, curvature, train, loss=loss, store=tmp_path / "x",
                    store_chunk_batches=0)
