"""The LM influence experiment as persistent stages, then the analyses.

Work directory layout (every stage is a :class:`tda_jax.io.Stage` with its saved arguments)::

    DIR/corpus/               tokenizer.json, corpus.json (texts, facts, queries, fingerprint)
    DIR/model/                the trained TransformerLM (params.npz, orbax checkpoints/, metrics)
    DIR/curvature/<method>/   curvature statistics of each method (statistics/ from fit_curvature)
    DIR/scores/<method>/      scores [num_queries, num_train] for every query (all of both orders)
    DIR/query_batching/       scores of the query subset at each rank (rank_<r>.npz, full.npz)
    DIR/tfidf/                candidates and timings (timing.npz)
    DIR/ground_truth/         LDS retraining measurements, chunk by chunk (when config.lds.enabled)
    DIR/results.json          every number the analyses produce, settings, timings
    DIR/{sparsity,order_flip,query_batching,tfidf,lds}.png

Every stage's arguments are checked before any work starts, so a changed setting raises
:class:`tda_jax.io.ArgumentMismatchError` naming it; a rerun reuses every finished stage (and the
finished ranks or retraining chunks of an interrupted one); ``results.json`` is rewritten only
after every stage agreed with the configuration.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments.llm_influence import analyses, figures
from tda_jax import attribution, data, losses, models, training
from tda_jax.attribution.influence import _query_plan
from tda_jax.curvature.blocks import registered_blocks
from tda_jax.curvature.fisher import FISHER_TYPES
from tda_jax.evaluation import lds, noise_ceiling, retrain_ground_truth, sample_subsets, summarize
from tda_jax.evaluation.figures import plot_lds_bars
from tda_jax.io import Stage, allow_overwrite, fingerprint, write_json, write_npz
from tda_jax.progress import progress
from tda_jax.sharding import is_main_process, run_on_main

MEASUREMENT = losses.completion_log_prob
_STRATEGY_ORDER = ("identity", "diagonal", "kfac", "ekfac", "exact")


def method_names(config: ml_collections.ConfigDict) -> list[str]:
    """Methods cheapest curvature first (ConfigDict iterates its keys alphabetically)."""
    def order(name: str) -> tuple:
        strategy = config.methods[name].strategy
        return (_STRATEGY_ORDER.index(strategy) if strategy in _STRATEGY_ORDER else 99, name)

    return sorted(config.methods, key=order)


# --------------------------------------------------------------------------------------------------
# Configuration checks (before any expensive stage).


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _require(condition: bool, field: str, requirement: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"config.{field} must be {requirement}, got {value!r}")


def _positive_int(config: ml_collections.ConfigDict, field: str) -> None:
    value = _get(config, field)
    _require(_is_int(value) and value >= 1, field, "a positive integer", value)


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every setting that does not need the corpus; raises ``ValueError`` naming the field.

    Corpus-dependent bounds (ranks and ``k`` up to the number of sequences, query counts) are
    checked by :func:`validate_against_corpus` once the (cheap) corpus exists.
    """
    _require(_is_int(config.seed), "seed", "an integer", config.seed)
    for field in ("model.num_layers", "model.d_model", "model.num_heads", "model.d_mlp",
                  "train.num_epochs", "train.batch_size", "train.checkpoint_every_epochs",
                  "curvature_batch_size", "query_batch_size", "train_batch_size",
                  "query_batching.num_queries", "query_batching.num_train",
                  "query_batching.max_query_bytes", "query_batching.train_batch_size",
                  "query_batching.query_batch_size",
                  "tfidf.top", "tfidf.timing_queries", "tfidf.timing_batch_size", "tfidf.repeats",
                  "sparsity.fit_min_rank", "sparsity.fit_max_rank"):
        _positive_int(config, field)
    _require(config.model.d_model % config.model.num_heads == 0, "model.d_model",
             f"divisible by config.model.num_heads={config.model.num_heads}", config.model.d_model)
    _require(isinstance(config.model.tie_embeddings, bool), "model.tie_embeddings", "a bool",
             config.model.tie_embeddings)
    for field in ("train.learning_rate", "train.weight_decay"):
        value = _get(config, field)
        _require(isinstance(value, float | int) and math.isfinite(value) and value >= 0
                 and (value > 0 or field.endswith("decay")), field,
                 "a finite number > 0" if field.endswith("rate") else "a finite number >= 0", value)
    _require(config.train.optimizer in training.config.OPTIMIZERS, "train.optimizer",
             f"one of {training.config.OPTIMIZERS}", config.train.optimizer)
    _require(len(config.methods) > 0, "methods", "a non-empty set of methods", config.methods)
    for name, method in config.methods.items():
        _require(method.strategy in registered_blocks(), f"methods.{name}.strategy",
                 f"one of {registered_blocks()}", method.strategy)
        _require(method.fisher in FISHER_TYPES, f"methods.{name}.fisher", f"one of {FISHER_TYPES}",
                 method.fisher)
        damping = method.damping
        _require(damping is None or (isinstance(damping, float | int) and math.isfinite(damping)
                                     and damping >= 0), f"methods.{name}.damping",
                 "None or a finite number >= 0", damping)
        _require(damping is None or method.strategy != "identity", f"methods.{name}.damping",
                 "None for strategy 'identity' (it has no curvature to damp)", damping)
    _require(config.layers is None or isinstance(config.layers, str), "layers",
             "None or a regular expression (str)", config.layers)
    methods = tuple(config.methods)
    for field in ("sparsity.method", "order_flip.main_method", "query_batching.method",
                  "tfidf.method"):
        _require(_get(config, field) in methods, field, f"one of config.methods {methods}",
                 _get(config, field))
    flip_methods = tuple(config.order_flip.methods)
    _require(len(flip_methods) > 0 and all(m in methods for m in flip_methods)
             and config.order_flip.main_method in flip_methods, "order_flip.methods",
             f"a non-empty tuple of config.methods {methods} holding order_flip.main_method",
             flip_methods)
    _require(config.sparsity.fit_min_rank < config.sparsity.fit_max_rank, "sparsity.fit_min_rank",
             f"< config.sparsity.fit_max_rank={config.sparsity.fit_max_rank}",
             config.sparsity.fit_min_rank)
    fraction = config.sparsity.top_fraction
    _require(isinstance(fraction, float) and 0 < fraction <= 1, "sparsity.top_fraction",
             "a float in (0, 1]", fraction)
    ranks = tuple(config.query_batching.ranks)
    _require(len(ranks) > 0 and all(_is_int(r) and r >= 1 for r in ranks)
             and len(set(ranks)) == len(ranks), "query_batching.ranks",
             "a non-empty tuple of distinct positive integers", ranks)
    ks = tuple(config.tfidf.ks)
    _require(len(ks) > 0 and all(_is_int(k) and k >= 1 for k in ks) and len(set(ks)) == len(ks),
             "tfidf.ks", "a non-empty tuple of distinct positive integers", ks)
    _require(isinstance(config.lds.enabled, bool), "lds.enabled", "a bool", config.lds.enabled)
    for field in ("lds.num_subsets", "lds.models_per_chunk"):
        _positive_int(config, field)
    _require(config.lds.num_subsets >= 3, "lds.num_subsets",
             "at least 3 (a rank correlation over subsets)", config.lds.num_subsets)
    _require(_is_int(config.lds.seeds_per_subset) and config.lds.seeds_per_subset >= 2,
             "lds.seeds_per_subset", "an integer >= 2 (the noise ceiling compares seeds)",
             config.lds.seeds_per_subset)
    _require(isinstance(config.lds.fraction, float) and 0 < config.lds.fraction < 1, "lds.fraction",
             "a float in (0, 1)", config.lds.fraction)


