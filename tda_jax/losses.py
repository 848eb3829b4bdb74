"""Per-example losses and measurements, with what curvature estimators need from them.

A :class:`Loss` bundles the pure functions that the attribution half asks of a training loss:

* ``per_example(outputs, targets) -> [B]``: the per-example loss (never averaged).
* ``sample_targets(key, outputs) -> targets``: labels drawn from the model's predictive
  distribution, for the *sampled* (true) Fisher.
* ``hessian_sqrt(outputs) -> [B, K, C]``: K output-space vectors ``v_k`` per example with
  ``sum_k v_k v_k^T`` equal to the Hessian of the loss w.r.t. the outputs. Back-propagating them gives
  the *expected* Fisher, i.e. the exact expectation over the predictive distribution, which for these
  losses equals the generalized Gauss-Newton (GGN) matrix.

Measurements (what a query's influence is measured on) share the signature
``measurement(outputs [B, C], targets [B, ...]) -> [B]``.

Sequence models (``outputs [B, T, V]``, e.g. a causal language model) use ``"token"`` targets:
``[B, T]`` integer next-token ids with :data:`IGNORE` (``-1``) at positions that carry no loss
(padding, and a query's prompt). :func:`causal_lm_loss` sums the token NLL of a sequence;
:func:`completion_log_prob` measures ``log p(completion | prompt)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MeasurementFn = Callable[[Array, Array], Array]


class Loss(NamedTuple):
    """A per-example loss and the output-space quantities used by Fisher estimators.

    Attributes:
      name: short name recorded in saved arguments.
      per_example: ``(outputs [B, C], targets) -> [B]`` per-example loss.
      sample_targets: ``(key, outputs [B, C]) -> targets`` drawn from the model's predictive
        distribution.
      hessian_sqrt: ``(outputs [B, C]) -> [B, K, C]`` with ``sum_k v_k v_k^T = d^2 loss / d outputs^2``.
      target_kind: ``"class"`` (integer labels in ``[0, C)``), ``"real"`` (float targets) or
        ``"token"`` (``[B, T]`` next-token ids in ``[0, V)`` or :data:`IGNORE`); checked by
        :func:`check_targets` before training, fitting and scoring.
    """

    name: str
    per_example: Callable[[Array, Array], Array]
    sample_targets: Callable[[Array, Array], Array]
    hessian_sqrt: Callable[[Array], Array]
    target_kind: str = "class"


TARGET_KINDS = ("class", "real", "token")

IGNORE = -1
"""Token target meaning "no loss at this position" (padding, prompt tokens)."""


def token_positions(targets: Array) -> Array:
    """``[B, T]`` float mask of the positions of ``"token"`` targets that carry a loss."""
    return (targets >= 0).astype(jnp.float32)


def check_targets(targets, num_outputs: int, kind: str, role: str = "targets",
                  positions: int | None = None) -> None:
    """Raises a clear error when targets do not suit a loss or measurement (host-side check).

    Out-of-range class labels are the dangerous case: ``take_along_axis`` clamps or fills them, so a
    label 10 with 10 classes, or -1, would otherwise give silently wrong losses, curvature and scores.

    Args:
      targets: ``[N]`` integer class labels (``kind="class"``) or ``[N, num_outputs]`` / ``[N]``
        real targets (``kind="real"``); a numpy or JAX array.
      num_outputs: the model's number of outputs (classes for a classifier).
      kind: ``"class"``, ``"real"`` or ``"token"`` (see :attr:`Loss.target_kind`).
      role: what the targets are, named in the error (e.g. ``"train.targets"``).
      positions: for ``"token"`` targets, the sequence length ``T`` of the model's outputs.

    Raises:
      ValueError: naming the offending rows and values, and what to do.
    """
    from tda_jax.data.dataset import host_array, iter_row_blocks  # (tda_jax.data imports losses)

    if kind not in TARGET_KINDS:
        raise ValueError(f"target kind {kind!r} is not one of {TARGET_KINDS}.")
    targets = host_array(targets)  # memory maps and record sources are checked block by block
    if kind == "token":
        _check_token_targets(targets, num_outputs, role, positions)
        return
    shape, dtype = tuple(np.shape(targets)), np.dtype(targets.dtype)
    if kind == "class":
        if not np.issubdtype(dtype, np.integer):
            raise ValueError(
                f"{role} has dtype {dtype} but a classification loss/measurement needs integer "
                "class labels; for regression targets use mean_squared_error() (and a real-valued "
                "measurement such as negative_loss(mean_squared_error())).")
        if len(shape) != 1:
            raise ValueError(f"{role} must be class labels of shape [N]; got shape {shape}.")
        count, shown = 0, []
        for start, block in iter_row_blocks(targets):
            bad = np.flatnonzero((block < 0) | (block >= num_outputs))
            count += bad.size
            shown += [f"row {int(i) + start}: {int(block[i])}" for i in bad[:5 - len(shown)]]
        if count:
            raise ValueError(
                f"{role} has {count} label(s) outside [0, {num_outputs}) for a model with "
                f"{num_outputs} outputs ({', '.join(shown)}{', ...' if count > 5 else ''}); fix the "
                "labels or the model's number of outputs.")
        return
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{role} has dtype {dtype} but a regression loss needs float targets; "
                         "for class labels use softmax_cross_entropy().")
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if per_row != num_outputs:
        raise ValueError(f"{role} has shape {shape} ({per_row} value(s) per row) but the model "
                         f"has {num_outputs} outputs.")
    bad = np.concatenate([start + np.flatnonzero(~np.all(np.isfinite(block.reshape(len(block), -1)),
                                                         axis=1))
                          for start, block in iter_row_blocks(targets)] or [np.zeros(0, np.int64)])
    if bad.size:
        raise ValueError(f"{role} has non-finite values in rows {bad[:5].tolist()}"
                         f"{' ...' if bad.size > 5 else ''}.")


def _check_token_targets(targets, vocab: int, role: str, positions: int | None) -> None:
    from tda_jax.data.dataset import iter_row_blocks

    shape, dtype = tuple(np.shape(targets)), np.dtype(targets.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{role} has dtype {dtype} but a sequence loss/measurement needs "
                         f"integer next-token ids (with {IGNORE} where no loss is taken).")
    if len(shape) != 2 or (positions is not None and shape[1] != positions):
        want = f"[N, {positions}]" if positions is not None else "[N, T]"
        raise ValueError(f"{role} must be next-token ids of shape {want} (one per output position); "
                         f"got shape {shape}.")
    count, shown, empty = 0, [], []
    for start, block in iter_row_blocks(targets):
        bad = np.argwhere((block < IGNORE) | (block >= vocab))
        count += len(bad)
        shown += [f"row {int(r) + start} position {int(t)}: {int(block[r, t])}"
                  for r, t in bad[:5 - len(shown)]]
        empty.append(start + np.flatnonzero(~np.any(block >= 0, axis=1)))
    if count:
        raise ValueError(
            f"{role} has {count} token id(s) outside [0, {vocab}) for a model with a vocabulary "
            f"of {vocab} ({', '.join(shown)}{', ...' if count > 5 else ''}); use {IGNORE} only to "
            "mark positions without a loss.")
    empty = np.concatenate(empty or [np.zeros(0, np.int64)])
    if empty.size:
        raise ValueError(
            f"{role} rows {empty[:5].tolist()}{' ...' if empty.size > 5 else ''} have no token with a "
            f"loss (every target is {IGNORE}: an empty completion, or a prompt mask that hides every "
            "token); give each sequence at least one target token.")


def check_loss(loss, argument: str = "loss") -> Loss:
    """Returns ``loss`` if it is a :class:`Loss`; explains the usual mistakes otherwise."""
    if isinstance(loss, Loss):
        return loss
    if loss in _FACTORIES:
        raise TypeError(f"{argument}={loss.__name__} is the factory, not the loss: pass "
                        f"{argument}={loss.__name__}() (note the parentheses).")
    if isinstance(loss, str):
        raise TypeError(f"{argument}={loss!r} is a name; pass a Loss object, e.g. get_loss({loss!r}).")
    raise TypeError(f"{argument} must be a tda_jax.losses.Loss (e.g. softmax_cross_entropy()); "
                    f"got {type(loss).__name__}.")


def target_kind_of(fn) -> str | None:
    """The target kind a measurement declares (``fn.target_kind``), or None if it declares none."""
    return getattr(fn, "target_kind", None)


def _ce_per_example(logits: Array, labels: Array) -> Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _ce_sample(key: Array, logits: Array) -> Array:
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _ce_hessian_sqrt(logits: Array) -> Array:
    # Columns sqrt(p_k) (e_k - p): sum_k p_k (e_k - p)(e_k - p)^T = diag(p) - p p^T.
    probs = jax.nn.softmax(logits, axis=-1)
    num_classes = logits.shape[-1]
    eye = jnp.eye(num_classes, dtype=logits.dtype)
    diff = eye[None, :, :] - probs[:, None, :]
    return jnp.sqrt(probs)[:, :, None] * diff


def softmax_cross_entropy() -> Loss:
    """Softmax cross-entropy on logits ``[B, C]`` with integer labels ``[B]`` (summed, not averaged)."""
    return Loss("softmax_cross_entropy", _ce_per_example, _ce_sample, _ce_hessian_sqrt)


def _mse_per_example(outputs: Array, targets: Array) -> Array:
    targets = jnp.reshape(targets, outputs.shape)
    return 0.5 * jnp.sum(jnp.square(outputs - targets), axis=-1)


def _mse_sample(key: Array, outputs: Array) -> Array:
    # 0.5 ||f - y||^2 is the negative log density of N(f, I) up to a constant.
    return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)


def _mse_hessian_sqrt(outputs: Array) -> Array:
    eye = jnp.eye(outputs.shape[-1], dtype=outputs.dtype)
    return jnp.broadcast_to(eye, (outputs.shape[0], *eye.shape))


def mean_squared_error() -> Loss:
    """Squared error ``0.5 * ||outputs - targets||^2`` per example (a unit-variance Gaussian NLL)."""
    return Loss("squared_error", _mse_per_example, _mse_sample, _mse_hessian_sqrt, "real")


def classification_margin(logits: Array, labels: Array) -> Array:
    """Margin ``z_y - logsumexp_{c != y} z_c`` per example, the usual LDS measurement for classifiers.

    Args:
      logits: ``[B, C]``.
      labels: ``[B]`` integer labels.

    Returns:
      ``[B]`` margins (higher means more confidently correct).
    """
    labels = labels.astype(jnp.int32)
    correct = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    masked = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return correct - jax.nn.logsumexp(masked, axis=-1)


classification_margin.target_kind = "class"


def negative_loss(loss: Loss) -> Callable[[Array, Array], Array]:
    """Measurement ``-loss``: higher is better, so a helpful training example scores positive."""

    def measurement(outputs: Array, targets: Array) -> Array:
        return -loss.per_example(outputs, targets)

    measurement.target_kind = loss.target_kind
    return measurement


def _token_log_probs(logits: Array, targets: Array) -> Array:
    """``log p(target_t)`` at every position, 0 where the target is :data:`IGNORE`."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.maximum(targets, 0)[..., None].astype(jnp.int32),
                                 axis=-1)[..., 0]
    return jnp.where(targets >= 0, picked, 0.0)


