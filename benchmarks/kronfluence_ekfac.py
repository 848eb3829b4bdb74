"""EK-FAC influence: tda_jax vs kronfluence 1.0.1 (PyTorch, CPU) on the same weights and data.

One run trains a small MLP on MNIST-1D in JAX, then times both pipelines one after the other on the
same CPU, each in a fresh subprocess so that each peak RSS is its own:

* ``tda_jax``: ``fit_curvature(strategy="ekfac", fisher="empirical")`` then ``pairwise_scores``,
  run by this script with ``--side tda_jax`` in our venv (``sys.executable``);
* kronfluence: ``benchmarks/_kronfluence_side.py`` run by ``benchmarks/.venv-kronfluence``'s python.

Weights, data and scores travel as ``.npz`` files in a temporary directory. The torch model is the
flax MLP with ``nn.Linear.weight = kernel.T``.

Both sides compute the same thing: empirical Fisher (true labels) EK-FAC over every Dense/Linear
layer (bias as an appended constant-1 activation), covariances and eigenvalue corrections averaged
over the training examples, float64 eigendecompositions, the same *absolute* damping added to the
corrected eigenvalues, the per-example cross-entropy as training loss and the query margin
``z_y - logsumexp_{c != y} z_c`` (or ``--measurement loss``) as measurement.

Sign convention, from each library's documented definition:

* tda_jax (``tda_jax.attribution`` module docstring): ``-grad f_q^T (F + damping I)^{-1} grad L_i``,
  positive = training on ``i`` pushes the query measurement up (with the margin: helpful).
* kronfluence (``Analyzer.compute_pairwise_scores``; its docs cite Eq. 5 of Grosse et al. 2023,
  and the 1.0.1 source computes the plain dot product of the preconditioned query gradient with the
  training gradient): ``grad f_q^T (G + damping I)^{-1} grad L_i``, no minus.

so on the same measurement ``tda_jax = -kronfluence``; agreement is measured after that one flip.
A third, independent float64 numpy EK-FAC (:func:`numpy_ekfac_reference`) checks both.

Timings are medians over ``--repeats`` runs after one warm-up run. The XLA compile seconds of
each tda_jax call are counted with ``jax.monitoring`` and reported separately; the main rows
exclude them (at the time of writing ``fit_curvature`` and ``pairwise_scores`` jit fresh closures
on every call, so every call compiles, not only the first). CPU seconds (all threads) are
reported too: on a busy machine they are steadier than wall time.

Run (from the repository root, after setting up ``benchmarks/.venv-kronfluence``, see
``benchmarks/README.md``)::

    .venv/bin/python benchmarks/kronfluence_ekfac.py

It prints a markdown table and writes it to ``benchmarks/results/kronfluence_ekfac.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from _common import peak_rss_mb  # benchmarks/ is on sys.path when run as a script

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KRONFLUENCE_PYTHON = REPO_ROOT / "benchmarks" / ".venv-kronfluence" / "bin" / "python"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "kronfluence_ekfac.md"
RERUN_COMMAND = ".venv/bin/python benchmarks/kronfluence_ekfac.py"
# Run as a script from anywhere: make the repository's tda_jax importable without installing it.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# tda_jax scores -grad f^T P grad L_i (its documented convention); kronfluence reports
# +grad f^T P grad L_i. Multiply kronfluence's scores by this to put them in tda_jax's convention.
KRONFLUENCE_TO_TDA_JAX_SIGN = -1.0

# Lead's API knobs we pass; kept in one place so a change of signature is a one-line edit.
EIGH_DTYPE = "float64"


_peak_rss_mb = peak_rss_mb


# ----------------------------------------------------------------------------------------------
# The shared problem: data + a trained MLP.
# ----------------------------------------------------------------------------------------------


def build_problem(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Generates MNIST-1D, trains the MLP in JAX and returns everything both sides need."""
    import jax
    import jax.numpy as jnp
    import optax

    from tda_jax.data import load_mnist1d
    from tda_jax.models import MLP

    train, test = load_mnist1d(num_train=args.num_train, num_test=max(1000, args.num_queries),
                               seed=args.seed)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    model = MLP(hidden_sizes=hidden, num_outputs=10)
    key = jax.random.key(args.seed)
    init_key, order_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, train.inputs.shape[1]), jnp.float32))
    optimizer = optax.adam(args.learning_rate)
    opt_state = optimizer.init(params)

    def loss_fn(p, x, y):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    n, batch = train.inputs.shape[0], args.train_batch_size_sgd
    x_all, y_all = jnp.asarray(train.inputs), jnp.asarray(train.targets)
    for epoch_key in jax.random.split(order_key, args.epochs):
        order = jax.random.permutation(epoch_key, n)
        for start in range(0, n - batch + 1, batch):  # drop the remainder: one compile
            rows = order[start:start + batch]
            params, opt_state, _ = step(params, opt_state, x_all[rows], y_all[rows])

    def accuracy(ds):
        logits = model.apply(params, jnp.asarray(ds.inputs))
        return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(ds.targets)))

    dense = params["params"]
    names = sorted(dense, key=lambda k: int(k.split("_")[-1]))  # Dense_0, Dense_1, ...
    problem: dict[str, np.ndarray] = {"num_layers": np.asarray(len(names))}
    for i, name in enumerate(names):
        problem[f"kernel_{i}"] = np.asarray(dense[name]["kernel"], np.float32)
        problem[f"bias_{i}"] = np.asarray(dense[name]["bias"], np.float32)
    problem["train_x"] = np.asarray(train.inputs, np.float32)
    problem["train_y"] = np.asarray(train.targets, np.int32)
    problem["query_x"] = np.asarray(test.inputs[: args.num_queries], np.float32)
    problem["query_y"] = np.asarray(test.targets[: args.num_queries], np.int32)
    settings = {
        "dataset": "MNIST-1D (mnist1d.make_dataset, offline)",
        "num_train": int(n),
        "num_queries": int(args.num_queries),
        "hidden": list(hidden),
        "num_params": int(sum(np.size(v) for v in jax.tree.leaves(params))),
        "train_accuracy": accuracy(train),
        "test_accuracy": accuracy(test),
        "damping": float(args.damping),
        "measurement": args.measurement,
        "train_batch_size": int(args.batch_size),
        "query_batch_size": int(args.query_batch_size),
        "seed": int(args.seed),
    }
    problem["settings"] = np.asarray(json.dumps(settings))
    return problem


