"""Evaluating a trained model on a dataset (masked, fixed-size batches)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tda_jax.data import Dataset, batch_iterator, num_examples
from tda_jax.losses import Loss
from tda_jax.training.losses import correct_per_example, resolve_loss


def evaluate(model: nn.Module, params: Any, dataset: Dataset, loss: Loss | str | None = None,
             batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` with ``params`` over ``dataset``.

    Args:
      model: the Flax module.
      params: its variables (``model.init``'s dict, as ``train`` returns them).
      dataset: the examples to evaluate on (must be non-empty).
      loss: a :class:`tda_jax.losses.Loss` (or its config name ``"cross_entropy"`` / ``"mse"``);
        by default cross-entropy for classification (``dataset.num_classes`` set) and squared
        error otherwise.
      batch_size: rows per jitted evaluation call.

    Returns:
      ``{"loss": mean per-example loss, "accuracy": fraction correct}``; ``accuracy`` is NaN for
      regression data.
    """
    n = num_examples(dataset)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset (0 examples)")
    classification = dataset.num_classes is not None
    loss_fn = resolve_loss(loss or ("cross_entropy" if classification else "mse")).per_example

    @jax.jit
    def sums(params, batch):
        outputs = model.apply(params, batch["inputs"])
        mask = batch["mask"]
        loss_sum = jnp.sum(loss_fn(outputs, batch["targets"]) * mask)
        correct = (jnp.sum(correct_per_example(outputs, batch["targets"]) * mask)
                   if classification else jnp.zeros(()))
        return loss_sum, correct

    totals = np.zeros(2)
    for batch in batch_iterator(dataset, min(int(batch_size), n)):
        totals += np.asarray(sums(params, {k: batch[k] for k in ("inputs", "targets", "mask")}))
    return {"loss": float(totals[0] / n),
            "accuracy": float(totals[1] / n) if classification else float("nan")}
