"""Run one program as a multi-process ``jax.distributed`` job on this machine.

Example (the LDS experiment on 2 processes x 2 forced CPU devices each)::

    python -m launch.local --num_processes=2 --devices_per_process=2 -- \\
        experiments.lds.main --config=experiments/lds/configs/default.py:tiny --workdir=workdirs/lds

Everything after ``--`` is the program: a module (run with ``python -m``) or a ``.py`` script, and
its arguments. Process ``i`` gets the environment that :func:`tda_jax.sharding.initialize_from_env`
reads (``TDA_JAX_COORDINATOR=127.0.0.1:<port>``, ``TDA_JAX_NUM_PROCESSES``, ``TDA_JAX_PROCESS_ID``)
and, on CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>`` (other
XLA flags are kept). ``--cores=0;1`` pins process ``i`` to the ``i``-th group of CPU cores (what
``taskset -c`` does). If one process fails the others are stopped, since they would wait for it
forever; the exit status is the first failure's.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags (defined only when run as a script, so that importing this
    module next to other absl programs defines nothing)."""
    flags.DEFINE_integer("num_processes", 2, "Processes to start.")
    flags.DEFINE_integer("devices_per_process", 1,
                         "CPU devices per process (--xla_force_host_platform_device_count); with "
                         "--platform=gpu, the GPUs each process drives.")
    flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "Devices the processes use.")
    flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")
    flags.DEFINE_string("cores", None,
                        "CPU cores of each process, groups separated by ';' (e.g. '0;1' or "
                        "'0-1;2-3'); process i is pinned to group i. Default: not pinned.")
    flags.DEFINE_string("logs", None,
                        "Write process i's output to <logs>/process_<i>.log instead of the terminal.")
    flags.DEFINE_float("timeout", None, "Stop every process after this many seconds (exit 124).")
    flags.DEFINE_bool("dry_run", False, "Print each process's environment and command, run nothing.")


_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port on the loopback interface that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_cores(spec: str | None, num_processes: int) -> list[set[int]] | None:
    """``"0-1;2,3"`` -> ``[{0, 1}, {2, 3}]`` (one group per process), None for no pinning."""
    if not spec:
        return None
    groups = []
    for group in spec.split(";"):
        cores: set[int] = set()
        for part in filter(None, group.split(",")):
            lo, _, hi = part.partition("-")
            if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
                raise ValueError(f"--cores={spec!r}: {part!r} is not a core number or range a-b.")
            cores.update(range(int(lo), int(hi or lo) + 1))
        if not cores:
            raise ValueError(f"--cores={spec!r} has an empty group.")
        groups.append(cores)
    if len(groups) != num_processes:
        raise ValueError(f"--cores={spec!r} gives {len(groups)} core group(s) for {num_processes} "
                         "processes; give one group per process, separated by ';'.")
    return groups


def program(target: str, args: Sequence[str]) -> list[str]:
    """The command of one process: ``python -m <module> args`` or ``python <script.py> args``."""
    if not target:
        raise ValueError("name the program after '--': a module (experiments.lds.main) or a .py "
                         "script, then its arguments.")
    if target.endswith(".py"):
        return [sys.executable, target, *args]
    return [sys.executable, "-m", target, *args]


def process_environments(num_processes: int, devices_per_process: int, coordinator: str,
                         base: Mapping[str, str], platform: str = "cpu") -> list[dict[str, str]]:
    """The environment of each process: ``base`` plus the variables of a distributed run."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes ({num_processes}) and devices_per_process "
                         f"({devices_per_process}) must be >= 1.")
    envs = []
    for index in range(num_processes):
        env = dict(base)
        env.update({"TDA_JAX_COORDINATOR": coordinator,
                    "TDA_JAX_NUM_PROCESSES": str(num_processes),
                    "TDA_JAX_PROCESS_ID": str(index), "PYTHONUNBUFFERED": "1"})
        if platform == "cpu":
            kept = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
            env["XLA_FLAGS"] = " ".join(
                [*kept, f"--xla_force_host_platform_device_count={devices_per_process}"])
            env["JAX_PLATFORMS"] = "cpu"
        else:  # one machine's GPUs split between the processes
            first = index * devices_per_process
            env["TDA_JAX_LOCAL_DEVICE_IDS"] = ",".join(
                str(d) for d in range(first, first + devices_per_process))
        envs.append(env)
    return envs


def describe(command: Sequence[str], env: Mapping[str, str], base: Mapping[str, str],
             cores: set[int] | None) -> str:
    """A shell line equivalent to starting one process (the variables that differ from ``base``)."""
    changed = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if base.get(k) != v]
    pin = ["taskset", "-c", ",".join(map(str, sorted(cores)))] if cores else []
    return " ".join([*changed, *pin, *map(shlex.quote, command)])


def launch(target: str, args: Sequence[str], *, num_processes: int = 2,
           devices_per_process: int = 1, platform: str = "cpu", port: int = 0,
           cores: str | None = None, log_dir: str | os.PathLike | None = None,
           timeout: float | None = None, dry_run: bool = False,
           base_env: Mapping[str, str] | None = None) -> int:
    """Starts the processes, waits for them, and returns the job's exit status.

    Returns:
      0 if every process succeeded; otherwise the first failure's exit status (124 on timeout),
      after stopping the processes still running.
    """
    base = dict(os.environ if base_env is None else base_env)
    command = program(target, args)
    groups = parse_cores(cores, num_processes)
    coordinator = f"127.0.0.1:{port or free_port()}"
    envs = process_environments(num_processes, devices_per_process, coordinator, base, platform)
    if dry_run:
        for index, env in enumerate(envs):
            print(describe(command, env, base, groups[index] if groups else None), flush=True)
        return 0
    logs = []
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        for index, env in enumerate(envs):
            out = None
            if log_dir is not None:
                out = open(Path(log_dir) / f"process_{index}.log", "wb")  # noqa: SIM115
                logs.append(out)
            pin = groups[index] if groups else None
            processes.append(subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                preexec_fn=(lambda cpus=pin: os.sched_setaffinity(0, cpus)) if pin else None))
        return _wait(processes, timeout)
    finally:
        for process in processes:  # only the processes started here, by their ids
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()


def _wait(processes: list[subprocess.Popen], timeout: float | None) -> int:
    start = time.monotonic()
    while True:
        codes = [p.poll() for p in processes]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _stop(processes)
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        if timeout is not None and time.monotonic() - start > timeout:
            _stop(processes)
            return 124
        time.sleep(0.05)


def _stop(processes: list[subprocess.Popen]) -> None:
    """Terminates the processes still running (their peers would otherwise wait on collectives)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv):
    # SIGTERM (e.g. from a scheduler) unwinds through launch(), which stops the processes.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    target, *args = argv[1:] or [""]
    code = launch(target, args, num_processes=FLAGS.num_processes,
                  devices_per_process=FLAGS.devices_per_process, platform=FLAGS.platform,
                  port=FLAGS.port, cores=FLAGS.cores, log_dir=FLAGS.logs,
                  timeout=FLAGS.timeout, dry_run=FLAGS.dry_run)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
