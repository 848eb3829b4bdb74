"""The IF-COMP experiment as persistent stages: models -> calibration -> mislabel -> OOD -> oracle.

Work directory layout (every stage is a :class:`tda_jax.io.Stage` with its saved arguments)::

    DIR/models/       the full-data models (``ensemble_size`` seeds, vmapped; member 0 is "the" model)
    DIR/calibration/  predictive probabilities of every method at every shift, chosen settings
    DIR/mislabel/     the model trained with flipped labels, its scores and the flipped mask
    DIR/ood/          the model trained on digits 0-4 and its OOD scores on the test digits
    DIR/oracle/       IF-COMP and brute-force pNML complexities on a small model
    DIR/results.json  the numbers (see ``tests/test_ifcomp_experiment.py`` for the contract)
    DIR/calibration.png, DIR/detection.png

Methods. Calibration: ``softmax``; ``temperature`` (one temperature fitted on the validation NLL);
``ensemble`` (mean softmax of ``ensemble_size`` models trained with different seeds by
``training.train_many``); ``laplace`` (linearized Laplace: logits ``~ N(f, s K(x))`` with the same
EK-FAC kernel ``K`` as IF-COMP, ``s`` fitted on the validation NLL, Monte Carlo predictive);
``ifcomp`` (the pNML distribution). Mislabel detection (higher = flipped): ``loss`` (training loss),
``self_influence`` (EK-FAC self-influence, :func:`tda_jax.attribution.self_scores`), ``ifcomp``
(pNML code length of the observed label). OOD detection (higher = OOD): ``ifcomp`` (complexity
``Gamma``), ``msp`` (minus the max softmax probability), ``energy`` (minus logsumexp of the logits),
``mahalanobis`` (distance of penultimate features to the nearest class mean under the shared
training covariance). AUROCs use scikit-learn's ``roc_auc_score``; every CI is the half-width of
the 95% percentile bootstrap interval over test (or training) points.

Every config value is checked first (:func:`validate_config`); every stage's arguments are checked
before any work (a changed setting of a finished stage raises
:class:`tda_jax.io.ArgumentMismatchError` unless ``--overwrite``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from scipy.optimize import minimize_scalar
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from experiments import config_checks as check
from tda_jax import attribution, data, losses, models, training
from tda_jax.complexity import (
    brute_force_pnml,
    build_kernel_step,
    labelled_complexity,
    output_kernels,
    pnml_from_kernels,
)
from tda_jax.io import Stage, allow_overwrite, write_json
from tda_jax.progress import progress
from tda_jax.sharding import is_main_process
from tda_jax.training.config import OPTIMIZERS

CALIBRATION_METHODS = ("softmax", "temperature", "ensemble", "laplace", "ifcomp")
MISLABEL_METHODS = ("ifcomp", "loss", "self_influence")
OOD_METHODS = ("ifcomp", "msp", "energy", "mahalanobis")
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


def _positive_reals(config, field: str) -> tuple[float, ...]:
    values = check.get(config, field)
    if isinstance(values, str) or not hasattr(values, "__len__") or not values or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) and v > 0
            for v in values):
        check.fail(field, values, "it must be a non-empty list of finite numbers > 0")
    return tuple(float(v) for v in values)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every value of the experiment's config before any stage runs (names the field)."""
    check.known_fields(config, "", ("seed", "fast_compile", "data", "model", "train", "ifcomp",
                                    "calibration", "mislabel", "ood", "oracle", "num_bootstrap"))
    check.integer(config, "seed")
    check.boolean(config, "fast_compile")
    check.known_fields(config, "data", ("num_train", "num_val", "num_test", "seed"))
    check.integer(config, "data.num_train", minimum=20)
    check.integer(config, "data.num_val", minimum=10)
    check.integer(config, "data.num_test", minimum=20)
    check.integer(config, "data.seed")
    check.known_fields(config, "model", ("hidden_sizes",))
    check.int_sequence(config, "model.hidden_sizes")
    check.known_fields(config, "train", ("num_epochs", "batch_size", "learning_rate",
                                         "weight_decay", "optimizer"))
    check.positive_int(config, "train.num_epochs")
    check.positive_int(config, "train.batch_size")
    check.real(config, "train.learning_rate", minimum=0.0, strict=True)
    check.real(config, "train.weight_decay", minimum=0.0)
    check.choice(config, "train.optimizer", OPTIMIZERS)
    check.known_fields(config, "ifcomp", ("damping", "temperatures", "epsilons", "batch_size",
                                          "curvature_batch_size"))
    check.real(config, "ifcomp.damping", minimum=0.0, allow_none=True)
    _positive_reals(config, "ifcomp.temperatures")
    _positive_reals(config, "ifcomp.epsilons")
    check.positive_int(config, "ifcomp.batch_size")
    check.positive_int(config, "ifcomp.curvature_batch_size")
    check.known_fields(config, "calibration", ("shifts", "ece_bins", "ensemble_size", "laplace",
                                               "laplace_scales", "laplace_samples"))
    shifts = check.get(config, "calibration.shifts")
    if isinstance(shifts, str) or not hasattr(shifts, "__len__") or len(shifts) < 5 or not all(
            isinstance(s, int | float) and not isinstance(s, bool) and np.isfinite(s) and s >= 0
            for s in shifts) or len(set(shifts)) != len(shifts):
        check.fail("calibration.shifts", shifts,
                   "it must list at least 5 distinct finite noise levels >= 0")
    check.integer(config, "calibration.ece_bins", minimum=2)
    check.integer(config, "calibration.ensemble_size", minimum=2)
    check.boolean(config, "calibration.laplace")
    _positive_reals(config, "calibration.laplace_scales")
    check.positive_int(config, "calibration.laplace_samples")
    check.known_fields(config, "mislabel", ("fraction",))
    check.fraction(config, "mislabel.fraction")
    check.known_fields(config, "ood", ("num_in_classes",))
    check.integer(config, "ood.num_in_classes", minimum=2, maximum=9)
    check.known_fields(config, "oracle", ("num_train", "num_points", "hidden_sizes", "activation",
                                          "num_epochs", "damping", "epsilon", "temperature",
                                          "num_steps", "learning_rate"))
    check.choice(config, "oracle.activation", tuple(ACTIVATIONS))
    check.integer(config, "oracle.num_train", minimum=10)
    check.integer(config, "oracle.num_points", minimum=3)
    check.int_sequence(config, "oracle.hidden_sizes")
    check.positive_int(config, "oracle.num_epochs")
    check.real(config, "oracle.damping", minimum=0.0, strict=True)
    check.real(config, "oracle.epsilon", minimum=0.0, strict=True)
    check.real(config, "oracle.temperature", minimum=0.0, strict=True)
    check.positive_int(config, "oracle.num_steps")
    check.real(config, "oracle.learning_rate", minimum=0.0, strict=True)
    check.integer(config, "num_bootstrap", minimum=10)
    if config.oracle.num_train > config.data.num_train:
        check.fail("oracle.num_train", config.oracle.num_train,
                   f"it must be <= data.num_train = {config.data.num_train}")
    if config.oracle.num_points > config.data.num_test:
        check.fail("oracle.num_points", config.oracle.num_points,
                   f"it must be <= data.num_test = {config.data.num_test}")


