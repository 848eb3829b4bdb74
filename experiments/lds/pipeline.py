"""The LDS experiment as persistent stages: models -> ground truth -> scores per method -> LDS.

Work directory layout (every stage is a :class:`tda_jax.io.Stage` with its saved arguments)::

    DIR/ground_truth/     retrained measurements [num_subsets, seeds, num_queries], by chunks
    DIR/models/           the models trained on the full data (member 0 is "the" model)
    DIR/scores/<method>/  scores [num_queries, num_train] per ensemble member (member_k.npz)
    DIR/results.json      LDS per method, noise ceiling, settings, timings
    DIR/lds.png           bar chart with 95% CIs and the noise ceiling
    DIR/lds_per_query.npz per-query LDS of every method and the per-query ceiling

Every config value is checked first (:func:`validate_config`), so a typo fails in seconds. A rerun
reuses every finished stage (and finished chunks or ensemble members of an interrupted one). Every
stage's arguments are checked before any work starts, so a changed setting of a stage holding
finished work raises :class:`tda_jax.io.ArgumentMismatchError` naming it (``overwrite=True``, the
``--overwrite`` flag, recomputes such stages instead), and ``results.json`` is only rewritten after
every stage agreed with the configuration. A stage with no finished work is simply restarted.

Several processes (``python -m launch.local --num_processes=2 -- experiments.lds.main ...``): every
process runs this pipeline; the library's drivers split retraining, curvature passes and scoring
over the global device mesh and return the same values everywhere, and process 0 writes the files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments import config_checks as check
from tda_jax import attribution, data, losses, models, training
from tda_jax.curvature import FISHER_TYPES
from tda_jax.curvature.blocks import get_block, registered_blocks
from tda_jax.evaluation import (
    lds,
    noise_ceiling,
    retrain_ground_truth,
    sample_subsets,
    summarize,
)
from tda_jax.evaluation.figures import plot_lds_bars
from tda_jax.io import Stage, allow_overwrite, write_json, write_npz
from tda_jax.progress import progress
from tda_jax.sharding import is_main_process
from tda_jax.training.config import OPTIMIZERS

DATA_NAMES = ("mnist1d",)
MODEL_NAMES = ("mlp",)
_METHOD_FIELDS = ("strategy", "fisher", "damping", "ensemble_size")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every value of the experiment's config before any stage runs.

    Raises:
      ValueError: naming the first offending field (``config.methods.kfac.strategy``), its value
        and what it must be (e.g. the registered curvature strategies).
    """
    check.known_fields(config, "", ("seed", "fast_compile", "data", "num_queries", "model",
                                    "train", "lds", "methods", "exact_max_params",
                                    "curvature_batch_size", "query_batch_size",
                                    "train_batch_size"))
    check.integer(config, "seed")
    check.boolean(config, "fast_compile")
    check.known_fields(config, "data", ("name", "num_train", "num_test", "seed"))
    check.choice(config, "data.name", DATA_NAMES)
    check.positive_int(config, "data.num_train")
    num_test = check.positive_int(config, "data.num_test")
    check.integer(config, "data.seed")
    check.integer(config, "num_queries", minimum=1, maximum=num_test)
    check.known_fields(config, "model", ("name", "hidden_sizes"))
    check.choice(config, "model.name", MODEL_NAMES)
    check.int_sequence(config, "model.hidden_sizes")
    check.known_fields(config, "train", ("num_epochs", "batch_size", "learning_rate",
                                         "weight_decay", "optimizer"))
    check.positive_int(config, "train.num_epochs")
    check.positive_int(config, "train.batch_size")
    check.real(config, "train.learning_rate", minimum=0.0, strict=True)
    check.real(config, "train.weight_decay", minimum=0.0)
    check.choice(config, "train.optimizer", OPTIMIZERS)
    check.known_fields(config, "lds", ("num_subsets", "fraction", "seeds_per_subset",
                                       "models_per_chunk"))
    # Spearman correlations over subsets need at least two subsets.
    check.integer(config, "lds.num_subsets", minimum=2)
    check.fraction(config, "lds.fraction")
    check.positive_int(config, "lds.seeds_per_subset")
    check.positive_int(config, "lds.models_per_chunk")
    if not check.get(config, "methods"):
        check.fail("methods", check.get(config, "methods"), "name at least one method")
    for name in config.methods:
        field = f"methods.{name}"
        check.known_fields(config, field, _METHOD_FIELDS)
        strategy = check.choice(config, f"{field}.strategy", registered_blocks())
        check.choice(config, f"{field}.fisher", FISHER_TYPES)
        damping = check.real(config, f"{field}.damping", minimum=0.0, allow_none=True)
        if damping is not None and not get_block(strategy).accepts_damping:
            check.fail(f"{field}.damping", damping,
                       f"strategy {strategy!r} has no curvature to damp; set it to None")
        check.positive_int(config, f"{field}.ensemble_size")
    check.positive_int(config, "exact_max_params")
    for field in ("curvature_batch_size", "query_batch_size", "train_batch_size"):
        check.positive_int(config, field)