def validate_against_corpus(config: ml_collections.ConfigDict, corpus: data.FactCorpus) -> None:
    """Bounds that depend on the corpus size (``N`` sequences, ``Q`` queries)."""
    n, q = corpus.num_train, len(corpus.queries)
    _require(config.sparsity.fit_max_rank <= n, "sparsity.fit_max_rank",
             f"<= the number of training sequences {n}", config.sparsity.fit_max_rank)
    _require(config.query_batching.num_queries <= q, "query_batching.num_queries",
             f"<= the number of queries {q}", config.query_batching.num_queries)
    _require(config.query_batching.num_train <= n, "query_batching.num_train",
             f"<= the number of training sequences {n}", config.query_batching.num_train)
    _require(max(config.tfidf.ks) <= n, "tfidf.ks", f"at most the number of training sequences {n}",
             tuple(config.tfidf.ks))
    _require(config.tfidf.top <= n, "tfidf.top", f"<= the number of training sequences {n}",
             config.tfidf.top)
    _require(config.tfidf.timing_queries <= q, "tfidf.timing_queries",
             f"<= the number of queries {q}", config.tfidf.timing_queries)


# --------------------------------------------------------------------------------------------------
# Shared set-up.


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _unflatten(template: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(arrays[jax.tree_util.keystr(path)]) for path, _ in paths])


def _read_seconds(directory: Path) -> float | None:
    """Compute time recorded by a stage (reported again when the stage is reused)."""
    path = Path(directory) / "timing.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def _write_stage_json(path: Path, obj: Any) -> None:
    """A stage's JSON file, written by process 0 while the others wait (one process: a write)."""
    run_on_main(lambda: write_json(path, obj), f"writing {path}")


def _write_seconds(stage: Stage, seconds: float) -> None:
    _write_stage_json(stage.path("timing.json"), {"seconds": seconds})


class Problem(NamedTuple):
    """What the stages share: corpus, datasets, model, loss, keys and stage arguments."""

    corpus: data.FactCorpus
    train: data.Dataset
    queries: data.Dataset
    same_order: np.ndarray
    row_mask: np.ndarray
    entity_mask: np.ndarray
    model: models.TransformerLM
    apply_fn: models.ModelApply
    loss: losses.Loss
    train_config: training.TrainConfig
    template: Any
    model_key: jax.Array
    curvature_key: jax.Array
    subset_key: jax.Array
    retrain_key: jax.Array
    rng_seed: int
    arguments: dict


def make_corpus(config: ml_collections.ConfigDict) -> data.FactCorpus:
    """The fact corpus that ``config.corpus`` describes (errors name the config field)."""
    settings = config.corpus.to_dict()
    settings["relations"] = tuple(settings["relations"])
    try:
        return data.make_fact_corpus(**settings)
    except (ValueError, TypeError) as error:
        raise ValueError(f"config.corpus: {error}") from error


def same_entity_rows(corpus: data.FactCorpus) -> np.ndarray:
    """``[Q, N]`` bool: the sequences stating *another* fact about the query's entity (and not the
    queried fact itself), the control rows of the order-flip analysis."""
    facts_of_entity: dict[str, list[int]] = {}
    for fact in corpus.facts:
        facts_of_entity.setdefault(fact.entity, []).append(fact.fact_id)
    mask = np.zeros((len(corpus.queries), corpus.num_train), bool)
    for q, query in enumerate(corpus.queries):
        entity = corpus.facts[query.fact_id].entity
        for other in facts_of_entity[entity]:
            if other != query.fact_id:
                mask[q, list(corpus.facts[other].rows)] = True
        mask[q, list(query.rows)] = False
    return mask