# --------------------------------------------------------------------------------------------
# Data, models and metrics
# --------------------------------------------------------------------------------------------


def load_splits(config) -> tuple[data.Dataset, data.Dataset, data.Dataset]:
    """``(train, val, test)`` MNIST-1D splits."""
    pool, test = data.load_mnist1d(config.num_train + config.num_val, config.num_test,
                                   seed=config.seed)
    train = data.subset(pool, np.arange(config.num_train))
    val = data.subset(pool, np.arange(config.num_train, config.num_train + config.num_val))
    return train, val, test


def _train_config(config) -> training.TrainConfig:
    return training.TrainConfig(num_epochs=config.num_epochs, batch_size=config.batch_size,
                                learning_rate=config.learning_rate,
                                weight_decay=config.weight_decay, optimizer=config.optimizer,
                                loss=losses.softmax_cross_entropy())


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _unflatten(template: Any, arrays: dict[str, np.ndarray]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(arrays[jax.tree_util.keystr(path)]) for path, _ in paths])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins."""
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / max(count.sum(), 1))


def bootstrap_ci(statistic, num: int, num_bootstrap: int, seed: int) -> float:
    """Half-width of the 95% percentile bootstrap interval of ``statistic(indices)``."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, num, num)) for _ in range(num_bootstrap)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float((high - low) / 2)


