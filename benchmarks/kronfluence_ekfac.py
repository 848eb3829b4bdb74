"""EK-FAC influence: tda_jax vs kronfluence 1.0.1 (PyTorch, CPU) on the same weights and data.

One run trains MLPs in JAX, then times both pipelines one after the other on the same CPU, each in
a fresh subprocess so that each peak RSS is its own:

* ``tda_jax``: ``fit_curvature(strategy="ekfac", fisher="empirical")`` then ``pairwise_scores``,
  run by this script with ``--side tda_jax`` in our venv (``sys.executable``);
* kronfluence: ``benchmarks/_kronfluence_side.py`` run by ``benchmarks/.venv-kronfluence``'s python.

Cases (``--cases``, default both):

* ``mnist1d``: MLP 40-128-128-10 on MNIST-1D, 4000 training examples, 200 test queries;
* ``digits_wide``: MLP 64-1024-1024-10 (about 1.1 M parameters) trained for a few epochs on
  scikit-learn's digits (:func:`tda_jax.data.load_digits`, default split: 1437 training, 360 test
  examples), all training examples, 297 test queries.

Two more measurements on top of the timings:

* query-side memory (``--memory-queries``, default ``100,1000``; the ``digits_wide`` model): for
  each Q and each library, a fresh process fits the factors, restarts its peak-RSS counter
  (``/proc/self/clear_refs``) and scores Q queries (the first Q training inputs, repeated
  cyclically if Q exceeds them) against all training examples; the peak RSS of that scoring call
  shows whether memory stays flat as Q grows;
* compile count (tda_jax only, the first case's problem, fresh process): ``fit_curvature`` and
  ``pairwise_scores`` are each called twice, each call with a fresh
  ``lambda p, x: model.apply({"params": p}, x)``; the XLA backend compilations of each call are
  counted with ``jax.monitoring`` (events named ``/jax/core/compile/backend_compile_duration``).

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
exclude them. CPU seconds (all threads) are reported too: on a busy machine they are steadier than
wall time, and the 1-minute load average (``/proc/loadavg``) at the start and end of each process
is recorded next to each result.

Before/after comparisons: ``--json PATH`` saves the run's results (no score matrices); a later run
given ``--baseline PATH`` puts those results in "before" columns next to its own. tda_jax is
imported from ``PYTHONPATH`` when that is set (e.g. an extracted older tree), otherwise from this
repository; the results name the tda_jax that ran (``--label``, default its git revision).
``--problem-dir DIR`` caches the trained problems so that both runs score the very same weights.

Run (from the repository root, after setting up ``benchmarks/.venv-kronfluence``, see
``benchmarks/README.md``)::

    .venv/bin/python benchmarks/kronfluence_ekfac.py

It prints markdown tables and writes them to ``benchmarks/results/kronfluence_ekfac.md``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
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
from _common import (  # benchmarks/ is on sys.path when run as a script
    current_rss_mb,
    load_average,
    peak_rss_mb,
    reset_peak_rss,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KRONFLUENCE_PYTHON = REPO_ROOT / "benchmarks" / ".venv-kronfluence" / "bin" / "python"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "kronfluence_ekfac.md"
RERUN_COMMAND = ".venv/bin/python benchmarks/kronfluence_ekfac.py"
# Run as a script from anywhere: make the repository's tda_jax importable without installing it,
# unless PYTHONPATH names another tree on purpose (an older checkout for "before" numbers).
if str(REPO_ROOT) not in sys.path:
    if os.environ.get("PYTHONPATH"):
        sys.path.append(str(REPO_ROOT))
    else:
        sys.path.insert(0, str(REPO_ROOT))

# tda_jax scores -grad f^T P grad L_i (its documented convention); kronfluence reports
# +grad f^T P grad L_i. Multiply kronfluence's scores by this to put them in tda_jax's convention.
KRONFLUENCE_TO_TDA_JAX_SIGN = -1.0

# Lead's API knobs we pass; kept in one place so a change of signature is a one-line edit.
EIGH_DTYPE = "float64"

# jax.monitoring event names (jax 0.10.2, jax._src.dispatch): every duration event of a compile
# starts with this prefix (tracing, lowering, backend compile) ...
COMPILE_EVENT_PREFIX = "/jax/core/compile/"
# ... and exactly one event per XLA backend compilation contains this.
BACKEND_COMPILE_MARK = "backend_compile"

CASE_NAMES = ("mnist1d", "digits_wide")

_peak_rss_mb = peak_rss_mb


# ----------------------------------------------------------------------------------------------
# The shared problems: data + a trained MLP.
# ----------------------------------------------------------------------------------------------


def case_config(name: str, args: argparse.Namespace) -> dict:
    """Everything that determines a case's trained problem and both sides' settings."""
    common = {
        "case": name,
        "learning_rate": float(args.learning_rate),
        "train_batch_size_sgd": int(args.train_batch_size_sgd),
        "damping": float(args.damping),
        "measurement": args.measurement,
        "train_batch_size": int(args.batch_size),
        "seed": int(args.seed),
    }
    if name == "mnist1d":
        return dict(common, dataset="mnist1d", num_train=int(args.num_train),
                    num_queries=int(args.num_queries), epochs=int(args.epochs),
                    hidden=[int(h) for h in args.hidden.split(",")],
                    query_batch_size=int(args.query_batch_size))
    if name == "digits_wide":
        return dict(common, dataset="digits", num_train=None,
                    num_queries=int(args.wide_num_queries),
                    epochs=int(args.wide_epochs),
                    hidden=[int(h) for h in args.wide_hidden.split(",")],
                    query_batch_size=int(args.wide_query_batch_size))
    raise ValueError(f"unknown case {name!r}; choose from {CASE_NAMES}")


def build_problem(cfg: dict) -> dict[str, np.ndarray]:
    """Loads the case's data, trains its MLP in JAX and returns everything both sides need."""
    import jax
    import jax.numpy as jnp
    import optax

    from tda_jax.data import load_digits, load_mnist1d
    from tda_jax.models import MLP

    if cfg["dataset"] == "mnist1d":
        train, test = load_mnist1d(num_train=cfg["num_train"],
                                   num_test=max(1000, cfg["num_queries"]), seed=cfg["seed"])
        dataset = "MNIST-1D (mnist1d.make_dataset, offline)"
    else:
        train, test = load_digits(seed=cfg["seed"])
        dataset = "scikit-learn digits (tda_jax.data.load_digits, 8x8 pixels / 16)"
    if cfg["num_queries"] > test.inputs.shape[0]:
        raise ValueError(f"num_queries {cfg['num_queries']} > {test.inputs.shape[0]} test examples")
    model = MLP(hidden_sizes=tuple(cfg["hidden"]), num_outputs=10)
    key = jax.random.key(cfg["seed"])
    init_key, order_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, train.inputs.shape[1]), jnp.float32))
    optimizer = optax.adam(cfg["learning_rate"])
    opt_state = optimizer.init(params)

    def loss_fn(p, x, y):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    n, batch = train.inputs.shape[0], cfg["train_batch_size_sgd"]
    x_all, y_all = jnp.asarray(train.inputs), jnp.asarray(train.targets)
    for epoch_key in jax.random.split(order_key, cfg["epochs"]):
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
    problem["query_x"] = np.asarray(test.inputs[: cfg["num_queries"]], np.float32)
    problem["query_y"] = np.asarray(test.targets[: cfg["num_queries"]], np.int32)
    settings = dict(
        cfg,
        dataset=dataset,
        num_train=int(n),
        num_test=int(test.inputs.shape[0]),
        num_inputs=int(train.inputs.shape[1]),
        query_source="test split",
        num_params=int(sum(np.size(v) for v in jax.tree.leaves(params))),
        train_accuracy=accuracy(train),
        test_accuracy=accuracy(test),
    )
    problem["settings"] = np.asarray(json.dumps(settings))
    return problem


