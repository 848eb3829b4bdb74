"""Evaluating a trained model on a dataset (masked, fixed-size batches)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tda_jax.data import Dataset, batch_iterator, num_examples
from tda_jax.losses import Loss, token_positions
from tda_jax.training.losses import correct_per_example, resolve_loss


def _default_loss(dataset: Dataset) -> str:
    targets = np.asarray(dataset.targets)
    if dataset.num_classes is None:
        return "mse"
    # Integer targets [N, T] are next-token ids of a language model.
    if targets.ndim == 2 and np.issubdtype(targets.dtype, np.integer):
        return "causal_lm"
    return "cross_entropy"


def evaluate(model: nn.Module, params: Any, dataset: Dataset, loss: Loss | str | None = None,
             batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` with ``params`` over ``dataset``.

    Args:
      model: the Flax module.
      params: its variables (``model.init``'s dict, as ``train`` returns them).
      dataset: the examples to evaluate on (must be non-empty).
      loss: a :class:`tda_jax.losses.Loss` (or its config name ``"cross_entropy"`` / ``"mse"`` /
        ``"causal_lm"``); by default squared error for regression (``dataset.num_classes`` is
        None), the causal LM loss for integer targets ``[N, T]`` (next-token ids) and
        cross-entropy otherwise.
      batch_size: rows per jitted evaluation call.

    Returns:
      ``{"loss": mean per-example loss, "accuracy": fraction correct}``; ``accuracy`` is NaN for
      regression data. With a ``"token"`` loss (language models, outputs ``[B, T, V]``) both are
      per token over the positions that carry a loss (targets not ``-1``): ``"loss"`` is the mean
      next-token NLL (``exp`` of it is the perplexity), ``"accuracy"`` the fraction of positions
      where the argmax logit is the next token, and ``"num_tokens"`` their count.
    """
    n = num_examples(dataset)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset (0 examples)")
    loss = resolve_loss(loss or _default_loss(dataset))
    loss_fn = loss.per_example
    tokens = loss.target_kind == "token"
    classification = tokens or dataset.num_classes is not None

    @jax.jit
    def sums(params, batch):
        outputs = model.apply(params, batch["inputs"])
        mask, targets = batch["mask"], batch["targets"]
        # Summed over the rows (and for tokens, over the positions with a loss): a sequence's
        # per-example loss is already its summed token NLL.
        loss_sum = jnp.sum(loss_fn(outputs, targets) * mask)
        if tokens:
            weights = token_positions(targets) * mask[:, None]
            correct = jnp.sum(correct_per_example(outputs, targets) * weights)
            return loss_sum, correct, jnp.sum(weights)
        correct = (jnp.sum(correct_per_example(outputs, targets) * mask)
                   if classification else jnp.zeros(()))
        return loss_sum, correct, jnp.sum(mask)

    totals = np.zeros(3)
    for batch in batch_iterator(dataset, min(int(batch_size), n)):
        totals += np.asarray(sums(params, {k: batch[k] for k in ("inputs", "targets", "mask")}))
    count = totals[2]
    metrics = {"loss": float(totals[0] / count),
               "accuracy": float(totals[1] / count) if classification else float("nan")}
    if tokens:
        metrics["num_tokens"] = float(count)
    return metrics
