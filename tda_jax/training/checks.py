"""Checks of training data against the model and the loss, before anything is compiled."""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from tda_jax.data import Dataset, num_examples
from tda_jax.losses import IGNORE, Loss, check_targets
from tda_jax.models import output_shape_of


def check_training_data(model: nn.Module, data: Dataset, loss: Loss,
                        name: str = "train_data") -> int:
    """Checks that ``data`` is non-empty and suits ``model`` and ``loss``; returns its size.

    * Integer inputs of a model with a ``vocab_size`` attribute (e.g.
      :class:`tda_jax.models.TransformerLM`) must be token ids in ``[0, vocab_size)``; bad ones are
      named by row and position (an out-of-range id would silently embed as a clamped row).
    * The model's outputs come from one abstract forward (``jax.eval_shape``): ``[B, C]`` for a
      classifier or regressor, ``[B, T, V]`` for a sequence model. ``C`` (or ``V``) is the number
      of outputs; ``data.num_classes`` (when set) must equal it.
    * Sequence outputs need a ``"token"`` loss (:func:`tda_jax.losses.causal_lm_loss`) and vice
      versa; token targets must be ``[N, T]`` ids in ``[0, V)`` or ``-1`` (no loss), and with an
      ``input_mask`` no loss may be taken at a padding position.
    * Float (regression) targets with a class loss, integer labels with a real loss, labels
      outside ``[0, C)`` (e.g. 10 with 10 classes, or -1) and mis-shaped targets raise, naming the
      rows (:func:`tda_jax.losses.check_targets`).

    Args:
      model: the Flax module.
      data: the examples.
      loss: the training loss.
      name: the argument's name in errors.

    Returns:
      the number of examples.

    Raises:
      ValueError: naming the problem and what to do.
    """
    n = num_examples(data)
    if n == 0:
        raise ValueError(f"{name} is empty (0 examples); training needs at least one example.")
    inputs = np.asarray(data.inputs)
    vocab_size = getattr(model, "vocab_size", None)
    if vocab_size is not None and np.issubdtype(inputs.dtype, np.integer):
        _check_token_inputs(inputs, int(vocab_size), f"{name}.inputs")
    shape = output_shape_of(model, inputs[:1])
    if len(shape) not in (2, 3):
        raise ValueError(f"the model ({type(model).__name__}) must map inputs [B, ...] to outputs "
                         f"[B, C] (or [B, T, V] for a sequence model); it gives outputs of shape "
                         f"{shape} for inputs of shape {inputs[:1].shape}.")
    num_outputs = shape[-1]
    sequence = len(shape) == 3
    if sequence != (loss.target_kind == "token"):
        raise ValueError(
            f"the model ({type(model).__name__}) gives outputs of shape {shape} but the loss "
            f"{loss.name!r} takes {loss.target_kind!r} targets; sequence outputs [B, T, V] need a "
            "token loss (TrainConfig(loss='causal_lm'), tda_jax.losses.causal_lm_loss()), and a "
            "token loss needs a model with outputs [B, T, V].")
    targets = np.asarray(data.targets)
    if loss.target_kind == "class" and np.issubdtype(targets.dtype, np.floating):
        raise ValueError(
            f"{name}.targets are float ({targets.dtype}, shape {targets.shape}), i.e. regression "
            f"targets, but the loss {loss.name!r} is a classification loss that needs integer "
            "class labels. Use TrainConfig(loss='mse') (tda_jax.losses.mean_squared_error()) for "
            "regression, or convert the labels to integers.")
    if data.num_classes is not None and int(data.num_classes) != num_outputs:
        fix = (f"vocab_size={data.num_classes}" if vocab_size is not None
               else f"num_outputs={data.num_classes}")
        raise ValueError(
            f"{name}.num_classes is {data.num_classes} but the model ({type(model).__name__}) has "
            f"{num_outputs} outputs; build the model with {fix}.")
    check_targets(targets, num_outputs, loss.target_kind, role=f"{name}.targets",
                  positions=shape[1] if sequence else None)
    if sequence and data.input_mask is not None:
        padded = np.argwhere((np.asarray(data.input_mask) == 0) & (targets != IGNORE))
        if padded.size:
            shown = ", ".join(f"row {int(r)} position {int(t)}" for r, t in padded[:5])
            raise ValueError(
                f"{name}.targets take a loss at {len(padded)} padding position(s) (input_mask 0: "
                f"{shown}{', ...' if len(padded) > 5 else ''}); set those targets to {IGNORE}.")
    return n


def _check_token_inputs(inputs: np.ndarray, vocab_size: int, role: str) -> None:
    """Raises naming the rows and positions of token ids outside ``[0, vocab_size)``."""
    flat = inputs.reshape(len(inputs), -1)
    bad = np.argwhere((flat < 0) | (flat >= vocab_size))
    if bad.size:
        shown = ", ".join(f"row {int(r)} position {int(t)}: {int(flat[r, t])}" for r, t in bad[:5])
        raise ValueError(
            f"{role} has {len(bad)} token id(s) outside [0, {vocab_size}) for a model with "
            f"vocab_size={vocab_size} ({shown}{', ...' if len(bad) > 5 else ''}); map them into "
            "the vocabulary (e.g. a padding id such as 0, with target -1) or enlarge vocab_size.")