def get_problem(cfg: dict, problem_dir: str) -> dict[str, np.ndarray]:
    """:func:`build_problem`, cached in ``problem_dir`` (if given) under a hash of ``cfg``."""
    if not problem_dir:
        return build_problem(cfg)
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(problem_dir) / f"{cfg['case']}_{digest}.npz"
    if path.exists():
        print(f"reusing the trained problem {path}", flush=True)
        return dict(np.load(path))
    problem = build_problem(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **problem)
    return problem


def with_queries(problem: dict[str, np.ndarray], num_queries: int,
                 num_train: int = 0) -> dict[str, np.ndarray]:
    """The problem with the first ``num_queries`` training inputs (cyclically) as queries.

    ``num_train > 0`` also keeps only the first ``num_train`` training examples (factors and
    scores): the query-side peak depends on the query count and the batch sizes, not on how many
    training batches stream past, so the memory runs may use fewer to save time.
    """
    out = dict(problem)
    out["query_x"] = np.resize(problem["train_x"], (num_queries, problem["train_x"].shape[1]))
    out["query_y"] = np.resize(problem["train_y"], (num_queries,))
    settings = json.loads(str(problem["settings"]))
    if 0 < num_train < problem["train_x"].shape[0]:
        out["train_x"] = problem["train_x"][:num_train]
        out["train_y"] = problem["train_y"][:num_train]
        settings.update(num_train=int(num_train))
    settings.update(num_queries=int(num_queries), query_source="training inputs, cyclically")
    out["settings"] = np.asarray(json.dumps(settings))
    return out


