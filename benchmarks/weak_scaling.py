"""Weak scaling over the number of training examples: EK-FAC factors and stored pairwise scores for
N = 10^4, 10^5, 10^6 examples read from a memory-mapped dataset on disk, with memory bounded
independently of N.

Setting: an MLP 40-128-128-10 (tda_jax.models.MLP, 23,050 parameters) trained for a few epochs on
MNIST-1D (tda_jax.data.load_mnist1d, 4000 examples). The training pool of N examples is MNIST-1D
repeated and noised (row i is MNIST-1D example i mod 4000 plus N(0, 0.05^2) noise drawn per chunk),
generated in chunks of 65,536 rows and written with tda_jax.data.save_memmap_dataset, so it never
exists in memory. Q queries are the first Q MNIST-1D test examples (classification margin).

Each N runs in a fresh process (``--worker``), which

1. trains the model (same key in every process, so the same weights) and warms up: one EK-FAC fit
   and one stored score call on a 2-batch in-memory prefix, so the timed stages reuse compiled
   executables (compilation is reported separately);
2. writes the data set (``write``), maps it back (tda_jax.data.load_memmap_dataset);
3. ``fit``: tda_jax.curvature.fit_curvature(strategy="ekfac", fisher="expected",
   batch_size=--batch) on the memory-mapped data (validation, fingerprint, covariance pass,
   eigendecompositions, lambda pass);
4. ``scores``: tda_jax.attribution.pairwise_scores(store=..., train_batch_size=--batch) into an
   ArrayStore (Q x N float32 on disk), then checks one block of it (queries x the first 2048
   training examples) against the in-memory scores of those examples.

Memory: a thread samples /proc/self/status every 20 ms; reported are the peak RSS (``VmHWM``) and
the peaks of its anonymous (``RssAnon``: heap, XLA buffers) and file-backed (``RssFile``: mapped
pages of the data set, the score store and shared libraries) parts per stage. The score store
releases each chunk's pages once it is flushed, and batches and checks release the pages of the
memory-mapped data set they read (tda_jax.data.dataset.release_pages), so neither part should grow
with N.

Run (from the repository root; 10^6 takes several minutes on 2 cores):

    nice -n 10 .venv/bin/python benchmarks/weak_scaling.py --workdir /tmp/weak_scaling
    .venv/bin/python benchmarks/weak_scaling.py --sizes 10000 --output ''      # a quick look

Writes benchmarks/results/weak_scaling.md (``--output``) and the raw numbers as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import load_average, machine_description, peak_rss_mb, reflow_markdown  # noqa: E402

CHUNK_ROWS = 65536
NOISE = 0.05


def _status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) / 1024.0
    return out


class MemorySampler:
    """Peaks of RssAnon / RssFile / VmRSS between :meth:`start_stage` calls (a sampling thread)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peaks, self._lock = interval, {}, threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self):
        now = _status()
        with self._lock:
            for key, value in now.items():
                self.peaks[key] = max(self.peaks.get(key, 0.0), value)

    def take(self) -> dict[str, float]:
        """The peaks since the last call (and restarts them)."""
        self.sample()
        with self._lock:
            peaks, self.peaks = self.peaks, {}
        return peaks

    def stop(self):
        self._stop.set()
        self._thread.join()


def _pool_chunks(num: int, base_x, base_y, seed: int):
    """The training pool in chunks: MNIST-1D repeated, plus Gaussian noise drawn per chunk."""
    import numpy as np

    for number, start in enumerate(range(0, num, CHUNK_ROWS)):
        rows = np.arange(start, min(start + CHUNK_ROWS, num))
        rng = np.random.default_rng([seed, number])
        x = base_x[rows % len(base_x)] + NOISE * rng.standard_normal((len(rows), base_x.shape[1]),
                                                                      dtype=np.float32)
        yield {"inputs": x.astype(np.float32), "targets": base_y[rows % len(base_y)]}


