"""HMC: tda_jax.mcmc.hmc_step vs blackjax.hmc on the same correlated Gaussian.

Setting: a 50-dimensional Gaussian with a random rotation and standard deviations log-spaced in
[0.3, 1.5]; identity mass matrix; both samplers use velocity Verlet with the SAME step size (tuned
once by ``tda_jax.mcmc.tune_step_size`` to ~0.65 acceptance, then frozen) and the same number of
integration steps; 100 chains vmapped, ``lax.scan`` over steps, everything jitted. Reported:

* time per (vmapped) transition after compilation: median over repeats of a scan of
  ``--num_steps`` transitions divided by ``--num_steps``;
* accuracy after ``--num_burnin`` burn-in transitions from N(0, I): the largest error of the
  sample mean in units of the true marginal standard deviation, the largest relative error of the
  marginal variances, the mean acceptance probability (chains x kept steps pooled).

Run from the repository root (the venv has blackjax and the same jax as our ``.venv``)::

    python3 -m venv benchmarks/.venv-blackjax          # once
    benchmarks/.venv-blackjax/bin/pip install blackjax -e .  # once (tda_jax with its dependencies too)
    benchmarks/.venv-blackjax/bin/python benchmarks/hmc_blackjax.py

It writes ``benchmarks/results/hmc_blackjax.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # tda_jax from this checkout, without installing it into the venv

import blackjax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tda_jax import mcmc  # noqa: E402


def make_target(dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    sds = np.geomspace(0.3, 1.5, dim)
    cov = (rotation * sds**2) @ rotation.T
    mean = rng.normal(size=dim)
    precision = jnp.asarray(np.linalg.inv(cov), jnp.float32)
    mean_j = jnp.asarray(mean, jnp.float32)

    def log_density(z):
        d = z - mean_j
        return -0.5 * d @ (precision @ d)

    return log_density, mean, cov


def build_runners(log_density, step_size, num_integration_steps, dim):
    """Returns {name: run(key, init [C, D], num_steps, keep) -> stats} for both libraries."""

    def ours_init(z):
        return mcmc.hmc_init(z, log_density)

    def ours_step(key, state):
        state, info = mcmc.hmc_step(key, state, log_density, step_size, num_integration_steps)
        return state, info.acceptance_probability

    bj = blackjax.hmc(log_density, step_size, jnp.ones(dim), num_integration_steps)

    def bj_step(key, state):
        state, info = bj.step(key, state)
        return state, info.acceptance_rate

    def make_run(init_fn, step_fn):
        def run(key, init_positions, num_steps, num_burnin):
            states = jax.vmap(init_fn)(init_positions)
            num_chains = init_positions.shape[0]

            def body(carry, step_key):
                states, i, s1, s2, acc = carry
                keys = jax.random.split(step_key, num_chains)
                states, a = jax.vmap(step_fn)(keys, states)
                keep = (i >= num_burnin).astype(jnp.float32)
                z = states.position
                s1 = s1 + keep * z.sum(0)
                s2 = s2 + keep * (z**2).sum(0)
                return (states, i + 1, s1, s2, acc + keep * a.sum()), None

            zeros = jnp.zeros(dim)
            init = (states, 0, zeros, zeros, jnp.zeros(()))
            (_, _, s1, s2, acc), _ = jax.lax.scan(body, init, jax.random.split(key, num_steps))
            return s1, s2, acc

        return jax.jit(run, static_argnums=(2, 3))

    return {"tda_jax": make_run(ours_init, ours_step), "blackjax": make_run(bj.init, bj_step)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--num_chains", type=int, default=100)
    parser.add_argument("--num_integration_steps", type=int, default=10)
    parser.add_argument("--num_steps", type=int, default=500, help="transitions per timed run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--num_burnin", type=int, default=500)
    parser.add_argument("--num_kept", type=int, default=2000)
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "benchmarks/results/hmc_blackjax.md"))
    args = parser.parse_args()

    log_density, mean, cov = make_target(args.dim)
    init = jax.random.normal(jax.random.key(0), (args.num_chains, args.dim))
    step_size = mcmc.tune_step_size(
        jax.random.key(1), init, log_density, num_integration_steps=args.num_integration_steps
    )
    runners = build_runners(log_density, step_size, args.num_integration_steps, args.dim)
    sd = np.sqrt(np.diag(cov))

    # Compile both, then interleave the timed repeats so that load drift on a shared machine hits
    # both libraries alike.
    compile_s, times = {}, {name: [] for name in runners}
    for name, run in runners.items():
        t0 = time.perf_counter()
        jax.block_until_ready(run(jax.random.key(2), init, args.num_steps, 0))
        compile_s[name] = time.perf_counter() - t0
    for r in range(args.repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run(jax.random.key(3 + r), init, args.num_steps, 0))
            times[name].append((time.perf_counter() - t0) / args.num_steps)

    rows, means = [], {}
    for name, run in runners.items():
        # Accuracy: burn in, then pool chains x kept steps.
        total = args.num_burnin + args.num_kept
        s1, s2, acc = run(jax.random.key(100), init, total, args.num_burnin)
        n = args.num_chains * args.num_kept
        est_mean = np.asarray(s1) / n
        est_var = np.asarray(s2) / n - est_mean**2
        means[name] = est_mean
        rows.append(
            dict(
                name=name,
                us_per_step=1e6 * statistics.median(times[name]),
                compile_s=compile_s[name],
                mean_err=float(np.max(np.abs(est_mean - mean) / sd)),
                var_err=float(np.max(np.abs(est_var / np.diag(cov) - 1.0))),
                acceptance=float(acc) / n,
            )
        )

    header = (
        "| library | time / transition (100 chains, µs, median) | compile + first run (s) | "
        "max mean error / sd | max rel. variance error | acceptance |\n"
        "|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['name']} | {r['us_per_step']:.0f} | {r['compile_s']:.1f} | {r['mean_err']:.3f} | "
        f"{r['var_err']:.3f} | {r['acceptance']:.3f} |\n"
        for r in rows
    )
    table = header + body
    # Both libraries split the key into (momentum, accept-test) keys the same way, so with equal
    # keys the chains coincide up to floating-point reassociation: a direct agreement check.
    agreement = float(np.max(np.abs(means["tda_jax"] - means["blackjax"])))
    table += (
        f"\nAgreement: with the same PRNG keys the two libraries' sample means differ by at most "
        f"{agreement:.2e} (same algorithm, same random streams).\n"
    )
    print(table)

    load = os.getloadavg()
    text = (
        "# HMC: tda_jax vs blackjax\n\n"
        f"Target: {args.dim}-dim correlated Gaussian (random rotation, sds log-spaced in "
        f"[0.3, 1.5]); identity mass; step size {step_size:.4f} (tuned once by "
        f"`tda_jax.mcmc.tune_step_size`, frozen, used by both); {args.num_integration_steps} "
        f"leapfrog steps; {args.num_chains} chains vmapped, jitted `lax.scan` of "
        f"{args.num_steps} transitions, median of {args.repeats} repeats. Accuracy: "
        f"{args.num_burnin} burn-in + {args.num_kept} kept transitions from N(0, I), chains "
        "pooled; both get the same PRNG keys and split them the same way, so the errors are "
        "the same Monte Carlo error (slow mixing along the widest direction), not a bias.\n\n"
        + table
        + "\nCommand (repository root):\n\n"
        "    benchmarks/.venv-blackjax/bin/python benchmarks/hmc_blackjax.py\n\n"
        f"Machine: shared 2-core CPU ({platform.processor() or platform.machine()}), load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) when written, so timings are "
        f"noisy; jax {jax.__version__}, blackjax {blackjax.__version__}; "
        f"{datetime.date.today().isoformat()}.\n"
    )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