def numpy_ekfac_reference(problem: dict[str, np.ndarray],
                          memory_bytes: int = 2**29) -> np.ndarray:
    """An independent float64 numpy EK-FAC, ``[num_queries, num_train]`` in tda_jax's sign.

    Written from the EK-FAC definition (George et al., 2018; Grosse et al., 2023) as a third
    opinion: when the two libraries disagree it shows which one moved. Per layer with inputs ``a``
    (plus a constant 1 for the bias) and pre-activation gradients ``g`` of the per-example loss:
    ``A = mean a a^T``, ``S = mean g g^T``, ``A = Q_A diag Q_A^T``, ``S = Q_S diag Q_S^T``,
    ``lambda = mean (Q_A^T a g^T Q_S)^2`` elementwise, and the query gradient ``M_q = a_q g_q^T`` is
    preconditioned as ``P_q = Q_A [(Q_A^T M_q Q_S) / (lambda + damping)] Q_S^T``; the score of
    training example ``n`` is ``-a_n^T P_q g_n``. Queries go in blocks so that the ``[N, Q, out]``
    intermediate stays under ``memory_bytes``.
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
    n, num_q = train_a[0].shape[0], query_a[0].shape[0]
    scores = np.zeros((num_q, n))
    for a, g, qa, qg in zip(train_a, train_g, query_a, query_g, strict=True):
        _, q_a = np.linalg.eigh(a.T @ a / n)
        _, q_s = np.linalg.eigh(g.T @ g / n)
        corrected = ((a @ q_a) ** 2).T @ ((g @ q_s) ** 2) / n  # [in + 1, out]
        qa_rot, qg_rot = qa @ q_a, qg @ q_s  # the rank-1 query gradients, rotated
        fan_in, fan_out = a.shape[1], g.shape[1]
        block = max(1, memory_bytes // (8 * fan_out * (n + 3 * fan_in)))
        for q0 in range(0, num_q, block):
            rotated = qa_rot[q0:q0 + block, :, None] * qg_rot[q0:q0 + block, None, :]
            rotated /= corrected + settings["damping"]
            precond = q_a @ rotated @ q_s.T  # [block, in, out]
            # sum_{i,o} a_ni P_qio g_no without forming per-example gradients.
            a_p = a @ np.transpose(precond, (1, 0, 2)).reshape(fan_in, -1)  # [n, block * out]
            scores[q0:q0 + block] += np.einsum("nqo,no->qn",
                                               a_p.reshape(n, -1, fan_out), g)
    return -scores  # tda_jax's convention: -grad f^T P grad L


# ----------------------------------------------------------------------------------------------
# The tda_jax side (runs in a fresh subprocess: ``--side tda_jax``).
# ----------------------------------------------------------------------------------------------


def run_tda_jax_side(problem_path: str, result_path: str, repeats: int, mode: str) -> None:
    """Times (or measures memory / compiles of) ``fit_curvature`` + ``pairwise_scores``."""
    rss_start = _peak_rss_mb()
    import jax
    import jax.numpy as jnp
    from jax import monitoring

    import tda_jax
    from tda_jax.attribution import fit_curvature, pairwise_scores
    from tda_jax.data import Dataset
    from tda_jax.losses import classification_margin, softmax_cross_entropy
    from tda_jax.models import MLP

    # Every XLA compile (tracing, lowering, backend compile) reports its duration here.
    compile_events: list[tuple[str, float]] = []
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_events.append((name, secs))
        if name.startswith(COMPILE_EVENT_PREFIX) else None)

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

    def fit(fn=apply_fn):
        return fit_curvature(
            fn, params, train, strategy="ekfac", loss=loss, fisher="empirical",
            damping=settings["damping"], batch_size=settings["train_batch_size"],
            eigh_dtype=EIGH_DTYPE)

    def score(curv, fn=apply_fn):
        return pairwise_scores(
            fn, params, curv, queries, train, loss=loss, measurement=measurement,
            query_batch_size=settings["query_batch_size"],
            train_batch_size=settings["train_batch_size"])

    rss_ready = _peak_rss_mb()

    def timed(call):
        """``(output, wall s, compile s, backend compiles)`` of ``call()``."""
        before = len(compile_events)
        start = time.perf_counter()
        out = jax.block_until_ready(call())
        wall = time.perf_counter() - start
        events = compile_events[before:]
        return (out, wall, float(sum(s for _, s in events)),
                sum(BACKEND_COMPILE_MARK in name for name, _ in events))

    common = {
        "tda_jax_file": tda_jax.__file__,
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "devices": [str(d) for d in jax.devices()],
        "rss_after_import_mb": rss_start,
    }

    if mode == "memory":
        curv, fit_s, _, _ = timed(fit)
        peak_through_fit = _peak_rss_mb()
        reset = reset_peak_rss()
        rss_score_start = current_rss_mb()
        scores, score_s, compile_s, _ = timed(lambda: score(curv))
        result = dict(common, num_queries=int(np.shape(scores)[0]),
                      num_train=int(np.shape(scores)[1]), fit_s=fit_s, score_s=score_s,
                      score_compile_s=compile_s, peak_rss_through_fit_mb=peak_through_fit,
                      rss_score_start_mb=rss_score_start, peak_rss_scoring_mb=_peak_rss_mb(),
                      peak_reset=reset)
        np.savez(result_path, timings=json.dumps(result))
        return

    if mode == "compile":
        calls = []
        for _ in range(2):
            # A fresh closure per call, as a user writing the documented one-liner would pass.
            fresh_apply = lambda p, x: model.apply({"params": p}, x)
            curv, fit_s, fit_c, fit_n = timed(lambda: fit(fresh_apply))
            _, score_s, score_c, score_n = timed(lambda: score(curv, fresh_apply))
            calls.append({"fit_compiles": fit_n, "fit_compile_s": fit_c, "fit_s": fit_s,
                          "score_compiles": score_n, "score_compile_s": score_c,
                          "score_s": score_s})
        names = sorted({name for name, _ in compile_events})
        np.savez(result_path, timings=json.dumps(dict(common, calls=calls, event_names=names)))
        return

    fit_t, score_t, fit_c, score_c, fit_n, score_n, cpu_t = [], [], [], [], [], [], []
    scores = None
    for _ in range(repeats + 1):  # the first run is the warm-up (compiles)
        cpu_start = time.process_time()
        curv, t, c, k = timed(fit)
        fit_t.append(t)
        fit_c.append(c)
        fit_n.append(k)
        scores, t, c, k = timed(lambda: score(curv))
        score_t.append(t)
        score_c.append(c)
        score_n.append(k)
        cpu_t.append(time.process_time() - cpu_start)

    # "excluding compile" subtracts the compile seconds jax.monitoring reported during that call.
    timings = dict(
        common,
        fit_s=statistics.median(t - c for t, c in zip(fit_t[1:], fit_c[1:], strict=True)),
        score_s=statistics.median(t - c for t, c in zip(score_t[1:], score_c[1:], strict=True)),
        fit_with_compile_s=statistics.median(fit_t[1:]),
        score_with_compile_s=statistics.median(score_t[1:]),
        compile_s=statistics.median(f + c for f, c in zip(fit_c[1:], score_c[1:], strict=True)),
        # CPU seconds (all threads, user + sys) of fit + scores, compile included.
        cpu_s=statistics.median(cpu_t[1:]),
        cpu_all_s=cpu_t,
        fit_all_s=fit_t,
        score_all_s=score_t,
        fit_compile_all_s=fit_c,
        score_compile_all_s=score_c,
        fit_compiles_all=fit_n,
        score_compiles_all=score_n,
        first_fit_s=fit_t[0],
        first_score_s=score_t[0],
        compile_first_s=fit_c[0] + score_c[0],
        peak_rss_mb=_peak_rss_mb(),
        rss_ready_mb=rss_ready,
    )
    np.savez(result_path, scores=np.asarray(scores, np.float64), timings=json.dumps(timings))


# ----------------------------------------------------------------------------------------------
# Orchestration.
# ----------------------------------------------------------------------------------------------


def _load1() -> float:
    load = load_average()
    return load[0] if load else float("nan")


def _run(cmd: list[str], label: str) -> list[float]:
    """Runs one side; returns the 1-minute load average at its start and end."""
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    start, load_start = time.perf_counter(), _load1()
    env = dict(os.environ, TDA_JAX_PROGRESS="0")  # no progress bars in the timed loops
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"[{label}] failed with exit code {proc.returncode}")
    load_end = _load1()
    print(f"[{label}] done in {time.perf_counter() - start:.1f} s (load {load_start:.2f} -> "
          f"{load_end:.2f})", flush=True)
    return [load_start, load_end]


def _side_commands(args: argparse.Namespace, problem: Path, tmp: Path, tag: str, mode: str):
    ours = [sys.executable, str(Path(__file__).resolve()), "--side", "tda_jax", "--mode", mode,
            "--problem", str(problem), "--result", str(tmp / f"tda_jax_{tag}.npz"),
            "--repeats", str(args.repeats)]
    theirs = [args.kronfluence_python, str(REPO_ROOT / "benchmarks" / "_kronfluence_side.py"),
              "--mode", mode, "--problem", str(problem),
              "--result", str(tmp / f"kronfluence_{tag}.npz"),
              "--workdir", str(tmp / f"kronfluence_out_{tag}"), "--repeats", str(args.repeats)]
    return ours, theirs


def run_case(name: str, args: argparse.Namespace, tmp: Path) -> tuple[dict, dict]:
    """Both sides' timings and scores on one case; returns (results, problem)."""
    cfg = case_config(name, args)
    print(f"== case {name}: training the MLP in JAX ...", flush=True)
    problem = get_problem(cfg, args.problem_dir)
    np.savez(tmp / f"{name}.npz", **problem)
    settings = json.loads(str(problem["settings"]))
    print(f"settings: {json.dumps(settings)}", flush=True)
    ours_cmd, theirs_cmd = _side_commands(args, tmp / f"{name}.npz", tmp, name, "timing")
    load = {"tda_jax": _run(ours_cmd, f"tda_jax {name}"),
            "kronfluence": _run(theirs_cmd, f"kronfluence {name}")}
    ours_npz = np.load(tmp / f"tda_jax_{name}.npz")
    theirs_npz = np.load(tmp / f"kronfluence_{name}.npz")
    ours_scores = ours_npz["scores"]
    theirs_scores = KRONFLUENCE_TO_TDA_JAX_SIGN * theirs_npz["scores"]
    if ours_scores.shape != theirs_scores.shape:
        raise SystemExit(f"score shapes differ: tda_jax {ours_scores.shape}, kronfluence "
                         f"{theirs_scores.shape}")
    print("computing the float64 numpy reference ...", flush=True)
    start = time.perf_counter()
    reference = numpy_ekfac_reference(problem)
    print(f"reference done in {time.perf_counter() - start:.1f} s", flush=True)
    result = {
        "settings": settings,
        "tda_jax": json.loads(str(ours_npz["timings"])),
        "kronfluence": json.loads(str(theirs_npz["timings"])),
        "load": load,
        "agreement": agreement(ours_scores, theirs_scores),
        "agreement_ref": {"tda_jax": agreement(ours_scores, reference),
                          "kronfluence": agreement(theirs_scores, reference)},
    }
    return result, problem


