"""IF-COMP: pNML distributions and stochastic complexity from temperature-scaled Boltzmann
influence functions (Ng, Grosse & Ghassemi, "Measuring Stochastic Data Complexity with Boltzmann
Influence Functions", ICML 2024).

**pNML.** For a test input ``x`` and every candidate label ``y``, the predictive normalized maximum
likelihood (pNML) distribution asks how well ``y`` could be fitted if ``(x, y)`` were added to the
training data: with ``theta_hat(x, y)`` the parameters refitted with ``(x, y)`` added,

    p_y(x)          = p(y | x, theta_hat(x, y))                   (hindsight-optimal probability)
    p_pNML(y | x)   = p_y(x) / sum_y' p_y'(x)
    Gamma(x)        = log sum_y p_y(x)                             (complexity, >= 0 when p_y >= p)

``Gamma`` is the pNML *regret* (stochastic complexity of an unlabelled point): large when many
labels can be fitted. For a labelled point ``(x, y_obs)`` the pNML code length of the observed
label is ``-log p_pNML(y_obs | x) = Gamma(x) - log p_{y_obs}(x)`` (:func:`labelled_complexity`).

**Temperature-scaled proximal Bregman response.** Refitting is replaced by the response of the
trained parameters ``theta_s`` to the added point, measured with the proximal Bregman response
objective of Bae et al. (2022) whose added-point loss is the cross-entropy of the *Boltzmann*
(temperature ``T``) label distribution ``softmax(f / T)``:

    theta_T(x, y) = argmin_theta  (1/N) sum_i D_L(f(theta, x_i), f(theta_s, x_i))
                                  + eps * L_T(f(theta, x), y) + (lambda / 2) ||theta - theta_s||^2,

    L_T(f, y) = -log softmax(f / T)_y,          grad_f L_T = (softmax(f / T) - e_y) / T,

with ``D_L`` the Bregman divergence of the training loss in output space (for softmax
cross-entropy ``D_L(f, f_s) = KL(softmax(f_s) || softmax(f))``), so the first term keeps the
*outputs* on the training data where they were and the last keeps the parameters close.

**Boltzmann influence function (linearized response).** Linearizing the network,
``f(theta, x) ~ f_s(x) + J_x (theta - theta_s)``, the Bregman term becomes
``(1/2) dtheta^T G dtheta`` with ``G = (1/N) sum_i J_i^T H_i J_i`` the Gauss-Newton matrix (the
expected Fisher: ``fit_curvature(..., fisher="expected")``, here EK-FAC), and ``L_T`` is taken to
first order. The minimiser and its effect on the test outputs are

    dtheta_y  = -eps (G + lambda I)^{-1} J_x^T grad_f L_T(f_s(x), y)
    Delta f_y = J_x dtheta_y = -eps K(x) grad_f L_T(f_s(x), y),   K(x) = J_x (G + lambda I)^{-1} J_x^T

and IF-COMP's hindsight probabilities are ``p_y(x) = softmax(f_s(x) + Delta f_y)_y``. ``lambda`` is
the damping of the fitted curvature (``fit_curvature(..., damping=lambda)``).

**Computation.** ``K(x)`` is a ``[C, C]`` output-space kernel, the same for every label, so all
labels cost one kernel per test point: per batch of ``B`` test points one forward pass and a VJP
of the ``C`` one-hot output cotangents give the layer inputs ``a`` and output gradients ``g``
(:func:`tda_jax.capture.layer_statistics`); the ``C`` per-output gradients are preconditioned with
the curvature block's own ``query_from_factors`` (EK-FAC: rotate into the Kronecker eigenbasis,
divide by ``eigenvalue + damping``) and contracted with the block's ``train_transform`` of the same
``a``, ``g``: ``K[b, c, d] = sum_layers sum_t a'_t^T V_{d,b} g'_{c,b,t}``. Only ``C x B``
preconditioned gradients exist at a time (one batch); nothing is formed per (point, label) pair.
Parameters outside tracked layers (LayerNorm, ...) do not move, as in the influence scores.

Supported models: classifiers with outputs ``[B, C]`` trained with softmax cross-entropy. The
output-space kernel and the linearized response (:func:`output_kernels`,
:func:`linearized_response`) work for any loss, e.g. squared-error regression, but the pNML over
labels needs a finite label set; regression targets are refused with an explanation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tda_jax.capture.statistics import layer_statistics
from tda_jax.compile import CompiledStep
from tda_jax.curvature.estimate import Curvature
from tda_jax.curvature.fit import check_compatible, inspect_model
from tda_jax.data import Dataset
from tda_jax.losses import Loss, check_loss

Array = jax.Array


class PNML(NamedTuple):
    """IF-COMP's output for ``N`` test points and the candidate labels ``labels [Y]``.

    Attributes:
      logits: ``[N, C]`` outputs of the trained model ``f_s(x)``.
      labels: ``[Y]`` candidate labels (class indices) the pNML is normalized over.
      hindsight: ``[N, Y]`` ``p_y(x) = softmax(f_s + Delta f_y)_y``.
      pnml: ``[N, Y]`` ``p_pNML(y | x) = p_y / sum_y' p_y'``.
      complexity: ``[N]`` ``Gamma(x) = log sum_y p_y(x)``.
    """

    logits: np.ndarray
    labels: np.ndarray
    hindsight: np.ndarray
    pnml: np.ndarray
    complexity: np.ndarray


def check_temperature(temperature: Any) -> float:
    """``temperature`` as a float; raises unless it is a finite number > 0."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a finite number > 0, got {temperature!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0 (the Boltzmann distribution "
                         f"softmax(f / T) is undefined otherwise), got {temperature!r}.")
    return value


