"""Language-model influence: tda_jax vs kronfluence 1.0.1 (PyTorch, CPU) on the same transformer.

One run builds a synthetic fact corpus (:func:`tda_jax.data.make_fact_corpus`), trains a small
:class:`tda_jax.models.TransformerLM` (untied head) on it with :func:`tda_jax.training.train`
(``loss="causal_lm"``), then times both pipelines one after the other on the same CPU, each in a
fresh subprocess so that each peak RSS is its own:

* ``tda_jax``: ``fit_curvature(strategy="ekfac", fisher="empirical", layers=<attention, MLP and
  head>)`` then ``pairwise_scores`` (sequence and ``granularity="token"``, each also with
  ``query_rank``), run by this script with ``--side tda_jax`` in our venv (``sys.executable``),
  with ``trim_padding=True`` (batches by real length, trailing padding cut: exact for this causal
  model; ``--no-trim-padding`` scores every padded position as kronfluence does) and its compiled
  steps built in the cold call and held (``steps=``) for the warm ones;
* kronfluence: ``benchmarks/_kronfluence_lm_side.py`` run by ``benchmarks/.venv-kronfluence``'s
  python, on a PyTorch twin of the model (``nn.Linear`` query / key / value / out projections
  holding the DenseGeneral kernels reshaped, see that file) whose logits are checked against the
  JAX logits before anything is timed.

Data: training sequences are the corpus's ``train_dataset()`` (``<bos>`` + text + ``<eos>``,
right-padded, targets ``-1`` at padding, ``input_mask``); queries are the first ``--num-queries``
of ``query_dataset()`` (alternately a fact in training order and flipped), whose targets are
``-1`` except on the completion tokens.

Both sides compute the same thing:

* tracked layers: every attention projection (query, key, value, out), both MLP layers of every
  block and the head; the token embedding, the positional table and the LayerNorms are left out
  (kronfluence tracks ``nn.Linear`` only; ours are chosen with ``layers=`` on the flax names);
* training loss: the summed token NLL of each sequence (``tda_jax.losses.causal_lm_loss()``);
  measurement: the completion log-probability (``tda_jax.losses.completion_log_prob``);
* EK-FAC with the empirical Fisher (true next tokens), float64 eigendecompositions, covariances
  and eigenvalue corrections over all training sequences, padding positions out of the activation
  covariances (kronfluence: ``Task.get_attention_mask``), bias as an appended constant 1;
* damping: by default the heuristic ``0.1 x mean(lambda)`` of each layer, which is kronfluence's
  rule for ``damping_factor=None`` and ours for ``damping=None`` (``--damping X`` sets the same
  absolute value on both sides instead).

Sign: tda_jax scores ``-grad f^T (F + damping)^-1 grad L`` and kronfluence ``+grad f^T ...``
(see ``benchmarks/kronfluence_ekfac.py``), so agreement is measured after flipping kronfluence's
sign.

Measured (medians of ``--repeats`` runs after the cold first call, which is reported too): factor
fitting seconds, pairwise scores (sequence level, ``[Q, N]``), per-token scores (``[Q, N, T]``, for
the first ``--token-queries`` queries: full-rank per-token scoring costs ``Q x N x T x parameters``
on both sides), both again with query batching at rank ``--query-rank`` (ours ``query_rank=r``, kronfluence's
``query_gradient_low_rank=r``), CPU seconds, XLA compile seconds of our calls, each process's
peak RSS, per-query Pearson / Spearman agreement of the score matrices, and training tokens
scored per second. The 1-minute load average at the start and end of each process is recorded.

Run (from the repository root, after setting up ``benchmarks/.venv-kronfluence``, see
``benchmarks/README.md``)::

    .venv/bin/python benchmarks/kronfluence_lm.py            # the full benchmark, ~20 min
    .venv/bin/python benchmarks/kronfluence_lm.py --quick    # small sizes, for development

It prints a markdown report and writes it to ``benchmarks/results/kronfluence_lm.md``.
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
import time
from pathlib import Path

import numpy as np
from _common import (  # benchmarks/ is on sys.path when run as a script
    load_average,
    machine_description,
    peak_rss_mb,
    reflow_markdown,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KRONFLUENCE_PYTHON = REPO_ROOT / "benchmarks" / ".venv-kronfluence" / "bin" / "python"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "kronfluence_lm.md"
RERUN_COMMAND = ".venv/bin/python benchmarks/kronfluence_lm.py"
if str(REPO_ROOT) not in sys.path:
    if os.environ.get("PYTHONPATH"):
        sys.path.append(str(REPO_ROOT))
    else:
        sys.path.insert(0, str(REPO_ROOT))

KRONFLUENCE_TO_TDA_JAX_SIGN = -1.0
# The flax names of the layers kronfluence tracks as nn.Linear (embed left out on both sides).
TRACKED_LAYERS = r"^(block_\d+/attn/(query|key|value|out)|block_\d+/mlp/fc[12]|head)$"
COMPILE_EVENT_PREFIX = "/jax/core/compile/"
SCORE_RUNS = ("sequence", "token", "sequence_lowrank", "token_lowrank")
KRONFLUENCE_EXTRA_RUNS = ("sequence_lowrank_fullsvd",)
RUN_LABELS = {
    "fit": "factor fit s (covariances + eigh + lambda)",
    "sequence": "pairwise scores s (sequence level, full rank)",
    "token": "per-token scores s (full rank)",
    "sequence_lowrank": "pairwise scores s (sequence level, query rank {r})",
    "token_lowrank": "per-token scores s (query rank {r})",
    "sequence_lowrank_fullsvd": "pairwise scores s (query rank {r}, kronfluence use_full_svd)",
}

QUICK = {"num_entities": 12, "num_queries": 16, "d_model": 64, "d_mlp": 128, "epochs": 2,
         "repeats": 1}


# ----------------------------------------------------------------------------------------------
# The shared problem: corpus, trained transformer, check logits.
# ----------------------------------------------------------------------------------------------


def problem_config(args: argparse.Namespace) -> dict:
    """Everything that determines the trained problem and both sides' settings."""
    return {
        "seed": int(args.seed),
        "num_entities": int(args.num_entities),
        "num_queries": int(args.num_queries),
        "d_model": int(args.d_model),
        "num_heads": int(args.num_heads),
        "num_layers": int(args.num_layers),
        "d_mlp": int(args.d_mlp),
        "epochs": int(args.epochs),
        "learning_rate": float(args.learning_rate),
        "train_batch_size_sgd": int(args.train_batch_size_sgd),
    }