def load_data(config: ml_collections.ConfigDict) -> tuple[data.Dataset, data.Dataset]:
    """The ``(train, test)`` datasets that ``config.data`` names."""
    if config.name == "mnist1d":
        return data.load_mnist1d(config.num_train, config.num_test, seed=config.seed)
    raise ValueError(f"config.data.name must be 'mnist1d', got {config.name!r}")


def make_model(config: ml_collections.ConfigDict, num_outputs: int):
    """The Flax module that ``config.model`` names."""
    if config.name == "mlp":
        return models.MLP(hidden_sizes=tuple(config.hidden_sizes), num_outputs=num_outputs)
    raise ValueError(f"config.model.name must be 'mlp', got {config.name!r}")


def _train_config(config: ml_collections.ConfigDict, loss: losses.Loss) -> training.TrainConfig:
    return training.TrainConfig(
        num_epochs=config.num_epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        optimizer=config.optimizer,
        loss=loss,
    )


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _unflatten(template: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(arrays[jax.tree_util.keystr(path)]) for path, _ in paths]
    )


def _read_seconds(directory: Path) -> float | None:
    """Compute time recorded by a stage (reported again when the stage is reused)."""
    path = Path(directory) / "timing.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def _write_seconds(stage: Stage, seconds: float) -> None:
    if is_main_process():
        write_json(stage.path("timing.json"), {"seconds": seconds})


_STRATEGY_ORDER = ("identity", "diagonal", "kfac", "ekfac", "exact")


def _method_order(item: tuple[str, ml_collections.ConfigDict]) -> tuple:
    """Cheapest curvature first, ensembles after single models (the figure's bar order)."""
    name, method = item
    rank = _STRATEGY_ORDER.index(method.strategy) if method.strategy in _STRATEGY_ORDER else 99
    return (method.ensemble_size > 1, rank, name)


def _exact_skip_reason(config: ml_collections.ConfigDict, num_params: int) -> str | None:
    if num_params > config.exact_max_params:
        return (
            f"the model has {num_params} parameters, above config.exact_max_params = "
            f"{config.exact_max_params} (the exact curvature is a dense [P, P] matrix)"
        )
    return None


class Problem(NamedTuple):
    """Everything the stages share: data, queries, model, loss and the keys of each stage."""

    train: data.Dataset
    test: data.Dataset
    queries: data.Dataset
    query_index: np.ndarray
    model: Any
    apply_fn: models.ModelApply
    loss: losses.Loss
    measurement: Callable
    train_config: training.TrainConfig
    template: Any
    num_params: int
    subset_key: jax.Array
    retrain_key: jax.Array
    model_key: jax.Array
    common: dict
    query_arguments: dict