def make_problem(config: ml_collections.ConfigDict, corpus: data.FactCorpus) -> Problem:
    """Datasets (every query, corpus order), model, loss, training settings, keys."""
    train = corpus.train_dataset()
    queries = corpus.query_dataset()
    model = models.TransformerLM(vocab_size=corpus.vocab_size, max_len=corpus.max_len,
                                 d_model=config.model.d_model, num_heads=config.model.num_heads,
                                 num_layers=config.model.num_layers, d_mlp=config.model.d_mlp,
                                 tie_embeddings=config.model.tie_embeddings)
    loss = losses.causal_lm_loss()
    train_config = training.TrainConfig(
        num_epochs=config.train.num_epochs, batch_size=config.train.batch_size,
        learning_rate=config.train.learning_rate, weight_decay=config.train.weight_decay,
        optimizer=config.train.optimizer, loss=loss)
    model_key, curvature_key, subset_key, retrain_key = jax.random.split(
        jax.random.key(config.seed), 4)
    corpus_arguments = {"corpus": config.corpus.to_dict(),
                        "fingerprint": fingerprint(train.inputs, train.targets, queries.inputs,
                                                   queries.targets)}
    model_arguments = {**corpus_arguments, "seed": config.seed, "model": config.model.to_dict(),
                       "train": {**train_config.to_dict(),
                                 "checkpoint_every_epochs": config.train.checkpoint_every_epochs}}
    curvature_arguments = {
        name: {"model": model_arguments, "method": method.to_dict(), "layers": config.layers,
               "curvature_batch_size": config.curvature_batch_size}
        for name, method in config.methods.items()}
    score_arguments = {
        name: {"curvature": curvature_arguments[name], "measurement": MEASUREMENT.__name__,
               "queries": "all (corpus order)", "query_batch_size": config.query_batch_size,
               "train_batch_size": config.train_batch_size}
        for name in config.methods}
    return Problem(
        corpus=corpus, train=train, queries=queries,
        same_order=np.array([q.order == "same" for q in corpus.queries]),
        row_mask=corpus.query_row_mask(), entity_mask=same_entity_rows(corpus), model=model,
        apply_fn=models.apply_fn_of(model),
        loss=loss, train_config=train_config,
        template=model.init(jax.random.key(0), jnp.asarray(train.inputs[:1])),
        model_key=model_key, curvature_key=curvature_key, subset_key=subset_key,
        retrain_key=retrain_key, rng_seed=config.seed,
        arguments={"corpus": corpus_arguments, "model": model_arguments,
                   "curvature": curvature_arguments, "scores": score_arguments})


class Stages(NamedTuple):
    corpus: Stage
    model: Stage
    curvature: dict[str, Stage]
    scores: dict[str, Stage]
    query_batching: Stage
    tfidf: Stage


def open_stages(config: ml_collections.ConfigDict, workdir: Path, problem: Problem) -> Stages:
    """Opens every stage first, so a mismatched setting fails before any work is done."""
    arguments = problem.arguments
    batching_method = config.query_batching.method
    tfidf_method = config.tfidf.method
    return Stages(
        corpus=Stage(workdir / "corpus", arguments["corpus"]),
        model=Stage(workdir / "model", arguments["model"]),
        curvature={name: Stage(workdir / "curvature" / name, arguments["curvature"][name])
                   for name in config.methods},
        scores={name: Stage(workdir / "scores" / name, arguments["scores"][name])
                for name in config.methods},
        query_batching=Stage(workdir / "query_batching",
                             {"scores": arguments["scores"][batching_method],
                              "query_batching": config.query_batching.to_dict()}),
        tfidf=Stage(workdir / "tfidf", {"scores": arguments["scores"][tfidf_method],
                                        "tfidf": config.tfidf.to_dict()}),
    )


# --------------------------------------------------------------------------------------------------
# Stages.


def corpus_stage(stage: Stage, corpus: data.FactCorpus, reused: list[str]) -> None:
    """Writes the tokenizer and the corpus (texts, facts, queries) for inspection."""
    if stage.is_complete():
        reused.append("corpus")
        return
    _write_stage_json(stage.path("tokenizer.json"), corpus.tokenizer.to_json())
    _write_stage_json(stage.path("corpus.json"), {
        "num_train": corpus.num_train, "vocab_size": corpus.vocab_size, "max_len": corpus.max_len,
        "texts": list(corpus.texts),
        "facts": [f._asdict() for f in corpus.facts],
        "queries": [q._asdict() for q in corpus.queries],
    })
    stage.mark_complete()


def _query_metrics(forward: Callable, variables, queries: data.Dataset) -> dict[str, float]:
    """Mean completion log-probability and top-1 accuracy of the completion's first token."""
    logits = np.asarray(forward(variables, jnp.asarray(queries.inputs)), np.float64)
    log_probs = np.asarray(MEASUREMENT(jnp.asarray(logits, jnp.float32),
                                       jnp.asarray(queries.targets)))
    first = np.argmax(queries.targets >= 0, axis=1)
    rows = np.arange(len(first))
    correct = np.argmax(logits[rows, first], axis=-1) == queries.targets[rows, first]
    return {"completion_log_prob": float(log_probs.mean()),
            "first_token_accuracy": float(correct.mean())}