def build_problem(cfg: dict) -> dict[str, np.ndarray]:
    """Builds the corpus, trains the transformer in JAX; returns what both sides need."""
    import jax
    import jax.numpy as jnp

    from tda_jax.data import make_fact_corpus
    from tda_jax.losses import completion_log_prob
    from tda_jax.models import TransformerLM
    from tda_jax.training import TrainConfig, evaluate, train

    # Arithmetic and distractor sentences scale with the entities, as in the corpus's defaults.
    corpus = make_fact_corpus(seed=cfg["seed"], num_entities=cfg["num_entities"],
                              num_arithmetic=400 * cfg["num_entities"] // 48,
                              num_distractors=400 * cfg["num_entities"] // 48)
    train_data = corpus.train_dataset()
    all_queries = corpus.query_dataset()
    q = cfg["num_queries"]
    if q > all_queries.inputs.shape[0]:
        raise ValueError(f"--num-queries {q} > the corpus's {all_queries.inputs.shape[0]} queries")
    model = TransformerLM(vocab_size=corpus.vocab_size, max_len=corpus.max_len,
                          d_model=cfg["d_model"], num_heads=cfg["num_heads"],
                          num_layers=cfg["num_layers"], d_mlp=cfg["d_mlp"], tie_embeddings=False)
    config = TrainConfig(num_epochs=cfg["epochs"], batch_size=cfg["train_batch_size_sgd"],
                         learning_rate=cfg["learning_rate"], loss="causal_lm")
    start = time.perf_counter()
    variables = train(jax.random.key(cfg["seed"]), model, None, train_data, config)
    train_s = time.perf_counter() - start
    params = variables["params"]
    quality = evaluate(model, variables, train_data, loss="causal_lm")
    query_logp = np.asarray(completion_log_prob(
        model.apply(variables, jnp.asarray(all_queries.inputs[:q])),
        jnp.asarray(all_queries.targets[:q])))
    orders = np.asarray([corpus.queries[i].order for i in range(q)])

    problem: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        problem[f"param/{name}"] = np.asarray(leaf, np.float32)
    for prefix, data in (("train", train_data), ("query", all_queries)):
        rows = slice(None) if prefix == "train" else slice(0, q)
        problem[f"{prefix}_inputs"] = np.asarray(data.inputs[rows], np.int32)
        problem[f"{prefix}_targets"] = np.asarray(data.targets[rows], np.int32)
        problem[f"{prefix}_mask"] = np.asarray(data.input_mask[rows], np.float32)
    # The torch twin must reproduce these logits before anything is timed.
    check = np.concatenate([problem["train_inputs"][:24], problem["query_inputs"][:8]])
    problem["check_inputs"] = check
    problem["check_mask"] = np.concatenate([problem["train_mask"][:24],
                                            problem["query_mask"][:8]])
    problem["check_logits"] = np.asarray(model.apply(variables, jnp.asarray(check)), np.float32)
    settings = dict(
        cfg,
        model={"vocab_size": corpus.vocab_size, "max_len": corpus.max_len,
               "d_model": cfg["d_model"], "num_heads": cfg["num_heads"],
               "num_layers": cfg["num_layers"], "d_mlp": cfg["d_mlp"]},
        num_train=int(train_data.inputs.shape[0]),
        num_train_tokens=int(np.sum(train_data.input_mask)),
        num_query_tokens=int(np.sum(problem["query_mask"])),
        num_params=int(sum(np.size(v) for v in jax.tree.leaves(params))),
        train_seconds=train_s,
        train_token_nll=float(quality["loss"]),
        train_token_accuracy=float(quality["accuracy"]),
        query_logp_same=float(np.mean(query_logp[orders == "same"])),
        query_logp_flipped=float(np.mean(query_logp[orders == "flipped"])),
    )
    problem["settings"] = np.asarray(json.dumps(settings))
    return problem


def get_problem(cfg: dict, problem_dir: str) -> dict[str, np.ndarray]:
    """:func:`build_problem`, cached in ``problem_dir`` (if given) under a hash of ``cfg``."""
    if not problem_dir:
        return build_problem(cfg)
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(problem_dir) / f"lm_{digest}.npz"
    if path.exists():
        print(f"reusing the trained problem {path}", flush=True)
        return dict(np.load(path))
    problem = build_problem(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **problem)
    return problem


def with_run_settings(problem: dict, args: argparse.Namespace) -> dict:
    """The problem with the scoring settings (not part of the cached training) in its settings."""
    out = dict(problem)
    settings = json.loads(str(problem["settings"]))
    settings.update(
        damping=None if args.damping == "heuristic" else float(args.damping),
        train_batch_size=int(args.batch_size),
        query_batch_size=int(args.query_batch_size or settings["num_queries"]),
        query_rank=int(args.query_rank),
        trim_padding=not args.no_trim_padding,
        token_queries=min(int(args.token_queries or settings["num_queries"]),
                          settings["num_queries"]),
        tda_jax_runs=[r for r in args.runs.split(",") if r],
        kronfluence_runs=[r for r in args.runs.split(",") if r]
        + [r for r in args.kronfluence_extra_runs.split(",") if r],
    )
    out["settings"] = np.asarray(json.dumps(settings))
    return out


# ----------------------------------------------------------------------------------------------
# The tda_jax side (runs in a fresh subprocess: ``--side tda_jax``).
# ----------------------------------------------------------------------------------------------


def run_tda_jax_side(problem_path: str, result_path: str, repeats: int) -> None:
    """Times ``fit_curvature`` and the ``pairwise_scores`` variants; saves scores and timings."""
    load_start = load_average()
    rss_start = peak_rss_mb()
    import jax
    from jax import monitoring

    import tda_jax
    from tda_jax.attribution import fit_curvature, pairwise_scores
    from tda_jax.attribution.influence import pairwise_score_steps
    from tda_jax.curvature.fit import build_fit_steps, inspect_model
    from tda_jax.data import Dataset, subset
    from tda_jax.losses import causal_lm_loss, completion_log_prob
    from tda_jax.models import TransformerLM, apply_fn_of

    compile_events: list[float] = []
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_events.append(secs)
        if name.startswith(COMPILE_EVENT_PREFIX) else None)

    problem = dict(np.load(problem_path))
    settings = json.loads(str(problem["settings"]))
    arch = settings["model"]
    model = TransformerLM(vocab_size=arch["vocab_size"], max_len=arch["max_len"],
                          d_model=arch["d_model"], num_heads=arch["num_heads"],
                          num_layers=arch["num_layers"], d_mlp=arch["d_mlp"],
                          tie_embeddings=False)
    params: dict = {}
    for key, value in problem.items():
        if key.startswith("param/"):
            *parents, leaf = key[len("param/"):].split("/")
            node = params
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = jax.numpy.asarray(value)
    vocab = arch["vocab_size"]
    train = Dataset(problem["train_inputs"], problem["train_targets"], vocab, problem["train_mask"])
    queries = Dataset(problem["query_inputs"], problem["query_targets"], vocab,
                      problem["query_mask"])
    apply_fn = apply_fn_of(model)
    loss = causal_lm_loss()
    damping = settings["damping"]
    trim = bool(settings.get("trim_padding", True))
    # The compiled steps are built once (in the cold call) and held, the documented way to call the
    # drivers repeatedly (``steps=``): warm calls then neither trace nor lower again.
    held: dict = {}

    def fit():
        if "fit" not in held:
            specs = inspect_model(apply_fn, params, train, "train", True, TRACKED_LAYERS).specs
            held["fit"] = build_fit_steps(apply_fn, "ekfac", loss, specs, fisher="empirical")
        return fit_curvature(apply_fn, params, train, strategy="ekfac", loss=loss,
                             fisher="empirical", damping=damping,
                             batch_size=settings["train_batch_size"], layers=TRACKED_LAYERS,
                             eigh_dtype="float64", trim_padding=trim, steps=held["fit"])

    token_queries = subset(queries, np.arange(settings["token_queries"]))

    def score(curvature, variant):
        token = variant.startswith("token")
        arguments = dict(
            loss=loss, measurement=completion_log_prob,
            granularity="token" if token else "sequence",
            query_rank=settings["query_rank"] if variant.endswith("lowrank") else None,
            train_batch_size=settings["train_batch_size"], trim_padding=trim)
        data = (token_queries if token else queries, train)
        if variant not in held:
            held[variant] = pairwise_score_steps(apply_fn, params, curvature, *data, **arguments)
        return pairwise_scores(apply_fn, params, curvature, *data,
                               query_batch_size=settings["query_batch_size"],
                               steps=held[variant], **arguments)

    rss_ready = peak_rss_mb()

    def timed(call):
        before = len(compile_events)
        start, cpu = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(call())
        return (out, time.perf_counter() - start, time.process_time() - cpu,
                float(sum(compile_events[before:])))

    timings: dict = {}

    def record(name, wall, cpu, compile_s):
        t = timings.setdefault(name, {"wall": [], "cpu": [], "compile": []})
        t["wall"].append(wall)
        t["cpu"].append(cpu)
        t["compile"].append(compile_s)
        print(f"{name} {len(t['wall']) - 1}: {wall:.2f} s (compile {compile_s:.2f} s)", flush=True)

    curvature = None
    for _ in range(repeats + 1):  # the first call is cold (compiles)
        curvature, wall, cpu, comp = timed(fit)
        record("fit", wall, cpu, comp)
    scores = {}
    for variant in settings["tda_jax_runs"]:
        for _ in range(repeats + 1):
            out, wall, cpu, comp = timed(lambda variant=variant: score(curvature, variant))
            record(variant, wall, cpu, comp)
        scores[variant] = np.asarray(out, np.float32)

    def median_warm(values):
        return statistics.median(values[1:]) if len(values) > 1 else values[0]

    summary = {
        name: {"median_s": median_warm(t["wall"]), "first_s": t["wall"][0],
               "cpu_median_s": median_warm(t["cpu"]),
               "compile_median_s": median_warm(t["compile"]), "first_compile_s": t["compile"][0],
               "all_s": t["wall"], "cpu_all_s": t["cpu"], "compile_all_s": t["compile"]}
        for name, t in timings.items()
    }
    result = {
        "timings": summary,
        "tracked_layers": [s.name for s in curvature.specs],
        "untracked": curvature.settings.get("untracked", []),
        "damping_used": {k: float(v) for k, v in
                         zip([s.name for s in curvature.specs],
                             [curvature.factors[s.name]["damping"] for s in curvature.specs],
                             strict=True)},
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_import_mb": rss_start,
        "rss_ready_mb": rss_ready,
        "load": [load_start, load_average()],
        "tda_jax_file": tda_jax.__file__,
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "devices": [str(d) for d in jax.devices()],
    }
    np.savez(result_path, timings=json.dumps(result),
             **{f"scores_{k}": v for k, v in scores.items()})


