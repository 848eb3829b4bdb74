"""The LAFTR experiment as stages: FSD accuracy -> continual learning -> influence -> mislabels.

Work directory::

    DIR/fsd/                    perturbation estimates per method and the true FSD
    DIR/continual/<bench>/<m>/  accuracies [seeds, tasks trained, tasks] per method
    DIR/influence/              LDS ground truth and models (experiments/lds stages), scores
    DIR/mislabel/               self-influence and flipped-label mask
    DIR/results.json            "fsd", "continual", "influence", "mislabel", settings, timings
    DIR/fsd.png, continual.png, influence.png

Every config value is checked first (:func:`validate_config`); finished stages are reused on rerun
and a stage holding work made with other settings is refused unless ``--overwrite``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from scipy import stats
from sklearn.metrics import roc_auc_score

from experiments import config_checks as check
from experiments.laftr import continual as cl
from experiments.laftr.configs.default import METHODS
from experiments.lds import pipeline as lds_pipeline
from tda_jax import attribution, data, fsd, losses, models, training
from tda_jax.evaluation import lds, sample_subsets, summarize
from tda_jax.io import Stage, allow_overwrite, write_json

PARTS = ("fsd", "continual", "influence", "mislabel")
FSD_METHODS = ("laftr", "laftr_bernoulli", "ewc", "kfac", "coreset")
DIRECTIONS = ("random", "gradient", "finetune")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field before any work (raises ValueError naming the field)."""
    check.known_fields(config, "", ("seed", "fast_compile", "parts", "data", "fsd", "continual",
                                    "influence"))
    check.integer(config, "seed")
    check.boolean(config, "fast_compile")
    for part in config.parts:
        if part not in PARTS:
            check.fail("parts", tuple(config.parts), f"name parts among {PARTS}")
    check.known_fields(config, "data", ("num_train", "num_test", "seed"))
    check.positive_int(config, "data.num_train")
    check.positive_int(config, "data.num_test")
    check.integer(config, "data.seed")
    f = "fsd"
    check.known_fields(config, f, ("hidden_sizes", "num_epochs", "batch_size", "learning_rate",
                                   "distance", "per_class", "num_random", "num_gradient", "num_finetune",
                                   "min_size", "max_size", "finetune_epochs", "laftr_samples",
                                   "bootstrap"))
    check.int_sequence(config, f"{f}.hidden_sizes")
    for name in ("num_epochs", "batch_size", "num_random", "num_gradient", "num_finetune",
                 "finetune_epochs", "laftr_samples", "bootstrap"):
        check.positive_int(config, f"{f}.{name}")
    check.real(config, f"{f}.learning_rate", minimum=0.0, strict=True)
    check.choice(config, f"{f}.distance", fsd.DISTANCES)
    check.boolean(config, f"{f}.per_class")
    lo = check.real(config, f"{f}.min_size", minimum=0.0, strict=True)
    hi = check.real(config, f"{f}.max_size", minimum=0.0, strict=True)
    if hi < lo:
        check.fail(f"{f}.max_size", hi, f"be >= fsd.min_size ({lo})")
    c = "continual"
    check.known_fields(config, c, ("benchmarks", "num_tasks", "num_seeds", "hidden_sizes",
                                   "batch_size", "learning_rate", "laftr_variant",
                                   "laftr_samples", "coreset_size", "split", "permuted"))
    for bench in config.continual.benchmarks:
        if bench not in ("split", "permuted"):
            check.fail(f"{c}.benchmarks", tuple(config.continual.benchmarks),
                       "name benchmarks among ('split', 'permuted')")
    check.integer(config, f"{c}.num_tasks", minimum=2, maximum=5)
    check.integer(config, f"{c}.num_seeds", minimum=2)
    check.int_sequence(config, f"{c}.hidden_sizes")
    check.positive_int(config, f"{c}.batch_size")
    check.positive_int(config, f"{c}.laftr_samples")
    check.positive_int(config, f"{c}.coreset_size")
    check.real(config, f"{c}.learning_rate", minimum=0.0, strict=True)
    check.choice(config, f"{c}.laftr_variant", fsd.VARIANTS)
    for bench in ("split", "permuted"):
        check.known_fields(config, f"{c}.{bench}", ("epochs", "penalty", "laftr_per_class"))
        check.positive_int(config, f"{c}.{bench}.epochs")
        check.boolean(config, f"{c}.{bench}.laftr_per_class")
        check.known_fields(config, f"{c}.{bench}.penalty", METHODS)
        for m in METHODS:
            check.real(config, f"{c}.{bench}.penalty.{m}", minimum=0.0)
    i = "influence"
    check.known_fields(config, i, ("num_train", "num_test", "num_queries", "hidden_sizes",
                                   "num_epochs", "batch_size", "learning_rate", "weight_decay",
                                   "num_subsets", "fraction", "seeds_per_subset",
                                   "models_per_chunk", "flip_fraction", "per_class",
                                   "hessian_chunk"))
    for name in ("num_train", "num_test", "num_epochs", "batch_size", "seeds_per_subset",
                 "models_per_chunk", "hessian_chunk"):
        check.positive_int(config, f"{i}.{name}")
    check.integer(config, f"{i}.num_queries", minimum=1, maximum=config.influence.num_test)
    check.integer(config, f"{i}.num_subsets", minimum=2)
    check.int_sequence(config, f"{i}.hidden_sizes")
    check.real(config, f"{i}.learning_rate", minimum=0.0, strict=True)
    check.real(config, f"{i}.weight_decay", minimum=0.0)
    check.fraction(config, f"{i}.fraction")
    check.fraction(config, f"{i}.flip_fraction")
    check.boolean(config, f"{i}.per_class")