def model_stage(config: ml_collections.ConfigDict, stage: Stage, problem: Problem,
                reused: list[str]) -> tuple[Any, dict[str, Any]]:
    """Trains the TransformerLM (orbax checkpoints every few epochs, resumed if interrupted).

    Returns:
      ``(variables, metrics)``: training per-token NLL / accuracy and, for same-order and flipped
      queries, the mean completion log-probability and top-1 accuracy.
    """
    if stage.is_complete():
        reused.append("model")
        variables = _unflatten(problem.template, stage.load_arrays("params"))
        return variables, json.loads(stage.path("metrics.json").read_text())
    began = time.perf_counter()
    steps_per_epoch = -(-data.num_examples(problem.train) // problem.train_config.batch_size)
    every = config.train.checkpoint_every_epochs
    checkpoint_steps = [e * steps_per_epoch
                        for e in range(every, config.train.num_epochs + 1, every)]
    logging.info("training the language model (%d epochs)", config.train.num_epochs)
    variables = training.train(problem.model_key, problem.model, None, problem.train,
                               problem.train_config, checkpoint_steps=checkpoint_steps,
                               checkpoint_dir=stage.path("checkpoints"))
    metrics = {"train": training.evaluate(problem.model, variables, problem.train)}
    forward = jax.jit(problem.model.apply)
    for order, mask in (("same_order", problem.same_order), ("flipped", ~problem.same_order)):
        metrics[order] = _query_metrics(forward, variables,
                                        data.subset(problem.queries, np.flatnonzero(mask)))
    stage.save_arrays("params", _flatten(variables))
    _write_stage_json(stage.path("metrics.json"), metrics)
    _write_seconds(stage, time.perf_counter() - began)
    stage.mark_complete()
    logging.info("model: %s", json.dumps(metrics))
    return variables, metrics


def make_curvature_getter(config: ml_collections.ConfigDict, stages: Stages, problem: Problem,
                          variables: Any, reused: list[str]) -> Callable[[str], Any]:
    """``get(name) -> Curvature``, fitted on first use (statistics cached in the stage)."""
    cache: dict[str, Any] = {}

    def get(name: str):
        if name in cache:
            return cache[name]
        method, stage = config.methods[name], stages.curvature[name]
        if stage.is_complete():
            reused.append(f"curvature/{name}")
        began = time.perf_counter()
        curvature = attribution.fit_curvature(
            problem.apply_fn, variables["params"], problem.train, strategy=method.strategy,
            loss=problem.loss, fisher=method.fisher, damping=method.damping,
            batch_size=config.curvature_batch_size, key=problem.curvature_key,
            layers=config.layers, stage_dir=str(stage.path("statistics")))
        if not stage.is_complete():
            _write_stage_json(stage.path("curvature.json"), {
                "settings": curvature.settings,
                "damping": {k: float(v) for k, v in curvature.damping.items()},
                "num_params": curvature.num_params})
            _write_seconds(stage, time.perf_counter() - began)
            stage.mark_complete()
        cache[name] = curvature
        return curvature

    return get


def scores_stage(config: ml_collections.ConfigDict, name: str, stage: Stage, problem: Problem,
                 variables: Any, curvature_of: Callable[[str], Any],
                 reused: list[str]) -> np.ndarray:
    """Scores ``[num_queries, num_train]`` of one method for every query."""
    if stage.is_complete():
        reused.append(f"scores/{name}")
        return stage.load_arrays("scores")["scores"]
    curvature = curvature_of(name)
    began = time.perf_counter()
    logging.info("%s: scores of %d queries", name, data.num_examples(problem.queries))
    scores = np.asarray(attribution.pairwise_scores(
        problem.apply_fn, variables["params"], curvature, problem.queries, problem.train,
        loss=problem.loss, measurement=MEASUREMENT, query_batch_size=config.query_batch_size,
        train_batch_size=config.train_batch_size), np.float32)
    stage.save_arrays("scores", {"scores": scores})
    _write_seconds(stage, time.perf_counter() - began)
    stage.mark_complete()
    return scores


def _warm_and_time(problem: Problem, variables: Any, curvature, queries: data.Dataset,
                   train: data.Dataset, *, batch_size: int, repeats: int = 1,
                   **kwargs) -> tuple[np.ndarray, float, float, float | None]:
    """Scores after one warm-up call on a single training batch (which compiles the steps for
    these shapes), timed over ``repeats`` runs (the best is kept).

    Returns:
      ``(scores, seconds, warmup_seconds, peak_rss_increase_mb)``.
    """
    query_rank = kwargs.get("query_rank")
    steps = attribution.build_score_steps(problem.apply_fn, curvature.strategy, curvature.specs,
                                          loss=problem.loss, measurement=MEASUREMENT,
                                          query_rank=query_rank)
    common = dict(loss=problem.loss, measurement=MEASUREMENT, train_batch_size=batch_size,
                  steps=steps, **kwargs)
    began = time.perf_counter()
    warm = data.subset(train, np.arange(min(batch_size, data.num_examples(train))))
    attribution.pairwise_scores(problem.apply_fn, variables["params"], curvature, queries, warm,
                                **common)
    warmup = time.perf_counter() - began
    best, peak, scores = math.inf, None, None
    for _ in range(repeats):
        with analyses.PeakMemory() as memory:
            began = time.perf_counter()
            scores = attribution.pairwise_scores(problem.apply_fn, variables["params"], curvature,
                                                 queries, train, **common)
            seconds = time.perf_counter() - began
        best = min(best, seconds)
        peak = memory.increase_mb if peak is None else max(peak, memory.increase_mb or 0.0)
    return np.asarray(scores, np.float32), best, warmup, peak


def _query_bytes(curvature, rank: int | None) -> int:
    """Bytes of one preconditioned query as held for scoring (float32)."""
    if rank is None:
        return 4 * curvature.num_params
    return 4 * sum(min(rank, s.in_dim, s.out_dim) * (s.in_dim + s.out_dim)
                   for s in curvature.specs)


def query_batching_selection(config: ml_collections.ConfigDict,
                             problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Sorted random query rows and training rows of the query-batching comparison."""
    rng = np.random.default_rng([problem.rng_seed, 1])
    settings = config.query_batching
    query_rows = np.sort(rng.choice(data.num_examples(problem.queries), settings.num_queries,
                                    replace=False))
    train_rows = np.sort(rng.choice(data.num_examples(problem.train), settings.num_train,
                                    replace=False))
    return query_rows, train_rows


def query_batching_stage(config: ml_collections.ConfigDict, stage: Stage, problem: Problem,
                         variables: Any, curvature_of: Callable[[str], Any],
                         reused: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Scores of the query subset at full rank and at every rank in ``config.query_batching.ranks``
    (each saved as soon as it is done), with seconds, memory and the number of training passes.

    Returns:
      ``{"full" | "<r>": {"scores", "seconds", "warmup_seconds", "peak_rss_increase_mb",
      "query_bytes", "training_passes"}}``.
    """
    settings = config.query_batching
    if stage.is_complete():
        reused.append("query_batching")
    query_rows, train_rows = query_batching_selection(config, problem)
    queries = data.subset(problem.queries, query_rows)
    train = data.subset(problem.train, train_rows)
    out = {}
    names = [*[str(r) for r in sorted(settings.ranks)], "full"]
    for name in progress(names, desc="query ranks", total=len(names)):
        file = "full" if name == "full" else f"rank_{name}"
        if stage.has(file):
            out[name] = stage.load_arrays(file)
            continue
        curvature = curvature_of(settings.method)
        rank = None if name == "full" else int(name)
        logging.info("query batching: rank %s", name)
        scores, seconds, warmup, peak = _warm_and_time(
            problem, variables, curvature, queries, train, batch_size=settings.train_batch_size,
            query_rank=rank, max_query_bytes=settings.max_query_bytes,
            query_batch_size=settings.query_batch_size)
        _, super_block = _query_plan(curvature, len(query_rows), settings.query_batch_size,
                                     settings.max_query_bytes, rank)
        result = {"scores": scores, "seconds": seconds, "warmup_seconds": warmup,
                  "peak_rss_increase_mb": np.nan if peak is None else peak,
                  "query_bytes": _query_bytes(curvature, rank) * len(query_rows),
                  "training_passes": -(-len(query_rows) // super_block)}
        stage.save_arrays(file, result)
        out[name] = stage.load_arrays(file)
    if not stage.is_complete():
        stage.save_arrays("selection", {"query_rows": query_rows, "train_rows": train_rows})
        _write_seconds(stage, float(sum(v["seconds"] + v["warmup_seconds"] for v in out.values())))
        stage.mark_complete()
    return out


def timing_query_rows(config: ml_collections.ConfigDict, problem: Problem) -> np.ndarray:
    """Sorted random query rows scored in the TF-IDF timing."""
    rng = np.random.default_rng([problem.rng_seed, 2])
    return np.sort(rng.choice(data.num_examples(problem.queries), config.tfidf.timing_queries,
                              replace=False))


def tfidf_stage(config: ml_collections.ConfigDict, stage: Stage, problem: Problem,
                variables: Any, curvature_of: Callable[[str], Any],
                reused: list[str]) -> dict[str, np.ndarray]:
    """TF-IDF candidates of every query (``max(ks)`` per query, most similar first) and the
    timing of scoring the timing queries against all sequences and against each candidate union.

    Returns:
      ``{"candidates" [Q, max k], "timing_rows", "seconds_all", "seconds_union" [len(ks)],
      "union_size" [len(ks)], "max_abs_difference" [len(ks)]}``; the last is the largest
      difference between a candidate's score from the union run and from the full run.
    """
    settings = config.tfidf
    if stage.is_complete():
        reused.append("tfidf")
        return stage.load_arrays("tfidf")
    began = time.perf_counter()
    ks = tuple(settings.ks)
    candidates = attribution.tfidf_candidates(problem.corpus.query_texts(), problem.corpus.texts,
                                              k=max(ks))
    rows = timing_query_rows(config, problem)
    queries = data.subset(problem.queries, rows)
    curvature = curvature_of(settings.method)
    timed = dict(batch_size=settings.timing_batch_size, repeats=settings.repeats,
                 query_batch_size=config.query_batch_size)
    logging.info("TF-IDF: scoring %d queries against all %d sequences", len(rows),
                 data.num_examples(problem.train))
    full, seconds_all, _, _ = _warm_and_time(problem, variables, curvature, queries,
                                             problem.train, **timed)
    seconds_union, union_sizes, differences = [], [], []
    for k in progress(ks, desc="TF-IDF k", total=len(ks)):
        chosen = candidates[rows, :k]
        union = attribution.candidate_union(chosen)
        scores, seconds, _, _ = _warm_and_time(problem, variables, curvature, queries,
                                               data.subset(problem.train, union), **timed)
        filtered = attribution.gather_candidates(scores, chosen, columns=union)
        reference = attribution.gather_candidates(full, chosen)
        differences.append(float(np.abs(filtered - reference).max()))
        seconds_union.append(seconds)
        union_sizes.append(len(union))
    result = {"candidates": candidates, "timing_rows": rows, "seconds_all": seconds_all,
              "seconds_union": np.asarray(seconds_union), "union_size": np.asarray(union_sizes),
              "max_abs_difference": np.asarray(differences),
              "full_scale": float(np.abs(full).max())}
    stage.save_arrays("tfidf", result)
    _write_seconds(stage, time.perf_counter() - began)
    stage.mark_complete()
    return stage.load_arrays("tfidf")


def ground_truth_stage(config: ml_collections.ConfigDict, workdir: Path, problem: Problem,
                       masks: np.ndarray, reused: list[str]) -> np.ndarray:
    """Retrains on random subsets (``workdir/ground_truth``; checks its own saved arguments) and
    measures every query's completion log-probability: ``[num_subsets, seeds, num_queries]``."""
    directory = workdir / "ground_truth"
    if (directory / "COMPLETE").exists():
        reused.append("ground_truth")
    lds_settings = {k: v for k, v in config.lds.to_dict().items() if k != "enabled"}
    return retrain_ground_truth(
        problem.retrain_key, problem.model, problem.train, problem.queries, masks,
        seeds_per_subset=config.lds.seeds_per_subset, config=problem.train_config,
        measurement=MEASUREMENT, directory=directory,
        models_per_chunk=config.lds.models_per_chunk,
        arguments={"model": problem.arguments["model"], "lds": lds_settings})


# --------------------------------------------------------------------------------------------------
# Analyses.


def _summary(values: np.ndarray) -> dict[str, float]:
    return summarize(values).to_dict()


def sparsity_results(config: ml_collections.ConfigDict, problem: Problem,
                     scores: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Top-share and tail exponent per method (all queries and by order) and the figure's data."""
    settings = config.sparsity
    per_method: dict[str, Any] = {}
    per_query = {}
    for name, values in scores.items():
        share = analyses.top_share(values, settings.top_fraction)
        alpha = analyses.tail_exponents(values, settings.fit_min_rank, settings.fit_max_rank)
        per_query[name] = (share, alpha)
        per_method[name] = {"top1pct_share": _summary(share), "tail_exponent": _summary(alpha)}
    main = settings.method
    share, alpha = per_query[main]
    same = problem.same_order
    results = {
        "method": main,
        "top1pct_share": _summary(share),
        "tail_exponent": _summary(alpha),
        "by_order": {order: {"top1pct_share": _summary(share[mask]),
                             "tail_exponent": _summary(alpha[mask])}
                     for order, mask in (("same_order", same), ("flipped", ~same))},
        "by_method": per_method,
        "definition": (
            f"per query, |score| over the {scores[main].shape[1]} training sequences sorted in "
            f"decreasing order; tail_exponent alpha = minus the least-squares slope of log10 "
            f"|score|_(r) against log10 r over ranks r = {settings.fit_min_rank}.."
            f"{settings.fit_max_rank}; top1pct_share = sum of the top "
            f"ceil({settings.top_fraction} N) |scores| / sum of all |scores|; mean and 95% CI "
            "over queries"),
    }
    normalised = analyses.sorted_magnitudes(scores[main])
    normalised = normalised / normalised.sum(axis=1, keepdims=True)
    ranks = np.arange(settings.fit_min_rank, settings.fit_max_rank + 1)
    median = np.median(normalised, axis=0)[ranks - 1]
    slope, intercept = np.polyfit(np.log10(ranks), np.log10(median), 1)
    fit = {"method": main, "min_rank": settings.fit_min_rank, "max_rank": settings.fit_max_rank,
           "exponent": float(-slope), "intercept": float(intercept)}
    results["median_curve_exponent"] = float(-slope)
    return results, {"curves": {n: analyses.sorted_magnitudes(v) for n, v in scores.items()},
                     "fit": fit, "shares": {n: v["top1pct_share"] for n, v in per_method.items()},
                     "exponents": {n: v["tail_exponent"] for n, v in per_method.items()}}


def order_flip_results(config: ml_collections.ConfigDict, problem: Problem,
                       scores: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Share of positive influence and mean rank of the fact's own sequences, by query order."""
    same = problem.same_order
    by_method = {}
    for name in [m for m in method_names(config) if m in config.order_flip.methods]:
        share, rank = analyses.fact_row_influence(scores[name], problem.row_mask)
        control = analyses.control_share(scores[name], problem.row_mask, problem.entity_mask)
        by_method[name] = {
            "share": {"same_order": _summary(share[same]), "flipped": _summary(share[~same])},
            "mean_rank": {"same_order": _summary(rank[same]), "flipped": _summary(rank[~same])},
            "same_entity_control_share": {"same_order": _summary(control[same]),
                                          "flipped": _summary(control[~same])},
        }
    main = by_method[config.order_flip.main_method]
    num_train = problem.row_mask.shape[1]
    return {
        "method": config.order_flip.main_method,
        "same_order": main["share"]["same_order"],
        "flipped": main["share"]["flipped"],
        "mean_rank": main["mean_rank"],
        "same_entity_control_share": main["same_entity_control_share"],
        "by_method": by_method,
        "no_relation": {"share": float(problem.row_mask.sum(axis=1).mean() / num_train),
                        "mean_rank": (num_train + 1) / 2},
        "definition": ("share = sum over the sequences stating the query's fact of max(score, 0) "
                       "/ sum over all sequences of max(score, 0); mean_rank = mean rank of those "
                       "sequences by decreasing score (1 = most positive); mean and 95% CI over "
                       "the queries of each order; no_relation: expected values for randomly "
                       "placed rows; same_entity_control_share: the share the fact's rows would "
                       "hold if each were as influential as the average row stating another fact "
                       "about the same entity (a share near it: the rows matter as mentions of the "
                       "entity, not as the fact)"),
    }


def query_batching_results(batching: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Per rank: Pearson with full-rank scores (mean, CI over queries), seconds, memory."""
    full = batching["full"]["scores"]
    results = {}
    for name, values in batching.items():
        pearson = summarize(analyses.pearson_per_query(values["scores"], full))
        peak = float(values["peak_rss_increase_mb"])
        results[name] = {
            "pearson": pearson.mean, "pearson_ci95": pearson.ci95,
            "seconds": float(values["seconds"]),
            "compile_and_warmup_seconds": float(values["warmup_seconds"]),
            "query_bytes": int(values["query_bytes"]),
            "training_passes": int(values["training_passes"]),
            "peak_rss_increase_mb": None if math.isnan(peak) else peak,
        }
    return results


def tfidf_results(config: ml_collections.ConfigDict, problem: Problem,
                  scores: np.ndarray, tfidf: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Per k: recall@k of each query's unfiltered top sequences (all queries and by order) and
    the speed-up of scoring the timing queries' candidate union instead of every sequence."""
    top = config.tfidf.top
    best = attribution.top_rows(scores, top)
    same = problem.same_order
    results = {}
    for i, k in enumerate(config.tfidf.ks):
        candidates = tfidf["candidates"][:, :k]
        per_query = analyses.recall_per_query(best, candidates)
        recall = attribution.recall_at_k(scores, candidates, top=top)
        results[str(k)] = {
            "recall": recall,
            "recall_ci95": summarize(per_query).ci95,
            "recall_by_order": {"same_order": _summary(per_query[same]),
                                "flipped": _summary(per_query[~same])},
            "speedup": float(tfidf["seconds_all"] / tfidf["seconds_union"][i]),
            "seconds_union": float(tfidf["seconds_union"][i]),
            "seconds_all": float(tfidf["seconds_all"]),
            "union_size": int(tfidf["union_size"][i]),
            "max_abs_difference_vs_full": float(tfidf["max_abs_difference"][i]),
        }
    return results


def lds_results(scores: Mapping[str, np.ndarray], masks: np.ndarray, ground_truth: np.ndarray,
                same: np.ndarray) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """LDS per method and the noise ceiling (all queries, and by order), and per-query arrays."""
    per_query = {name: lds(values, masks, ground_truth) for name, values in scores.items()}
    ceiling = noise_ceiling(ground_truth)
    results = {name: _summary(v) for name, v in per_query.items()}
    by_order = {order: {**{name: _summary(v[mask]) for name, v in per_query.items()},
                        "noise_ceiling": _summary(ceiling.ceiling[mask])}
                for order, mask in (("same_order", same), ("flipped", ~same))}
    arrays = {f"lds/{name}": v for name, v in per_query.items()}
    arrays["noise_ceiling"] = ceiling.ceiling
    return results, {"noise_ceiling": _summary(ceiling.ceiling),
                     "seed_correlation": _summary(ceiling.seed_correlation),
                     "by_order": by_order}, arrays


# --------------------------------------------------------------------------------------------------
# Driver.


def _settings(config, problem: Problem, curvature_settings: dict[str, Any],
              metrics: dict[str, Any]) -> dict[str, Any]:
    num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(problem.template))
    return {
        "num_train": data.num_examples(problem.train),
        "num_queries": data.num_examples(problem.queries),
        "num_facts": len(problem.corpus.facts),
        "vocab_size": problem.corpus.vocab_size,
        "max_len": problem.corpus.max_len,
        "num_params": num_params,
        "measurement": MEASUREMENT.__name__,
        "loss": problem.loss.name,
        "methods": config.methods.to_dict(),
        "curvature": curvature_settings,
        "model_metrics": metrics,
        "jax_devices": len(jax.devices()),
        "sign_convention": "score > 0: training on the sequence raises the query's completion "
                           "log-probability",
    }


def _curvature_settings(workdir: Path, config) -> dict[str, Any]:
    out = {}
    for name in config.methods:
        path = workdir / "curvature" / name / "curvature.json"
        if path.exists():
            saved = json.loads(path.read_text())
            out[name] = {"tracked_params": saved["num_params"],
                         "untracked": saved["settings"].get("untracked"),
                         "layers": saved["settings"].get("layers"),
                         "fisher": saved["settings"].get("fisher"),
                         "damping": saved["damping"]}
    return out


def run(config: ml_collections.ConfigDict, workdir: str | Path,
        overwrite: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the experiment and writes ``workdir/results.json`` and the figures.

    Order: validate the config, corpus (cheap), open every stage (settings checked), LDS ground
    truth (if enabled), model, scores per method (fitting curvature on demand), query batching,
    TF-IDF, analyses and outputs.

    Args:
      config: see ``experiments/llm_influence/configs/default.py``.
      workdir: the work directory; its finished stages are reused.
      overwrite: recompute stages whose finished work was made with other settings (deleting it;
        each replacement is logged) instead of raising.

    Returns:
      The results dictionary written to ``results.json``.

    Raises:
      ValueError: naming the config field of an invalid setting (before any expensive stage).
      tda_jax.io.ArgumentMismatchError: if a stage in ``workdir`` holds finished work made with
        other settings and ``overwrite`` is false.
    """
    with allow_overwrite(overwrite):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    start = time.perf_counter()
    validate_config(config)
    corpus = make_corpus(config)
    validate_against_corpus(config, corpus)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []
    problem = make_problem(config, corpus)
    stages = open_stages(config, workdir, problem)
    corpus_stage(stages.corpus, corpus, reused)

    ground_truth = masks = None
    if config.lds.enabled:
        masks = sample_subsets(problem.subset_key, data.num_examples(problem.train),
                               config.lds.num_subsets, config.lds.fraction)
        ground_truth = ground_truth_stage(config, workdir, problem, masks, reused)

    variables, metrics = model_stage(config, stages.model, problem, reused)
    curvature_of = make_curvature_getter(config, stages, problem, variables, reused)
    scores = {name: scores_stage(config, name, stages.scores[name], problem, variables,
                                 curvature_of, reused)
              for name in progress(method_names(config), desc="methods",
                                   total=len(config.methods))}
    batching = query_batching_stage(config, stages.query_batching, problem, variables,
                                    curvature_of, reused)
    tfidf = tfidf_stage(config, stages.tfidf, problem, variables, curvature_of, reused)

    sparsity, sparsity_plot = sparsity_results(config, problem, scores)
    results: dict[str, Any] = {
        "lds": None, "noise_ceiling": None,
        "sparsity": sparsity,
        "order_flip": order_flip_results(config, problem, scores),
        "query_batching": query_batching_results(batching),
        "tfidf": tfidf_results(config, problem, scores[config.tfidf.method], tfidf),
    }
    per_query_arrays: dict[str, np.ndarray] = {}
    if ground_truth is not None:
        results["lds"], extra, per_query_arrays = lds_results(scores, masks, ground_truth,
                                                              problem.same_order)
        results["noise_ceiling"] = extra.pop("noise_ceiling")
        results["lds_details"] = {
            **extra, "num_subsets": config.lds.num_subsets,
            "seeds_per_subset": config.lds.seeds_per_subset, "fraction": config.lds.fraction,
            "definition": "Spearman over subsets of the predicted sum of scores and the "
                          "seed-mean completion log-probability of the retrained models; mean "
                          "and 95% CI over queries (both orders)"}
    else:
        results["lds_note"] = ("LDS not computed in this configuration (config.lds.enabled is "
                               "False); run the ':lds' config in this work directory")
    timings = {"model": _read_seconds(stages.model.directory)}
    for name in method_names(config):
        timings[f"curvature/{name}"] = _read_seconds(stages.curvature[name].directory)
        timings[f"scores/{name}"] = _read_seconds(stages.scores[name].directory)
    timings["query_batching"] = _read_seconds(stages.query_batching.directory)
    timings["tfidf"] = _read_seconds(stages.tfidf.directory)
    if config.lds.enabled:
        timings["ground_truth"] = _read_seconds(workdir / "ground_truth")
    timings["total_this_run"] = time.perf_counter() - start
    results["settings"] = _settings(config, problem, _curvature_settings(workdir, config), metrics)
    results["timings_s"] = timings
    results["stages_reused"] = reused
    write_outputs(config, workdir, problem, results, sparsity_plot, per_query_arrays)
    return results


def write_outputs(config: ml_collections.ConfigDict, workdir: Path, problem: Problem,
                  results: dict[str, Any], sparsity_plot: dict[str, Any],
                  per_query_arrays: dict[str, np.ndarray]) -> None:
    """``results.json`` and the figures (written by process 0 in a multi-process run)."""
    if not is_main_process():
        return
    write_json(workdir / "results.json", results)
    n = results["settings"]["num_train"]
    where = f"{n} sequences, {results['settings']['num_queries']} queries"
    figures.plot_sparsity(workdir / "sparsity.png", top_fraction=config.sparsity.top_fraction,
                          title=f"Sparsity of influence ({where})", **sparsity_plot)
    flip = results["order_flip"]
    figures.plot_order_flip(
        workdir / "order_flip.png",
        share={m: v["share"] for m, v in flip["by_method"].items()},
        rank={m: v["mean_rank"] for m, v in flip["by_method"].items()},
        control={m: v["same_entity_control_share"] for m, v in flip["by_method"].items()},
        chance_share=flip["no_relation"]["share"], chance_rank=flip["no_relation"]["mean_rank"],
        title=f"Influence of the sequences stating the queried fact ({where})")
    figures.plot_query_batching(
        workdir / "query_batching.png", results["query_batching"],
        title=(f"Low-rank query batching ({config.query_batching.method}, "
               f"{config.query_batching.num_queries} queries x {config.query_batching.num_train} "
               "sequences)"))
    figures.plot_tfidf(workdir / "tfidf.png", results["tfidf"], top=config.tfidf.top, num_train=n,
                       title=(f"TF-IDF filtering ({config.tfidf.method}; speed-up for "
                              f"{config.tfidf.timing_queries} queries)"))
    if results["lds"] is not None:
        write_npz(workdir / "lds_per_query.npz", per_query_arrays)
        plot_lds_bars(results["lds"], workdir / "lds.png", noise_ceiling=results["noise_ceiling"],
                      title=(f"LDS, fact-corpus LM ({config.lds.num_subsets} subsets x "
                             f"{config.lds.seeds_per_subset} seeds)"))
    logging.info("results: %s", json.dumps({k: results[k] for k in ("lds", "noise_ceiling")}))
