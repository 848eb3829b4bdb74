"""Strong scaling of EK-FAC fitting and pairwise scoring over processes (jax.distributed, CPU).

The same problem (random 10-class data, an MLP ``input-hidden-hidden-10``, EK-FAC with the
expected Fisher, margin scores of ``num_queries`` queries against every training example) is run
as ``launch.local`` jobs of 1, 2 and 4 processes with one forced host device each, and then pinned:
1 process on core 0 against 2 processes on cores 0 and 1 (``launch.local --cores``, what
``taskset -c`` does). Each job is a fresh set of processes running ``benchmarks/_scaling_worker.py``:
one warm-up call (compilation), then the median of ``--repeats`` timed calls, each started after a
barrier. The speed-up is the 1-process time over the N-process time of the same kind of run.

Unpinned, XLA's CPU thread pool of a single process already uses every core, and 4 processes on a
2-core machine share 2 cores; the pinned pair is the clean measure of the multi-process path's
overhead (ideal: 2x). The machine is shared: its load average before and after each job is
recorded, and a control (two unrelated 1-process jobs at once, pinned to cores 0 and 1) measures
how much of the two cores the other jobs leave, which gives a load-adjusted speed-up.

Run from the repository root (no peer library; our ``.venv``)::

    .venv/bin/python benchmarks/scaling.py                     # writes benchmarks/results/scaling.md
    .venv/bin/python benchmarks/scaling.py --processes 1,2 --no-pinned --output ''
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_average  # noqa: E402

from launch.local import launch  # noqa: E402

WORKER = "benchmarks/_scaling_worker.py"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_job(num_processes: int, cores: str | None, worker_args: list[str]) -> dict:
    """One launch.local job; returns process 0's timings plus the load before and after."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        before = load_average()
        began = time.perf_counter()
        code = launch(WORKER, [f"--out={out}", *worker_args], num_processes=num_processes,
                      devices_per_process=1, cores=cores, log_dir=Path(tmp) / "logs",
                      base_env={**os.environ, "TDA_JAX_PROGRESS": "0"})
        wall = time.perf_counter() - began
        if code != 0:
            log = (Path(tmp) / "logs" / "process_0.log").read_text()[-3000:]
            raise RuntimeError(f"job with {num_processes} process(es) failed ({code}):\n{log}")
        result = json.loads(out.read_text())
    # CPU seconds of the busiest process (median over calls): the wall time a call would take
    # with a free core per process, whatever share of the cores other jobs took meanwhile.
    result.update(load_before=before, load_after=load_average(), wall_s=wall, cores=cores,
                  fit=statistics.median(result["fit_s"]),
                  score=statistics.median(result["score_s"]),
                  fit_cpu=max(statistics.median(c) for c in result["fit_cpu_s"]),
                  score_cpu=max(statistics.median(c) for c in result["score_cpu_s"]))
    return result


def run_independent(worker_args: list[str]) -> list[dict]:
    """The control: two unrelated 1-process jobs at once, pinned to cores 0 and 1.

    Their times show how much of the two cores the machine leaves us right now: on an idle machine
    each takes the 1-process time, under load longer; half of it is what a perfect 2-process run
    could reach at this load.
    """
    results: list = [None, None]

    def one(index: int) -> None:
        results[index] = run_job(1, str(index), worker_args)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(r is None for r in results):
        raise RuntimeError("a control job failed (see above)")
    return results


def table(rows: list[dict], base: dict, cpu: bool) -> list[str]:
    """Markdown rows: wall seconds and speed-ups (and, pinned, the busiest process's CPU seconds)."""
    head = "| processes x devices | cores | fit (s) | speed-up | scores (s) | speed-up |"
    rule = "|---|---|---|---|---|---|"
    if cpu:
        head += " fit CPU (s) | CPU speed-up | scores CPU (s) | CPU speed-up |"
        rule += "---|---|---|---|"
    lines = [head + " load before / after |", rule + "---|"]
    for r in rows:
        line = (f"| {r['processes']} x 1 | {r['cores'] or 'any'} | {r['fit']:.2f} | "
                f"{base['fit'] / r['fit']:.2f}x | {r['score']:.2f} | "
                f"{base['score'] / r['score']:.2f}x |")
        if cpu:
            line += (f" {r['fit_cpu']:.2f} | {base['fit_cpu'] / r['fit_cpu']:.2f}x | "
                     f"{r['score_cpu']:.2f} | {base['score_cpu'] / r['score_cpu']:.2f}x |")
        lines.append(line + f" {r['load_before'][0]:.2f} / {r['load_after'][0]:.2f} |")
    return lines