def numpy_ekfac_reference(problem: dict[str, np.ndarray], chunk: int = 500) -> np.ndarray:
    """An independent float64 numpy EK-FAC, ``[num_queries, num_train]`` in tda_jax's sign.

    Written from the EK-FAC definition (George et al., 2018; Grosse et al., 2023) as a third opinion:
    when the two libraries disagree it shows which one moved. Per layer with inputs ``a`` (plus a
    constant 1 for the bias) and pre-activation gradients ``g`` of the per-example loss:
    ``A = mean a a^T``, ``S = mean g g^T``, ``A = Q_A diag Q_A^T``, ``S = Q_S diag Q_S^T``,
    ``lambda = mean (Q_A^T a g^T Q_S)^2`` elementwise, and the query gradient ``M_q`` is
    preconditioned as ``Q_A [(Q_A^T M_q Q_S) / (lambda + damping)] Q_S^T``.
    """
    settings = json.loads(str(problem["settings"]))
    num_layers = int(problem["num_layers"])
    kernels = [problem[f"kernel_{i}"].astype(np.float64) for i in range(num_layers)]
    biases = [problem[f"bias_{i}"].astype(np.float64) for i in range(num_layers)]

    def activations_and_gradients(x, y, output_gradient):
        acts, pre = [], []
        h = x.astype(np.float64)
        for i in range(num_layers):
            acts.append(np.concatenate([h, np.ones((h.shape[0], 1))], axis=1))
            z = h @ kernels[i] + biases[i]
            pre.append(z)
            h = np.maximum(z, 0.0) if i < num_layers - 1 else z
        onehot = np.eye(h.shape[1])[y]
        g = output_gradient(h, onehot)
        grads = [None] * num_layers
        for i in reversed(range(num_layers)):
            grads[i] = g
            if i:
                g = (g @ kernels[i].T) * (pre[i - 1] > 0)
        return acts, grads

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def loss_gradient(z, onehot):  # d cross-entropy / d logits
        return softmax(z) - onehot

    def margin_gradient(z, onehot):  # d (z_y - logsumexp_{c != y} z_c) / d logits
        return onehot - softmax(np.where(onehot > 0, -np.inf, z))

    train_a, train_g = activations_and_gradients(problem["train_x"], problem["train_y"],
                                                 loss_gradient)
    query_a, query_g = activations_and_gradients(
        problem["query_x"], problem["query_y"],
        margin_gradient if settings["measurement"] == "margin" else loss_gradient)
    n = train_a[0].shape[0]
    scores = np.zeros((query_a[0].shape[0], n))
    for a, g, qa, qg in zip(train_a, train_g, query_a, query_g, strict=True):
        _, q_a = np.linalg.eigh(a.T @ a / n)
        _, q_s = np.linalg.eigh(g.T @ g / n)
        corrected = ((a @ q_a) ** 2).T @ ((g @ q_s) ** 2) / n  # [in + 1, out]
        rotated = np.einsum("ia,qi,qo,ob->qab", q_a, qa, qg, q_s, optimize=True)
        rotated /= corrected + settings["damping"]
        precond = np.einsum("ia,qab,ob->qio", q_a, rotated, q_s, optimize=True)
        flat = precond.reshape(precond.shape[0], -1)
        for start in range(0, n, chunk):  # per-example gradients a g^T, a chunk at a time
            per_example = np.einsum("ni,no->nio", a[start:start + chunk], g[start:start + chunk])
            scores[:, start:start + chunk] += flat @ per_example.reshape(per_example.shape[0], -1).T
    return -scores  # tda_jax's convention: -grad f^T P grad L