def ci95(values: np.ndarray) -> dict[str, float]:
    """Mean and the half-width of a Student-t 95% interval over seeds."""
    values = np.asarray(values, np.float64)
    n = values.size
    half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": float(values.mean()), "ci95": half, "values": values.tolist()}


# --- part 1: FSD accuracy ----------------------------------------------------------------------

def _direction_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(tree))))


def _scaled(p0, direction, size: float):
    norm = _direction_norm(direction)
    base = _direction_norm(p0)
    return jax.tree.map(lambda a, u: a + (size * base / norm) * u, p0, direction)


def perturbations(config, model, p0, train: data.Dataset, workdir: Path) -> tuple[list, list]:
    """``(params1 list, direction label list)``: random, gradient and fine-tuning perturbations."""
    c = config.fsd
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed + 1)
    sizes = lambda k: np.exp(rng.uniform(np.log(c.min_size), np.log(c.max_size), k))  # noqa: E731
    out, kinds = [], []
    names = sorted(p0)
    for size in sizes(c.num_random):
        # Random Gaussian directions whose mass is spread over the layers at random.
        weights = rng.dirichlet(np.ones(len(names)))
        key, sub = jax.random.split(key)
        direction = {}
        for name, w, k in zip(names, weights, jax.random.split(sub, len(names))):
            leaves, tree = jax.tree.flatten(p0[name])
            ks = jax.random.split(k, len(leaves))
            direction[name] = jax.tree.unflatten(tree, [
                float(np.sqrt(w)) * jax.random.normal(kk, leaf.shape) / np.sqrt(leaf.size)
                for leaf, kk in zip(leaves, ks)])
        out.append(_scaled(p0, direction, size))
        kinds.append("random")
    apply_fn = models.apply_fn_of(model)
    ce = losses.softmax_cross_entropy()
    n = data.num_examples(train)
    for size in sizes(c.num_gradient):
        # The training-loss gradient on a random batch with shuffled labels (a direction that
        # changes the function where the data lie).
        idx = rng.choice(n, 64, replace=False)
        labels = rng.permutation(np.asarray(train.targets)[idx])
        grad = jax.grad(lambda p: jnp.mean(ce.per_example(apply_fn(p, train.inputs[idx]),
                                                          labels)))(p0)
        out.append(_scaled(p0, jax.tree.map(jnp.negative, grad), size))
        kinds.append("gradient")
    # Fine-tuning on another task (the inputs with their positions reversed), saved along the
    # trajectory.
    other = data.Dataset(np.asarray(train.inputs)[:, ::-1].copy(), train.targets,
                         train.num_classes)
    cfg = training.TrainConfig(num_epochs=c.finetune_epochs, batch_size=c.batch_size,
                               learning_rate=c.learning_rate)
    total = c.finetune_epochs * (-(-n // c.batch_size))
    steps = sorted({max(1, int(round(s))) for s in np.geomspace(1, total, c.num_finetune)})
    ckpt = workdir / "fsd" / "finetune_checkpoints"
    training.train(jax.random.key(config.seed + 2), model, {"params": p0}, other, cfg,
                   checkpoint_steps=steps, checkpoint_dir=ckpt)
    for step in steps:
        out.append(training.load_params(ckpt, step, {"params": p0})["params"])
        kinds.append("finetune")
    return out, kinds


def run_fsd(config, workdir: Path, train: data.Dataset) -> dict[str, Any]:
    c = config.fsd
    stage = Stage(workdir / "fsd", {"seed": config.seed, "data": config.data.to_dict(),
                                     "fsd": c.to_dict()})
    model = models.MLP(hidden_sizes=tuple(c.hidden_sizes), num_outputs=10)
    if stage.is_complete():
        arrays = stage.load_arrays("estimates")
    else:
        cfg = training.TrainConfig(num_epochs=c.num_epochs, batch_size=c.batch_size,
                                   learning_rate=c.learning_rate)
        p0 = training.train(jax.random.key(config.seed), model, None, train, cfg)["params"]
        params1, kinds = perturbations(config, model, p0, train, workdir)
        summary = fsd.summarize(model, p0, train, per_class=c.per_class)
        d = int(np.prod(train.inputs.shape[1:]))
        laftr_stored = summary.num_stored(c.distance)
        coreset = fsd.select_coreset(jax.random.key(config.seed + 3), train,
                                     max(1, math.ceil(laftr_stored / d)))
        curv = {m: fsd.fit_quadratic(model, p0, train, strategy=s, distance=c.distance)
                for m, s in (("ewc", "diagonal"), ("kfac", "kfac"))}
        apply_fn = fsd.HeadApply(model)
        estimators = {
            "true": lambda p1: fsd.true_fsd(apply_fn, p0, p1, train.inputs, distance=c.distance,
                                            batch_size=1000),
            "laftr": lambda p1: fsd.laftr_fsd(summary, p0, p1, distance=c.distance),
            "laftr_bernoulli": lambda p1: fsd.laftr_fsd(
                summary, p0, p1, variant="bernoulli", distance=c.distance,
                key=jax.random.key(7), num_samples=c.laftr_samples),
            "ewc": lambda p1: fsd.quadratic_fsd(curv["ewc"], p0, p1),
            "kfac": lambda p1: fsd.quadratic_fsd(curv["kfac"], p0, p1),
            "coreset": lambda p1: fsd.true_fsd(apply_fn, p0, p1, coreset.inputs,
                                               distance=c.distance),
        }
        values = {name: np.array([float(jax.jit(fn)(p1)) for p1 in params1])
                  for name, fn in estimators.items()}
        arrays = {**values, "kinds": np.array([DIRECTIONS.index(k) for k in kinds]),
                  "sizes": np.array([_direction_norm(jax.tree.map(jnp.subtract, p1, p0))
                                     for p1 in params1]),
                  "stored": np.array([laftr_stored, laftr_stored,
                                      fsd.quadratic_num_stored(curv["ewc"]),
                                      fsd.quadratic_num_stored(curv["kfac"]),
                                      coreset.inputs.size])}
        stage.save_arrays("estimates", arrays)
        stage.mark_complete()
    truth = arrays["true"]
    rng = np.random.default_rng(0)
    result, by_direction, stored = {}, {}, {}
    for i, name in enumerate(FSD_METHODS):
        est = arrays[name]
        boot = []
        for _ in range(c.bootstrap):
            idx = rng.integers(0, truth.size, truth.size)
            boot.append(stats.spearmanr(est[idx], truth[idx])[0])
        lo, hi = np.nanpercentile(boot, [2.5, 97.5])
        result[name] = {"spearman": float(stats.spearmanr(est, truth)[0]),
                        "relative_error": float(np.median(np.abs(est - truth) / truth)),
                        "spearman_bootstrap95": [float(lo), float(hi)],
                        "numbers_stored": int(arrays["stored"][i])}
        by_direction[name] = {
            kind: float(stats.spearmanr(est[arrays["kinds"] == j], truth[arrays["kinds"] == j])[0])
            for j, kind in enumerate(DIRECTIONS) if np.sum(arrays["kinds"] == j) > 2}
        stored[name] = int(arrays["stored"][i])
    return {"fsd": result, "fsd_by_direction": by_direction, "_arrays": arrays}


# --- part 2: continual learning ---------------------------------------------------------------

def run_continual(config, workdir: Path, train, test) -> dict[str, Any]:
    c = config.continual
    out: dict[str, Any] = {}
    matrices = {}
    for bench in c.benchmarks:
        b = c[bench]
        tasks = cl.make_tasks(bench, train, test, c.num_tasks, config.seed)
        out[bench] = {}
        for method in METHODS:
            settings = ml_collections.ConfigDict({
                "learning_rate": c.learning_rate, "batch_size": c.batch_size,
                "epochs": b.epochs, "penalty": b.penalty.to_dict(),
                "laftr_per_class": b.laftr_per_class, "laftr_variant": c.laftr_variant,
                "laftr_samples": c.laftr_samples, "coreset_size": c.coreset_size})
            stage = Stage(workdir / "continual" / bench / method, {
                "seed": config.seed, "data": config.data.to_dict(), "method": method,
                "num_tasks": c.num_tasks, "num_seeds": c.num_seeds,
                "hidden_sizes": list(c.hidden_sizes), "settings": settings.to_dict()})
            if stage.is_complete():
                acc = stage.load_arrays("accuracy")["accuracy"]
            else:
                began = time.perf_counter()
                runner = cl.ContinualRunner(method, tuple(c.hidden_sizes), tasks, settings)
                acc = runner.run(jax.random.key(config.seed), c.num_seeds)
                stage.save_arrays("accuracy", {"accuracy": acc})
                stage.mark_complete()
                logging.info("continual %s/%s: %.1f s", bench, method,
                             time.perf_counter() - began)
            final = acc[:, -1].mean(axis=1)  # average accuracy over all tasks after the last
            out[bench][method] = ci95(final)
            matrices[(bench, method)] = acc
    return {"continual": out, "_matrices": matrices}


# --- part 3: influence and mislabels -----------------------------------------------------------

def _lds_config(config) -> ml_collections.ConfigDict:
    """The experiments/lds config of the influence part (its stages and ground truth)."""
    i = config.influence
    lds_config = ml_collections.ConfigDict({
        "seed": config.seed, "fast_compile": config.fast_compile,
        "data": {"name": "mnist1d", "num_train": i.num_train, "num_test": i.num_test,
                 "seed": config.data.seed},
        "num_queries": i.num_queries,
        "model": {"name": "mlp", "hidden_sizes": tuple(i.hidden_sizes)},
        "train": {"num_epochs": i.num_epochs, "batch_size": i.batch_size,
                  "learning_rate": i.learning_rate, "weight_decay": i.weight_decay,
                  "optimizer": "adamw"},
        "lds": {"num_subsets": i.num_subsets, "fraction": i.fraction,
                "seeds_per_subset": i.seeds_per_subset, "models_per_chunk": i.models_per_chunk},
        "methods": {"ekfac": {"strategy": "ekfac", "fisher": "expected", "damping": None,
                              "ensemble_size": 1}},
        "exact_max_params": 1, "curvature_batch_size": 256, "query_batch_size": 100,
        "train_batch_size": 500})
    lds_pipeline.validate_config(lds_config)
    return lds_config


def run_influence(config, workdir: Path) -> dict[str, Any]:
    lds_config = _lds_config(config)
    root = workdir / "influence"
    problem = lds_pipeline.make_problem(lds_config)
    reused: list[str] = []
    models_stage, score_stages = lds_pipeline.open_stages(lds_config, root, problem,
                                                          lds_config.methods)
    masks = sample_subsets(problem.subset_key, data.num_examples(problem.train),
                           lds_config.lds.num_subsets, lds_config.lds.fraction)
    truth = lds_pipeline.ground_truth_stage(lds_config, root, problem, masks, reused)
    members = lds_pipeline.full_data_models_stage(models_stage, problem, reused)
    ekfac = lds_pipeline.scores_stage(lds_config, "ekfac", lds_config.methods.ekfac,
                                      score_stages["ekfac"], problem, members, {}, reused)
    stage = Stage(root / "laftr_scores", {"lds": lds_config.to_dict(),
                                          "per_class": config.influence.per_class,
                                          "hessian_chunk": config.influence.hessian_chunk})
    if stage.is_complete():
        laftr_scores = stage.load_arrays("scores")["scores"]
    else:
        params = members[0]["params"]
        summary = fsd.summarize(problem.model, params, problem.train,
                                per_class=config.influence.per_class)
        hessian = fsd.laftr_hessian(summary, params, distance="kl",
                                    chunk=config.influence.hessian_chunk)
        laftr_scores = fsd.pbrf_scores(problem.apply_fn, params, hessian, problem.queries,
                                       problem.train, loss=problem.loss,
                                       measurement=problem.measurement)
        stage.save_arrays("scores", {"scores": laftr_scores})
        stage.mark_complete()
    per_query = {"laftr": lds(laftr_scores, masks, truth), "ekfac": lds(ekfac, masks, truth)}
    out = {name: summarize(v).to_dict() for name, v in per_query.items()}
    return {"influence": {"lds": out["laftr"], "lds_ekfac": out["ekfac"],
                          "num_params": problem.num_params}}


def run_mislabel(config, workdir: Path) -> dict[str, Any]:
    i = config.influence
    stage = Stage(workdir / "mislabel", {"seed": config.seed, "influence": i.to_dict(),
                                         "data_seed": config.data.seed})
    if stage.is_complete():
        arrays = stage.load_arrays("self_influence")
    else:
        train, _ = data.load_mnist1d(i.num_train, i.num_test, seed=config.data.seed)
        rng = np.random.default_rng(config.seed + 11)
        n = data.num_examples(train)
        flipped = np.zeros(n, bool)
        flipped[rng.choice(n, int(round(i.flip_fraction * n)), replace=False)] = True
        labels = np.asarray(train.targets).copy()
        labels[flipped] = (labels[flipped] + rng.integers(1, 10, flipped.sum())) % 10
        noisy = data.Dataset(train.inputs, labels.astype(np.int32), 10)
        model = models.MLP(hidden_sizes=tuple(i.hidden_sizes), num_outputs=10)
        loss = losses.softmax_cross_entropy()
        cfg = training.TrainConfig(num_epochs=i.num_epochs, batch_size=i.batch_size,
                                   learning_rate=i.learning_rate, weight_decay=i.weight_decay)
        params = training.train(jax.random.key(config.seed + 12), model, None, noisy,
                                cfg)["params"]
        summary = fsd.summarize(model, params, noisy, per_class=i.per_class)
        hessian = fsd.laftr_hessian(summary, params, distance="kl", chunk=i.hessian_chunk)
        apply_fn = models.apply_fn_of(model)
        laftr_self = fsd.pbrf_self_influence(apply_fn, params, hessian, noisy, loss=loss)
        curvature = attribution.fit_curvature(apply_fn, params, noisy, strategy="ekfac",
                                              loss=loss)
        ekfac_self = np.asarray(attribution.self_scores(apply_fn, params, curvature, noisy,
                                                        loss=loss))
        arrays = {"laftr": laftr_self, "ekfac": ekfac_self, "flipped": flipped}
        stage.save_arrays("self_influence", arrays)
        stage.mark_complete()
    flipped = arrays["flipped"].astype(bool)
    return {"mislabel": {"auroc": float(roc_auc_score(flipped, arrays["laftr"])),
                         "auroc_ekfac": float(roc_auc_score(flipped, arrays["ekfac"])),
                         "num_flipped": int(flipped.sum())}, "_mislabel": arrays}


# --- figures and driver ------------------------------------------------------------------------

def _figures(workdir: Path, results: dict, extras: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if "fsd" in results:
        arrays = extras["fsd"]
        figure = Figure(figsize=(4.0 * (len(FSD_METHODS) + 1), 3.8), dpi=120)
        FigureCanvasAgg(figure)
        truth = arrays["true"]
        for k, name in enumerate(FSD_METHODS):
            ax = figure.add_subplot(1, len(FSD_METHODS) + 1, k + 1)
            for j, kind in enumerate(DIRECTIONS):
                sel = arrays["kinds"] == j
                ax.loglog(truth[sel], arrays[name][sel], "o", ms=4, label=kind)
            lim = [truth.min() * 0.5, truth.max() * 2]
            ax.plot(lim, lim, "k--", lw=0.8)
            r = results["fsd"][name]
            ax.set_title(f"{name}: rho={r['spearman']:.3f}")
            ax.set_xlabel("true FSD (all training data)")
            ax.set_ylabel(f"{name} estimate")
            ax.legend(fontsize=7)
        ax = figure.add_subplot(1, len(FSD_METHODS) + 1, len(FSD_METHODS) + 1)
        vals = [results["fsd"][n]["spearman"] for n in FSD_METHODS]
        lo = [v - results["fsd"][n]["spearman_bootstrap95"][0] for v, n in zip(vals, FSD_METHODS)]
        hi = [results["fsd"][n]["spearman_bootstrap95"][1] - v for v, n in zip(vals, FSD_METHODS)]
        ax.bar(range(len(vals)), vals, yerr=[lo, hi], capsize=4)
        ax.set_xticks(range(len(vals)), FSD_METHODS, rotation=30, fontsize=8)
        ax.set_ylabel("Spearman with true FSD (bootstrap 95%)")
        ax.set_xlabel("method")
        figure.tight_layout()
        figure.savefig(workdir / "fsd.png")
    if "continual" in results:
        benches = list(results["continual"])
        figure = Figure(figsize=(5.0 * len(benches), 3.8), dpi=120)
        FigureCanvasAgg(figure)
        for k, bench in enumerate(benches):
            ax = figure.add_subplot(1, len(benches), k + 1)
            entries = results["continual"][bench]
            ax.bar(range(len(entries)), [e["mean"] for e in entries.values()],
                   yerr=[e["ci95"] for e in entries.values()], capsize=4)
            ax.set_xticks(range(len(entries)), list(entries), rotation=30)
            ax.set_ylabel("accuracy on all tasks after the last\n(mean, 95% CI over seeds)")
            ax.set_xlabel("method")
            ax.set_title(f"{bench} MNIST-1D")
            lo = min(e["mean"] - e["ci95"] for e in entries.values())
            ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        figure.tight_layout()
        figure.savefig(workdir / "continual.png")
    if "influence" in results or "mislabel" in results:
        figure = Figure(figsize=(8.0, 3.8), dpi=120)
        FigureCanvasAgg(figure)
        if "influence" in results:
            ax = figure.add_subplot(1, 2, 1)
            entries = {"LAFTR-PBRF": results["influence"]["lds"],
                       "EK-FAC": results["influence"]["lds_ekfac"]}
            ax.bar(range(2), [e["mean"] for e in entries.values()],
                   yerr=[e["ci95"] for e in entries.values()], capsize=4)
            ax.set_xticks(range(2), list(entries))
            ax.set_ylabel("LDS (95% CI over queries)")
            ax.set_xlabel("method")
        if "mislabel" in results:
            from sklearn.metrics import roc_curve
            ax = figure.add_subplot(1, 2, 2)
            arrays = extras["mislabel"]
            for name in ("laftr", "ekfac"):
                fpr, tpr, _ = roc_curve(arrays["flipped"].astype(bool), arrays[name])
                auc = roc_auc_score(arrays["flipped"].astype(bool), arrays[name])
                ax.plot(fpr, tpr, label=f"{name} self-influence (AUROC {auc:.3f})")
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate (flipped labels)")
            ax.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(workdir / "influence.png")


def run(config: ml_collections.ConfigDict, workdir: str | Path,
        overwrite: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the parts named in ``config.parts``; writes ``results.json`` + figures."""
    validate_config(config)
    with allow_overwrite(overwrite):
        return _run(config, Path(workdir))


def _run(config, workdir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    train, test = data.load_mnist1d(config.data.num_train, config.data.num_test,
                                    seed=config.data.seed)
    results: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    timings = {}
    for part in PARTS:
        if part not in config.parts:
            continue
        began = time.perf_counter()
        if part == "fsd":
            out = run_fsd(config, workdir, train)
            extras["fsd"] = out.pop("_arrays")
        elif part == "continual":
            out = run_continual(config, workdir, train, test)
            out.pop("_matrices")
        elif part == "influence":
            out = run_influence(config, workdir)
        else:
            out = run_mislabel(config, workdir)
            extras["mislabel"] = out.pop("_mislabel")
        results.update(out)
        timings[part] = time.perf_counter() - began
        logging.info("%s done in %.1f s", part, timings[part])
    results["settings"] = {"config": config.to_dict(),
                           "ci95": "continual: Student-t 95% half-width over seeds; influence: "
                                   "1.96 std / sqrt(num_queries)",
                           "relative_error": "median over perturbations of |est - true| / true"}
    results["timings_s"] = {**timings, "total": time.perf_counter() - start}
    write_json(workdir / "results.json", results)
    _figures(workdir, results, extras)
    return results