def make_problem(config: ml_collections.ConfigDict) -> Problem:
    """Loads the data, draws the queries, builds the model, loss and measurement."""
    train, test = load_data(config.data)
    num_test = data.num_examples(test)
    if not 0 < config.num_queries <= num_test:
        raise ValueError(f"config.num_queries must be in 1..{num_test}, got {config.num_queries}")
    key = jax.random.key(config.seed)
    query_key, subset_key, retrain_key, model_key = jax.random.split(key, 4)
    query_index = np.sort(
        np.asarray(jax.random.choice(query_key, num_test, (config.num_queries,), replace=False))
    )
    classification = train.num_classes is not None
    loss = losses.get_loss("cross_entropy" if classification else "mse")
    # Margin for classification; for regression the per-example loss itself.
    measurement = losses.classification_margin if classification else loss.per_example
    num_outputs = train.num_classes if classification else int(np.prod(train.targets.shape[1:]))
    model = make_model(config.model, num_outputs)
    train_config = _train_config(config.train, loss)
    template = model.init(jax.random.key(0), jnp.asarray(train.inputs[:1]))
    return Problem(
        train=train,
        test=test,
        queries=data.subset(test, query_index),
        query_index=query_index,
        model=model,
        apply_fn=models.apply_fn_of(model),
        loss=loss,
        measurement=measurement,
        train_config=train_config,
        template=template,
        num_params=sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(template)),
        subset_key=subset_key,
        retrain_key=retrain_key,
        model_key=model_key,
        common={
            "seed": config.seed,
            "data": config.data.to_dict(),
            "model": config.model.to_dict(),
            "train": train_config.to_dict(),
        },
        query_arguments={"num_queries": config.num_queries, "query_index": query_index.tolist()},
    )


def select_methods(
    config: ml_collections.ConfigDict, num_params: int
) -> tuple[dict[str, ml_collections.ConfigDict], dict[str, str]]:
    """The methods that run (in the figure's order) and the skipped ones with their reasons."""
    skipped: dict[str, str] = {}
    methods: dict[str, ml_collections.ConfigDict] = {}
    for name, method in sorted(config.methods.items(), key=_method_order):
        reason = _exact_skip_reason(config, num_params) if method.strategy == "exact" else None
        if reason is None:
            methods[name] = method
        else:
            skipped[name] = reason
            logging.info("skipping %s: %s", name, reason)
    return methods, skipped


def open_stages(
    config: ml_collections.ConfigDict, workdir: Path, problem: Problem,
    methods: Mapping[str, ml_collections.ConfigDict],
) -> tuple[Stage, dict[str, Stage]]:
    """Opens the models stage and every score stage first, so a mismatched setting fails before
    any work is done."""
    num_models = max([m.ensemble_size for m in methods.values()] + [1])
    models_arguments = {**problem.common, "num_models": num_models}
    models_stage = Stage(workdir / "models", models_arguments)
    score_stages = {
        name: Stage(
            workdir / "scores" / name,
            {
                "method": method.to_dict(),
                "models": models_arguments,
                "queries": problem.query_arguments,
                "loss": problem.loss.name,
                "measurement": problem.measurement.__name__,
                "curvature_batch_size": config.curvature_batch_size,
                "query_batch_size": config.query_batch_size,
                "train_batch_size": config.train_batch_size,
            },
        )
        for name, method in methods.items()
    }
    return models_stage, score_stages


def ground_truth_stage(
    config: ml_collections.ConfigDict, workdir: Path, problem: Problem, masks: np.ndarray,
    reused: list[str],
) -> np.ndarray:
    """Retrains on random subsets (``workdir/ground_truth``; checks its own saved arguments)."""
    directory = workdir / "ground_truth"
    if (directory / "COMPLETE").exists():
        reused.append("ground_truth")
    return retrain_ground_truth(
        problem.retrain_key,
        problem.model,
        problem.train,
        problem.queries,
        masks,
        seeds_per_subset=config.lds.seeds_per_subset,
        config=problem.train_config,
        measurement=problem.measurement,
        directory=directory,
        models_per_chunk=config.lds.models_per_chunk,
        arguments={**problem.common, "lds": config.lds.to_dict(),
                   "queries": problem.query_arguments},
    )


