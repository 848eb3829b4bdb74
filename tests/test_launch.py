"""launch.grid builds one command per grid point; launch.local, launch.slurm and launch.tpu_vm
build the commands of a multi-process job (checked in dry-run mode: no cluster needed)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch.grid import commands, parse_grid
from launch.local import launch, parse_cores, process_environments, program
from launch.slurm import batch_script
from launch.tpu_vm import gcloud_command

ROOT = Path(__file__).resolve().parents[1]


def test_grid_is_a_product_of_axes():
    points = parse_grid(["a=1,2", "b=x,y,z"])
    assert len(points) == 6
    assert points[0] == [("a", "1"), ("b", "x")]
    assert parse_grid([]) == [[]]


def test_grid_commands_name_workdirs_and_overrides():
    cmds = commands("lds", "cfg.py:tiny", ["seed=0,1"], Path("/tmp/root"))
    assert [w.name for w, _ in cmds] == ["seed=0", "seed=1"]
    assert "--config.seed=1" in cmds[1][1] and "--workdir=/tmp/root/seed=1" in cmds[1][1]


def test_bad_grid_entry_is_named():
    with pytest.raises(ValueError, match="key=v1,v2"):
        parse_grid(["novalue"])



def test_local_launcher_environments_and_commands(capsys):
    envs = process_environments(2, 3, "127.0.0.1:999",
                                {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --foo=1",
                                 "KEEP": "x"})
    assert [e["TDA_JAX_PROCESS_ID"] for e in envs] == ["0", "1"]
    assert all(e["TDA_JAX_NUM_PROCESSES"] == "2" and e["KEEP"] == "x" for e in envs)
    assert envs[1]["XLA_FLAGS"] == "--foo=1 --xla_force_host_platform_device_count=3"
    gpu = process_environments(2, 2, "127.0.0.1:999", {}, platform="gpu")
    assert gpu[1]["TDA_JAX_LOCAL_DEVICE_IDS"] == "2,3"
    assert program("experiments.lds.main", ["--x=1"])[1:] == ["-m", "experiments.lds.main", "--x=1"]
    assert program("tests/w.py", [])[1:] == ["tests/w.py"]
    assert parse_cores("0;1-2,4", 2) == [{0}, {1, 2, 4}]
    with pytest.raises(ValueError, match="one group per process"):
        parse_cores("0;1", 3)
    assert launch("experiments.lds.main", ["--workdir=a b"], num_processes=2, cores="0;1",
                  port=1234, dry_run=True, base_env={}) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "TDA_JAX_COORDINATOR=127.0.0.1:1234" in lines[1] and "TDA_JAX_PROCESS_ID=1" in lines[1]
    assert "taskset -c 1" in lines[1] and lines[1].endswith("-m experiments.lds.main '--workdir=a b'")


def test_local_launcher_stops_the_others_when_one_process_fails(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        if os.environ["TDA_JAX_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(120)  # would wait for its peer forever
    """))
    assert launch(str(script), [], num_processes=2, timeout=60) == 3


def test_slurm_batch_script_dry_run():
    script = batch_script("experiments.lds.main", ["--config=c.py:tiny", "--workdir=w d"],
                          nodes=2, gpus_per_node=4, per="gpu", partition="gpu", port=1234,
                          setup=["source .venv/bin/activate"])
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "source .venv/bin/activate",
                 'export TDA_JAX_COORDINATOR="$coordinator:1234"'):
        assert line in lines
    srun = lines[-1]
    assert srun.startswith("srun --kill-on-bad-exit=1 bash -c '")
    for part in ('TDA_JAX_PROCESS_ID="$SLURM_PROCID"', 'TDA_JAX_NUM_PROCESSES="$SLURM_NTASKS"',
                 'TDA_JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"', "exec python -m experiments.lds.main"):
        assert part in srun
    per_node = batch_script("m", [], nodes=3, gpus_per_node=8, per="node")
    assert "#SBATCH --ntasks-per-node=1" in per_node and "LOCAL_DEVICE_IDS" not in per_node
    # The command line (absl flags, then the program after --) prints the same script.
    out = subprocess.run([sys.executable, "-m", "launch.slurm", "--nodes=2", "--gpus_per_node=4",
                          "--partition=gpu", "--port=1234", "--setup=source .venv/bin/activate",
                          "--dry_run", "--", "experiments.lds.main", "--config=c.py:tiny",
                          "--workdir=w d"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == script


def test_tpu_vm_command_dry_run():
    command = gcloud_command("experiments.lds.main", ["--workdir=/mnt/w"], tpu="v4-32",
                             zone="us-central2-b", project="p", setup=["source env/bin/activate"])
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v4-32"]
    assert "--worker=all" in command and "--zone=us-central2-b" in command
    assert command[-1] == ("--command=cd ~/tda_jax && source env/bin/activate && "
                           "TDA_JAX_DISTRIBUTED=auto python3 -m experiments.lds.main "
                           "--workdir=/mnt/w")
    out = subprocess.run([sys.executable, "-m", "launch.tpu_vm", "--tpu=v4-32",
                          "--zone=us-central2-b", "--project=p",
                          "--setup=source env/bin/activate", "--dry_run", "--",
                          "experiments.lds.main", "--workdir=/mnt/w"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("gcloud compute tpus tpu-vm ssh v4-32 --zone=us-central2-b")
    assert "--worker=all" in out.stdout and "TDA_JAX_DISTRIBUTED=auto" in out.stdout
