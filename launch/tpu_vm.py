"""Run a multi-process ``jax.distributed`` job on every worker of a Cloud TPU VM slice.

Example (print the command instead of running it)::

    python -m launch.tpu_vm --tpu=my-v4-32 --zone=us-central2-b --repo_dir='~/tda_jax' \\
        --setup='source .venv/bin/activate' --dry_run -- \\
        experiments.lds.main --config=experiments/lds/configs/default.py --workdir=/mnt/shared/lds

One ``gcloud compute tpus tpu-vm ssh --worker=all`` starts the program on every host of the slice
(one process per host, driving its TPU chips). ``TDA_JAX_DISTRIBUTED=auto`` makes
:func:`tda_jax.sharding.initialize_from_env` call ``jax.distributed.initialize()`` without
arguments: JAX finds the coordinator and the process ids from the TPU metadata. The repository
(and its environment) must already be on every worker, and the work directory on storage that
every worker sees (e.g. a mounted bucket or NFS), since process 0 writes it and all read it.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence

from absl import app, flags

from launch.local import program

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags (defined only when run as a script, so that importing this
    module next to other absl programs defines nothing)."""
    flags.DEFINE_string("tpu", None, "TPU VM name.")
    flags.DEFINE_string("zone", None, "Zone of the TPU VM.")
    flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's).")
    flags.DEFINE_string("repo_dir", "~/tda_jax", "Repository checkout on every worker.")
    flags.DEFINE_multi_string("setup", [], "Shell commands run first on every worker (venv, env).")
    flags.DEFINE_string("python", "python3", "Python interpreter on the workers.")
    flags.DEFINE_bool("dry_run", False, "Print the gcloud command instead of running it.")
    flags.mark_flags_as_required(["tpu", "zone"])


def gcloud_command(target: str, args: Sequence[str], *, tpu: str, zone: str,
                   project: str | None = None, repo_dir: str = "~/tda_jax",
                   setup: Sequence[str] = (), python: str = "python3") -> list[str]:
    """The ``gcloud`` command (argument list) that runs ``target`` on every worker."""
    if not tpu or not zone:
        raise ValueError("name the TPU VM (tpu=...) and its zone (zone=...).")
    # repo_dir is left unquoted so that a leading ~ expands on the worker.
    remote = " && ".join([f"cd {repo_dir}", *setup, "TDA_JAX_DISTRIBUTED=auto "
                          + shlex.join([python, *program(target, args)[1:]])])
    command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}"]
    if project:
        command.append(f"--project={project}")
    return [*command, "--worker=all", f"--command={remote}"]


def main(argv):
    target, *args = argv[1:] or [""]
    command = gcloud_command(target, args, tpu=FLAGS.tpu, zone=FLAGS.zone, project=FLAGS.project,
                             repo_dir=FLAGS.repo_dir, setup=FLAGS.setup, python=FLAGS.python)
    if FLAGS.dry_run:
        print(shlex.join(command))
        return
    subprocess.run(command, check=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
