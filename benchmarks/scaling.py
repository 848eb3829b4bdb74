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

``--eigh`` measures the eigendecomposition stage alone instead (``_scaling_worker.py --mode=eigh``):
K-FAC's per-layer float64 eigendecompositions of an MLP with ``--eigh_layers`` layers of width
``--eigh_width``, which ``fit_curvature`` shares out between processes by cost (``in^3 + out^3``)
and then exchanges, so that every process holds all factors. 1 process pinned to core 0 against 2
processes pinned to cores 0 and 1 (``OPENBLAS_NUM_THREADS=1`` etc.: one thread per core), median
of ``--repeats`` calls; the result replaces (or is appended as) the section "Eigendecomposition
stage distributed by layer" of the output file, keeping the rest of it.

Run from the repository root (no peer library; our ``.venv``)::

    .venv/bin/python benchmarks/scaling.py                     # writes benchmarks/results/scaling.md
    .venv/bin/python benchmarks/scaling.py --processes 1,2 --no-pinned --output ''
    .venv/bin/python benchmarks/scaling.py --eigh              # adds the eigendecomposition section
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


def run_job(num_processes: int, cores: str | None, worker_args: list[str],
            env: dict[str, str] | None = None) -> dict:
    """One launch.local job; returns process 0's timings plus the load before and after."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        before = load_average()
        began = time.perf_counter()
        code = launch(WORKER, [f"--out={out}", *worker_args], num_processes=num_processes,
                      devices_per_process=1, cores=cores, log_dir=Path(tmp) / "logs",
                      base_env={**os.environ, "TDA_JAX_PROGRESS": "0", **(env or {})})
        wall = time.perf_counter() - began
        if code != 0:
            log = (Path(tmp) / "logs" / "process_0.log").read_text()[-3000:]
            raise RuntimeError(f"job with {num_processes} process(es) failed ({code}):\n{log}")
        result = json.loads(out.read_text())
    result.update(load_before=before, load_after=load_average(), wall_s=wall, cores=cores)
    if "eigh_s" in result:
        result.update(eigh=statistics.median(result["eigh_s"]),
                      eigh_cpu=max(statistics.median(c) for c in result["eigh_cpu_s"]))
        return result
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


EIGH_SECTION = "## Eigendecomposition stage distributed by layer"
EIGH_LOAD_NOTE = (
    "With a load average far above the 2 cores (other jobs' threads time-share every core), a pinned "
    'process gets a small and varying share of its core, so the wall times mostly measure that share '
    '(the 2-process job also waits for its slower process at every exchange); the CPU speed-up is the'
    ' measure of the distribution itself. Its gap to the ideal is the exchange (packing, the gloo '
    'all-gather of all factors, about 67 MB at W = 1024) and the cache misses of a heavily time-'
    'shared core.'
)
ONE_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def run_eigh(args) -> None:
    """``--eigh``: 1 process on core 0 vs 2 processes on cores 0 and 1, eigendecomposition stage."""
    uptime_before = os.popen("uptime").read().strip()
    rows = []
    for width in (int(w) for w in str(args.eigh_width).split(",")):
        worker_args = ["--mode=eigh", f"--eigh_layers={args.eigh_layers}",
                       f"--eigh_width={width}", f"--eigh_num_train={args.eigh_num_train}",
                       f"--batch_size={args.batch_size}", f"--repeats={args.repeats}"]
        for cores in ("0", "0;1"):
            rows.append(run_job(len(cores.split(";")), cores, worker_args, ONE_THREAD))
            rows[-1]["width"] = width
            print(json.dumps(rows[-1]), flush=True)
    uptime_after = os.popen("uptime").read().strip()
    if args.json:
        Path(args.json).write_text(json.dumps({"eigh": rows}, indent=1))
    command = " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]])
    layers = rows[0]["layers"]
    lines = [
        EIGH_SECTION, "",
        f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}. Rerun from the repository "
        "root:", "", "```", f".venv/bin/{command}", "```", "",
        f"K-FAC covariance statistics of an MLP with {len(layers)} Dense layers of width W (input "
        "W, W outputs: matrix views (W+1) x W; "
        f"{', '.join(str(r['num_params']) for r in rows[::2])} parameters; empirical Fisher, "
        f"{args.eigh_num_train} examples, untimed), then the timed "
        "stage: `tda_jax.curvature.fit.finalize_pass`, i.e. two float64 eigendecompositions per "
        "layer. With 2 processes each layer is assigned to one process by cost (in^3 + out^3, "
        "`tda_jax.sharding.assign_by_cost`), each process eigendecomposes its layers, and the "
        "factors are exchanged as bytes (`exchange_arrays`), so every process holds all of them. "
        f"Median of {args.repeats} calls, each after a barrier; one thread per process "
        "(`OPENBLAS_NUM_THREADS=1`), pinned with `launch.local --cores` (what `taskset -c` does).",
        "", f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, shared with other jobs. "
        f"`uptime` before: `{uptime_before}`; after: `{uptime_after}`.", "",
        "| W | processes | cores | eigh stage (s) | speed-up | busiest process CPU (s) | "
        "CPU speed-up | same bytes on every process | eigenvalue checksum | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, r in enumerate(rows):
        base = rows[index - index % 2]
        lines.append(
            f"| {r['width']} | {r['processes']} | {r['cores']} | {r['eigh']:.2f} | "
            f"{base['eigh'] / r['eigh']:.2f}x | "
            f"{r['eigh_cpu']:.2f} | {base['eigh_cpu'] / r['eigh_cpu']:.2f}x | "
            f"{r['identical_across_processes']} | {r['eigenvalue_checksum']:.6g} | "
            f"{r['load_before'][0]:.2f} / {r['load_after'][0]:.2f} |")
    costs = [i ** 3 + o ** 3 for _, i, o in layers]
    ideal = sum(costs) / max(sum(c for c, w in zip(costs, _owners(costs)) if w == k) for k in (0, 1))
    lines += ["", f"Ideal speed-up of this assignment (total cost over the larger process's cost): "
              f"{ideal:.2f}x. The CPU columns are the CPU seconds of the busiest process "
              "(`time.process_time`), which other jobs on the shared cores do not inflate; the wall "
              "time includes the exchange and the wait for the slower process.", ""]
    if max(r["load_before"][0] for r in rows) > (os.cpu_count() or 1):
        lines += [EIGH_LOAD_NOTE, ""]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.output:
        path = Path(args.output)
        text = path.read_text() if path.exists() else ""
        if EIGH_SECTION in text:  # replace the old section (up to the next "## " heading of level 2)
            head, rest = text.split(EIGH_SECTION, 1)
            tail = rest.split("\n## ", 1)
            text = head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        path.write_text(text)


def _owners(costs):
    from tda_jax.sharding import assign_by_cost

    return assign_by_cost(costs, 2)


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
    parser.add_argument("--eigh", action="store_true",
                        help="time the eigendecomposition stage (1 vs 2 pinned processes) only")
    parser.add_argument("--eigh_layers", type=int, default=8)
    parser.add_argument("--eigh_width", default="1024", help="layer widths, comma-separated")
    parser.add_argument("--eigh_num_train", type=int, default=1024)
    args = parser.parse_args()
    if args.eigh:
        run_eigh(args)
        return
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