# ----------------------------------------------------------------------------------------------
# The tda_jax side (runs in a fresh subprocess: ``--side tda_jax``).
# ----------------------------------------------------------------------------------------------


def run_tda_jax_side(problem_path: str, result_path: str, repeats: int) -> None:
    """Times ``fit_curvature`` + ``pairwise_scores`` on the problem and writes scores/timings."""
    rss_start = _peak_rss_mb()
    import jax
    import jax.numpy as jnp
    from jax import monitoring

    from tda_jax.attribution import fit_curvature, pairwise_scores
    from tda_jax.data import Dataset
    from tda_jax.losses import classification_margin, softmax_cross_entropy
    from tda_jax.models import MLP

    # Every XLA compile (tracing, lowering, backend compile) reports its duration here.
    compile_events: list[float] = []
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_events.append(secs)
        if name.startswith("/jax/core/compile/") else None)

    problem = dict(np.load(problem_path))
    settings = json.loads(str(problem["settings"]))
    num_layers = int(problem["num_layers"])
    model = MLP(hidden_sizes=tuple(settings["hidden"]), num_outputs=10)
    params = {f"Dense_{i}": {"kernel": jnp.asarray(problem[f"kernel_{i}"]),
                             "bias": jnp.asarray(problem[f"bias_{i}"])}
              for i in range(num_layers)}
    train = Dataset(problem["train_x"], problem["train_y"], 10)
    queries = Dataset(problem["query_x"], problem["query_y"], 10)
    loss = softmax_cross_entropy()
    # The same f as kronfluence's compute_measurement, so one sign flip aligns the two.
    measurement = (classification_margin if settings["measurement"] == "margin"
                   else loss.per_example)

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    rss_ready = _peak_rss_mb()

    def timed(fn):
        before = len(compile_events)
        start = time.perf_counter()
        out = fn()
        out = jax.block_until_ready(out)
        return out, time.perf_counter() - start, float(sum(compile_events[before:]))

    fit_t, score_t, fit_c, score_c, cpu_t, scores = [], [], [], [], [], None
    for _ in range(repeats + 1):  # the first run is the warm-up (compiles)
        cpu_start = time.process_time()
        curv, t, c = timed(lambda: fit_curvature(
            apply_fn, params, train, strategy="ekfac", loss=loss, fisher="empirical",
            damping=settings["damping"], batch_size=settings["train_batch_size"],
            eigh_dtype=EIGH_DTYPE))
        fit_t.append(t)
        fit_c.append(c)
        scores, t, c = timed(lambda: pairwise_scores(
            apply_fn, params, curv, queries, train, loss=loss, measurement=measurement,
            query_batch_size=settings["query_batch_size"],
            train_batch_size=settings["train_batch_size"]))
        score_t.append(t)
        score_c.append(c)
        cpu_t.append(time.process_time() - cpu_start)

    # fit_curvature / pairwise_scores jit fresh closures on every call, so every call compiles;
    # "excluding compile" subtracts the compile seconds jax.monitoring reported during that call.
    timings = {
        "fit_s": statistics.median(t - c for t, c in zip(fit_t[1:], fit_c[1:], strict=True)),
        "score_s": statistics.median(t - c for t, c in zip(score_t[1:], score_c[1:], strict=True)),
        "fit_with_compile_s": statistics.median(fit_t[1:]),
        "score_with_compile_s": statistics.median(score_t[1:]),
        "compile_s": statistics.median(f + c for f, c in zip(fit_c[1:], score_c[1:], strict=True)),
        # CPU seconds (all threads, user + sys) of fit + scores, compile included.
        "cpu_s": statistics.median(cpu_t[1:]),
        "cpu_all_s": cpu_t,
        "fit_all_s": fit_t,
        "score_all_s": score_t,
        "fit_compile_all_s": fit_c,
        "score_compile_all_s": score_c,
        "first_fit_s": fit_t[0],
        "first_score_s": score_t[0],
        "compile_first_s": fit_c[0] + score_c[0],
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_import_mb": rss_start,
        "rss_ready_mb": rss_ready,
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "devices": [str(d) for d in jax.devices()],
    }
    np.savez(result_path, scores=np.asarray(scores, np.float64), timings=json.dumps(timings))


