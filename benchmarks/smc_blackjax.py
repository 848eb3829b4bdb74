"""Bootstrap particle filter: tda_jax.probability.run_smc vs blackjax.smc.base.step.

Problem: the 1-D linear-Gaussian state-space model x_0 ~ N(0, 1), x_t = 0.9 x_{t-1} + N(0, 1),
y_t = x_t + N(0, 0.5), T = 100 observations, bootstrap proposal, systematic resampling at every
step, N = 1000 and 10000 particles, float32 on CPU. Both libraries run the same arithmetic; the
differences are API shape (blackjax's ``step`` takes per-particle keys and resamples before
moving) and implementation detail. Reported: time per filter run after compilation (median of
repeats) and per particle-step, and the log Z estimates' mean error and spread over 20 seeds
against the exact Kalman-filter log-likelihood.

Set up and run (from the repository root):

    python3 -m venv benchmarks/.venv-blackjax
    benchmarks/.venv-blackjax/bin/pip install blackjax -e .
    benchmarks/.venv-blackjax/bin/python benchmarks/smc_blackjax.py

tda_jax is imported from this checkout (the repository root is put on ``sys.path``), so both
libraries run in one process on the same jax. The table goes to
``benchmarks/results/smc_blackjax.md``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import blackjax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from blackjax.smc import base as bj_base  # noqa: E402
from blackjax.smc import resampling as bj_resampling  # noqa: E402

import tda_jax.probability as tp  # noqa: E402

A, Q, R, M0, P0 = 0.9, 1.0, 0.5, 0.0, 1.0
NUM_TIMES = 100
PARTICLE_COUNTS = (1000, 10000)
NUM_SEEDS = 20
NUM_REPEATS = 15


def simulate(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = M0 + np.sqrt(P0) * rng.normal()
    ys = []
    for _ in range(NUM_TIMES):
        ys.append(x + np.sqrt(R) * rng.normal())
        x = A * x + np.sqrt(Q) * rng.normal()
    return np.asarray(ys)


def kalman_log_likelihood(ys: np.ndarray) -> float:
    m, p, ll = M0, P0, 0.0
    for y in ys:
        s = p + R
        ll += -0.5 * (np.log(2 * np.pi * s) + (y - m) ** 2 / s)
        k = p / s
        m, p = m + k * (y - m), (1 - k) * p
        m, p = A * m, A * A * p + Q
    return float(ll)


def log_obs(y, x):
    return -0.5 * (jnp.log(2 * jnp.pi * R) + (y - x) ** 2 / R)


def make_ours(ys: jnp.ndarray, n: int):
    def proposal(key, x, t):
        return A * x + np.sqrt(Q) * jax.random.normal(key, x.shape)

    def potential(x_prev, x, t):
        return log_obs(ys[t], x)

    def run(key):
        k0, k1 = jax.random.split(key)
        x0 = M0 + np.sqrt(P0) * jax.random.normal(k0, (n,))
        state = tp.init(x0, log_obs(ys[0], x0))
        out = tp.run_smc(k1, state, proposal, potential, NUM_TIMES - 1, tp.systematic)
        return out.log_normalizer

    return jax.jit(run)


def make_blackjax(ys: jnp.ndarray, n: int):
    def update_fn(keys, particles, update_parameters):
        noise = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
        return A * particles + np.sqrt(Q) * noise, None

    def run(key):
        k0, k1 = jax.random.split(key)
        x0 = M0 + np.sqrt(P0) * jax.random.normal(k0, (n,))
        log_w0 = log_obs(ys[0], x0)
        log_z0 = jax.scipy.special.logsumexp(log_w0) - jnp.log(n)
        state = bj_base.SMCState(x0, jax.nn.softmax(log_w0), jnp.zeros(()))

        def body(s, inputs):
            key, y = inputs
            s, info = bj_base.step(
                key,
                s,
                update_fn,
                lambda x: log_obs(y, x),
                bj_resampling.systematic,
            )
            return s, info.log_likelihood_increment

        keys = jax.random.split(k1, NUM_TIMES - 1)
        _, increments = jax.lax.scan(body, state, (keys, ys[1:]))
        return log_z0 + jnp.sum(increments)

    return jax.jit(run)


def time_interleaved(fns: dict, key) -> dict:
    """Median and min seconds per run; libraries alternate so that they share the machine's load."""
    for fn in fns.values():
        fn(key).block_until_ready()  # compile
    times = {name: [] for name in fns}
    for i in range(NUM_REPEATS):
        k = jax.random.fold_in(key, i)
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(k).block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main() -> None:
    ys_np = simulate()
    log_z = kalman_log_likelihood(ys_np)
    ys = jnp.asarray(ys_np, jnp.float32)
    rows = []
    for n in PARTICLE_COUNTS:
        fns = {"tda_jax": make_ours(ys, n), "blackjax": make_blackjax(ys, n)}
        timings = time_interleaved(fns, jax.random.key(0))
        for name, fn in fns.items():
            median, fastest = timings[name]
            estimates = np.array(
                [float(fn(jax.random.key(1000 + s))) for s in range(NUM_SEEDS)], np.float64
            )
            err = estimates - log_z
            rows.append(
                (
                    n,
                    name,
                    median * 1e3,
                    fastest * 1e3,
                    median / (n * NUM_TIMES) * 1e9,
                    err.mean(),
                    err.std(ddof=1) / np.sqrt(NUM_SEEDS),
                    err.std(ddof=1),
                )
            )
            print(rows[-1], flush=True)

    header = (
        "| N | library | ms / run (median) | ms / run (min) | ns / particle-step (median) "
        "| mean(log Zhat - log Z) | s.e. | sd(log Zhat) |\n|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {n} | {name} | {ms:.1f} | {lo:.1f} | {ns:.1f} | {mean:+.3f} | {se:.3f} | {sd:.3f} |\n"
        for n, name, ms, lo, ns, mean, se, sd in rows
    )
    try:
        load = os.getloadavg()
        load_text = f"load average at the end {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}"
    except OSError:
        load_text = "load average unavailable"
    text = (
        "# SMC: tda_jax vs blackjax (bootstrap particle filter)\n\n"
        f"Linear-Gaussian SSM (a={A}, q={Q}, r={R}), T={NUM_TIMES} observations, bootstrap "
        "proposal, systematic resampling at every step, float32. Exact Kalman log Z = "
        f"{log_z:.4f}. Timing: median and min of {NUM_REPEATS} runs after compilation, the two "
        f"libraries alternating run by run; log Z over {NUM_SEEDS} seeds.\n\n"
        + header
        + body
        + "\nBoth estimators are unbiased for Z, so mean(log Zhat) sits slightly below log Z "
        "(by about Var/2); the two libraries should agree within their standard errors.\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"shared with other workers ({load_text}), so timings are noisy. "
        f"jax {jax.__version__}, blackjax {blackjax.__version__}, Python "
        f"{platform.python_version()}.\n\n"
        "Rerun: `python3 -m venv benchmarks/.venv-blackjax && "
        "benchmarks/.venv-blackjax/bin/pip install blackjax -e . && "
        "benchmarks/.venv-blackjax/bin/python benchmarks/smc_blackjax.py`\n"
    )
    out = ROOT / "benchmarks" / "results" / "smc_blackjax.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