# ----------------------------------------------------------------------------------------------
# Agreement.
# ----------------------------------------------------------------------------------------------


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def agreement(ours: np.ndarray, theirs: np.ndarray, positions: np.ndarray | None = None
              ) -> dict[str, float]:
    """Per-query Pearson / Spearman of two ``[Q, N]`` (or ``[Q, N, T]``) score arrays.

    For ``[Q, N, T]`` arrays each query's row is the ``(n, t)`` entries where ``positions [N, T]``
    is true (real training tokens; padding scores are 0 on both sides).
    """
    from scipy.stats import rankdata

    ours = np.asarray(ours, np.float64)
    theirs = np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        raise ValueError(f"score shapes differ: {ours.shape} vs {theirs.shape}")
    if ours.ndim == 3:
        keep = np.asarray(positions, bool).reshape(-1)
        ours = ours.reshape(ours.shape[0], -1)[:, keep]
        theirs = theirs.reshape(theirs.shape[0], -1)[:, keep]
    pearson = _rowwise_pearson(ours, theirs)
    spearman = _rowwise_pearson(rankdata(ours, axis=1), rankdata(theirs, axis=1))
    return {
        "pearson_min": float(pearson.min()),
        "pearson_median": float(np.median(pearson)),
        "spearman_min": float(spearman.min()),
        "spearman_median": float(np.median(spearman)),
        "slope": float((ours * theirs).sum() / (theirs * theirs).sum()),
        "relative_error": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)),
    }


