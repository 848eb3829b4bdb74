"""Twisted SMC on the TransformerLM: tokens per second with a KV cache vs prefix recomputation.

Both sides run the same twisted SMC (tda_jax.twisted.twisted_smc: core SMC step, systematic
resampling every step, an all-vocabulary twist head on the LM's final hidden state, a soft final
potential) with the same key, so they make the same particles; they differ only in the step model:

* ``CachedTransformer``: each particle carries a fixed-size key/value cache
  ``[layers, max_len, heads, d_head]``; a step computes one position and attends over the cache;
  resampling gathers the caches with the ancestor indices;
* ``RecomputedTransformer``: each step reruns the model on the whole ``[K, max_len]`` token buffer
  (what the paper's reference code does, recomputing the prefix).

Model: TransformerLM(vocab 64, max_len 64, d_model 64, 4 heads, 2 layers, d_mlp 256), prompt of 8
tokens, 56 generated tokens; K = 16, 64, 256 particles. Reported: generated tokens per second
(K * 56 / median seconds per run after compilation) and the speed-up. Writes
``benchmarks/results/twisted_smc_kv.md``.

    nice -n 10 python benchmarks/twisted_smc_kv.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import load_average, machine_description, reflow_markdown  # noqa: E402

from tda_jax.models import TransformerLM  # noqa: E402
from tda_jax.twisted.kv_cache import CachedTransformer, RecomputedTransformer  # noqa: E402
from tda_jax.twisted.potentials import soft  # noqa: E402
from tda_jax.twisted.smc import TwistedProblem, twisted_smc  # noqa: E402
from tda_jax.twisted.twists import HeadTwist  # noqa: E402

VOCAB, MAX_LEN, PROMPT_LEN = 64, 64, 8
HORIZON = MAX_LEN - PROMPT_LEN
PARTICLES = (16, 64, 256)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "twisted_smc_kv.md"))
    args = parser.parse_args()
    model = TransformerLM(vocab_size=VOCAB, max_len=MAX_LEN, d_model=64, num_heads=4,
                          num_layers=2, d_mlp=256)
    params = model.init(jax.random.key(0), jnp.zeros((1, MAX_LEN), jnp.int32))["params"]
    twist = HeadTwist(VOCAB, 64, HORIZON, hidden=64)
    tp = twist.init(jax.random.key(1))
    tp["out"]["w"] = 0.1 * jax.random.normal(jax.random.key(2), tp["out"]["w"].shape)
    pot = soft(lambda s, c: -0.1 * jnp.sum((s == 3).astype(jnp.float32), axis=1), "fewer 3s")
    prompt = jnp.arange(PROMPT_LEN, dtype=jnp.int32)
    load_before = load_average()
    rows = []
    for k in PARTICLES:
        times, estimates = {}, {}
        for name, step_model in (("kv_cache", CachedTransformer(model)),
                                 ("recompute", RecomputedTransformer(model))):
            problem = TwistedProblem(step_model, twist, pot, HORIZON, params, tp, prompt,
                                     max_len=MAX_LEN)
            start = time.perf_counter()
            result = twisted_smc(jax.random.key(3), problem, k)
            jax.block_until_ready(result.log_normalizer)
            compile_s = time.perf_counter() - start
            samples = []
            for r in range(args.repeats):
                start = time.perf_counter()
                out = twisted_smc(jax.random.key(4 + r), problem, k)
                jax.block_until_ready(out.log_normalizer)
                samples.append(time.perf_counter() - start)
            times[name] = (statistics.median(samples), min(samples), compile_s)
            estimates[name] = float(result.log_normalizer)
            print(name, k, times[name], estimates[name], flush=True)
        kv, rc = times["kv_cache"], times["recompute"]
        rows.append((k, k * HORIZON / kv[0], k * HORIZON / rc[0], rc[0] / kv[0], kv[2], rc[2],
                     abs(estimates["kv_cache"] - estimates["recompute"])))
    load_after = load_average()
    lines = [
        "# Twisted SMC on the TransformerLM: KV cache vs prefix recomputation",
        "",
        f"TransformerLM(vocab {VOCAB}, max_len {MAX_LEN}, d_model 64, 4 heads, 2 layers, d_mlp "
        f"256), prompt {PROMPT_LEN} tokens, {HORIZON} generated tokens, twisted SMC with an "
        "all-vocabulary twist head, systematic resampling every step, float32 on CPU. Tokens/s = "
        f"K x {HORIZON} generated tokens / median seconds per run after compilation "
        f"({args.repeats} runs). Same key on both sides, so both make the same particles (|log "
        "Zhat difference| in the last column, float rounding only).",
        "",
        "| K | KV cache tokens/s | recompute tokens/s | speed-up | compile KV (s) | compile "
        "recompute (s) | abs(log Zhat diff) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, a, b, s, ca, cb, d in rows:
        lines.append(f"| {k} | {a:,.0f} | {b:,.0f} | {s:.2f}x | {ca:.1f} | {cb:.1f} | {d:.1e} |")
    lines += [
        "",
        f"Machine: {machine_description()}, shared with other workers (load average before "
        f"{load_before}, after {load_after}), run under nice, so absolute numbers are noisy; the "
        f"ratio is the result. jax {jax.__version__}, Python {platform.python_version()}.",
        "",
        "Rerun: `nice -n 10 python benchmarks/twisted_smc_kv.py`",
    ]
    Path(args.out).write_text(reflow_markdown("\n".join(lines)))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