# ----------------------------------------------------------------------------------------------
# Orchestration and the report.
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], label: str) -> None:
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, TDA_JAX_PROGRESS="0")  # no progress bars in the timed loops
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"[{label}] failed with exit code {proc.returncode}")
    print(f"[{label}] done in {time.perf_counter() - start:.1f} s", flush=True)


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return _rowwise_pearson(rankdata(a, axis=1), rankdata(b, axis=1))


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Per-query Pearson/Spearman and global scale/relative error of two ``[Q, N]`` matrices."""
    pearson = _rowwise_pearson(ours, theirs)
    spearman = _rowwise_spearman(ours, theirs)
    slope = float((ours * theirs).sum() / (theirs * theirs).sum())
    rel_err = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    return {
        "pearson_min": float(pearson.min()),
        "pearson_median": float(np.median(pearson)),
        "spearman_min": float(spearman.min()),
        "spearman_median": float(np.median(spearman)),
        "slope_ours_on_theirs": slope,
        "relative_error": rel_err,
        "sign_agreement": float(np.mean(np.sign(ours) == np.sign(theirs))),
    }


def format_report(settings: dict, ours: dict, theirs: dict, agree: dict,
                  agree_ref: dict[str, dict[str, float]]) -> str:
    """The markdown table of timings and memory, then the agreement statistics."""

    def speedup(a: float, b: float) -> str:
        return f"{b / a:.2f}x" if a > 0 else "-"

    total_o, total_t = ours["fit_s"] + ours["score_s"], theirs["fit_s"] + theirs["score_s"]
    with_compile_o = ours["fit_with_compile_s"] + ours["score_with_compile_s"]
    first_o = ours["first_fit_s"] + ours["first_score_s"]
    first_t = theirs["first_fit_s"] + theirs["first_score_s"]
    rows = [
        ("factor fit s (covariances + eigh + lambda)", ours["fit_s"], theirs["fit_s"]),
        ("pairwise scores s", ours["score_s"], theirs["score_s"]),
        ("**total s**", total_o, total_t),
        ("total s incl. tda_jax's per-call XLA compile", with_compile_o, total_t),
        ("first run s (cold: warm-up)", first_o, first_t),
    ]
    lines = [
        "| | tda_jax | kronfluence | speed-up (kronfluence / tda_jax) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {o:.3f} | {t:.3f} | {speedup(o, t)} |" for name, o, t in rows]
    lines += [
        f"| XLA compile s per fit + scores (warm; cold) | {ours['compile_s']:.2f}; "
        f"{ours['compile_first_s']:.2f} | - | - |",
        f"| CPU s per fit + scores (all threads; tda_jax incl. compile) | {ours['cpu_s']:.2f} | "
        f"{theirs['cpu_s']:.2f} | {speedup(ours['cpu_s'], theirs['cpu_s'])} |",
        f"| peak RSS MB (whole process, VmHWM) | {ours['peak_rss_mb']:.0f} | "
        f"{theirs['peak_rss_mb']:.0f} | - |",
        f"| RSS MB before the pipeline (imports + data) | {ours['rss_ready_mb']:.0f} | "
        f"{theirs['rss_ready_mb']:.0f} | - |",
    ]

    def corr(x: float) -> str:
        # Near-perfect agreement would print as 1.000000; show the gap to 1 instead.
        return f"1 - {1.0 - x:.0e}" if 0.99999 < x < 1.0 else f"{x:.6f}"

    def stats_line(label: str, a: dict[str, float]) -> str:
        return (f"| {label} | {corr(a['pearson_min'])} | {corr(a['pearson_median'])} | "
                f"{corr(a['spearman_min'])} | {corr(a['spearman_median'])} | "
                f"{a['slope_ours_on_theirs']:.6f} | {a['relative_error']:.1e} |")

    agree_lines = [
        f"Agreement of the {settings['num_queries']} x {settings['num_train']} score matrices, "
        f"per query (kronfluence's scores x {KRONFLUENCE_TO_TDA_JAX_SIGN:+.0f}, see the sign "
        "convention; reference = independent float64 numpy EK-FAC):",
        "",
        "| pair | Pearson min | Pearson median | Spearman min | Spearman median | "
        "LS slope | rel. Frobenius error |",
        "|---|---:|---:|---:|---:|---:|---:|",
        stats_line("tda_jax vs kronfluence", agree),
        stats_line("tda_jax vs reference", agree_ref["tda_jax"]),
        stats_line("kronfluence vs reference", agree_ref["kronfluence"]),
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(agree_lines)


def write_results(path: Path, report: str, settings: dict, ours: dict, theirs: dict,
                  args: argparse.Namespace) -> None:
    hidden = "-".join(str(h) for h in settings["hidden"])
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    if ours["compile_s"] > 0.1:
        compile_note = (f"`tda_jax.attribution.fit_curvature` and `pairwise_scores` compile on "
                        f"*every* call, not only the first ({ours['compile_s']:.1f} s per warm "
                        "fit-and-score round).")
    else:
        compile_note = "tda_jax compiles only on the first call."
    text = f"""# EK-FAC influence: tda_jax vs kronfluence

