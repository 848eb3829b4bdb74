"""One process of benchmarks/scaling.py (started by launch.local): times EK-FAC fitting and scoring.

Every process builds the same problem (random classification data, an MLP at its initialization),
joins the run (``tda_jax.sharding.initialize_from_env``), does one untimed warm-up call of
``fit_curvature`` and ``pairwise_scores`` (compilation), then ``--repeats`` timed calls of each,
every one started after a barrier. Process 0 writes the wall seconds and every process's CPU
seconds (all its threads, ``time.process_time``) to ``--out`` (JSON).

``--mode=eigh`` times the eigendecomposition stage alone instead: K-FAC covariance statistics of
an MLP with ``--eigh_layers`` Dense layers of width ``--eigh_width`` (empirical Fisher, one pass
over ``--eigh_num_train`` examples, untimed), then ``--repeats`` timed calls of
``tda_jax.curvature.fit.finalize_pass`` (each layer's two float64 eigendecompositions, shared out
between the processes by cost, then exchanged), plus a checksum of the factors and whether every
process holds the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from tda_jax import sharding
from tda_jax.attribution import build_score_steps, fit_curvature, pairwise_scores
from tda_jax.curvature import build_fit_steps, discover_layers
from tda_jax.curvature.blocks import get_block
from tda_jax.curvature.fit import finalize_pass, run_pass
from tda_jax.data import Dataset
from tda_jax.losses import classification_margin, softmax_cross_entropy
from tda_jax.models import MLP, apply_fn_of


def eigh_stage(args) -> None:
    """``--mode=eigh``: times ``finalize_pass`` of K-FAC's covariance pass (see the docstring)."""
    width, rng = args.eigh_width, np.random.default_rng(0)
    x = rng.normal(size=(args.eigh_num_train, width)).astype(np.float32)
    y = rng.integers(0, width, size=len(x)).astype(np.int32)
    train = Dataset(x, y, width)
    model = MLP(hidden_sizes=(width,) * (args.eigh_layers - 1), num_outputs=width)
    params = model.init(jax.random.key(0), x[:1])["params"]
    apply_fn, loss = apply_fn_of(model), softmax_cross_entropy()
    specs = discover_layers(apply_fn, params, train)
    block = get_block("kfac")
    steps = build_fit_steps(apply_fn, block, loss, specs, fisher="empirical")
    mesh = sharding.default_mesh()
    extra = {"inputs": block.pass_inputs("covariance", specs, block.initial_factors(specs))}
    stats = run_pass(steps["covariance"], params, extra, train, args.batch_size, mesh, "covariance")
    count = float(stats.pop("examples"))
    seconds, cpu = [], []
    for _ in range(args.repeats):
        sharding.barrier("timing")
        start, cpu_start = time.perf_counter(), time.process_time()
        factors = finalize_pass(block, "covariance", specs, stats, count,
                                block.initial_factors(specs), None, "float64")
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(factors)]
    digest = np.frombuffer(hashlib.sha256(b"".join(v.tobytes() for v in leaves)).digest()[:8],
                           np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    cpus = multihost_utils.process_allgather(np.asarray(cpu, np.float32))
    if sharding.is_main_process():
        eig = sum(float(np.sum(factors[s.name]["eigvals_A"]))
                  * float(np.sum(factors[s.name]["eigvals_G"])) for s in specs)
        result = {"processes": jax.process_count(), "devices": jax.device_count(),
                  "eigh_s": seconds,
                  "eigh_cpu_s": np.reshape(cpus, (jax.process_count(), -1)).tolist(),
                  "layers": [[s.name, s.in_dim, s.out_dim] for s in specs],
                  "num_params": int(sum(s.num_params for s in specs)),
                  "eigenvalue_checksum": eig,
                  "identical_across_processes": bool(np.all(digests == digests[0])),
                  "load_after": list(os.getloadavg())}
        with open(args.out, "w") as f:
            json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("fit_score", "eigh"), default="fit_score")
    parser.add_argument("--eigh_layers", type=int, default=8)
    parser.add_argument("--eigh_width", type=int, default=1024)
    parser.add_argument("--eigh_num_train", type=int, default=1024)
    parser.add_argument("--num_train", type=int, default=8192)
    parser.add_argument("--num_queries", type=int, default=64)
    parser.add_argument("--input_dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sharding.initialize_from_env()
    if args.mode == "eigh":
        eigh_stage(args)
        return

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.num_train + args.num_queries, args.input_dim)).astype(np.float32)
    y = rng.integers(0, 10, size=len(x)).astype(np.int32)
    train = Dataset(x[:args.num_train], y[:args.num_train], 10)
    queries = Dataset(x[args.num_train:], y[args.num_train:], 10)
    model = MLP(hidden_sizes=(args.hidden, args.hidden), num_outputs=10)
    params = model.init(jax.random.key(0), x[:1])["params"]
    apply_fn, loss = apply_fn_of(model), softmax_cross_entropy()

    # Compiled steps built once and held, as for any repeated call (otherwise each call traces
    # and lowers its steps again to look their executables up: a fixed cost in every process).
    specs = discover_layers(apply_fn, params, train)
    fit_steps = build_fit_steps(apply_fn, "ekfac", loss, specs)
    score_steps = build_score_steps(apply_fn, "ekfac", specs, loss=loss,
                                    measurement=classification_margin)

    def fit():
        return fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss,
                             batch_size=args.batch_size, steps=fit_steps)

    def score(curvature):
        return pairwise_scores(apply_fn, params, curvature, queries, train, loss=loss,
                               measurement=classification_margin,
                               query_batch_size=args.num_queries,
                               train_batch_size=args.batch_size, steps=score_steps)

    def timed(fn, *fn_args):
        sharding.barrier("timing")
        start, cpu = time.perf_counter(), time.process_time()
        value = fn(*fn_args)
        return time.perf_counter() - start, time.process_time() - cpu, value

    started = time.perf_counter()
    curvature = fit()
    score(curvature)
    warmup = time.perf_counter() - started
    fits, scores, fit_cpu, score_cpu = [], [], [], []
    for _ in range(args.repeats):
        seconds, cpu, curvature = timed(fit)
        fits.append(seconds)
        fit_cpu.append(cpu)
        seconds, cpu, values = timed(score, curvature)
        scores.append(seconds)
        score_cpu.append(cpu)
    # CPU seconds of every process (all its threads), gathered on process 0.
    cpu = multihost_utils.process_allgather(np.asarray([fit_cpu, score_cpu], np.float32))
    if sharding.is_main_process():
        result = {"processes": jax.process_count(), "devices": jax.device_count(),
                  "fit_s": fits, "score_s": scores, "warmup_s": warmup,
                  "fit_cpu_s": cpu[:, 0].tolist(), "score_cpu_s": cpu[:, 1].tolist(),
                  "num_params": curvature.num_params, "scores_checksum": float(np.sum(values)),
                  "load_after": list(os.getloadavg())}
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