def full_data_models_stage(stage: Stage, problem: Problem, reused: list[str]) -> list[Any]:
    """The models trained on the full data (several seeds for ensembles); member 0 is "the"
    model. Returns each member's variables."""
    num_models = stage.arguments["num_models"]
    if stage.is_complete():
        reused.append("models")
        stacked = _unflatten(problem.template, stage.load_arrays("params"))
    else:
        began = time.perf_counter()
        logging.info("training %d models on the full data", num_models)
        stacked = training.train_many(
            jax.random.split(problem.model_key, num_models),
            problem.model,
            problem.train,
            np.ones((num_models, data.num_examples(problem.train)), dtype=bool),
            problem.train_config,
        )
        stage.save_arrays("params", _flatten(stacked))
        _write_seconds(stage, time.perf_counter() - began)
        stage.mark_complete()
    return [jax.tree.map(lambda leaf, k=k: leaf[k], stacked) for k in range(num_models)]


def _member_scores(config: ml_collections.ConfigDict, problem: Problem, method, variables,
                   k: int) -> np.ndarray:
    """Influence scores ``[num_queries, num_train]`` of one full-data model (member ``k``)."""
    curvature = attribution.fit_curvature(
        problem.apply_fn,
        variables["params"],
        problem.train,
        strategy=method.strategy,
        loss=problem.loss,
        fisher=method.fisher,
        damping=method.damping,
        batch_size=config.curvature_batch_size,
        key=jax.random.fold_in(problem.model_key, k),
    )
    return np.asarray(
        attribution.pairwise_scores(
            problem.apply_fn,
            variables["params"],
            curvature,
            problem.queries,
            problem.train,
            loss=problem.loss,
            measurement=problem.measurement,
            query_batch_size=config.query_batch_size,
            train_batch_size=config.train_batch_size,
        ),
        dtype=np.float32,
    )


def scores_stage(
    config: ml_collections.ConfigDict, name: str, method: ml_collections.ConfigDict, stage: Stage,
    problem: Problem, members: list[Any], computed: dict[tuple, np.ndarray], reused: list[str],
) -> np.ndarray:
    """One method's scores, averaged over its ensemble members (each saved as ``member_k``).

    ``computed`` maps ``(strategy, fisher, damping, member)`` to scores, so an ensemble reuses
    the single-model run of the same method.
    """
    if stage.is_complete():
        reused.append(f"scores/{name}")
    member_scores = []
    began = time.perf_counter()
    for k in range(method.ensemble_size):
        cache_key = (method.strategy, method.fisher, method.damping, k)
        member = f"member_{k}"
        if stage.has(member):
            values = stage.load_arrays(member)["scores"]
        elif cache_key in computed:
            values = computed[cache_key]
            stage.save_arrays(member, {"scores": values})
        else:
            logging.info("%s: scores of model %d", name, k)
            values = _member_scores(config, problem, method, members[k], k)
            stage.save_arrays(member, {"scores": values})
        computed[cache_key] = values
        member_scores.append(values)
    if not stage.is_complete():
        _write_seconds(stage, time.perf_counter() - began)
        stage.mark_complete()
    # Averaging scores over models trained with different seeds (an ensemble of influence
    # estimates) smooths out each model's idiosyncrasies.
    return np.mean(member_scores, axis=0)