def compare(ours: dict, theirs: dict, problem: dict) -> list[tuple[str, dict]]:
    """The agreement rows of the report (kronfluence's scores already in tda_jax's sign)."""
    positions = problem["train_mask"] > 0
    rows = []
    for variant in SCORE_RUNS:
        if variant in ours and variant in theirs:
            rows.append((f"{variant}: tda_jax vs kronfluence",
                         agreement(ours[variant], theirs[variant], positions)))
    for side, scores in (("tda_jax", ours), ("kronfluence", theirs)):
        for low, full in (("sequence_lowrank", "sequence"), ("token_lowrank", "token"),
                          ("sequence_lowrank_fullsvd", "sequence")):
            if low in scores and full in scores:
                rows.append((f"{side}: {low} vs its own {full}",
                             agreement(scores[low], scores[full], positions)))
        if "token" in scores and "sequence" in scores:
            summed = scores["token"].sum(-1)  # per-token scores cover the first queries only
            rows.append((f"{side}: per-token scores summed over tokens vs its sequence scores",
                         agreement(summed, scores["sequence"][: summed.shape[0]])))
    return rows


# ----------------------------------------------------------------------------------------------
# Orchestration.
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], label: str) -> None:
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, TDA_JAX_PROGRESS="0")  # no progress bars in the timed loops
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"[{label}] failed with exit code {proc.returncode}")
    print(proc.stdout[-3000:], end="", flush=True)
    print(f"[{label}] done in {time.perf_counter() - start:.1f} s", flush=True)