def run_memory(problem: dict, sizes: list[int], args: argparse.Namespace, tmp: Path) -> dict:
    """Query-side peak RSS of each library scoring Q queries, each (Q, library) fresh."""
    out: dict = {"sizes": sizes}
    for q in sizes:
        path = tmp / f"memory_{q}.npz"
        memory_problem = with_queries(problem, q, args.memory_num_train)
        out["settings"] = json.loads(str(memory_problem["settings"]))
        np.savez(path, **memory_problem)
        ours_cmd, theirs_cmd = _side_commands(args, path, tmp, f"memory_{q}", "memory")
        for side, cmd in (("tda_jax", ours_cmd), ("kronfluence", theirs_cmd)):
            load = _run(cmd, f"{side} memory Q={q}")
            res = json.loads(str(np.load(tmp / f"{side}_memory_{q}.npz")["timings"]))
            out[f"{side}_{q}"] = dict(res, load=load)
            print(f"  {side} Q={q}: RSS {res['rss_score_start_mb']:.0f} -> peak "
                  f"{res['peak_rss_scoring_mb']:.0f} MB, scores {res['score_s']:.1f} s", flush=True)
    return out


def run_compile_count(problem_path: Path, args: argparse.Namespace, tmp: Path) -> dict:
    ours_cmd, _ = _side_commands(args, problem_path, tmp, "compile", "compile")
    load = _run(ours_cmd, "tda_jax compile count")
    res = json.loads(str(np.load(tmp / "tda_jax_compile.npz")["timings"]))
    return dict(res, load=load)