def _lm_per_example(logits: Array, targets: Array) -> Array:
    return -jnp.sum(_token_log_probs(logits, targets), axis=-1)


def _lm_hessian_sqrt(logits: Array) -> Array:
    # For every position t and token k the cotangent sqrt(p_tk) (e_k - p_t) placed at position t:
    # [B, T * V, T, V]. Exact but T * V backward passes per sequence (small vocabularies only).
    batch, length, vocab = logits.shape
    per_position = jax.vmap(_ce_hessian_sqrt, in_axes=1, out_axes=1)(logits)  # [B, T, V, V]
    eye = jnp.eye(length, dtype=logits.dtype)
    out = eye[None, :, None, :, None] * per_position[:, :, :, None, :]  # [B, T, V, T, V]
    return jnp.reshape(out, (batch, length * vocab, length, vocab))


def causal_lm_loss() -> Loss:
    """Summed next-token NLL of a sequence: ``logits [B, T, V]``, ``"token"`` targets ``[B, T]``.

    Positions whose target is :data:`IGNORE` carry no loss (and no curvature). Fisher types for
    :func:`tda_jax.curvature.fit_curvature`: ``"sampled"`` (one token drawn per position from the
    model, per-example keys) and ``"empirical"`` cost one backward pass per sequence and suit any
    vocabulary; ``"expected"`` is exact but back-propagates ``T x V`` cotangents per sequence, so it
    is only for small vocabularies and short sequences.
    """
    return Loss("causal_lm", _lm_per_example, _ce_sample, _lm_hessian_sqrt, "token")


def completion_log_prob(logits: Array, targets: Array) -> Array:
    """Measurement ``log p(completion | prompt)`` per sequence -> ``[B]``.

    ``targets [B, T]`` holds the completion's next-token ids and :data:`IGNORE` at prompt and
    padding positions, so only completion tokens are counted (build queries with
    :func:`tda_jax.data.lm_dataset` and ``prompt_lengths``).
    """
    return jnp.sum(_token_log_probs(logits, targets), axis=-1)


completion_log_prob.target_kind = "token"

_FACTORIES = (softmax_cross_entropy, mean_squared_error, causal_lm_loss)


def get_loss(name: str) -> Loss:
    """Looks a loss up by name: ``"cross_entropy"`` or ``"mse"``."""
    if name in ("cross_entropy", "softmax_cross_entropy"):
        return softmax_cross_entropy()
    if name in ("mse", "squared_error"):
        return mean_squared_error()
    if name in ("causal_lm", "causal_lm_loss"):
        return causal_lm_loss()
    raise ValueError(f"unknown loss {name!r}; expected 'cross_entropy', 'mse' or 'causal_lm'")