def auroc_summary(scores: np.ndarray, positive: np.ndarray, num_bootstrap: int,
                  seed: int) -> dict[str, float]:
    positive = positive.astype(np.int64)

    def statistic(index):
        if positive[index].min() == positive[index].max():
            return np.nan
        return roc_auc_score(positive[index], scores[index])

    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, len(scores), len(scores)))
                       for _ in range(num_bootstrap)])
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return {"auroc": float(roc_auc_score(positive, scores)), "ci95": float((high - low) / 2)}


def penultimate_features(model: models.MLP, params, inputs: np.ndarray) -> np.ndarray:
    """Activations feeding the MLP's last Dense layer (the inputs for an MLP without hidden layers)."""
    if not model.hidden_sizes:
        return np.asarray(inputs).reshape(len(inputs), -1)
    _, state = model.apply({"params": params}, jnp.asarray(inputs), capture_intermediates=True)
    last = f"Dense_{len(model.hidden_sizes) - 1}"
    return np.asarray(model.activation(state["intermediates"][last]["__call__"][0]))


def mahalanobis_scores(train_features, train_labels, features, num_classes) -> np.ndarray:
    """``min_c (h - mu_c)^T Sigma^-1 (h - mu_c)`` with class means and the shared covariance."""
    means = np.stack([train_features[train_labels == c].mean(0) for c in range(num_classes)])
    centred = train_features - means[train_labels]
    cov = centred.T @ centred / len(centred) + 1e-6 * np.eye(centred.shape[1])
    precision = np.linalg.inv(cov)
    diff = features[:, None, :] - means[None]
    return np.einsum("ncd,de,nce->nc", diff, precision, diff).min(axis=1)


# --------------------------------------------------------------------------------------------
# IF-COMP helpers
# --------------------------------------------------------------------------------------------


class KernelSource:
    """An EK-FAC (expected Fisher) curvature of one model and its compiled kernel step."""

    def __init__(self, config, apply_fn, params, train: data.Dataset):
        self.apply_fn, self.params, self.config = apply_fn, params, config
        self.curvature = attribution.fit_curvature(
            apply_fn, params, train, strategy="ekfac", fisher="expected",
            loss=losses.softmax_cross_entropy(), damping=config.ifcomp.damping,
            batch_size=config.ifcomp.curvature_batch_size)
        self.step = build_kernel_step(apply_fn, self.curvature)

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return output_kernels(self.apply_fn, self.params, self.curvature, inputs,
                              batch_size=self.config.ifcomp.batch_size, step=self.step)


