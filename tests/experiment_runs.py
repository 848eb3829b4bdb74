"""Shared by the experiments' end-to-end tests: run a main in a fresh process, edit a config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_main(experiment: str, workdir: Path, config_arg: str = "tiny", *flags: str) -> None:
    """``python -m experiments.<experiment>.main --config=...default.py:<config_arg>
    --workdir=<workdir>`` in a fresh process (where a tiny config's ``fast_compile``, XLA's
    unoptimised backend, can take effect; tiny runs are compile-bound). Raises if it fails."""
    env = dict(os.environ, TDA_JAX_PROGRESS="0", MPLBACKEND="Agg")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    config = f"experiments/{experiment}/configs/default.py" + (f":{config_arg}" if config_arg else "")
    subprocess.run([sys.executable, "-m", f"experiments.{experiment}.main", f"--config={config}",
                    f"--workdir={workdir}", *flags], cwd=REPO, env=env, check=True, timeout=900)


def run_tiny_results(experiment: str, tmp_path_factory) -> tuple[Path, dict]:
    """:func:`run_main` of the tiny config in a fresh temporary work directory (for a
    module-scoped fixture); returns the directory and its ``results.json``."""
    workdir = tmp_path_factory.mktemp(experiment)
    run_main(experiment, workdir)
    return workdir, json.loads((workdir / "results.json").read_text())


def config_with(get_config: Callable[[str], Any], arg: str = "tiny", **changes: Any) -> Any:
    """``get_config(arg)`` with ``changes`` applied (dotted field -> value, types not checked)."""
    config = get_config(arg)
    for field, value in changes.items():
        *parents, last = field.split(".")
        node = config
        for part in parents:
            node = node[part]
        with node.ignore_type():
            node[last] = value
    return config
