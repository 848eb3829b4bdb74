"""Several processes (jax.distributed over loopback, gloo collectives) give the one-process results.

The slow test starts 2 processes x 2 forced CPU devices with ``python -m launch.local`` running
``tests/distributed_worker.py`` and compares EK-FAC and K-FAC factors (each layer finalised by the
one process it is assigned to, then exchanged), pairwise scores (in memory and into a
store), self scores, an LDS ground truth and a checkpointed training run with the same computation
on 1 process x 1 device.
The other tests cover the assignment of layers to processes (balanced against an exhaustive
optimum, deterministic), the byte exchange's packing, and the helpers' single-process behaviour
(the launchers' commands are checked in tests/test_launch.py).
"""

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tda_jax.attribution.influence as influence
from tda_jax import sharding
from tda_jax.curvature.blocks import LayerwiseBlock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_worker  # noqa: E402  (the worker script, imported for its reference compute)

# --------------------------------------------------------------------------------------------------
# Single-process behaviour of the helpers: the plain single-controller calls.


def test_initialize_from_env_is_a_no_op_without_launcher_variables():
    assert sharding.initialize_from_env({}) is False
    assert sharding.initialize_from_env({"TDA_JAX_DISTRIBUTED": "0"}) is False
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("env, match", [
    ({"TDA_JAX_COORDINATOR": "127.0.0.1:1234"}, "TDA_JAX_NUM_PROCESSES"),
    ({"TDA_JAX_COORDINATOR": "h:1", "TDA_JAX_NUM_PROCESSES": "two", "TDA_JAX_PROCESS_ID": "0"},
     "integers"),
    ({"TDA_JAX_DISTRIBUTED": "sometimes"}, "auto"),
])
def test_initialize_from_env_names_bad_settings(env, match):
    with pytest.raises(ValueError, match=match):
        sharding.initialize_from_env(env)
    assert not jax.distributed.is_initialized()


def test_initialize_distributed_checks_the_process_id():
    with pytest.raises(ValueError, match="process_id=2"):
        sharding.initialize_distributed("127.0.0.1:1", 2, 2)


def test_helpers_on_one_process_are_the_plain_calls():
    assert sharding.is_main_process() and not sharding.is_distributed()
    assert sharding.default_mesh().devices.size == 1
    mesh = sharding.make_data_mesh(2)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    placed = sharding.put_global({"x": x}, sharding.data_sharding(mesh))["x"]
    assert placed.sharding == sharding.data_sharding(mesh)
    np.testing.assert_array_equal(sharding.to_host(placed), x)
    tree = {"a": np.float64(1.5), "b": jnp.ones(3)}
    assert sharding.broadcast_from_main(tree) is tree
    assert sharding.run_on_main(lambda: 7, "testing") == 7
    sharding.barrier("nothing to wait for")


# --------------------------------------------------------------------------------------------------
# Factors distributed by layer: the assignment and the exchange.


def _makespan(costs, owners, workers):
    loads = [0.0] * workers
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    return max(loads)


def test_assign_by_cost_is_within_the_lpt_bound_of_the_optimum():
    rng = np.random.default_rng(0)
    for trial in range(40):
        workers = int(rng.integers(1, 4))
        size = int(rng.integers(1, 8))
        costs = rng.choice([1.0, 8.0, 27.0, 1000.0, 1331.0], size=size)
        if trial % 2:  # layer-like costs in^3 + out^3
            costs = (rng.integers(2, 40, size=size) ** 3 + rng.integers(2, 40, size=size) ** 3
                     ).astype(float)
        owners = sharding.assign_by_cost(costs.tolist(), workers)
        assert len(owners) == len(costs) and all(0 <= o < workers for o in owners)
        assert owners == sharding.assign_by_cost(list(costs), workers)  # deterministic
        best = min(_makespan(costs, assignment, workers) for assignment in
                   itertools.product(range(workers), repeat=len(costs)))
        assert _makespan(costs, owners, workers) <= (4 / 3 - 1 / (3 * workers)) * best + 1e-9


def test_assign_by_cost_examples():
    # Equal costs: round robin, every worker within one task of the others.
    assert sharding.assign_by_cost([1.0] * 5, 2) == [0, 1, 0, 1, 0]
    # The big layer alone on one worker, the small ones together on the other.
    assert sharding.assign_by_cost([1.0, 10.0, 3.0, 4.0], 2) == [1, 0, 1, 1]
    assert sharding.assign_by_cost([], 3) == []
    assert sharding.assign_by_cost([5.0, 2.0], 1) == [0, 0]
    # Seven MLP layers of width 1024 and a 10-way head over 2 processes: 4 + 4 layers.
    costs = [1025.0 ** 3 + 1024.0 ** 3] * 7 + [1025.0 ** 3 + 10.0 ** 3]
    owners = sharding.assign_by_cost(costs, 2)
    assert sorted(owners) == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("costs, workers, match", [
    ([1.0], 0, "num_workers"), ([1.0, -2.0], 2, r"costs\[1\]"), ([float("nan")], 2, r"costs\[0\]"),
])
def test_assign_by_cost_names_bad_arguments(costs, workers, match):
    with pytest.raises(ValueError, match=match):
        sharding.assign_by_cost(costs, workers)