def check_epsilon(epsilon: Any) -> float:
    """``epsilon`` (the added point's weight) as a float; raises unless finite and > 0."""
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise TypeError(f"epsilon must be a finite number > 0, got {epsilon!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"epsilon must be a finite number > 0 (the weight of the added test "
                         f"point in the proximal objective), got {epsilon!r}.")
    return value


def check_labels(labels: Any, num_classes: int, argument: str = "labels") -> np.ndarray:
    """Candidate labels as ``[Y]`` int32: distinct class indices in ``[0, num_classes)``."""
    if labels is None:
        return np.arange(num_classes, dtype=np.int32)
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{argument} must be a non-empty 1-D sequence of class indices, got "
                         f"shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{argument} must hold integer class indices, got dtype {array.dtype}.")
    bad = np.flatnonzero((array < 0) | (array >= num_classes))
    if bad.size:
        raise ValueError(f"{argument}[{int(bad[0])}] = {int(array[bad[0]])} is not a class of the "
                         f"model, whose outputs have {num_classes} classes (0..{num_classes - 1}).")
    if np.unique(array).size != array.size:
        values, counts = np.unique(array, return_counts=True)
        raise ValueError(f"{argument} repeats the class(es) {values[counts > 1].tolist()}; each "
                         "candidate label must appear once.")
    return array.astype(np.int32)


def _inputs_of(data: Dataset | Any) -> tuple[np.ndarray, Dataset | None]:
    if isinstance(data, Dataset):
        return np.asarray(data.inputs), data
    return np.asarray(data), None


def check_classifier(apply_fn, params, data: Dataset | Any, loss: Loss | None = None) -> int:
    """The number of classes ``C`` of a classifier ``[B, C]``; clear errors for regression and
    sequence models, and for a dataset whose ``num_classes`` differs from the outputs."""
    if loss is not None:
        loss = check_loss(loss)
        if loss.target_kind != "class":
            raise ValueError(
                f"IF-COMP's pNML needs a classifier trained with a class loss (softmax "
                f"cross-entropy); got loss {loss.name!r} with {loss.target_kind!r} targets. A "
                "regression model has no finite label set to normalize over; use output_kernels "
                "and linearized_response for its output response instead.")
    inputs, dataset = _inputs_of(data)
    if dataset is not None and dataset.num_classes is None:
        raise ValueError("IF-COMP's pNML needs a classification dataset (num_classes set); this "
                         "dataset has regression targets (num_classes=None). Use output_kernels "
                         "and linearized_response for a regression model's output response.")
    if inputs.shape[0] == 0:
        raise ValueError("the dataset is empty (0 examples).")
    out = jax.eval_shape(apply_fn, params, jnp.asarray(inputs[:1]))
    if len(out.shape) != 2:
        raise ValueError(f"IF-COMP needs a classifier with outputs [batch, classes]; apply_fn "
                         f"returns shape {tuple(out.shape)} (sequence models are not supported).")
    num_classes = int(out.shape[1])
    if dataset is not None and int(dataset.num_classes) != num_classes:
        raise ValueError(f"the dataset has num_classes={dataset.num_classes} but the model has "
                         f"{num_classes} outputs; the label set must match the model's outputs.")
    if num_classes < 2:
        raise ValueError(f"IF-COMP needs at least 2 classes, the model has {num_classes} output.")
    return num_classes