def _tda_jax_label() -> tuple[str, str]:
    """(file of the tda_jax this run imports, its git revision or 'unknown')."""
    import tda_jax

    root = Path(tda_jax.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "tda_jax"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return tda_jax.__file__, rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return tda_jax.__file__, "unknown"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


# ----------------------------------------------------------------------------------------------
# Agreement and the report.
# ----------------------------------------------------------------------------------------------


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


def _corr(x: float) -> str:
    # Near-perfect agreement would print as 1.000000; show the gap to 1 instead.
    return f"1 - {1.0 - x:.0e}" if 0.99999 < x < 1.0 else f"{x:.6f}"


def _load(pair: list[float]) -> str:
    return f"{pair[0]:.1f}-{pair[1]:.1f}"


def format_case(name: str, runs: list[dict]) -> str:
    """Timing/memory table and agreement table of one case over one or two runs."""
    cases = [r["cases"][name] for r in runs if name in r["cases"]]
    labels = [r["label"] for r in runs if name in r["cases"]]
    if not cases:
        return ""

    def speedup(a: float, b: float) -> str:
        return f"{b / a:.2f}x" if a > 0 else "-"

    def totals(c):
        o, t = c["tda_jax"], c["kronfluence"]
        return {
            "fit": (o["fit_s"], t["fit_s"]),
            "score": (o["score_s"], t["score_s"]),
            "total": (o["fit_s"] + o["score_s"], t["fit_s"] + t["score_s"]),
            "incl": (o["fit_with_compile_s"] + o["score_with_compile_s"],
                     t["fit_s"] + t["score_s"]),
            "first": (o["first_fit_s"] + o["first_score_s"],
                      t["first_fit_s"] + t["first_score_s"]),
            "cpu": (o["cpu_s"], t["cpu_s"]),
        }

    rows = [
        ("fit", "factor fit s (covariances + eigh + lambda)"),
        ("score", "pairwise scores s"),
        ("total", "**total s**"),
        ("incl", "total s incl. tda_jax's XLA compile in a warm call"),
        ("first", "first call s (cold: fit + scores, incl. compile)"),
        ("cpu", "CPU s per fit + scores (all threads; tda_jax incl. compile)"),
    ]
    header = ([f"tda_jax {lab}" for lab in labels]
              + [f"kronfluence (run with {lab})" for lab in labels]
              + [f"speed-up kronfluence / tda_jax ({lab})" for lab in labels])
    lines = ["| | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    tots = [totals(c) for c in cases]
    for key, label in rows:
        cells = ([f"{t[key][0]:.3f}" for t in tots] + [f"{t[key][1]:.3f}" for t in tots]
                 + [speedup(*t[key]) for t in tots])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    dash = ["-"] * len(cases)

    def row(label, ours_cells, theirs_cells):
        lines.append(f"| {label} | " + " | ".join(ours_cells + theirs_cells + dash) + " |")

    row("XLA compile s per fit + scores (warm; cold)",
        [f"{c['tda_jax']['compile_s']:.2f}; {c['tda_jax']['compile_first_s']:.2f}"
         for c in cases], dash)
    row("XLA backend compiles per fit + scores (warm runs; cold)",
        [(f"{_compiles_warm(c['tda_jax'])}; "
          f"{c['tda_jax']['fit_compiles_all'][0] + c['tda_jax']['score_compiles_all'][0]}"
          if "fit_compiles_all" in c["tda_jax"] else "-") for c in cases], dash)
    row("peak RSS MB (whole process, VmHWM)",
        [f"{c['tda_jax']['peak_rss_mb']:.0f}" for c in cases],
        [f"{c['kronfluence']['peak_rss_mb']:.0f}" for c in cases])
    row("RSS MB before the pipeline (imports + data)",
        [f"{c['tda_jax']['rss_ready_mb']:.0f}" for c in cases],
        [f"{c['kronfluence']['rss_ready_mb']:.0f}" for c in cases])
    row("load average (1 min) at start-end of the process",
        [_load(c["load"]["tda_jax"]) for c in cases],
        [_load(c["load"]["kronfluence"]) for c in cases])

    def stats_line(label: str, a: dict[str, float]) -> str:
        return (f"| {label} | {_corr(a['pearson_min'])} | {_corr(a['pearson_median'])} | "
                f"{_corr(a['spearman_min'])} | {_corr(a['spearman_median'])} | "
                f"{a['slope_ours_on_theirs']:.6f} | {a['relative_error']:.1e} |")

    s = cases[-1]["settings"]
    agree_lines = [
        f"Agreement of the {s['num_queries']} x {s['num_train']} score matrices, per query "
        f"(kronfluence's scores x {KRONFLUENCE_TO_TDA_JAX_SIGN:+.0f}, see the sign convention; "
        "reference = independent float64 numpy EK-FAC):",
        "",
        "| pair | Pearson min | Pearson median | Spearman min | Spearman median | "
        "LS slope | rel. Frobenius error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for lab, c in zip(labels, cases, strict=True):
        agree_lines += [
            stats_line(f"tda_jax {lab} vs kronfluence", c["agreement"]),
            stats_line(f"tda_jax {lab} vs reference", c["agreement_ref"]["tda_jax"]),
            stats_line(f"kronfluence vs reference (run with {lab})",
                       c["agreement_ref"]["kronfluence"]),
        ]
    return "\n".join(lines) + "\n\n" + "\n".join(agree_lines)


def _compiles_warm(timings: dict) -> str:
    warm = [f + s for f, s in zip(timings["fit_compiles_all"][1:],
                                  timings["score_compiles_all"][1:], strict=True)]
    return ", ".join(str(w) for w in warm)


def format_memory(runs: list[dict]) -> str:
    mems = [(r["label"], r["memory"]) for r in runs if r.get("memory")]
    if not mems:
        return ""
    header = ([f"tda_jax {lab}" for lab, _ in mems]
              + [f"kronfluence (run with {lab})" for lab, _ in mems])
    lines = ["| queries scored | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    sizes = sorted({q for _, m in mems for q in m["sizes"]})

    def cell(m: dict, side: str, q: int) -> str:
        r = m.get(f"{side}_{q}")
        if r is None:
            return "-"
        peak, start = r["peak_rss_scoring_mb"], r["rss_score_start_mb"]
        return (f"**{peak:.0f}** ({start:.0f} + {peak - start:.0f}); {r['score_s']:.1f} s; "
                f"load {_load(r['load'])}")

    for q in sizes:
        cells = ([cell(m, "tda_jax", q) for _, m in mems]
                 + [cell(m, "kronfluence", q) for _, m in mems])
        lines.append(f"| Q = {q} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_compile(runs: list[dict]) -> str:
    comps = [(r["label"], r["compile"]) for r in runs if r.get("compile")]
    if not comps:
        return ""
    lines = ["| call (fresh `lambda p, x: model.apply({\"params\": p}, x)` each) | "
             + " | ".join(f"tda_jax {lab}" for lab, _ in comps) + " |",
             "|---|" + "---:|" * len(comps)]
    for i in range(2):
        for key, fn in (("fit", "fit_curvature"), ("score", "pairwise_scores")):
            cells = [f"{c['calls'][i][f'{key}_compiles']} ({c['calls'][i][f'{key}_compile_s']:.2f} "
                     f"s compiling of {c['calls'][i][f'{key}_s']:.2f} s)" for _, c in comps]
            lines.append(f"| `{fn}` call {i + 1} | " + " | ".join(cells) + " |")
    lines.append("| load average (1 min) at start-end | "
                 + " | ".join(_load(c["load"]) for _, c in comps) + " |")
    return "\n".join(lines)


def format_report(runs: list[dict]) -> str:
    parts = []
    for name in CASE_NAMES:
        table = format_case(name, runs)
        if table:
            s = next(r["cases"][name]["settings"] for r in runs if name in r["cases"])
            parts.append(f"### Case `{name}`: MLP {s['num_inputs']}-"
                         f"{'-'.join(str(h) for h in s['hidden'])}-10, {s['num_train']} x "
                         f"{s['num_queries']}\n\n{table}")
    memory = format_memory(runs)
    if memory:
        m = next(r["memory"]["settings"] for r in reversed(runs) if r.get("memory"))
        parts.append("### Query-side memory (`digits_wide` model)\n\nPeak RSS MB of one "
                     "`pairwise_scores` / `compute_pairwise_scores` call in a fresh process after "
                     "fitting the factors (peak counter restarted before scoring): **peak** "
                     "(RSS when scoring starts + growth during scoring); seconds of that call; "
                     f"load average. Queries: {m['query_source']}; factors and scores on "
                     f"{m['num_train']} training examples; query batch size "
                     f"{m['query_batch_size']}, training batch size {m['train_batch_size']}."
                     "\n\n" + memory)
    comp = format_compile(runs)
    if comp:
        parts.append("### XLA compiles per call (tda_jax)\n\nBackend compilations counted by "
                     "`jax.monitoring` (events containing `backend_compile`) during each call "
                     "(seconds of all compile events, of the call's wall seconds), on the "
                     f"`{next(r['compile_case'] for r in runs if r.get('compile'))}` problem, "
                     "in a fresh process.\n\n" + comp)
    return "\n\n".join(parts)


def write_results(path: Path, runs: list[dict]) -> None:
    latest = runs[-1]
    extra_cli = latest["extra_cli"]
    case_lines = []
    for name in CASE_NAMES:
        s = next((r["cases"][name]["settings"] for r in reversed(runs) if name in r["cases"]),
                 None)
        if s is None:
            continue
        case_lines.append(
            f"* `{name}`: {s['dataset']}, {s['num_train']} training examples, "
            f"{s['num_queries']} queries ({s['query_source']}); MLP {s['num_inputs']}-"
            f"{'-'.join(str(h) for h in s['hidden'])}-10 ({s['num_params']} parameters, ReLU) "
            f"trained in JAX (Adam, {s['epochs']} epochs; train accuracy "
            f"{s['train_accuracy']:.3f}, test {s['test_accuracy']:.3f}); batch size "
            f"{s['train_batch_size']} (training examples), {s['query_batch_size']} (queries).")
    s = next(iter(latest["cases"].values()))["settings"] if latest["cases"] else {}
    versions = []
    for r in runs:
        ours = next(iter(r["cases"].values()))["tda_jax"] if r["cases"] else {}
        theirs = next(iter(r["cases"].values()))["kronfluence"] if r["cases"] else {}
        if ours and theirs:
            versions.append(
                f"run {r['label']} ({r['date']}, tda_jax from `{r['tda_jax_file']}`): jax "
                f"{ours['versions']['jax']} (devices {', '.join(ours['devices'])}), torch "
                f"{theirs['versions']['torch']} ({theirs['torch_threads']} threads), kronfluence "
                f"{theirs['versions']['kronfluence']}, Python {ours['versions']['python']}; "
                f"machine {r['machine']}{r['machine_note']}")
    before_after = (
        f"Columns: tda_jax at {', then at '.join(r['label'] for r in runs)}; each run also "
        "reran kronfluence, so its two columns show how much the machine's load moved the "
        "numbers between runs, and each run's speed-up compares with the kronfluence of the same "
        "run. Both runs scored the very same trained weights." if len(runs) > 1 else "")
    raw = []
    for r in runs:
        for name, c in r["cases"].items():
            o, t = c["tda_jax"], c["kronfluence"]
            raw.append(f"{r['label']} `{name}`: tda_jax fit {_fmt(o['fit_all_s'])} of which XLA "
                       f"compile {_fmt(o['fit_compile_all_s'])}, scores {_fmt(o['score_all_s'])} "
                       f"of which compile {_fmt(o['score_compile_all_s'])}; kronfluence fit "
                       f"{_fmt(t['fit_all_s'])}, scores {_fmt(t['score_all_s'])}.")
    text = f"""# EK-FAC influence: tda_jax vs kronfluence

Date: {latest['date']}. Rerun from the repository root (setup in `benchmarks/README.md`):

```
{RERUN_COMMAND}{extra_cli}
```

Cases:

{chr(10).join(case_lines)}

The torch models have the same weights (`nn.Linear.weight = kernel.T`). EK-FAC on all
Dense/Linear layers (bias as an appended 1), empirical Fisher (true labels), covariances and
lambda averaged over all training examples, float64 eigendecompositions, absolute damping
{s.get('damping', 0):g} added to the corrected eigenvalues in both, training loss = per-example
cross-entropy (summed over a batch), measurement = query {s.get('measurement', '')}. Each side
runs in its own fresh process, one after the other on the same machine; peak RSS is each process's
`VmHWM`.

Timing: medians of {latest['repeats']} runs after a warm-up run. The first three rows exclude the
XLA compile seconds that `jax.monitoring` reports during each call (tracing, lowering and backend
compile); the "incl." row shows what a warm call costs as is, the "first call" row a cold one.
kronfluence's times include its own saving of factors and scores to a scratch directory, as that is
part of its pipeline. **The machine has 2 cores shared with other jobs: wall times are noisy**;
the 1-minute load average at the start and end of each process is listed next to each result
(a load above 2 means other work competed for the cores), and CPU seconds are steadier than wall
seconds. {before_after}

{format_report(runs)}

Versions: {'; '.join(versions)}.

Raw per-run wall seconds (first = warm-up): {' '.join(raw)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_reflow(text))


def _reflow(markdown: str, width: int = 100) -> str:
    """Re-wraps the prose paragraphs of ``markdown`` (not tables, code, headings or lists)."""
    blocks = []
    for block in markdown.strip().split("\n\n"):
        if block.startswith(("|", "#", "```")):
            blocks.append(block)
        elif block.startswith("* "):
            blocks.append("\n".join(
                textwrap.fill(" ".join(item.split()), width=width, subsequent_indent="  ",
                              break_on_hyphens=False, break_long_words=False)
                for item in ("* " + i for i in block[2:].split("\n* "))))
        else:
            blocks.append(textwrap.fill(" ".join(block.split()), width=width,
                                        break_on_hyphens=False, break_long_words=False))
    return "\n\n".join(blocks) + "\n"


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def _non_default_flags(args: argparse.Namespace) -> str:
    """The command-line flags (setting only) that differ from the defaults, for the rerun line."""
    defaults = vars(_parser().parse_args([]))
    skip = {"machine_note", "output", "kronfluence_python", "side", "problem", "result", "mode",
            "json", "baseline", "from_json", "label", "problem_dir"}
    flags = [f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if k in defaults and k not in skip and v != defaults[k]]
    return "".join(flags)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASE_NAMES),
                        help=f"comma-separated subset of {', '.join(CASE_NAMES)}")
    parser.add_argument("--num-train", type=int, default=4000, help="mnist1d case")
    parser.add_argument("--num-queries", type=int, default=200, help="mnist1d case")
    parser.add_argument("--hidden", default="128,128", help="mnist1d case: hidden widths")
    parser.add_argument("--epochs", type=int, default=30, help="mnist1d case")
    parser.add_argument("--query-batch-size", type=int, default=200, help="mnist1d case")
    parser.add_argument("--wide-hidden", default="1024,1024", help="digits_wide case")
    parser.add_argument("--wide-epochs", type=int, default=5, help="digits_wide case")
    parser.add_argument("--wide-num-queries", type=int, default=297,
                        help="digits_wide case: test queries (at most 360)")
    parser.add_argument("--wide-query-batch-size", type=int, default=100,
                        help="digits_wide case, also the memory runs")
    parser.add_argument("--memory-queries", default="100,1000",
                        help="query counts of the digits_wide memory runs ('' to skip)")
    parser.add_argument("--memory-num-train", type=int, default=0,
                        help="memory runs: fit and score on the first N training examples only "
                             "(0: all; the query-side peak does not depend on it)")
    parser.add_argument("--skip-compile-count", action="store_true")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-batch-size-sgd", type=int, default=100)
    parser.add_argument("--damping", type=float, default=1e-3,
                        help="absolute damping added to the EK-FAC eigenvalues (both sides)")
    parser.add_argument("--measurement", choices=("margin", "loss"), default="margin")
    parser.add_argument("--batch-size", type=int, default=500,
                        help="training-example batch size for factors and scores (both sides)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kronfluence-python", default=str(DEFAULT_KRONFLUENCE_PYTHON))
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help="markdown file to write ('' to skip)")
    parser.add_argument("--machine-note", default="",
                        help="free text about the machine's load, added to the results file")
    parser.add_argument("--json", default="", help="also save this run's results (JSON) here")
    parser.add_argument("--baseline", default="",
                        help="JSON saved by an earlier run (--json): shown as 'before' columns")
    parser.add_argument("--from-json", default="",
                        help="do not run: write the report of this saved JSON (with --baseline)")
    parser.add_argument("--label", default="",
                        help="name of this run's tda_jax in the tables (default: git revision)")
    parser.add_argument("--problem-dir", default="",
                        help="cache the trained problems here (same weights across runs)")
    # Internal: run one side in this (fresh) process.
    parser.add_argument("--side", choices=("tda_jax",), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("timing", "memory", "compile"), default="timing",
                        help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side == "tda_jax":
        run_tda_jax_side(args.problem, args.result, args.repeats, args.mode)
        return

    if args.from_json:
        run = json.loads(Path(args.from_json).read_text())
    else:
        run = run_all(args)
        if args.json:
            Path(args.json).write_text(json.dumps(run, indent=1))
            print(f"wrote {args.json}")
    runs = ([json.loads(Path(args.baseline).read_text())] if args.baseline else []) + [run]
    print()
    print(format_report(runs))
    if args.output:
        write_results(Path(args.output), runs)
        print(f"wrote {args.output}")


def run_all(args: argparse.Namespace) -> dict:
    if not Path(args.kronfluence_python).exists():
        raise SystemExit(f"--kronfluence-python {args.kronfluence_python} does not exist; set up "
                         "benchmarks/.venv-kronfluence as described in benchmarks/README.md")
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        case_config(c, args)  # unknown names fail before any work
    tda_jax_file, rev = _tda_jax_label()
    print(f"tda_jax imported from {tda_jax_file} ({rev})", flush=True)
    run: dict = {
        "label": args.label or rev,
        "tda_jax_file": tda_jax_file,
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": _machine(),
        "machine_note": f" ({args.machine_note})" if args.machine_note else "",
        "repeats": args.repeats,
        "extra_cli": _non_default_flags(args),
        "cases": {},
    }
    sizes = [int(q) for q in args.memory_queries.split(",") if q]

    def save_so_far() -> None:  # a long run that dies late keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(run, indent=1))

    with tempfile.TemporaryDirectory(prefix="kronfluence_ekfac_") as tmp:
        tmp = Path(tmp)
        for name in cases:
            run["cases"][name], _ = run_case(name, args, tmp)
            save_so_far()
        if not args.skip_compile_count:
            name = cases[0] if cases else "mnist1d"
            if not (tmp / f"{name}.npz").exists():
                np.savez(tmp / f"{name}.npz", **get_problem(case_config(name, args),
                                                            args.problem_dir))
            run["compile"] = run_compile_count(tmp / f"{name}.npz", args, tmp)
            run["compile_case"] = name
            save_so_far()
        if sizes:
            wide = (dict(np.load(tmp / "digits_wide.npz")) if (tmp / "digits_wide.npz").exists()
                    else get_problem(case_config("digits_wide", args), args.problem_dir))
            run["memory"] = run_memory(wide, sizes, args, tmp)
    return run


if __name__ == "__main__":
    main()