def lds_results(
    config: ml_collections.ConfigDict, problem: Problem, scores: Mapping[str, np.ndarray],
    masks: np.ndarray, ground_truth: np.ndarray, test_metrics: list[dict[str, float]],
    skipped: dict[str, str], timings: dict[str, float | None], reused: list[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The results dictionary and the per-query arrays (LDS of each method, noise ceiling)."""
    per_query = {name: lds(values, masks, ground_truth) for name, values in scores.items()}
    ceiling = noise_ceiling(ground_truth) if ground_truth.shape[1] >= 2 else None
    classification = problem.train.num_classes is not None
    results = {
        "lds": {name: summarize(values).to_dict() for name, values in per_query.items()},
        "noise_ceiling": summarize(ceiling.ceiling).to_dict() if ceiling else None,
        "seed_correlation": summarize(ceiling.seed_correlation).to_dict() if ceiling else None,
        "skipped": skipped,
        "settings": {
            "config": config.to_dict(),
            "num_params": problem.num_params,
            "num_train": data.num_examples(problem.train),
            "num_queries": config.num_queries,
            "task": "classification" if classification else "regression",
            "measurement": problem.measurement.__name__,
            "loss": problem.loss.name,
            "ci95": "1.96 * std / sqrt(num_queries) over per-query Spearman correlations",
            "noise_ceiling": "sqrt of the Spearman-Brown reliability of the seed-mean ground truth",
        },
        "models": {
            "test_accuracy": [float(m["accuracy"]) for m in test_metrics],
            "test_loss": [float(m["loss"]) for m in test_metrics],
        },
        "timings_s": timings,
        "stages_reused": reused,
    }
    arrays = {f"lds/{name}": values for name, values in per_query.items()}
    if ceiling is not None:
        arrays["noise_ceiling"] = ceiling.ceiling
    return results, arrays


def write_outputs(config: ml_collections.ConfigDict, workdir: Path, results: dict[str, Any],
                  arrays: dict[str, np.ndarray]) -> None:
    """``results.json``, ``lds_per_query.npz`` and the bar chart ``lds.png`` (written by process 0
    of a multi-process run)."""
    if not is_main_process():
        return
    write_json(workdir / "results.json", results)
    write_npz(workdir / "lds_per_query.npz", arrays)
    plot_lds_bars(
        results["lds"],
        workdir / "lds.png",
        noise_ceiling=results["noise_ceiling"],
        title=(
            f"LDS on {config.data.name} ({results['settings']['num_train']} train, "
            f"{config.num_queries} queries, {config.lds.num_subsets} subsets x "
            f"{config.lds.seeds_per_subset} seeds)"
        ),
    )
    logging.info("LDS: %s", json.dumps(results["lds"]))


def run(config: ml_collections.ConfigDict, workdir: str | Path,
        overwrite: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the LDS experiment and writes ``workdir/results.json`` and the figure.

    Order: :func:`validate_config`, then open every stage (settings checked first), ground truth,
    full-data models, scores per method, LDS and outputs.

    Args:
      config: see ``experiments/lds/configs/default.py``.
      workdir: the work directory; its finished stages are reused.
      overwrite: recompute stages whose finished work was made with other settings (deleting it;
        each is logged) instead of raising. Stages with the same settings are still reused.

    Returns:
      The results dictionary written to ``results.json``.

    Raises:
      ValueError: naming an invalid config field, before any work.
      tda_jax.io.ArgumentMismatchError: if a stage in ``workdir`` holds finished work made with
        other settings and ``overwrite`` is false.
    """
    validate_config(config)
    with allow_overwrite(overwrite):
        return _run(config, Path(workdir))


def _run(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []
    problem = make_problem(config)
    methods, skipped = select_methods(config, problem.num_params)
    models_stage, score_stages = open_stages(config, workdir, problem, methods)
    masks = sample_subsets(problem.subset_key, data.num_examples(problem.train),
                           config.lds.num_subsets, config.lds.fraction)
    ground_truth = ground_truth_stage(config, workdir, problem, masks, reused)
    members = full_data_models_stage(models_stage, problem, reused)
    test_metrics = [training.evaluate(problem.model, v, problem.test) for v in members]
    computed: dict[tuple, np.ndarray] = {}
    scores = {
        name: scores_stage(config, name, method, score_stages[name], problem, members, computed,
                           reused)
        for name, method in progress(methods.items(), desc="methods", total=len(methods))
    }
    timings = {
        "ground_truth": _read_seconds(workdir / "ground_truth"),
        "models": _read_seconds(models_stage.directory),
        **{f"scores/{name}": _read_seconds(stage.directory) for name, stage in score_stages.items()},
        "total_this_run": time.perf_counter() - start,
    }
    results, arrays = lds_results(config, problem, scores, masks, ground_truth, test_metrics,
                                  skipped, timings, reused)
    write_outputs(config, workdir, results, arrays)
    return results