Date: {datetime.date.today().isoformat()}. Rerun from the repository root (setup in
`benchmarks/README.md`):

```
{RERUN_COMMAND}{args.extra_cli}
```

Setting: {settings['dataset']}, {settings['num_train']} training examples, {settings['num_queries']}
queries (test set); MLP 40-{hidden}-10 ({settings['num_params']} parameters, ReLU) trained once in
JAX (Adam, {args.epochs} epochs; train accuracy {settings['train_accuracy']:.3f}, test
{settings['test_accuracy']:.3f}); the torch model has the same weights (`nn.Linear.weight =
kernel.T`). EK-FAC on all {len(settings['hidden']) + 1} Dense/Linear layers (bias as an appended 1),
empirical Fisher (true labels), covariances and lambda averaged over the {settings['num_train']}
training examples, float64 eigendecompositions, absolute damping {settings['damping']:g} added
to the corrected eigenvalues in both, training loss = per-example cross-entropy (summed over a
batch), measurement = query {settings['measurement']}. Batch size {settings['train_batch_size']}
(training examples), {settings['query_batch_size']} (queries). Each side runs in its own fresh
process, one after the other on the same machine; peak RSS is each process's `VmHWM`.

Timing: medians of {args.repeats} runs after a warm-up run. {compile_note} The first three rows
exclude the XLA compile seconds that `jax.monitoring` reports during each call (tracing, lowering
and backend compile); the "incl." row shows what a call costs as is.
kronfluence's times include its own saving of factors and scores to a scratch directory, as
that is part of its pipeline.

Machine: {cpu}, {os.cpu_count()} logical CPUs{args.machine_note}. Versions: jax
{ours['versions']['jax']} (devices {', '.join(ours['devices'])}), torch
{theirs['versions']['torch']} ({theirs['torch_threads']} threads), kronfluence
{theirs['versions']['kronfluence']}, Python {ours['versions']['python']}.

{report}

Raw per-run wall seconds (first = warm-up): tda_jax fit {_fmt(ours['fit_all_s'])} of which XLA
compile {_fmt(ours['fit_compile_all_s'])}, scores {_fmt(ours['score_all_s'])} of which compile
{_fmt(ours['score_compile_all_s'])}; kronfluence fit {_fmt(theirs['fit_all_s'])}, scores
{_fmt(theirs['score_all_s'])}.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_reflow(text))