def worker(args) -> dict:
    os.environ.setdefault("TDA_JAX_PROGRESS", "0")
    sampler = MemorySampler()
    import jax
    import numpy as np

    from tda_jax.attribution import fit_curvature, pairwise_scores
    from tda_jax.data import Dataset, load_memmap_dataset, load_mnist1d, save_memmap_dataset, subset
    from tda_jax.losses import classification_margin, softmax_cross_entropy
    from tda_jax.models import MLP, apply_fn_of
    from tda_jax.training import TrainConfig, train

    result = {"n": args.n, "load_start": load_average(), "stages": {}}
    stages = result["stages"]
    work = Path(args.workdir) / f"n{args.n}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    def stage(name, start):
        peaks = sampler.take()
        stages[name] = {"seconds": time.perf_counter() - start, "vmhwm_mb": peak_rss_mb(),
                        "peak_rss_anon_mb": peaks.get("RssAnon", -1.0),
                        "peak_rss_file_mb": peaks.get("RssFile", -1.0),
                        "peak_vmrss_mb": peaks.get("VmRSS", -1.0), "end": _status()}

    start = time.perf_counter()
    base, test = load_mnist1d()
    model = MLP(hidden_sizes=(128, 128), num_outputs=10)
    variables = train(jax.random.key(0), model, None, base,
                      TrainConfig(num_epochs=args.epochs, batch_size=128, learning_rate=3e-3))
    params, apply_fn = variables["params"], apply_fn_of(model)
    loss = softmax_cross_entropy()
    queries = subset(test, np.arange(args.queries))
    result["num_params"] = int(sum(np.size(v) for v in jax.tree.leaves(params)))
    stage("setup (data, training)", start)

    start = time.perf_counter()
    warm = subset(base, np.arange(2 * args.batch))
    curvature = fit_curvature(apply_fn, params, warm, strategy="ekfac", loss=loss,
                              batch_size=args.batch)
    pairwise_scores(apply_fn, params, curvature, queries, warm, loss=loss,
                    measurement=classification_margin, train_batch_size=args.batch,
                    store=work / "warm_scores", store_chunk_batches=args.chunk_batches)
    stage("warm-up (compile)", start)

    start = time.perf_counter()
    path = work / "data"
    save_memmap_dataset(path, _pool_chunks(args.n, base.inputs, base.targets, seed=1),
                        num_examples=args.n, num_classes=10)
    train_data = load_memmap_dataset(path)
    assert isinstance(train_data.inputs, np.memmap)
    stage("write data", start)
    result["data_mb"] = sum(f.stat().st_size for f in path.rglob("*.npy")) / 2**20

    start = time.perf_counter()
    curvature = fit_curvature(apply_fn, params, train_data, strategy="ekfac", loss=loss,
                              batch_size=args.batch)
    jax.block_until_ready(curvature.factors)
    stage("fit (EK-FAC)", start)

    start = time.perf_counter()
    store = pairwise_scores(apply_fn, params, curvature, queries, train_data, loss=loss,
                            measurement=classification_margin, train_batch_size=args.batch,
                            store=work / "scores", store_chunk_batches=args.chunk_batches)
    assert store.complete
    stage("pairwise scores (store)", start)
    result["store_mb"] = (work / "scores" / "data.npy").stat().st_size / 2**20

    start = time.perf_counter()
    head = Dataset(np.array(train_data.inputs[:2048]), np.array(train_data.targets[:2048]), 10)
    expected = pairwise_scores(apply_fn, params, curvature, queries, head, loss=loss,
                               measurement=classification_margin, train_batch_size=args.batch)
    got = store.read(cols=slice(0, 2048))
    result["check_max_abs_diff"] = float(np.max(np.abs(got - expected)))
    result["check_max_abs_score"] = float(np.max(np.abs(expected)))
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-4 * result["check_max_abs_score"]):
        raise AssertionError(f"stored scores differ from in-memory ones by "
                             f"{result['check_max_abs_diff']}")
    stage("check (2048 columns in memory)", start)
    sampler.stop()
    result["load_end"] = load_average()
    store.close()
    if not args.keep:
        shutil.rmtree(work)
    return result