def choose_ifcomp(config, logits: np.ndarray, kernels: np.ndarray,
                  labels: np.ndarray) -> tuple[float, float, float]:
    """``(temperature, epsilon, nll)`` of the grid point with the lowest validation pNML NLL."""
    best = None
    for temperature in config.ifcomp.temperatures:
        for epsilon in config.ifcomp.epsilons:
            result = pnml_from_kernels(logits, kernels, temperature=temperature, epsilon=epsilon)
            value = nll(result.pnml, labels)
            if best is None or value < best[2]:
                best = (float(temperature), float(epsilon), value)
    return best


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` (bounded search on log T)."""
    found = minimize_scalar(lambda log_t: nll(softmax(logits / np.exp(log_t)), labels),
                            bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(found.x))


def laplace_probs(logits: np.ndarray, kernels: np.ndarray, scale: float, num_samples: int,
                  seed: int) -> np.ndarray:
    """Monte Carlo predictive of logits ``~ N(f, scale K)`` (linearized Laplace)."""
    num_classes = logits.shape[-1]
    chol = np.linalg.cholesky(scale * kernels.astype(np.float64) + 1e-9 * np.eye(num_classes))
    noise = np.random.default_rng(seed).normal(size=(num_samples, num_classes))
    samples = logits[None] + np.einsum("ncd,sd->snc", chol, noise)
    return softmax(samples).mean(axis=0)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def _timed(stage: Stage, began: float) -> None:
    if is_main_process():
        write_json(stage.path("timing.json"), {"seconds": time.perf_counter() - began})


def _seconds(stage: Stage) -> float | None:
    path = stage.path("timing.json")
    return json.loads(Path(path).read_text())["seconds"] if Path(path).exists() else None


def models_stage(stage: Stage, config, model, train, template, reused: list[str]) -> list[Any]:
    """``ensemble_size`` models trained on the full data with different seeds (vmapped)."""
    size = config.calibration.ensemble_size
    if stage.is_complete():
        reused.append("models")
        stacked = _unflatten(template, stage.load_arrays("params"))
    else:
        began = time.perf_counter()
        stacked = training.train_many(
            jax.random.split(jax.random.key(config.seed), size), model, train,
            np.ones((size, data.num_examples(train)), dtype=bool), _train_config(config.train))
        stage.save_arrays("params", _flatten(stacked))
        _timed(stage, began)
        stage.mark_complete()
    return [jax.tree.map(lambda leaf, k=k: leaf[k], stacked)["params"] for k in range(size)]


def calibration_stage(stage: Stage, config, model, members, train, val, test,
                      reused: list[str]) -> dict[str, np.ndarray]:
    if stage.is_complete():
        reused.append("calibration")
        return stage.load_arrays("probs")
    began = time.perf_counter()
    apply_fn = models.apply_fn_of(model)
    kernels_of = KernelSource(config, apply_fn, members[0], train)
    val_logits, val_kernels = kernels_of(np.asarray(val.inputs))
    temperature, epsilon, _ = choose_ifcomp(config, val_logits, val_kernels,
                                            np.asarray(val.targets))
    scaling = fit_temperature(val_logits, np.asarray(val.targets))
    arrays: dict[str, np.ndarray] = {
        "ifcomp_temperature": np.float64(temperature), "ifcomp_epsilon": np.float64(epsilon),
        "temperature_scaling": np.float64(scaling)}
    laplace_scale = None
    if config.calibration.laplace:
        scores = [(nll(laplace_probs(val_logits, val_kernels, s, config.calibration.laplace_samples,
                                     config.seed), np.asarray(val.targets)), s)
                  for s in config.calibration.laplace_scales]
        laplace_scale = min(scores)[1]
        arrays["laplace_scale"] = np.float64(laplace_scale)
    noise = np.random.default_rng(config.seed + 1).normal(size=np.shape(test.inputs))
    for k, shift in enumerate(progress(config.calibration.shifts, desc="shifts")):
        inputs = (np.asarray(test.inputs) + shift * noise).astype(np.float32)
        logits, kernels = kernels_of(inputs)
        arrays[f"softmax/{k}"] = softmax(logits)
        arrays[f"temperature/{k}"] = softmax(logits / scaling)
        member_probs = [softmax(np.asarray(apply_fn(p, jnp.asarray(inputs)))) for p in members]
        arrays[f"ensemble/{k}"] = np.mean(member_probs, axis=0)
        arrays[f"ifcomp/{k}"] = pnml_from_kernels(logits, kernels, temperature=temperature,
                                                  epsilon=epsilon).pnml
        if laplace_scale is not None:
            arrays[f"laplace/{k}"] = laplace_probs(logits, kernels, laplace_scale,
                                                   config.calibration.laplace_samples,
                                                   config.seed + k)
    stage.save_arrays("probs", arrays)
    _timed(stage, began)
    stage.mark_complete()
    return arrays


def _flip_labels(labels: np.ndarray, num_classes: int, fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(labels), bool)
    flipped[rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)] = True
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, flipped.sum())) % num_classes
    return noisy.astype(np.int32), flipped


def mislabel_stage(stage: Stage, config, model, train, val, reused: list[str]):
    if stage.is_complete():
        reused.append("mislabel")
        return stage.load_arrays("scores")
    began = time.perf_counter()
    noisy_labels, flipped = _flip_labels(np.asarray(train.targets), train.num_classes,
                                         config.mislabel.fraction, config.seed + 2)
    noisy = data.Dataset(np.asarray(train.inputs), noisy_labels, train.num_classes)
    variables = training.train(jax.random.key(config.seed + 2), model, None, noisy,
                               _train_config(config.train))
    params = variables["params"]
    apply_fn = models.apply_fn_of(model)
    kernels_of = KernelSource(config, apply_fn, params, noisy)
    val_logits, val_kernels = kernels_of(np.asarray(val.inputs))
    temperature, epsilon, _ = choose_ifcomp(config, val_logits, val_kernels,
                                            np.asarray(val.targets))
    logits, kernels = kernels_of(np.asarray(noisy.inputs))
    result = pnml_from_kernels(logits, kernels, temperature=temperature, epsilon=epsilon)
    loss = losses.softmax_cross_entropy()
    arrays = {
        "flipped": flipped,
        "ifcomp": labelled_complexity(result, noisy_labels),
        "loss": np.asarray(loss.per_example(jnp.asarray(logits), jnp.asarray(noisy_labels))),
        "self_influence": attribution.self_scores(apply_fn, params, kernels_of.curvature, noisy,
                                                  loss=loss),
        "ifcomp_temperature": np.float64(temperature), "ifcomp_epsilon": np.float64(epsilon),
    }
    stage.save_arrays("scores", arrays)
    _timed(stage, began)
    stage.mark_complete()
    return arrays


def _digits_below(dataset: data.Dataset, num_classes: int) -> data.Dataset:
    keep = np.flatnonzero(np.asarray(dataset.targets) < num_classes)
    picked = data.subset(dataset, keep)
    return data.Dataset(picked.inputs, picked.targets, num_classes)


def ood_stage(stage: Stage, config, train, val, test, reused: list[str]):
    if stage.is_complete():
        reused.append("ood")
        return stage.load_arrays("scores")
    began = time.perf_counter()
    classes = config.ood.num_in_classes
    train_in, val_in = _digits_below(train, classes), _digits_below(val, classes)
    model = models.MLP(hidden_sizes=tuple(config.model.hidden_sizes), num_outputs=classes)
    variables = training.train(jax.random.key(config.seed + 3), model, None, train_in,
                               _train_config(config.train))
    params = variables["params"]
    apply_fn = models.apply_fn_of(model)
    kernels_of = KernelSource(config, apply_fn, params, train_in)
    val_logits, val_kernels = kernels_of(np.asarray(val_in.inputs))
    temperature, epsilon, _ = choose_ifcomp(config, val_logits, val_kernels,
                                            np.asarray(val_in.targets))
    inputs = np.asarray(test.inputs)
    logits, kernels = kernels_of(inputs)
    result = pnml_from_kernels(logits, kernels, temperature=temperature, epsilon=epsilon)
    probs = softmax(logits)
    train_features = penultimate_features(model, params, np.asarray(train_in.inputs))
    arrays = {
        "is_ood": np.asarray(test.targets) >= classes,
        "ifcomp": result.complexity,
        "msp": -probs.max(axis=-1),
        "energy": -np.asarray(jax.nn.logsumexp(jnp.asarray(logits), axis=-1)),
        "mahalanobis": mahalanobis_scores(train_features, np.asarray(train_in.targets),
                                          penultimate_features(model, params, inputs), classes),
        "ifcomp_temperature": np.float64(temperature), "ifcomp_epsilon": np.float64(epsilon),
    }
    stage.save_arrays("scores", arrays)
    _timed(stage, began)
    stage.mark_complete()
    return arrays


def oracle_stage(stage: Stage, config, train, test, reused: list[str]):
    if stage.is_complete():
        reused.append("oracle")
        return stage.load_arrays("complexity")
    began = time.perf_counter()
    oracle = config.oracle
    small = data.subset(train, np.arange(oracle.num_train))
    model = models.MLP(hidden_sizes=tuple(oracle.hidden_sizes), num_outputs=train.num_classes,
                       activation=ACTIVATIONS[oracle.activation])
    settings = _train_config(config.train).replace(num_epochs=oracle.num_epochs,
                                                   batch_size=min(oracle.num_train, 128))
    params = training.train(jax.random.key(config.seed + 4), model, None, small,
                            settings)["params"]
    apply_fn = models.apply_fn_of(model)
    curvature = attribution.fit_curvature(apply_fn, params, small, strategy="ekfac",
                                          fisher="expected", loss=losses.softmax_cross_entropy(),
                                          damping=oracle.damping)
    points = np.asarray(test.inputs[:oracle.num_points])
    logits, kernels = output_kernels(apply_fn, params, curvature, points)
    approx = pnml_from_kernels(logits, kernels, temperature=oracle.temperature,
                               epsilon=oracle.epsilon)
    exact, grad_norms = brute_force_pnml(apply_fn, params, np.asarray(small.inputs), points,
                                         temperature=oracle.temperature, epsilon=oracle.epsilon,
                                         damping=oracle.damping, num_steps=oracle.num_steps,
                                         learning_rate=oracle.learning_rate)
    arrays = {"ifcomp": approx.complexity, "brute_force": exact.complexity,
              "ifcomp_hindsight": approx.hindsight, "brute_force_hindsight": exact.hindsight,
              "grad_norms": grad_norms}
    stage.save_arrays("complexity", arrays)
    _timed(stage, began)
    stage.mark_complete()
    return arrays


# --------------------------------------------------------------------------------------------
# Results and figures
# --------------------------------------------------------------------------------------------


def calibration_results(config, probs: dict[str, np.ndarray], labels: np.ndarray) -> list[dict]:
    methods = [m for m in CALIBRATION_METHODS if f"{m}/0" in probs]
    out = []
    for k, shift in enumerate(config.calibration.shifts):
        entry = {}
        for method in methods:
            p = probs[f"{method}/{k}"]
            bins = config.calibration.ece_bins
            seed = config.seed + 100 * k
            entry[method] = {
                "ece": ece(p, labels, bins), "nll": nll(p, labels),
                "accuracy": float(np.mean(p.argmax(-1) == labels)),
                "ece_ci95": bootstrap_ci(lambda i, p=p: ece(p[i], labels[i], bins), len(labels),
                                         config.num_bootstrap, seed),
                "nll_ci95": bootstrap_ci(lambda i, p=p: nll(p[i], labels[i]), len(labels),
                                         config.num_bootstrap, seed),
            }
        out.append({"shift": float(shift), "methods": entry})
    return out


def detection_results(config, scores: dict[str, np.ndarray], positive: np.ndarray,
                      methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {m: auroc_summary(np.asarray(scores[m], np.float64), positive, config.num_bootstrap,
                             config.seed + j) for j, m in enumerate(methods)}


def plot_figures(config, workdir: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibration = results["calibration"]
    shifts = [entry["shift"] for entry in calibration]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in calibration[0]["methods"]:
        for ax, metric in zip(axes, ("ece", "nll")):
            values = [e["methods"][method][metric] for e in calibration]
            errors = [e["methods"][method][f"{metric}_ci95"] for e in calibration]
            ax.errorbar(shifts, values, yerr=errors, marker="o", capsize=3, label=method)
    for ax, name in zip(axes, ("ECE (15 bins)", "NLL")):
        ax.set_xlabel("input noise std (shift)")
        ax.set_ylabel(name)
        ax.set_title(f"{name} under shift (95% bootstrap CI)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(workdir / "calibration.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    titles = (f"mislabel detection ({100 * config.mislabel.fraction:g}% flipped)",
              f"OOD detection (train 0-{config.ood.num_in_classes - 1}, OOD "
              f"{config.ood.num_in_classes}-9)")
    for ax, task, title in zip(axes, ("mislabel", "ood"), titles):
        names = list(results[task])
        values = [results[task][m]["auroc"] for m in names]
        errors = [results[task][m]["ci95"] for m in names]
        ax.bar(names, values, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("method")
        ax.set_ylabel("AUROC")
        ax.set_title(f"{title} (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(workdir / "detection.png", dpi=120)
    plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str | Path,
        overwrite: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the experiment; writes ``workdir/results.json`` and the figures.

    Raises:
      ValueError: naming an invalid config field, before any work.
      tda_jax.io.ArgumentMismatchError: a finished stage made with other settings (unless
        ``overwrite``).
    """
    validate_config(config)
    with allow_overwrite(overwrite):
        return _run(config, Path(workdir))


def _run(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []
    train, val, test = load_splits(config.data)
    model = models.MLP(hidden_sizes=tuple(config.model.hidden_sizes), num_outputs=train.num_classes)
    template = model.init(jax.random.key(0), jnp.asarray(train.inputs[:1]))
    common = {"seed": config.seed, "data": config.data.to_dict(), "model": config.model.to_dict(),
              "train": config.train.to_dict()}
    stages = {
        "models": Stage(workdir / "models",
                        {**common, "ensemble_size": config.calibration.ensemble_size}),
        "calibration": Stage(workdir / "calibration",
                             {**common, "ensemble_size": config.calibration.ensemble_size,
                              "ifcomp": config.ifcomp.to_dict(),
                              "calibration": config.calibration.to_dict()}),
        "mislabel": Stage(workdir / "mislabel", {**common, "ifcomp": config.ifcomp.to_dict(),
                                                 "mislabel": config.mislabel.to_dict()}),
        "ood": Stage(workdir / "ood", {**common, "ifcomp": config.ifcomp.to_dict(),
                                       "ood": config.ood.to_dict()}),
        "oracle": Stage(workdir / "oracle", {**common, "oracle": config.oracle.to_dict()}),
    }
    members = models_stage(stages["models"], config, model, train, template, reused)
    probs = calibration_stage(stages["calibration"], config, model, members, train, val, test,
                              reused)
    mislabel = mislabel_stage(stages["mislabel"], config, model, train, val, reused)
    ood = ood_stage(stages["ood"], config, train, val, test, reused)
    oracle = oracle_stage(stages["oracle"], config, train, test, reused)

    labels = np.asarray(test.targets)
    results = {
        "calibration": calibration_results(config, probs, labels),
        "mislabel": detection_results(config, mislabel, mislabel["flipped"], MISLABEL_METHODS),
        "ood": detection_results(config, ood, ood["is_ood"], OOD_METHODS),
        "oracle": {
            "spearman_vs_brute_force": float(spearmanr(oracle["ifcomp"],
                                                       oracle["brute_force"])[0]),
            "hindsight_spearman": float(spearmanr(oracle["ifcomp_hindsight"].ravel(),
                                                  oracle["brute_force_hindsight"].ravel())[0]),
            "max_refit_gradient_norm": float(np.max(oracle["grad_norms"])),
            "num_points": int(len(oracle["ifcomp"])),
        },
        "selected": {
            "calibration": {k: float(probs[k]) for k in ("ifcomp_temperature", "ifcomp_epsilon",
                                                         "temperature_scaling", "laplace_scale")
                            if k in probs},
            "mislabel": {k: float(mislabel[k]) for k in ("ifcomp_temperature", "ifcomp_epsilon")},
            "ood": {k: float(ood[k]) for k in ("ifcomp_temperature", "ifcomp_epsilon")},
        },
        "settings": {
            "config": config.to_dict(),
            "ci95": "half-width of the 95% percentile bootstrap interval over points "
                    f"({config.num_bootstrap} resamples)",
            "scores": "higher = more likely mislabelled / OOD",
        },
        "timings_s": {**{name: _seconds(stage) for name, stage in stages.items()},
                      "total_this_run": time.perf_counter() - start},
        "stages_reused": reused,
    }
    if is_main_process():
        write_json(workdir / "results.json", results)
        plot_figures(config, workdir, results)
    logging.info("IF-COMP results: %s", json.dumps({k: results[k] for k in
                                                    ("mislabel", "ood", "oracle")}))
    return results