def build_kernel_step(apply_fn, curvature: Curvature) -> CompiledStep:
    """The compiled step ``(params, factors, inputs [B, ...]) -> (logits [B, C], K [B, C, C])``.

    ``K[b] = J_b (G + lambda I)^{-1} J_b^T`` with ``G + lambda I`` the curvature (damping included)
    restricted to its tracked layers.
    """
    block = curvature.block
    specs = curvature.specs

    def step(params, factors, inputs):
        def one_hot_cotangents(outputs):
            num_outputs = outputs.shape[-1]
            eye = jnp.eye(num_outputs, dtype=outputs.dtype)
            return jnp.broadcast_to(eye[:, None, :], (num_outputs, *outputs.shape))

        captured = layer_statistics(apply_fn, params, inputs, one_hot_cotangents)
        a = {s.name: captured.a[s.name] for s in specs}
        g = {s.name: captured.g[s.name] for s in specs}  # [C, B, T, out]
        # (G + lambda)^-1 J^T e_d for every output d, in the block's score coordinates.
        precond = jax.vmap(lambda g_d: block.query_from_factors(specs, factors, a, g_d))(g)
        a_score, g_score = block.train_transform(specs, factors, a, g)
        kernel = 0.0
        for s in specs:
            # K[b, c, d] += sum_t a'_{b,t}^T V_{d,b} g'_{c,b,t}
            rotated = jnp.einsum("bti,dbio->dbto", a_score[s.name], precond[s.name])
            kernel = kernel + jnp.einsum("dbto,cbto->bcd", rotated, g_score[s.name])
        return captured.outputs, kernel

    return CompiledStep(step, name=f"ifcomp:{block.name}:kernel")