def _table(results: list[dict]) -> str:
    timed = ["write data", "fit (EK-FAC)", "pairwise scores (store)"]
    lines = ["| N | write data (s) | fit EK-FAC (s) | scores into store (s) | fit us/example | "
             "scores us/example | compile (s) | peak RSS VmHWM (MB) | peak RssAnon (MB) | "
             "peak RssFile (MB) | data / store on disk (MB) | load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["stages"]
        anon = max(v["peak_rss_anon_mb"] for v in s.values())
        file_ = max(v["peak_rss_file_mb"] for v in s.values())
        hwm = max(v["vmhwm_mb"] for v in s.values())
        lines.append(
            f"| {r['n']:,} | {s[timed[0]]['seconds']:.1f} | {s[timed[1]]['seconds']:.1f} | "
            f"{s[timed[2]]['seconds']:.1f} | {1e6 * s[timed[1]]['seconds'] / r['n']:.1f} | "
            f"{1e6 * s[timed[2]]['seconds'] / r['n']:.1f} | "
            f"{s['warm-up (compile)']['seconds']:.1f} | {hwm:.0f} | {anon:.0f} | {file_:.0f} | "
            f"{r['data_mb']:.0f} / {r['store_mb']:.0f} | "
            f"{r['load_start'][0]:.2f} / {r['load_end'][0]:.2f} |")
    return "\n".join(lines)


def _stage_table(results: list[dict]) -> str:
    lines = ["| N | stage | seconds | peak RssAnon (MB) | peak RssFile (MB) | VmHWM after (MB) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for name, v in r["stages"].items():
            lines.append(f"| {r['n']:,} | {name} | {v['seconds']:.1f} | {v['peak_rss_anon_mb']:.0f} | "
                         f"{v['peak_rss_file_mb']:.0f} | {v['vmhwm_mb']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--chunk-batches", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workdir", default="/tmp/tda_weak_scaling")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/weak_scaling.md"))
    parser.add_argument("--json", default="")
    parser.add_argument("--from-json", default="", help="rewrite the report from a saved --json")
    parser.add_argument("--keep", action="store_true", help="keep the data and score files")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results, meta = saved["results"], saved["meta"]
    else:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M", time.gmtime()), "machine":
                machine_description(), "uptime": subprocess.run(["uptime"], capture_output=True,
                                                                text=True).stdout.strip(),
                "command": "nice -n 10 .venv/bin/python " + " ".join(
                    [os.path.relpath(__file__, ROOT), *sys.argv[1:]]), "args": vars(args)}
        results = []
        for n in args.sizes:
            command = [sys.executable, __file__, "--worker", "--n", str(n), "--queries",
                       str(args.queries), "--batch", str(args.batch), "--chunk-batches",
                       str(args.chunk_batches), "--epochs", str(args.epochs), "--workdir",
                       args.workdir] + (["--keep"] if args.keep else [])
            env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"N={n} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"N={n}: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in
                                         results[-1]["stages"].items()), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        meta["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    a = meta["args"]
    report = f"""# Weak scaling over N: factors and stored scores from a memory-mapped data set

Date: {meta['date']} (UTC). Rerun from the repository root:

```
{meta['command']}
```

Machine: {meta['machine']}. `uptime` at the start: `{meta['uptime']}`; at the end:
`{meta.get('uptime_end', '?')}`. Other jobs shared the 2 cores (the load column gives each
process's 1-minute load average at its start and end), so the seconds are noisy; memory is not.

Setting: MLP 40-128-128-10 ({results[0].get('num_params', '?')} parameters) trained
{a['epochs']} epochs on MNIST-1D; the N training examples are MNIST-1D repeated with Gaussian noise,
written in chunks of {CHUNK_ROWS} rows by `tda_jax.data.save_memmap_dataset` and read back as
`np.memmap` arrays (`load_memmap_dataset`); EK-FAC (expected Fisher, float64 eigendecompositions),
batch {a['batch']}; Q = {a['queries']} queries (classification margin) scored into an `ArrayStore`
(`pairwise_scores(store=..., store_chunk_batches={a['chunk_batches']})`). Each N ran in a fresh
process after a warm-up on 2 batches (compilation, column "compile"); stage seconds exclude it.
Each run checked the first 2048 stored columns against in-memory scores (max abs difference
{', '.join(f"{r['check_max_abs_diff']:.1e}" for r in results)} for score magnitudes up to
{', '.join(f"{r['check_max_abs_score']:.1e}" for r in results)}).

## Summary

{_table(results)}

RssAnon is the heap and XLA's buffers; RssFile the file-backed pages mapped into the process
(shared libraries, about 200 MB in every run, plus whatever pages of the data set and the score
store are mapped at the moment). Passes over the memory-mapped data set release the pages of each
block they read, and the score store releases each chunk's pages after flushing it, so neither the
{results[-1]['data_mb']:.0f} MB of data nor the {results[-1]['store_mb']:.0f} MB of scores at the
largest N become resident at once (they stay in the kernel's page cache). VmHWM is the peak of the
sum.

## Per stage

{_stage_table(results)}
"""
    report = reflow_markdown(report)
    print(report)
    if args.output:
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
