"""Run an experiment over a grid of config overrides, one work directory per grid point.

Example (three dampings for the LDS experiment, tiny config, run one after another)::

    python -m launch.grid --experiment=lds \
        --config=experiments/lds/configs/default.py:tiny \
        --grid='methods.ekfac.damping=0.001,0.01,0.1' --workdir_root=workdirs/lds_damping

Each grid point runs ``python -m experiments.<experiment>.main --config=... --config.<key>=<value>
--workdir=<root>/<key>=<value>`` in a subprocess, so a finished point is reused (its stages are
cached) and a failed point does not stop the others. A summary of exit codes is written to
``<root>/grid.json``.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

from absl import app, flags

from tda_jax.io import write_json

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", None, "Experiment folder under experiments/ (e.g. lds).")
flags.DEFINE_string("config", None, "Config file (with optional :arg) for the experiment.")
flags.DEFINE_multi_string("grid", [], "key=v1,v2,... ; several --grid flags form a product.")
flags.DEFINE_string("workdir_root", None, "Directory holding one work directory per grid point.")
flags.DEFINE_bool("dry_run", False, "Print the commands without running them.")
flags.mark_flags_as_required(["experiment", "config", "workdir_root"])


def parse_grid(specs: list[str]) -> list[list[tuple[str, str]]]:
    """``["a=1,2", "b=x"] -> [[("a","1"),("b","x")], [("a","2"),("b","x")]]``."""
    axes = []
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--grid entry {spec!r} must look like key=v1,v2")
        key, values = spec.split("=", 1)
        choices = [v for v in values.split(",") if v]
        if not key or not choices:
            raise ValueError(f"--grid entry {spec!r} has an empty key or no values")
        axes.append([(key, v) for v in choices])
    return [list(point) for point in itertools.product(*axes)] if axes else [[]]


def commands(experiment: str, config: str, grid: list[str], root: Path) -> list[tuple[Path, list[str]]]:
    out = []
    for point in parse_grid(grid):
        name = ",".join(f"{k}={v}" for k, v in point) or "default"
        workdir = root / name
        cmd = [sys.executable, "-m", f"experiments.{experiment}.main", f"--config={config}",
               f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in point]
        out.append((workdir, cmd))
    return out


def main(argv):
    del argv
    root = Path(FLAGS.workdir_root)
    summary = {}
    for workdir, cmd in commands(FLAGS.experiment, FLAGS.config, FLAGS.grid, root):
        print(" ".join(cmd), flush=True)
        if FLAGS.dry_run:
            continue
        summary[workdir.name] = subprocess.run(cmd, check=False).returncode
    if not FLAGS.dry_run:
        write_json(root / "grid.json", summary)
        failed = [k for k, v in summary.items() if v != 0]
        if failed:
            raise SystemExit(f"grid points failed: {failed}")


if __name__ == "__main__":
    app.run(main)
