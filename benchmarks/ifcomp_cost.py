"""Cost of IF-COMP per test point vs one forward pass and vs brute-force pNML (no peer library).

Setting: MLPs on MNIST-1D (``tda_jax.data.load_mnist1d``), trained briefly (the cost does not
depend on how well they are trained), EK-FAC curvature (expected Fisher) fitted once:

* ``mnist1d``: MLP 40-128-128-10, 4000 training examples (the experiment's default model);
* ``oracle``: MLP 40-16-10, 300 training examples (the experiment's brute-force oracle model).

Per case: seconds per test point of (1) one jitted forward pass (batches of 64), (2) IF-COMP (the
output-space kernel of every test point from one forward pass and a VJP of the C one-hot output
cotangents, preconditioned by EK-FAC, then the pNML over all C labels; batches of 64; 1000 test
points), and (3) brute-force pNML (for every label, ``--brute_steps`` Adam steps of the full
proximal objective over the whole training set; ``--brute_points`` points, all labels stacked
into one vmapped run). Times are medians of ``--repeats`` calls after a warm-up call (compilation
excluded), plus the one-off curvature fit. The 1-minute load average is recorded before and after.

Command (from the repository root)::

    nice -n 10 python benchmarks/ifcomp_cost.py            # writes benchmarks/results/ifcomp_cost.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TDA_JAX_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import load_average, machine_description  # noqa: E402
from tda_jax import attribution, data, losses, models, training  # noqa: E402
from tda_jax.complexity import (  # noqa: E402
    brute_force_pnml,
    build_kernel_step,
    output_kernels,
    pnml_from_kernels,
)

RESULTS = Path(__file__).resolve().parent / "results" / "ifcomp_cost.md"


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(name: str, num_train: int, hidden: tuple[int, ...], args) -> dict:
    train, test = data.load_mnist1d(num_train, 1000, seed=0)
    model = models.MLP(hidden_sizes=hidden, num_outputs=10)
    config = training.TrainConfig(num_epochs=5, batch_size=128, learning_rate=1e-3,
                                  loss=losses.softmax_cross_entropy())
    params = training.train(jax.random.key(0), model, None, train, config)["params"]
    apply_fn = models.apply_fn_of(model)
    began = time.perf_counter()
    curvature = attribution.fit_curvature(apply_fn, params, train, strategy="ekfac",
                                          loss=losses.softmax_cross_entropy(), damping=1e-3)
    fit_seconds = time.perf_counter() - began
    inputs = np.asarray(test.inputs)
    num_test = len(inputs)

    forward = jax.jit(apply_fn)
    batches = [jnp.asarray(inputs[i:i + 64]) for i in range(0, num_test - 63, 64)]

    def run_forward():
        for batch in batches:
            forward(params, batch).block_until_ready()

    forward_s = _median_seconds(run_forward, args.repeats) / (64 * len(batches))

    step = build_kernel_step(apply_fn, curvature)

    def run_ifcomp():
        logits, kernels = output_kernels(apply_fn, params, curvature, inputs, batch_size=64,
                                         step=step)
        pnml_from_kernels(logits, kernels, temperature=1.0, epsilon=1e-2)

    ifcomp_s = _median_seconds(run_ifcomp, args.repeats) / num_test

    points = inputs[:args.brute_points]

    def run_brute():
        brute_force_pnml(apply_fn, params, np.asarray(train.inputs), points, temperature=1.0,
                         epsilon=1e-2, damping=1e-3, num_steps=args.brute_steps)

    brute_s = _median_seconds(run_brute, 1) / len(points)
    num_params = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    return {"case": name, "num_train": num_train, "params": num_params, "fit_s": fit_seconds,
            "forward_s": forward_s, "ifcomp_s": ifcomp_s, "brute_s": brute_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--brute_points", type=int, default=2)
    parser.add_argument("--brute_steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = load_average()
    rows = [measure("mnist1d", 4000, (128, 128), args), measure("oracle", 300, (16,), args)]
    load_after = load_average()
    lines = [
        "# IF-COMP cost per test point",
        "",
        f"Command: `nice -n 10 python benchmarks/ifcomp_cost.py --repeats={args.repeats} "
        f"--brute_points={args.brute_points} --brute_steps={args.brute_steps}`",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: "
        f"{machine_description()}; JAX {jax.__version__} on {jax.devices()[0].platform}; "
        f"1-minute load average {load_before[:1]} before, {load_after[:1]} after (a shared "
        "machine: absolute times are noisy, ratios less so).",
        "",
        "Seconds per test point (medians after a warm-up call; compilation excluded). IF-COMP = "
        "output-space kernel (one forward + VJP of the 10 one-hot cotangents, EK-FAC "
        "preconditioning) + pNML over all 10 labels; brute force = for each of the 10 labels, "
        f"{args.brute_steps} Adam steps of the full proximal objective over the whole training "
        "set (the experiment's oracle refits a tanh 40-16-10 model with 600 steps, to gradient "
        "norm ~1e-7). The EK-FAC fit is paid once for all test points.",
        "",
        "| case | train | params | EK-FAC fit (s, once) | forward (s/pt) | IF-COMP (s/pt) | "
        "brute force (s/pt) | IF-COMP / forward | brute force / IF-COMP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['num_train']} | {r['params']} | {r['fit_s']:.2f} | "
            f"{r['forward_s']:.2e} | {r['ifcomp_s']:.2e} | {r['brute_s']:.2e} | "
            f"{r['ifcomp_s'] / r['forward_s']:.0f}x | {r['brute_s'] / r['ifcomp_s']:.0f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
