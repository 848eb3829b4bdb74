"""bfloat16 capture against float32: score agreement and speed of ``compute_dtype`` on CPU.

Two trained models, each attributed twice with EK-FAC, once with float32 capture
(``compute_dtype=None``: the parameters' dtype) and once with ``compute_dtype=jnp.bfloat16``
(forward and backward passes, activations ``a`` and output gradients ``g`` in bfloat16; ``a`` and
``g`` cast to float32 before any statistic or score is formed, statistics accumulated in float32,
eigendecompositions in float64 as always):

* ``mlp``: an MLP ``input-hidden-hidden-10`` trained briefly on random 10-class Gaussian-cluster
  data, expected Fisher, margin measurement;
* ``transformer``: :class:`tda_jax.models.TransformerLM` (untied head, built with ``dtype=None``
  so that it computes in its parameters' dtype) trained briefly on the synthetic fact corpus
  (:func:`tda_jax.data.make_fact_corpus`), empirical Fisher, completion log-probability of fact
  queries.

Measured per problem and dtype, with compiled steps held (``build_fit_steps`` /
``build_score_steps``): the cold first call of ``fit_curvature`` + ``pairwise_scores``
(compilation included), then the median of ``--repeats`` warm calls of each; and the agreement of
the bfloat16 score matrix with the float32 one: Pearson and Spearman correlation per query (min /
median), the largest absolute difference relative to the largest float32 score, and the overlap
of each query's top-10 training examples. The machine's ``uptime`` before and after is recorded.

Run from the repository root (our ``.venv``)::

    .venv/bin/python benchmarks/precision.py              # writes benchmarks/results/precision.md
    .venv/bin/python benchmarks/precision.py --quick --output ''
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tda_jax.attribution import build_score_steps, fit_curvature, pairwise_scores  # noqa: E402
from tda_jax.curvature import build_fit_steps, discover_layers  # noqa: E402
from tda_jax.data import Dataset, make_fact_corpus, subset  # noqa: E402
from tda_jax.losses import (  # noqa: E402
    classification_margin,
    completion_log_prob,
    softmax_cross_entropy,
)
from tda_jax.models import MLP, TransformerLM, apply_fn_of  # noqa: E402
from tda_jax.training import TrainConfig, train  # noqa: E402

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return "unknown CPU"


def cpu_bf16_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(flag for flag in set(flags) if "bf16" in flag)


def mlp_problem(args) -> dict:
    rng = np.random.default_rng(0)
    n = args.mlp_train + args.queries
    centers = rng.normal(size=(10, args.mlp_input)).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int32)
    x = (centers[y] + 1.5 * rng.normal(size=(n, args.mlp_input))).astype(np.float32)
    train_data = Dataset(x[:args.mlp_train], y[:args.mlp_train], 10)
    queries = Dataset(x[args.mlp_train:], y[args.mlp_train:], 10)
    model = MLP(hidden_sizes=(args.mlp_hidden, args.mlp_hidden), num_outputs=10)
    variables = train(jax.random.key(0), model, None, train_data,
                      TrainConfig(num_epochs=args.epochs, batch_size=128, learning_rate=1e-3))
    return {"name": "mlp", "apply_fn": apply_fn_of(model), "params": variables["params"],
            "train": train_data, "queries": queries, "loss": softmax_cross_entropy(),
            "measurement": classification_margin, "fisher": "expected",
            "description": f"MLP {args.mlp_input}-{args.mlp_hidden}-{args.mlp_hidden}-10, "
                           f"{args.mlp_train} training examples (random 10-class Gaussian clusters), "
                           f"{args.queries} queries, trained {args.epochs} epochs (AdamW); expected "
                           "Fisher, margin measurement"}


def lm_problem(args) -> dict:
    corpus = make_fact_corpus(seed=0, num_entities=args.lm_entities,
                              num_arithmetic=400 * args.lm_entities // 48,
                              num_distractors=400 * args.lm_entities // 48)
    train_data = corpus.train_dataset()
    queries = subset(corpus.query_dataset(), np.arange(args.queries))
    model = TransformerLM(vocab_size=corpus.vocab_size, max_len=corpus.max_len,
                          d_model=args.lm_d_model, num_heads=4, num_layers=2,
                          d_mlp=4 * args.lm_d_model, dtype=None)
    variables = train(jax.random.key(0), model, None, train_data,
                      TrainConfig(num_epochs=args.epochs, batch_size=32, learning_rate=3e-3,
                                  loss="causal_lm"))
    return {"name": "transformer", "apply_fn": apply_fn_of(model), "params": variables["params"],
            "train": train_data, "queries": queries, "loss": TrainConfig(loss="causal_lm").loss,
            "measurement": completion_log_prob, "fisher": "empirical",
            "description": f"TransformerLM d_model={args.lm_d_model}, 4 heads, 2 blocks, d_mlp="
                           f"{4 * args.lm_d_model}, untied head, dtype=None; fact corpus "
                           f"(make_fact_corpus(num_entities={args.lm_entities})), "
                           f"{len(train_data.inputs)} training sequences of "
                           f"{train_data.inputs.shape[1]} positions, {args.queries} fact queries, "
                           f"trained {args.epochs} epochs; empirical Fisher, completion "
                           "log-probability"}


def run(problem: dict, dtype, args) -> dict:
    apply_fn, params, train_data = problem["apply_fn"], problem["params"], problem["train"]
    specs = discover_layers(apply_fn, params, train_data)
    fit_steps = build_fit_steps(apply_fn, "ekfac", problem["loss"], specs, fisher=problem["fisher"],
                                compute_dtype=dtype)
    score_steps = build_score_steps(apply_fn, "ekfac", specs, loss=problem["loss"],
                                    measurement=problem["measurement"], compute_dtype=dtype)

    def fit():
        return fit_curvature(apply_fn, params, train_data, strategy="ekfac", loss=problem["loss"],
                             fisher=problem["fisher"], batch_size=args.batch_size,
                             compute_dtype=dtype, steps=fit_steps)

    def score(curvature):
        return pairwise_scores(apply_fn, params, curvature, problem["queries"], train_data,
                               loss=problem["loss"], measurement=problem["measurement"],
                               query_batch_size=args.queries, train_batch_size=args.batch_size,
                               compute_dtype=dtype, steps=score_steps)

    start = time.perf_counter()
    curvature = fit()
    scores = score(curvature)
    cold = time.perf_counter() - start
    fits, scorings, fit_cpu, score_cpu = [], [], [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        curvature = fit()
        fits.append(time.perf_counter() - start)
        fit_cpu.append(time.process_time() - cpu)
        start, cpu = time.perf_counter(), time.process_time()
        scores = score(curvature)
        scorings.append(time.perf_counter() - start)
        score_cpu.append(time.process_time() - cpu)
    return {"cold_s": cold, "fit_s": statistics.median(fits), "score_s": statistics.median(scorings),
            "fit_cpu_s": statistics.median(fit_cpu), "score_cpu_s": statistics.median(score_cpu),
            "scores": scores, "load": os.getloadavg()[0]}


def agreement(exact: np.ndarray, low: np.ndarray) -> dict:
    pearson = [scipy.stats.pearsonr(a, b)[0] for a, b in zip(exact, low)]
    spearman = [scipy.stats.spearmanr(a, b)[0] for a, b in zip(exact, low)]
    top = [len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(exact, low)]
    return {"pearson_min": float(np.min(pearson)), "pearson_median": float(np.median(pearson)),
            "spearman_min": float(np.min(spearman)), "spearman_median": float(np.median(spearman)),
            "top10_mean": float(np.mean(top)),
            "max_rel_diff": float(np.max(np.abs(low - exact)) / np.max(np.abs(exact)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default="mlp,transformer")
    parser.add_argument("--mlp_train", type=int, default=8192)
    parser.add_argument("--mlp_input", type=int, default=256)
    parser.add_argument("--mlp_hidden", type=int, default=1024)
    parser.add_argument("--lm_entities", type=int, default=48)
    parser.add_argument("--lm_d_model", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for development")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "precision.md"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.mlp_train, args.mlp_input, args.mlp_hidden = 512, 16, 64
        args.lm_entities, args.lm_d_model, args.epochs, args.queries = 8, 32, 1, 8
        args.repeats = 1
    os.environ.setdefault("TDA_JAX_PROGRESS", "0")
    uptime_before = os.popen("uptime").read().strip()
    results = []
    for name in args.problems.split(","):
        problem = {"mlp": mlp_problem, "transformer": lm_problem}[name](args)
        runs = {label: run(problem, dtype, args) for label, dtype in DTYPES.items()}
        stats = agreement(runs["float32"]["scores"], runs["bfloat16"]["scores"])
        results.append({"name": name, "description": problem["description"], **stats,
                        **{f"{label}_{key}": value for label, r in runs.items()
                           for key, value in r.items() if key != "scores"}})
        print(json.dumps(results[-1]), flush=True)
    uptime_after = os.popen("uptime").read().strip()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    command = " ".join(["python", "benchmarks/precision.py", *sys.argv[1:]])
    lines = [
        "# Precision controls: bfloat16 capture vs float32 (CPU)", "",
        f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}. Rerun from the repository "
        "root:", "", "```", f".venv/bin/{command}", "```", "",
        "EK-FAC fitted and scored twice per problem: float32 capture (`compute_dtype=None`) and "
        "`compute_dtype=jnp.bfloat16` in both `fit_curvature` and `pairwise_scores` (forward and "
        "backward passes in bfloat16; activations and output gradients cast to float32 before "
        "statistics and scores; statistics accumulated in float32; eigendecompositions in "
        "float64). Compiled steps are held; times are the median of "
        f"{args.repeats} warm calls, `cold` is the first call (compilation included). jax "
        f"{jax.__version__}, {cpu_name()}, {os.cpu_count()} logical CPUs, shared with other jobs: "
        f"`uptime` before: `{uptime_before}`; after: `{uptime_after}`.", "",
    ]
    for r in results:
        lines += [f"## {r['name']}", "", r["description"] + ".", "",
                  "| capture | fit (s) | scores (s) | fit CPU (s) | scores CPU (s) | cold fit + "
                  "scores (s) | load (1 min) |", "|---|---|---|---|---|---|---|"]
        for label in DTYPES:
            lines.append(f"| {label} | {r[label + '_fit_s']:.2f} | {r[label + '_score_s']:.2f} | "
                         f"{r[label + '_fit_cpu_s']:.2f} | {r[label + '_score_cpu_s']:.2f} | "
                         f"{r[label + '_cold_s']:.2f} | {r[label + '_load']:.2f} |")
        lines += ["", f"Speed-up of bfloat16 over float32 (wall; CPU seconds, all threads): fit "
                  f"{r['float32_fit_s'] / r['bfloat16_fit_s']:.2f}x "
                  f"({r['float32_fit_cpu_s'] / r['bfloat16_fit_cpu_s']:.2f}x), scores "
                  f"{r['float32_score_s'] / r['bfloat16_score_s']:.2f}x "
                  f"({r['float32_score_cpu_s'] / r['bfloat16_score_cpu_s']:.2f}x); below 1: "
                  "slower.", "",
                  f"Agreement of the bfloat16 scores with the float32 ones, per query: Pearson min "
                  f"{r['pearson_min']:.5f}, median {r['pearson_median']:.5f}; Spearman min "
                  f"{r['spearman_min']:.5f}, median {r['spearman_median']:.5f}; top-10 overlap "
                  f"{r['top10_mean']:.2f}; largest difference {r['max_rel_diff']:.3g} of the largest "
                  "float32 score.", ""]
    flags = cpu_bf16_flags()
    ratios = [r[f"float32_{kind}_cpu_s"] / r[f"bfloat16_{kind}_cpu_s"] for r in results
              for kind in ("fit", "score")]
    lines += [f"CPU bfloat16 features reported by /proc/cpuinfo: {', '.join(flags) or 'none'}. "
              "Speed: compare the CPU columns (CPU seconds of all threads, insensitive to the share "
              "of the cores other jobs take): float32 over bfloat16 CPU seconds range from "
              f"{min(ratios):.2f}x to {max(ratios):.2f}x here (above 1: bfloat16 is cheaper). "
              "Capture adds casts to and from float32 around every captured array, and XLA's CPU "
              "backend gains little from bfloat16 products; the setting is meant for accelerators "
              "with bfloat16 matrix units, and the agreement numbers are what carries over.", ""]
    if max(r[label + "_load"] for r in results for label in DTYPES) > (os.cpu_count() or 1):
        lines += ["The load average was above the core count: the float32 calls run first and the "
                  "bfloat16 ones later, at another load, so the wall-clock speed-ups mostly "
                  "measure the change in load; the CPU-second ratios are the comparison.", ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
