"""The LDS experiment as persistent stages: models -> ground truth -> scores per method -> LDS.

Work directory layout (every stage is a :class:`tda_jax.io.Stage` with its saved arguments)::

    DIR/ground_truth/     retrained measurements [num_subsets, seeds, num_queries], by chunks
    DIR/models/           the models trained on the full data (member 0 is "the" model)
    DIR/scores/<method>/  scores [num_queries, num_train] per ensemble member (member_k.npz)
    DIR/results.json      LDS per method, noise ceiling, settings, timings
    DIR/lds.png           bar chart with 95% CIs and the noise ceiling
    DIR/lds_per_query.npz per-query LDS of every method and the per-query ceiling

A rerun reuses every finished stage (and finished chunks or ensemble members of an interrupted
one). Every stage's arguments are checked before any work starts, so a changed setting raises
:class:`tda_jax.io.ArgumentMismatchError` naming it, and ``results.json`` is only rewritten after
every stage agreed with the configuration.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from tda_jax import attribution, data, losses, models, training
from tda_jax.evaluation import (
    lds,
    noise_ceiling,
    retrain_ground_truth,
    sample_subsets,
    summarize,
)
from tda_jax.evaluation.figures import plot_lds_bars
from tda_jax.io import Stage, write_json
from tda_jax.progress import progress


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


def _train_config(config: ml_collections.ConfigDict, loss: str) -> training.TrainConfig:
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


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs (or resumes) the LDS experiment and writes ``workdir/results.json`` and the figure.

    Args:
      config: see ``experiments/lds/configs/default.py``.
      workdir: the work directory; its finished stages are reused.

    Returns:
      The results dictionary written to ``results.json``.

    Raises:
      tda_jax.io.ArgumentMismatchError: if a stage in ``workdir`` was made with other settings.
    """
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []

    # ---- Data, queries, model and measurement.
    train, test = load_data(config.data)
    num_train = data.num_examples(train)
    num_test = data.num_examples(test)
    if not 0 < config.num_queries <= num_test:
        raise ValueError(f"config.num_queries must be in 1..{num_test}, got {config.num_queries}")
    key = jax.random.key(config.seed)
    query_key, subset_key, retrain_key, model_key = jax.random.split(key, 4)
    query_index = np.sort(
        np.asarray(jax.random.choice(query_key, num_test, (config.num_queries,), replace=False))
    )
    queries = data.subset(test, query_index)
    classification = train.num_classes is not None
    loss_name = "cross_entropy" if classification else "mse"
    loss = losses.get_loss(loss_name)
    # Margin for classification; for regression the per-example loss itself.
    measurement = losses.classification_margin if classification else loss.per_example
    num_outputs = train.num_classes if classification else int(np.prod(train.targets.shape[1:]))
    model = make_model(config.model, num_outputs)
    train_config = _train_config(config.train, loss_name)
    template = model.init(jax.random.key(0), jnp.asarray(train.inputs[:1]))
    num_params = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(template))

    # ---- Which methods run; how many full-data models they need.
    skipped: dict[str, str] = {}
    methods: dict[str, ml_collections.ConfigDict] = {}
    for name, method in sorted(config.methods.items(), key=_method_order):
        reason = _exact_skip_reason(config, num_params) if method.strategy == "exact" else None
        if reason is None:
            methods[name] = method
        else:
            skipped[name] = reason
            logging.info("skipping %s: %s", name, reason)
    num_models = max([m.ensemble_size for m in methods.values()] + [1])

    common = {
        "seed": config.seed,
        "data": config.data.to_dict(),
        "model": config.model.to_dict(),
        "train": train_config.to_dict(),
    }
    models_arguments = {**common, "num_models": num_models}
    query_arguments = {"num_queries": config.num_queries, "query_index": query_index.tolist()}

    # ---- Open every stage first, so a mismatched setting fails before any work is done.
    models_stage = Stage(workdir / "models", models_arguments)
    score_stages = {
        name: Stage(
            workdir / "scores" / name,
            {
                "method": method.to_dict(),
                "models": models_arguments,
                "queries": query_arguments,
                "loss": loss.name,
                "measurement": measurement.__name__,
                "curvature_batch_size": config.curvature_batch_size,
                "query_batch_size": config.query_batch_size,
                "train_batch_size": config.train_batch_size,
            },
        )
        for name, method in methods.items()
    }

    # ---- Ground truth: retrain on random subsets (checks its own saved arguments first).
    masks = sample_subsets(subset_key, num_train, config.lds.num_subsets, config.lds.fraction)
    ground_truth_dir = workdir / "ground_truth"
    if (ground_truth_dir / "COMPLETE").exists():
        reused.append("ground_truth")
    ground_truth = retrain_ground_truth(
        retrain_key,
        model,
        train,
        queries,
        masks,
        seeds_per_subset=config.lds.seeds_per_subset,
        config=train_config,
        measurement=measurement,
        directory=ground_truth_dir,
        models_per_chunk=config.lds.models_per_chunk,
        arguments={**common, "lds": config.lds.to_dict(), "queries": query_arguments},
    )

    # ---- Models trained on the full data (several seeds for the ensemble).
    if models_stage.is_complete():
        reused.append("models")
        stacked = _unflatten(template, models_stage.load_arrays("params"))
    else:
        began = time.perf_counter()
        logging.info("training %d models on the full data", num_models)
        stacked = training.train_many(
            jax.random.split(model_key, num_models),
            model,
            train,
            np.ones((num_models, num_train), dtype=bool),
            train_config,
        )
        models_stage.save_arrays("params", _flatten(stacked))
        _write_seconds(models_stage, time.perf_counter() - began)
        models_stage.mark_complete()
    members = [jax.tree.map(lambda leaf, k=k: leaf[k], stacked) for k in range(num_models)]
    test_metrics = [training.evaluate(model, params, test) for params in members]

    # ---- Scores per method (ensemble members saved one by one).
    def apply_fn(params, inputs):
        return model.apply({"params": params}, inputs)

    scores: dict[str, np.ndarray] = {}
    # (strategy, fisher, damping, member) -> scores, so an ensemble reuses the single-model run.
    computed: dict[tuple, np.ndarray] = {}
    for name, method in progress(methods.items(), desc="methods", total=len(methods)):
        stage = score_stages[name]
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
                curvature = attribution.fit_curvature(
                    apply_fn,
                    members[k]["params"],
                    train,
                    strategy=method.strategy,
                    loss=loss,
                    fisher=method.fisher,
                    damping=method.damping,
                    batch_size=config.curvature_batch_size,
                    key=jax.random.fold_in(model_key, k),
                )
                values = np.asarray(
                    attribution.pairwise_scores(
                        apply_fn,
                        members[k]["params"],
                        curvature,
                        queries,
                        train,
                        loss=loss,
                        measurement=measurement,
                        query_batch_size=config.query_batch_size,
                        train_batch_size=config.train_batch_size,
                    ),
                    dtype=np.float32,
                )
                stage.save_arrays(member, {"scores": values})
            computed[cache_key] = values
            member_scores.append(values)
        if not stage.is_complete():
            _write_seconds(stage, time.perf_counter() - began)
            stage.mark_complete()
        # Averaging scores over models trained with different seeds (an ensemble of influence
        # estimates) smooths out each model's idiosyncrasies.
        scores[name] = np.mean(member_scores, axis=0)

    # ---- LDS, noise ceiling, results.
    per_query = {name: lds(values, masks, ground_truth) for name, values in scores.items()}
    ceiling = noise_ceiling(ground_truth) if ground_truth.shape[1] >= 2 else None
    timings = {
        "ground_truth": _read_seconds(ground_truth_dir),
        "models": _read_seconds(models_stage.directory),
    }
    timings.update({f"scores/{name}": _read_seconds(score_stages[name].directory)
                    for name in methods})
    timings["total_this_run"] = time.perf_counter() - start
    results = {
        "lds": {name: summarize(values).to_dict() for name, values in per_query.items()},
        "noise_ceiling": summarize(ceiling.ceiling).to_dict() if ceiling else None,
        "seed_correlation": summarize(ceiling.seed_correlation).to_dict() if ceiling else None,
        "skipped": skipped,
        "settings": {
            "config": config.to_dict(),
            "num_params": num_params,
            "num_train": num_train,
            "num_queries": config.num_queries,
            "task": "classification" if classification else "regression",
            "measurement": measurement.__name__,
            "loss": loss.name,
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
    write_json(workdir / "results.json", results)
    arrays = {f"lds/{name}": values for name, values in per_query.items()}
    if ceiling is not None:
        arrays["noise_ceiling"] = ceiling.ceiling
    np.savez(workdir / "lds_per_query.npz", **arrays)
    plot_lds_bars(
        results["lds"],
        workdir / "lds.png",
        noise_ceiling=results["noise_ceiling"],
        title=(
            f"LDS on {config.data.name} ({num_train} train, {config.num_queries} queries, "
            f"{config.lds.num_subsets} subsets x {config.lds.seeds_per_subset} seeds)"
        ),
    )
    logging.info("LDS: %s", json.dumps(results["lds"]))
    return results