def output_kernels(apply_fn, params, curvature: Curvature, data: Dataset | Any, *,
                   batch_size: int = 64, step: CompiledStep | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[N, C]`` and output-space kernels ``K(x) = J_x (G + lambda I)^{-1} J_x^T``
    ``[N, C, C]`` for every row of ``data`` (a :class:`Dataset` or an input array).

    Works for any model with outputs ``[B, C]`` (classifiers and regressors). Test points are
    processed ``batch_size`` at a time (the last batch padded, so one program is compiled).
    """
    if not isinstance(curvature, Curvature):
        raise TypeError(f"curvature must be a tda_jax.curvature.Curvature from fit_curvature; got "
                        f"{type(curvature).__name__}.")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    inputs, _ = _inputs_of(data)
    dataset = data if isinstance(data, Dataset) else Dataset(inputs, np.zeros(len(inputs)), None)
    info = inspect_model(apply_fn, params, dataset, "test", allow_untracked=True)
    check_compatible(curvature, info.specs, "test")
    if info.positions is not None:
        raise ValueError("output_kernels needs outputs [batch, outputs]; this model returns "
                         "sequence outputs [batch, T, V].")
    step = build_kernel_step(apply_fn, curvature) if step is None else step
    num = inputs.shape[0]
    batch_size = min(int(batch_size), num)
    logits, kernels = [], []
    for start in range(0, num, batch_size):
        chunk = inputs[start:start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:  # pad with copies of the first row; the padded rows are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        out, kernel = step(params, curvature.factors, jnp.asarray(chunk))
        logits.append(out[:real])
        kernels.append(kernel[:real])
    logits = np.asarray(jnp.concatenate(logits), np.float32)
    kernels = np.asarray(jnp.concatenate(kernels), np.float32)
    if not (np.all(np.isfinite(logits)) and np.all(np.isfinite(kernels))):
        bad = np.flatnonzero(~np.isfinite(kernels).all(axis=(1, 2)) | ~np.isfinite(logits).all(1))
        raise FloatingPointError(f"non-finite outputs or kernels for test rows {bad[:8].tolist()}; "
                                 "check the inputs and parameters.")
    return logits, kernels


def boltzmann_loss_gradients(logits: Array, labels: Array, temperature: float) -> Array:
    """``grad_f L_T(f, y) = (softmax(f / T) - e_y) / T`` for every candidate label.

    Args:
      logits: ``[N, C]``.
      labels: ``[Y]`` candidate labels.
      temperature: ``T > 0``.

    Returns:
      ``[N, Y, C]``.
    """
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return (probs[:, None, :] - one_hot[None, :, :]) / temperature


def linearized_response(kernels: Array, output_gradients: Array, epsilon: float) -> Array:
    """``Delta f = -eps K(x) grad_f L`` for each test point and each given output gradient.

    Args:
      kernels: ``[N, C, C]`` from :func:`output_kernels`.
      output_gradients: ``[N, Y, C]`` (``Y`` gradients per point, e.g. one per candidate label)
        or ``[N, C]``.
      epsilon: the added point's weight ``eps``.

    Returns:
      ``Delta f`` with the shape of ``output_gradients``.
    """
    kernels = jnp.asarray(kernels)
    grads = jnp.asarray(output_gradients)
    if grads.ndim == 2:
        return -epsilon * jnp.einsum("ncd,nd->nc", kernels, grads)
    return -epsilon * jnp.einsum("ncd,nyd->nyc", kernels, grads)


def pnml_from_kernels(logits: Array, kernels: Array, *, temperature: float, epsilon: float,
                      labels: Sequence[int] | None = None) -> PNML:
    """IF-COMP's pNML from logits ``[N, C]`` and kernels ``[N, C, C]`` (see the module docstring).

    Args:
      logits: ``f_s(x)`` of the trained model.
      kernels: ``K(x) = J (G + lambda I)^{-1} J^T`` from :func:`output_kernels`.
      temperature: ``T > 0`` of the Boltzmann added-point loss.
      epsilon: weight ``eps > 0`` of the added point.
      labels: candidate labels (default: every class).
    """
    temperature = check_temperature(temperature)
    epsilon = check_epsilon(epsilon)
    logits = jnp.asarray(logits, jnp.float32)
    kernels = jnp.asarray(kernels, jnp.float32)
    if logits.ndim != 2 or kernels.shape != (*logits.shape, logits.shape[-1]):
        raise ValueError(f"logits must be [N, C] and kernels [N, C, C]; got {logits.shape} and "
                         f"{kernels.shape}.")
    labels = check_labels(labels, int(logits.shape[-1]))
    label_array = jnp.asarray(labels)
    grads = boltzmann_loss_gradients(logits, label_array, temperature)  # [N, Y, C]
    shifted = logits[:, None, :] + linearized_response(kernels, grads, epsilon)
    log_probs = jax.nn.log_softmax(shifted, axis=-1)  # [N, Y, C]
    log_hindsight = jnp.take_along_axis(log_probs, label_array[None, :, None], axis=-1)[..., 0]
    complexity = jax.nn.logsumexp(log_hindsight, axis=-1)
    pnml = jnp.exp(log_hindsight - complexity[:, None])
    return PNML(np.asarray(logits), labels, np.asarray(jnp.exp(log_hindsight)), np.asarray(pnml),
                np.asarray(complexity))


def ifcomp(apply_fn, params, curvature: Curvature, data: Dataset | Any, *, temperature: float,
           epsilon: float = 1.0, labels: Sequence[int] | None = None, loss: Loss | None = None,
           batch_size: int = 64) -> PNML:
    """IF-COMP pNML distributions and complexities of every row of ``data``.

    Args:
      apply_fn: ``(params, inputs) -> logits [B, C]`` (e.g. :func:`tda_jax.models.apply_fn_of`).
      params: the trained parameters ``theta_s``.
      curvature: ``fit_curvature(apply_fn, params, train, strategy="ekfac", fisher="expected",
        damping=lambda, loss=softmax_cross_entropy())``: ``G + lambda I``.
      data: test points, a :class:`Dataset` (its targets are not used; ``num_classes`` must match
        the model's outputs) or an input array ``[N, ...]``.
      temperature: ``T > 0`` of the Boltzmann added-point loss ``-log softmax(f / T)_y``.
      epsilon: weight of the added point relative to the (per-example averaged) training term.
      labels: candidate labels to normalize over (distinct class indices); default every class.
      loss: the training loss, checked to be a classification loss when given.
      batch_size: test points per compiled step.

    Returns:
      :class:`PNML` with ``hindsight``, ``pnml`` ``[N, Y]`` and ``complexity`` ``[N]``.

    Raises:
      ValueError: temperature or epsilon <= 0, label sets that do not match the model's outputs,
        regression losses or datasets, sequence models, curvature fitted on another model.
    """
    temperature = check_temperature(temperature)
    epsilon = check_epsilon(epsilon)
    num_classes = check_classifier(apply_fn, params, data, loss)
    labels = check_labels(labels, num_classes)
    logits, kernels = output_kernels(apply_fn, params, curvature, data, batch_size=batch_size)
    return pnml_from_kernels(logits, kernels, temperature=temperature, epsilon=epsilon,
                             labels=labels)


def labelled_complexity(result: PNML, observed: Any) -> np.ndarray:
    """pNML code length of observed labels: ``-log p_pNML(y_obs | x) = Gamma(x) - log p_{y_obs}(x)``.

    Args:
      result: :func:`ifcomp`'s output.
      observed: ``[N]`` observed labels; each must be one of ``result.labels``.

    Returns:
      ``[N]`` float32 (large for labels the model fits only in hindsight, e.g. mislabelled points).
    """
    observed = np.asarray(observed)
    num = result.complexity.shape[0]
    if observed.shape != (num,):
        raise ValueError(f"observed must be [N] = [{num}] labels, got shape {observed.shape}.")
    position = {int(label): k for k, label in enumerate(result.labels)}
    missing = [i for i, y in enumerate(observed.tolist()) if int(y) not in position]
    if missing:
        raise ValueError(f"observed[{missing[0]}] = {observed[missing[0]]} is not one of the "
                         f"candidate labels {result.labels.tolist()}.")
    columns = np.array([position[int(y)] for y in observed.tolist()], np.int64)
    hindsight = result.hindsight[np.arange(num), columns]
    return (result.complexity - np.log(np.maximum(hindsight, 1e-30))).astype(np.float32)