def test_packed_arrays_round_trip_bit_for_bit():
    arrays = {"a::x": np.asarray([1.5, np.pi], np.float64),
              "b::bf": jnp.asarray([1.25, 3.0], jnp.bfloat16),
              "c::i": np.arange(6, dtype=np.int32).reshape(2, 3), "d::s": jnp.float32(0.1)}
    unpacked, error = sharding._unpack_arrays(sharding._pack_arrays(arrays, None))
    assert error is None and list(unpacked) == list(arrays)
    for name, value in arrays.items():
        assert isinstance(unpacked[name], jax.Array) == isinstance(value, jax.Array), name
        assert unpacked[name].dtype == value.dtype and unpacked[name].shape == value.shape
        np.testing.assert_array_equal(np.asarray(unpacked[name]).reshape(-1).view(np.uint8),
                                      np.asarray(value).reshape(-1).view(np.uint8))
    _, error = sharding._unpack_arrays(sharding._pack_arrays({}, ValueError("layer 'x' singular"),
                                                             3))
    assert error == ["ValueError", "layer 'x' singular", 3.0]


def test_exchange_on_one_process_returns_the_local_arrays_or_raises():
    local = {"x::y": np.ones(2)}
    assert sharding.exchange_arrays(local) == local
    with pytest.raises(FloatingPointError, match="bad"):
        sharding.exchange_arrays({}, FloatingPointError("bad"))
    assert sharding.allgather_bytes(b"abc")[0].tobytes() == b"abc"


# --------------------------------------------------------------------------------------------------
# 2 processes x 2 devices against 1 process x 1 device.


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, monkeypatch):
    out = tmp_path / "distributed"
    env = {**os.environ, "TDA_JAX_PROGRESS": "1"}  # bars on: only process 0 may draw them
    started = subprocess.Popen(
        [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=2",
         f"--logs={out / 'logs'}", "--timeout=240", "--", "tests/distributed_worker.py",
         f"--out={out}"], cwd=ROOT, env=env)

    # Meanwhile the reference: 1 process, 1 device (the drivers' default mesh here), recording
    # the progress bars of the pairwise scores.
    bars = []

    class RecordingBar:
        def __init__(self, total, desc=None, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(influence, "progress_bar", RecordingBar)
    finalized = []
    original = LayerwiseBlock.finalize_layer

    def recording(self, pass_name, spec, *args, **kwargs):
        finalized.append(f"{self.name}:{pass_name}:{spec.name}")
        return original(self, pass_name, spec, *args, **kwargs)

    monkeypatch.setattr(LayerwiseBlock, "finalize_layer", recording)
    try:
        reference = distributed_worker.compute(tmp_path / "reference")
        code = started.wait(timeout=300)
    finally:
        if started.poll() is None:
            started.terminate()  # the launcher then stops its processes
            started.wait()
    # One bar per call over all super-blocks x training batches (2 x 5), however it is stored.
    assert [(bar.total, bar.n) for bar in bars] == [(10, 10), (10, 10)]

    assert code == 0, (out / "logs" / "process_0.log").read_text()[-3000:]
    logs = [(out / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    assert "pairwise scores" in logs[0] and "pairwise scores" not in logs[1]
    results = [dict(np.load(out / f"process_{i}.npz")) for i in range(2)]
    assert results[0]["devices"].tolist() == [4, 2]  # 4 devices in all, 2 per process
    # Each layer of each pass was finalised by exactly one process (both had work), and the
    # singular layer's error was raised on both, the owner's own and the other's naming it.
    done = [results[i].pop("finalized").tolist() for i in range(2)]
    assert set(done[0]) | set(done[1]) == set(finalized)
    ekfac = [[layer for layer in part if layer.startswith("ekfac:")] for part in done]
    assert ekfac[0] and ekfac[1] and not set(ekfac[0]) & set(ekfac[1])
    assert sorted(ekfac[0] + ekfac[1]) == sorted(x for x in finalized if x.startswith("ekfac:"))
    errors = [str(results[i].pop("singular_error")) for i in range(2)]
    expected_error = reference.pop("singular_error")
    assert "singular" in expected_error and "Dense_0" in expected_error
    assert all("layer 'Dense_0' (kfac)" in error and "singular" in error for error in errors), errors
    assert sum(error.startswith("process ") for error in errors) == 1, errors  # the non-owner's
    for key in reference:
        # Every process holds the same values, bit for bit (factors broadcast, scores gathered).
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
    for key, expected in reference.items():
        if "eigvecs" in key:  # eigenvectors only up to sign: compared through "dense"
            continue
        got = results[0][key]
        scale = max(float(np.max(np.abs(expected))), 1e-12)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale, err_msg=key)
    assert reference["pairwise"].shape == (5, distributed_worker.NUM_TRAIN)
    np.testing.assert_array_equal(results[0]["stored"], results[0]["pairwise"])
    # The checkpointed model, trained then loaded back from its finished run.
    reloaded = [key for key in reference if key.startswith("trained1/")]
    assert reloaded
    for key in reloaded:
        np.testing.assert_array_equal(results[0][key], results[0][key.replace("trained1", "trained0")])


@pytest.mark.slow
def test_a_failing_process_ends_the_job(tmp_path):
    """An exception on one process ends the job (no hang in collectives or JAX's shutdown)."""
    script = tmp_path / "fails.py"
    script.write_text(textwrap.dedent("""
        import jax
        import numpy as np
        from tda_jax import sharding

        sharding.initialize_from_env()
        mesh = sharding.default_mesh()
        x = sharding.put_global(np.ones(jax.device_count(), np.float32), sharding.data_sharding(mesh))
        if jax.process_index() == 1:
            raise RuntimeError("failing on purpose")
        sharding.to_host(jax.jit(lambda v: 2 * v)(x))  # process 0 waits for process 1 here
    """))
    logs = tmp_path / "logs"
    code = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes=2",
                           f"--logs={logs}", "--timeout=120", "--", str(script)], cwd=ROOT,
                          env={**os.environ, "TDA_JAX_PROGRESS": "0"}).returncode
    assert code not in (0, 124)  # failed, and before the timeout
    assert "failing on purpose" in (logs / "process_1.log").read_text()
