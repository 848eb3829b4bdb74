"""experiments/launcher.py: the flags every experiment main shares, and that each main uses it."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAINS = sorted(REPO.glob("experiments/*/main.py"))

_SCRIPT = """
import os
from experiments.launcher import launch

def run(config, workdir, overwrite=False):
    print("run", config.get("fast_compile"), workdir, overwrite,
          "--xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", ""))

launch(run)
"""


def _launch(*args):
    env = dict(os.environ, TDA_JAX_PROGRESS="0", XLA_FLAGS="")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", _SCRIPT, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_flags_reach_run_and_tiny_configs_compile_fast(tmp_path):
    done = _launch("--config=experiments/lds/configs/default.py:tiny", f"--workdir={tmp_path}",
                   "--overwrite")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"run True {tmp_path} True True" in done.stdout
    done = _launch("--config=experiments/lds/configs/default.py", f"--workdir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"run False {tmp_path} False False" in done.stdout


def test_missing_workdir_and_stray_arguments_are_refused(tmp_path):
    done = _launch("--config=experiments/lds/configs/default.py:tiny")
    assert done.returncode != 0 and "workdir" in done.stderr
    done = _launch("--config=experiments/lds/configs/default.py:tiny", f"--workdir={tmp_path}",
                   "stray")
    assert done.returncode != 0 and "stray" in done.stderr


@pytest.mark.parametrize("main", MAINS, ids=[p.parent.name for p in MAINS])
def test_every_experiment_main_launches_a_run_with_an_overwrite_argument(main):
    """Each main calls launch(f) where f takes (config, workdir, overwrite=...)."""
    tree = ast.parse(main.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "launch"]
    assert len(calls) == 1, f"{main} must call experiments.launcher.launch once"
    target = calls[0].args[0].id
    module = next(n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and any(a.name == target for a in n.names))
    import importlib
    import inspect
    fn = getattr(importlib.import_module(module), target)
    parameters = inspect.signature(fn).parameters
    assert list(parameters)[:2] and "overwrite" in parameters, f"{module}.{target}"
