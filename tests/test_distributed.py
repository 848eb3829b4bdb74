"""Several processes (jax.distributed over loopback, gloo collectives) give the one-process results.

The slow test starts 2 processes x 2 forced CPU devices with ``python -m launch.local`` running
``tests/distributed_worker.py`` and compares EK-FAC factors, pairwise scores (in memory and into a
store), self scores, an LDS ground truth and a checkpointed training run with the same computation
on 1 process x 1 device.
The other tests cover the helpers' single-process behaviour (the launchers' commands are checked
in tests/test_launch.py).
"""

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