def control_lines(pinned: list[dict], control: list[dict]) -> list[str]:
    """The control runs and the speed-up of the pinned pair relative to what the load allowed."""
    fit = statistics.mean(r["fit"] for r in control)
    score = statistics.mean(r["score"] for r in control)
    pair = pinned[-1]
    return [
        "Control, right after: two unrelated 1-process jobs at the same time, pinned to cores 0 "
        f"and 1, took {fit:.2f} s (fit) and {score:.2f} s (scores) each (load "
        f"{control[0]['load_before'][0]:.2f} before). On an idle machine that equals the "
        "1-process time; the excess is the share of the two cores other jobs took. Half of it is "
        "what a perfect 2-process run could reach at that load: the pinned pair's wall time "
        f"against it gives {fit / pair['fit']:.2f}x (fit) and {score / pair['score']:.2f}x "
        "(scores), ideal 2x (the load moves between jobs, so this is rough).", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4", help="unpinned process counts")
    parser.add_argument("--pinned", action=argparse.BooleanOptionalAction, default=True,
                        help="also run 1 process on core 0 vs 2 processes on cores 0 and 1")
    parser.add_argument("--num_train", type=int, default=8192)
    parser.add_argument("--num_queries", type=int, default=64)
    parser.add_argument("--input_dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "scaling.md"))
    parser.add_argument("--json", default=None, help="also save the raw results here")
    args = parser.parse_args()
    worker_args = [f"--{k}={getattr(args, k)}" for k in
                   ("num_train", "num_queries", "input_dim", "hidden", "batch_size", "repeats")]
    counts = [int(c) for c in args.processes.split(",") if c]
    start_load = load_average()
    unpinned = []
    for count in counts:
        unpinned.append(run_job(count, None, worker_args))
        print(json.dumps(unpinned[-1]), flush=True)
    pinned, control = [], []
    if args.pinned:
        for cores in ("0", "0;1"):
            pinned.append(run_job(len(cores.split(";")), cores, worker_args))
            print(json.dumps(pinned[-1]), flush=True)
        control = run_independent(worker_args)
        print(json.dumps(control), flush=True)
    end_load = load_average()
    if args.json:
        Path(args.json).write_text(json.dumps({"unpinned": unpinned, "pinned": pinned,
                                               "control": control}, indent=1))

    command = " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]])
    num_params = (unpinned or pinned)[0]["num_params"]
    checks = {round(r["scores_checksum"], 2) for r in unpinned + pinned}
    lines = [
        "# Multi-process scaling (jax.distributed on CPU)", "",
        f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}. Rerun from the "
        "repository root:", "", "```", f".venv/bin/{command}", "```", "",
        f"Problem: {args.num_train} training examples, {args.num_queries} queries, MLP "
        f"{args.input_dim}-{args.hidden}-{args.hidden}-10 ({num_params} parameters), EK-FAC "
        f"(expected Fisher, 2 passes), global batch {args.batch_size}; "
        f"median of {args.repeats} timed calls after a warm-up (compilation excluded), each call "
        "started after a barrier; seconds are process 0's. Every job is `python -m launch.local` "
        "with one forced host device per process, gloo collectives over loopback. Score "
        f"checksums of all jobs: {sorted(checks)} (the same matrix up to float reassociation).",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, shared with other jobs: 1/5/15-"
        f"minute load average {start_load} at the start and {end_load} at the end. With a load "
        "above the core count, other jobs take part of every core and the timings are noisy.", "",
        "## Unpinned (every process may use every core)", "",
        *(table(unpinned, unpinned[0], cpu=False) if unpinned else ["(not run)"]), "",
        "A single process already runs XLA's CPU thread pool on both cores, so splitting the batch "
        "over more processes on this 2-core machine mostly adds communication; 4 processes "
        "oversubscribe the cores.", "",
        "## Pinned: 1 process on core 0 vs 2 processes on cores 0 and 1", "",
        *(table(pinned, pinned[0], cpu=True) if pinned else ["(not run)"]), "",
        "CPU columns: CPU seconds (`time.process_time`, all threads) of the busiest process, "
        "median over calls. Pinned to one core each, that is the wall time the call would take "
        "with the cores to itself, so the CPU speed-up is the scaling without the other jobs' "
        "share of the cores: the multi-process path's own cost (duplicated query gradients, "
        "gathers, collectives) is in it, time stolen by other jobs is not.", "",
        *(control_lines(pinned, control) if control else []),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
