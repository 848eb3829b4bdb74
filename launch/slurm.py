"""Submit a multi-process ``jax.distributed`` job to SLURM (GPU nodes).

Example (2 nodes x 4 GPUs, one process per GPU; print the batch script instead of submitting)::

    python -m launch.slurm --nodes=2 --gpus_per_node=4 --per=gpu --time=02:00:00 \\
        --setup='source .venv/bin/activate' --dry_run -- \\
        experiments.lds.main --config=experiments/lds/configs/default.py --workdir=workdirs/lds

The batch script starts the processes with ``srun``: ``--per=gpu`` runs one process per GPU (each
drives the GPU of its node-local rank), ``--per=node`` one process per node driving all its GPUs.
Process 0's node (the first of ``$SLURM_JOB_NODELIST``) hosts the coordinator on ``--port``; each
process reads its rank from ``$SLURM_PROCID`` and the process count from ``$SLURM_NTASKS``, which
:func:`tda_jax.sharding.initialize_from_env` turns into ``jax.distributed.initialize``. The work
directory must be on a file system that every node sees (process 0 writes it; all read it).
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from collections.abc import Sequence

from absl import app, flags

from launch.local import program

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags (defined only when run as a script, so that importing this
    module next to other absl programs defines nothing)."""
    flags.DEFINE_integer("nodes", 1, "Nodes to allocate.")
    flags.DEFINE_integer("gpus_per_node", 1, "GPUs per node.")
    flags.DEFINE_enum("per", "gpu", ["gpu", "node"], "One process per GPU or per node.")
    flags.DEFINE_string("time", "01:00:00", "Wall-clock limit (SLURM --time).")
    flags.DEFINE_string("partition", None, "SLURM partition.")
    flags.DEFINE_string("account", None, "SLURM account.")
    flags.DEFINE_integer("cpus_per_task", None, "CPU cores per process.")
    flags.DEFINE_string("job_name", "tda_jax", "Job name.")
    flags.DEFINE_string("output", "slurm-%j.out", "SLURM output file pattern.")
    flags.DEFINE_integer("port", 29511, "Coordinator port on the first node.")
    flags.DEFINE_multi_string("setup", [], "Shell lines run before srun (module load, venv activation).")
    flags.DEFINE_string("python", "python", "Python interpreter on the nodes.")
    flags.DEFINE_bool("dry_run", False, "Print the batch script instead of submitting it.")


def batch_script(target: str, args: Sequence[str], *, nodes: int = 1, gpus_per_node: int = 1,
                 per: str = "gpu", time: str = "01:00:00", partition: str | None = None,
                 account: str | None = None, cpus_per_task: int | None = None,
                 job_name: str = "tda_jax", output: str = "slurm-%j.out", port: int = 29511,
                 setup: Sequence[str] = (), python: str = "python") -> str:
    """The ``sbatch`` script that runs ``target`` (module or ``.py`` script) on every process.

    Raises:
      ValueError: a non-positive node or GPU count, or an unknown ``per``.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes ({nodes}) and gpus_per_node ({gpus_per_node}) must be >= 1.")
    if per not in ("gpu", "node"):
        raise ValueError(f"per={per!r} must be 'gpu' (a process per GPU) or 'node'.")
    tasks_per_node = gpus_per_node if per == "gpu" else 1
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={tasks_per_node}",
             f"#SBATCH --gpus-per-node={gpus_per_node}", f"#SBATCH --time={time}",
             f"#SBATCH --output={output}"]
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    lines += ["", "set -euo pipefail", *setup,
              'coordinator="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
              f'export TDA_JAX_COORDINATOR="$coordinator:{port}"']
    command = shlex.join([python, *program(target, args)[1:]])
    # Evaluated by each task's shell, so every process sees its own rank.
    per_task = ['export TDA_JAX_NUM_PROCESSES="$SLURM_NTASKS"',
                'export TDA_JAX_PROCESS_ID="$SLURM_PROCID"']
    if per == "gpu":
        per_task.append('export TDA_JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"')
    per_task.append(f"exec {command}")
    lines.append("srun --kill-on-bad-exit=1 bash -c " + shlex.quote("; ".join(per_task)))
    return "\n".join(lines) + "\n"


def main(argv):
    target, *args = argv[1:] or [""]
    script = batch_script(target, args, nodes=FLAGS.nodes, gpus_per_node=FLAGS.gpus_per_node,
                          per=FLAGS.per, time=FLAGS.time, partition=FLAGS.partition,
                          account=FLAGS.account, cpus_per_task=FLAGS.cpus_per_task,
                          job_name=FLAGS.job_name, output=FLAGS.output, port=FLAGS.port,
                          setup=FLAGS.setup, python=FLAGS.python)
    if FLAGS.dry_run:
        print(script, end="")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
    subprocess.run(["sbatch", f.name], check=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
