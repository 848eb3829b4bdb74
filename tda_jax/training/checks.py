"""Checks of training data against the model and the loss, before anything is compiled."""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from tda_jax.data import Dataset, num_examples
from tda_jax.losses import Loss, check_targets
from tda_jax.models import num_outputs_of


def check_training_data(model: nn.Module, data: Dataset, loss: Loss,
                        name: str = "train_data") -> int:
    """Checks that ``data`` is non-empty and suits ``model`` and ``loss``; returns its size.

    * The model's number of outputs ``C`` comes from one abstract forward (``jax.eval_shape``).
    * ``data.num_classes`` (when set) must equal ``C``.
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
    num_outputs = num_outputs_of(model, np.asarray(data.inputs[:1]))
    targets = np.asarray(data.targets)
    if loss.target_kind == "class" and np.issubdtype(targets.dtype, np.floating):
        raise ValueError(
            f"{name}.targets are float ({targets.dtype}, shape {targets.shape}), i.e. regression "
            f"targets, but the loss {loss.name!r} is a classification loss that needs integer "
            "class labels. Use TrainConfig(loss='mse') (tda_jax.losses.mean_squared_error()) for "
            "regression, or convert the labels to integers.")
    if data.num_classes is not None and int(data.num_classes) != num_outputs:
        raise ValueError(
            f"{name}.num_classes is {data.num_classes} but the model ({type(model).__name__}) has "
            f"{num_outputs} outputs; build the model with num_outputs={data.num_classes}.")
    check_targets(targets, num_outputs, loss.target_kind, role=f"{name}.targets")
    return n