def _reflow(markdown: str, width: int = 100) -> str:
    """Re-wraps the prose paragraphs of ``markdown`` (not tables, code or headings)."""
    blocks = []
    for block in markdown.strip().split("\n\n"):
        if block.startswith(("|", "#", "```")):
            blocks.append(block)
        else:
            blocks.append(textwrap.fill(" ".join(block.split()), width=width,
                                        break_on_hyphens=False, break_long_words=False))
    return "\n\n".join(blocks) + "\n"


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def _non_default_flags(args: argparse.Namespace) -> str:
    """The command-line flags (setting only) that differ from the defaults, for the rerun line."""
    defaults = vars(_parser().parse_args([]))
    skip = {"machine_note", "output", "kronfluence_python", "side", "problem", "result"}
    flags = [f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if k in defaults and k not in skip and v != defaults[k]]
    return "".join(flags)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-queries", type=int, default=200)
    parser.add_argument("--hidden", default="128,128", help="hidden widths, comma separated")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-batch-size-sgd", type=int, default=100)
    parser.add_argument("--damping", type=float, default=1e-3,
                        help="absolute damping added to the EK-FAC eigenvalues (both sides)")
    parser.add_argument("--measurement", choices=("margin", "loss"), default="margin")
    parser.add_argument("--batch-size", type=int, default=500,
                        help="training-example batch size for factors and scores (both sides)")
    parser.add_argument("--query-batch-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kronfluence-python", default=str(DEFAULT_KRONFLUENCE_PYTHON))
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help="markdown file to write ('' to skip)")
    parser.add_argument("--machine-note", default="",
                        help="free text about the machine's load, added to the results file")
    # Internal: run one side in this (fresh) process.
    parser.add_argument("--side", choices=("tda_jax",), help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side == "tda_jax":
        run_tda_jax_side(args.problem, args.result, args.repeats)
        return

    args.extra_cli = _non_default_flags(args)
    args.machine_note = f" ({args.machine_note})" if args.machine_note else ""
    if not Path(args.kronfluence_python).exists():
        raise SystemExit(f"--kronfluence-python {args.kronfluence_python} does not exist; set up "
                         "benchmarks/.venv-kronfluence as described in benchmarks/README.md")

    with tempfile.TemporaryDirectory(prefix="kronfluence_ekfac_") as tmp:
        tmp = Path(tmp)
        print("training the MLP in JAX ...", flush=True)
        problem = build_problem(args)
        np.savez(tmp / "problem.npz", **problem)
        settings = json.loads(str(problem["settings"]))
        print(f"settings: {json.dumps(settings)}", flush=True)

        _run([sys.executable, str(Path(__file__).resolve()), "--side", "tda_jax",
              "--problem", str(tmp / "problem.npz"), "--result", str(tmp / "tda_jax.npz"),
              "--repeats", str(args.repeats)], "tda_jax")
        _run([args.kronfluence_python, str(REPO_ROOT / "benchmarks" / "_kronfluence_side.py"),
              "--problem", str(tmp / "problem.npz"), "--result", str(tmp / "kronfluence.npz"),
              "--workdir", str(tmp / "kronfluence_out"), "--repeats", str(args.repeats)],
             "kronfluence")

        ours_npz, theirs_npz = np.load(tmp / "tda_jax.npz"), np.load(tmp / "kronfluence.npz")
        ours_scores = ours_npz["scores"]
        theirs_scores = KRONFLUENCE_TO_TDA_JAX_SIGN * theirs_npz["scores"]
        ours_t = json.loads(str(ours_npz["timings"]))
        theirs_t = json.loads(str(theirs_npz["timings"]))

    if ours_scores.shape != theirs_scores.shape:
        raise SystemExit(f"score shapes differ: tda_jax {ours_scores.shape}, kronfluence "
                         f"{theirs_scores.shape}")
    print("computing the float64 numpy reference ...", flush=True)
    reference = numpy_ekfac_reference(problem)
    agree = agreement(ours_scores, theirs_scores)
    agree_ref = {"tda_jax": agreement(ours_scores, reference),
                 "kronfluence": agreement(theirs_scores, reference)}
    report = format_report(settings, ours_t, theirs_t, agree, agree_ref)
    print()
    print(report)
    print(f"\nraw timings: tda_jax {json.dumps(ours_t)}\nkronfluence {json.dumps(theirs_t)}")
    if args.output:
        write_results(Path(args.output), report, settings, ours_t, theirs_t, args)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