def run_all(args: argparse.Namespace) -> dict:
    if not Path(args.kronfluence_python).exists():
        raise SystemExit(f"--kronfluence-python {args.kronfluence_python} does not exist; set up "
                         "benchmarks/.venv-kronfluence as described in benchmarks/README.md")
    for r in args.runs.split(","):
        if r and r not in SCORE_RUNS:
            raise SystemExit(f"--runs: unknown {r!r}; choose from {SCORE_RUNS}")
    for r in args.kronfluence_extra_runs.split(","):
        if r and r not in KRONFLUENCE_EXTRA_RUNS:
            raise SystemExit(f"--kronfluence-extra-runs: unknown {r!r}; choose from "
                             f"{KRONFLUENCE_EXTRA_RUNS}")
    tda_jax_file, rev = _tda_jax_label()
    print(f"tda_jax imported from {tda_jax_file} ({rev})", flush=True)
    start = time.perf_counter()
    print("== building the corpus and training the transformer in JAX ...", flush=True)
    problem = with_run_settings(get_problem(problem_config(args), args.problem_dir), args)
    settings = json.loads(str(problem["settings"]))
    print(f"settings: {json.dumps(settings)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kronfluence_lm_") as scratch:
        # --side-dir keeps each side's result, so a run whose other side failed (or was killed on a
        # shared machine) can be resumed without redoing the finished side.
        tmp = Path(args.side_dir) if args.side_dir else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        # Same settings, repeats and tda_jax tree (an uncommitted tree is never reused).
        digest = hashlib.sha1((str(problem["settings"]) + f"|{args.repeats}|{rev}").encode()
                              ).hexdigest()[:12]
        if rev.endswith("+uncommitted") or rev == "unknown":
            digest += f"_{os.getpid()}"
        # kronfluence's side never imports tda_jax: its result depends on the settings only.
        theirs_digest = hashlib.sha1((str(problem["settings"]) + f"|{args.repeats}").encode()
                                     ).hexdigest()[:12]
        paths = {"problem": tmp / f"problem_{digest}.npz",
                 "tda_jax": tmp / f"tda_jax_{digest}.npz",
                 "kronfluence": tmp / f"kronfluence_{theirs_digest}.npz"}
        np.savez(paths["problem"], **problem)
        ours_cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "tda_jax",
                    "--problem", str(paths["problem"]), "--result", str(paths["tda_jax"]),
                    "--repeats", str(args.repeats)]
        theirs_cmd = [args.kronfluence_python,
                      str(REPO_ROOT / "benchmarks" / "_kronfluence_lm_side.py"),
                      "--problem", str(paths["problem"]),
                      "--result", str(paths["kronfluence"]),
                      "--workdir", str(Path(scratch) / "kronfluence_out"),
                      "--repeats", str(args.repeats),
                      "--logit-tolerance", str(args.logit_tolerance)]
        for side, cmd in (("tda_jax", ours_cmd), ("kronfluence", theirs_cmd)):
            if args.side_dir and paths[side].exists():
                print(f"[{side}] reusing {paths[side]}", flush=True)
            else:
                _run(cmd, side)
        ours_npz, theirs_npz = np.load(paths["tda_jax"]), np.load(paths["kronfluence"])
        ours = {k[len("scores_"):]: ours_npz[k] for k in ours_npz.files if k.startswith("scores_")}
        theirs = {k[len("scores_"):]: KRONFLUENCE_TO_TDA_JAX_SIGN * theirs_npz[k]
                  for k in theirs_npz.files if k.startswith("scores_")}
        rows = compare(ours, theirs, problem)
        return {
            "label": args.label or rev,
            "tda_jax_file": tda_jax_file,
            "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "machine": machine_description(),
            "machine_note": args.machine_note,
            "repeats": args.repeats,
            "extra_cli": _non_default_flags(args),
            "settings": settings,
            "tda_jax": json.loads(str(ours_npz["timings"])),
            "kronfluence": json.loads(str(theirs_npz["timings"])),
            "agreement": rows,
            "wall_s": time.perf_counter() - start,
        }


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


# ----------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------


def _corr(x: float) -> str:
    # Near-perfect agreement would print as 1.000000; show the gap to 1 instead.
    return f"1 - {1.0 - x:.0e}" if 0.99999 < x < 1.0 else f"{x:.6f}"


def _load(pair: list[list[float]]) -> str:
    return "-".join(f"{p[0]:.1f}" if p else "?" for p in pair)


