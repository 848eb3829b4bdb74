"""LAFTR's summary size and FSD evaluation time against a coreset, the K-FAC quadratic and the
true FSD on all the data (no peer library: the comparison is between estimators).

Setting: an MLP ``40-h-h-10`` (``--hidden``) trained 20 epochs on MNIST-1D (``--num_train``
examples), distance ``--distance`` (default KL). For each estimator: numbers stored, seconds to
build it (one pass over the data: the LAFTR summary; the K-FAC fit; nothing for a coreset), and
seconds per FSD evaluation and per FSD gradient (``jax.value_and_grad`` in ``theta1``, what a
continual-learning penalty costs per step), the fastest of ``--repeats`` jitted calls after a
warm-up (on a shared machine the other jobs only add time).
Coresets: one of LAFTR's memory (``ceil(numbers / 40)`` inputs) and one of 1000 inputs. The 1-minute
load average before and after is recorded (the machine is shared; times are noisy when loaded).

Run from the repository root::

    nice -n 10 .venv/bin/python benchmarks/laftr_fsd.py      # writes benchmarks/results/laftr_fsd.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._common import load_average, machine_description  # noqa: E402
from tda_jax import data, fsd, models, training  # noqa: E402


def _best_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    # The minimum: on a shared machine the other jobs only ever add time.
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--distance", default="kl", choices=fsd.DISTANCES)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default="benchmarks/results/laftr_fsd.md")
    args = parser.parse_args()
    os.environ.setdefault("TDA_JAX_PROGRESS", "0")
    load_before = load_average()

    train, _ = data.load_mnist1d(args.num_train, 100)
    model = models.MLP(hidden_sizes=(args.hidden, args.hidden), num_outputs=10)
    config = training.TrainConfig(num_epochs=20, batch_size=128, learning_rate=3e-3)
    p0 = training.train(jax.random.key(0), model, None, train, config)["params"]
    leaves, tree = jax.tree.flatten(p0)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    p1 = jax.tree.unflatten(tree, [v + 0.01 * jax.random.normal(k, v.shape)
                                   for v, k in zip(leaves, keys)])
    d = train.inputs.shape[1]
    rows = []

    def add(name, stored, build_s, fn):
        value = jax.jit(fn)
        grad = jax.jit(jax.value_and_grad(fn))
        rows.append((name, stored, build_s, _best_seconds(lambda: value(p1), args.repeats),
                     _best_seconds(lambda: grad(p1), args.repeats), float(value(p1))))

    start = time.perf_counter()
    summary = fsd.summarize(model, p0, train)
    jax.block_until_ready(summary.cov)
    laftr_build = time.perf_counter() - start
    stored = summary.num_stored(args.distance)
    add("LAFTR (moment)", stored, laftr_build,
        lambda p: fsd.laftr_fsd(summary, p0, p, distance=args.distance))
    add("LAFTR (Bernoulli, 256 samples)", stored, laftr_build,
        lambda p: fsd.laftr_fsd(summary, p0, p, variant="bernoulli", distance=args.distance,
                                key=jax.random.key(2), num_samples=256))
    per_class = fsd.summarize(model, p0, train, per_class=True)
    add("LAFTR (moment, per class)", per_class.num_stored(args.distance), laftr_build,
        lambda p: fsd.laftr_fsd(per_class, p0, p, distance=args.distance))
    for strategy, label in (("kfac", "K-FAC quadratic"), ("diagonal", "diagonal Fisher (EWC)")):
        start = time.perf_counter()
        curvature = fsd.fit_quadratic(model, p0, train, strategy=strategy,
                                      distance=args.distance)
        build = time.perf_counter() - start
        add(label, fsd.quadratic_num_stored(curvature), build,
            lambda p, c=curvature: fsd.quadratic_fsd(c, p0, p))
    apply_fn = fsd.HeadApply(model)
    for size in (math.ceil(stored / d), 1000):
        core = fsd.select_coreset(jax.random.key(3), train, size)
        inputs = jnp.asarray(core.inputs)
        add(f"coreset ({size} inputs)", int(inputs.size), 0.0,
            lambda p, x=inputs: fsd.true_fsd(apply_fn, p0, p, x, distance=args.distance))
    inputs = jnp.asarray(train.inputs)
    add(f"true FSD (all {args.num_train} inputs)", int(inputs.size), 0.0,
        lambda p: fsd.true_fsd(apply_fn, p0, p, inputs, distance=args.distance))
    load_after = load_average()

    lines = [
        "# LAFTR: summary size and FSD evaluation time",
        "",
        f"Command: `nice -n 10 .venv/bin/python benchmarks/laftr_fsd.py --num_train "
        f"{args.num_train} --hidden {args.hidden} --distance {args.distance}`. MLP 40-"
        f"{args.hidden}-{args.hidden}-10 on MNIST-1D, FSD between theta0 and a perturbed theta1 "
        f"(relative noise 0.01), distance {args.distance}; fastest of {args.repeats} jitted calls "
        "after a warm-up. Machine: "
        f"{machine_description()}; {datetime.date.today()}; 1-minute load average "
        f"{load_before[:1]} before, {load_after[:1]} after (shared machine: timings are noisy).",
        "",
        "| estimator | numbers stored | build (s) | FSD (ms) | FSD + gradient (ms) | value |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, n, build, t_value, t_grad, value in rows:
        lines.append(f"| {name} | {n:,} | {build:.2f} | {1e3 * t_value:.3f} | "
                     f"{1e3 * t_grad:.3f} | {value:.4g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