def format_report(run: dict) -> str:
    s, o, t = run["settings"], run["tda_jax"], run["kronfluence"]
    ot, tt = o["timings"], t["timings"]
    r = s["query_rank"]

    def cell(timing: dict | None, key: str = "median_s") -> str:
        return "-" if timing is None else f"{timing[key]:.2f}"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{b / a:.2f}x" if a and b else "-"

    def get(side: dict, name: str, key: str = "median_s") -> float | None:
        return side[name][key] if name in side else None

    lines = ["| | tda_jax | kronfluence | speed-up kronfluence / tda_jax |",
             "|---|---:|---:|---:|"]
    names = ["fit", *SCORE_RUNS, *KRONFLUENCE_EXTRA_RUNS]
    for name in names:
        if name not in ot and name not in tt:
            continue
        a, b = get(ot, name), get(tt, name)
        lines.append(f"| {RUN_LABELS[name].format(r=r)} | {cell(ot.get(name))} | "
                     f"{cell(tt.get(name))} | {ratio(a, b)} |")

    def total(side: dict, names: tuple[str, ...], key: str = "median_s") -> float | None:
        if not all(n in side for n in names):
            return None
        return sum(side[n][key] for n in names)

    for names_, label in ((("fit", "sequence"), "**end to end s: fit + sequence scores**"),
                          (("fit", "token"), "**end to end s: fit + per-token scores**"),
                          (("fit", "sequence_lowrank"),
                           f"end to end s: fit + sequence scores at query rank {r}")):
        a, b = total(ot, names_), total(tt, names_)
        if a is not None or b is not None:
            lines.append(f"| {label} | {'-' if a is None else f'{a:.2f}'} | "
                         f"{'-' if b is None else f'{b:.2f}'} | {ratio(a, b)} |")
    a, b = total(ot, ("fit", "sequence"), "first_s"), total(tt, ("fit", "sequence"), "first_s")
    lines.append(f"| first call s (cold: fit + sequence scores, incl. XLA compile) | "
                 f"{'-' if a is None else f'{a:.2f}'} | {'-' if b is None else f'{b:.2f}'} | "
                 f"{ratio(a, b)} |")
    a = total(ot, ("fit", "sequence"), "cpu_median_s")
    b = total(tt, ("fit", "sequence"), "cpu_median_s")
    lines.append(f"| CPU s (all threads) of fit + sequence scores | "
                 f"{'-' if a is None else f'{a:.2f}'} | {'-' if b is None else f'{b:.2f}'} | "
                 f"{ratio(a, b)} |")
    comp = "; ".join(f"{n} {ot[n]['compile_median_s']:.2f} / {ot[n]['first_compile_s']:.2f}"
                     for n in ot)
    lines.append(f"| XLA compile s inside tda_jax's calls (warm median / cold) | {comp} | - | - |")
    lines.append(f"| peak RSS MB (whole process, VmHWM) | {o['peak_rss_mb']:.0f} | "
                 f"{t['peak_rss_mb']:.0f} | - |")
    lines.append(f"| RSS MB before the pipeline (imports + data) | {o['rss_ready_mb']:.0f} | "
                 f"{t['rss_ready_mb']:.0f} | - |")
    lines.append(f"| load average (1 min) at start-end of the process | {_load(o['load'])} | "
                 f"{_load(t['load'])} | - |")

    tokens = s["num_train_tokens"]
    q = s["num_queries"]
    thr = ["| scoring call | queries | tda_jax train tokens/s | kronfluence train tokens/s | "
           "tda_jax query x token pairs/s | kronfluence query x token pairs/s |",
           "|---|---:|---:|---:|---:|---:|"]
    for name in (*SCORE_RUNS, *KRONFLUENCE_EXTRA_RUNS):
        a, b = get(ot, name), get(tt, name)
        if a is None and b is None:
            continue
        nq = s["token_queries"] if name.startswith("token") else q

        def rate(x, scale=1):
            return "-" if x is None else f"{scale * tokens / x:,.0f}"

        thr.append(f"| {RUN_LABELS[name].format(r=r).replace(' s (', ' (')} | {nq} | "
                   f"{rate(a)} | {rate(b)} | {rate(a, nq)} | {rate(b, nq)} |")
    a_full, a_low = get(ot, "sequence"), get(ot, "sequence_lowrank")
    b_full, b_low = get(tt, "sequence"), get(tt, "sequence_lowrank")
    cross = []
    if a_low and b_full:
        cross.append(f"tda_jax at query rank {r} vs kronfluence full rank: "
                     f"{ratio(a_low, b_full)} (sequence level)")
    if a_low and b_low:
        cross.append(f"tda_jax vs kronfluence, both at query rank {r}: {ratio(a_low, b_low)}")
    a_tl, b_t = get(ot, "token_lowrank"), get(tt, "token")
    if a_tl and b_t:
        cross.append(f"per-token, tda_jax at rank {r} vs kronfluence full rank: "
                     f"{ratio(a_tl, b_t)}")
    b_tl = get(tt, "token_lowrank")
    if a_tl and b_tl:
        cross.append(f"per-token, both at rank {r}: {ratio(a_tl, b_tl)}")
    if a_full and a_low:
        cross.append(f"tda_jax's own query batching (sequence level): full rank / rank {r} = "
                     f"{a_full / a_low:.2f}x")

    agree = ["| pair | Pearson min | Pearson median | Spearman min | Spearman median | "
             "LS slope | rel. Frobenius error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, a in run["agreement"]:
        agree.append(f"| {label} | {_corr(a['pearson_min'])} | {_corr(a['pearson_median'])} | "
                     f"{_corr(a['spearman_min'])} | {_corr(a['spearman_median'])} | "
                     f"{a['slope']:.6f} | {a['relative_error']:.1e} |")
    fc = t["forward_check"]
    return "\n".join([
        f"### Timings ({s['num_train']} training sequences x {q} queries; per-token scores for "
        f"the first {s['token_queries']} queries)", "",
        *lines, "",
        f"### Throughput ({tokens} real training tokens, {q} queries, "
        f"{s['num_query_tokens']} query tokens)", "",
        *thr, "",
        "Speed-ups of scoring with query batching: " + "; ".join(cross) + ".", "",
        "### Agreement", "",
        f"Per-query agreement (kronfluence's scores x {KRONFLUENCE_TO_TDA_JAX_SIGN:+.0f}); "
        "per-token rows compare each query's scores over the real training tokens "
        f"({tokens} entries). Forward check before timing: max |logit difference| torch vs JAX "
        f"{fc['max_abs_logit_diff']:.1e} (mean {fc['mean_abs_logit_diff']:.1e}, largest "
        f"|logit| {fc['max_abs_logit']:.1f}) over {fc['positions_checked']} real positions.", "",
        *agree,
    ])


def write_results(path: Path, run: dict) -> None:
    s, o, t = run["settings"], run["tda_jax"], run["kronfluence"]
    m = s["model"]
    damping = ("kronfluence's and tda_jax's default heuristic, 0.1 x mean(lambda) of each layer"
               if s["damping"] is None else f"absolute {s['damping']:g} on both sides")
    used = o.get("damping_used", {})
    used_text = (f" (tda_jax used {min(used.values()):.3g} to {max(used.values()):.3g})"
                 if used else "")
    raw = []
    for side, res in (("tda_jax", o), ("kronfluence", t)):
        raw.append(f"{side}: " + "; ".join(
            f"{n} [{', '.join(f'{x:.2f}' for x in v['all_s'])}]"
            for n, v in res["timings"].items()))
    model_call = (f"`TransformerLM(d_model={m['d_model']}, num_heads={m['num_heads']}, "
                  f"num_layers={m['num_layers']}, d_mlp={m['d_mlp']}, tie_embeddings=False)`")
    corpus_call = (f"`make_fact_corpus(num_entities={s['num_entities']})`" if
                   s["num_entities"] != 48 else "`make_fact_corpus()` (its defaults)")
    trim_text = (
        "Padding: tda_jax runs with `trim_padding=True` (training sequences and queries batched by "
        "real length, each batch's trailing padding cut to a multiple of 8 positions; exact for this "
        "causal model, an algorithmic advantage: kronfluence computes every padded position, "
        f"{s['num_train'] * m['max_len']} positions for {s['num_train_tokens']} real tokens). "
        "tda_jax's compiled steps are built in the cold call and held (`steps=`) for the warm ones."
        if s.get("trim_padding", False) else
        "Padding: both sides compute every padded position (`--no-trim-padding`).")
    text = f"""# Language-model influence: tda_jax vs kronfluence

Date: {run['date']}. Rerun from the repository root (setup in `benchmarks/README.md`):

```
{RERUN_COMMAND}{run['extra_cli']}
```

Setting: the synthetic fact corpus {corpus_call}, {s['num_train']} training sequences
({s['num_train_tokens']} real tokens,
{m['max_len']} positions, vocabulary {m['vocab_size']}), queries = the first {s['num_queries']}
fact queries (half in training order, half flipped; completion log-probability measured on the
completion tokens only); per-token scores (`[Q, N, T]`, full rank costing Q x N x T x parameters
on both sides) for the first {s['token_queries']} of them. Model {model_call},
{s['num_params']} parameters, trained with `tda_jax.training.train` (AdamW, learning rate
{s['learning_rate']:g}, batch {s['train_batch_size_sgd']}, {s['epochs']} epochs,
{s['train_seconds']:.0f} s): train token NLL {s['train_token_nll']:.3f}, next-token accuracy
{s['train_token_accuracy']:.3f}; mean query completion log-probability
{s['query_logp_same']:.2f} (training order) and {s['query_logp_flipped']:.2f} (flipped).

Both sides: EK-FAC, empirical Fisher, float64 eigendecompositions, all training sequences, padding
out of the activation covariances, tracked layers = the {len(o['tracked_layers'])} attention
projections, MLP layers and head (tda_jax `layers=` on {', '.join(
f'`{n}`' for n in o['tracked_layers'][:3])}, ...; kronfluence's
{len(t['tracked_modules'])} `nn.Linear` modules; embedding, positional table and LayerNorms
untracked on both sides), damping {damping}{used_text}. Training loss = summed token NLL per
sequence, measurement = completion log-probability. All {s['num_queries']} queries form one query
batch on both sides (so each scoring call streams over the training set once), training batch size
{s['train_batch_size']}. Query batching: rank {s['query_rank']} (tda_jax `query_rank`, an exact truncated SVD
of each layer's preconditioned query gradient, from the eigendecomposition of its smaller Gram
matrix, expanded to full rank where that is cheaper to score; kronfluence
`query_gradient_low_rank`, by default
`torch.svd_lowrank`, a randomized SVD). The torch twin of the model (`benchmarks/_kronfluence_lm_side.py`)
uses `nn.Linear` query/key/value/out projections holding the flax DenseGeneral kernels reshaped.
{trim_text}

Timing: medians of {run['repeats']} runs after the cold first call; each side runs in its own fresh
process, one after the other. kronfluence's times include its saving of factors and scores to a
scratch directory (part of its pipeline); tda_jax's include the XLA compile seconds that happen
in a warm call (listed separately). **The machine has 2 cores shared with other jobs: wall times
are noisy**; see the load averages.

{format_report(run)}

Versions: tda_jax {run['label']} from `{run['tda_jax_file']}`, jax {o['versions']['jax']}
(devices {', '.join(o['devices'])}), torch {t['versions']['torch']} ({t['torch_threads']} threads),
kronfluence {t['versions']['kronfluence']}, Python {o['versions']['python']}; machine
{run['machine']}{' (' + run['machine_note'] + ')' if run['machine_note'] else ''}; whole run
{run['wall_s'] / 60:.1f} min.

Raw wall seconds per call (first = cold): {' '.join(raw)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reflow_markdown(text))


def _non_default_flags(args: argparse.Namespace) -> str:
    """The setting flags that differ from the defaults, for the rerun line."""
    defaults = vars(_parser().parse_args([]))
    skip = {"machine_note", "output", "kronfluence_python", "side", "problem", "result", "json",
            "from_json", "label", "problem_dir", "side_dir"}
    if args.quick:
        return " --quick" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k in defaults and k not in skip and k != "quick" and k not in QUICK
            and v != defaults[k])
    return "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                   if k in defaults and k not in skip and v != defaults[k])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for development: " + ", ".join(
                            f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--num-entities", type=int, default=48,
                        help="corpus size (48, the corpus's default: 2161 training sequences)")
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--d-mlp", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--train-batch-size-sgd", type=int, default=64)
    parser.add_argument("--damping", default="heuristic",
                        help="'heuristic' (0.1 x mean lambda per layer, both sides) or an "
                             "absolute value")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="training sequences per step when fitting and scoring (both sides)")
    parser.add_argument("--query-batch-size", type=int, default=0,
                        help="queries per batch (0: all queries at once)")
    parser.add_argument("--query-rank", type=int, default=32)
    parser.add_argument("--no-trim-padding", action="store_true",
                        help="tda_jax scores padded positions too (default: trim_padding=True, "
                             "batches by length with trailing padding cut)")
    parser.add_argument("--token-queries", type=int, default=8,
                        help="per-token scores for the first N queries only (0: all); full-rank "
                             "per-token scoring costs Q x N x T x parameters on both sides")
    parser.add_argument("--runs", default=",".join(SCORE_RUNS),
                        help=f"scoring calls timed on both sides, from {SCORE_RUNS}")
    parser.add_argument("--kronfluence-extra-runs", default="",
                        help=f"kronfluence only, from {KRONFLUENCE_EXTRA_RUNS}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-tolerance", type=float, default=1e-3,
                        help="largest |logit difference| torch vs JAX accepted before timing")
    parser.add_argument("--kronfluence-python", default=str(DEFAULT_KRONFLUENCE_PYTHON))
    parser.add_argument("--output", default=None,
                        help=f"markdown file to write ('' to skip; default {DEFAULT_OUTPUT}, "
                             "none with --quick)")
    parser.add_argument("--machine-note", default="")
    parser.add_argument("--json", default="", help="also save this run's results (JSON) here")
    parser.add_argument("--from-json", default="",
                        help="do not run: write the report of this saved JSON")
    parser.add_argument("--label", default="", help="name of this run's tda_jax (default: git)")
    parser.add_argument("--problem-dir", default="",
                        help="cache the trained problem here (same weights across runs)")
    parser.add_argument("--side-dir", default="",
                        help="keep each side's result here; a rerun with the same settings reuses "
                             "a finished side (resume after the other side failed)")
    # Internal: run our side in this (fresh) process.
    parser.add_argument("--side", choices=("tda_jax",), help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    if args.output is None:
        args.output = "" if args.quick else str(DEFAULT_OUTPUT)
    if args.quick:
        defaults = vars(_parser().parse_args([]))
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:  # explicit flags win over the preset
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side == "tda_jax":
        run_tda_jax_side(args.problem, args.result, args.repeats)
        return
    if args.from_json:
        run = json.loads(Path(args.from_json).read_text())
    else:
        run = run_all(args)
        if args.json:
            Path(args.json).write_text(json.dumps(run, indent=1))
            print(f"wrote {args.json}")
    print()
    print(format_report(run))
    if args.output:
        write_results(Path(args.output), run)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
