"""Training one model: a jitted optax step, a Python loop over padded batches, checkpoints."""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import islice
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tda_jax.data import Dataset, batches_in_order, num_examples, shuffled_order
from tda_jax.io import Stage, fingerprint, write_json
from tda_jax.progress import progress
from tda_jax.training.checkpoints import (
    DATA_ORDER_FILE,
    checkpoint_manager,
    restore_checkpoint,
    save_checkpoint,
)
from tda_jax.training.config import TrainConfig
from tda_jax.training.step import epoch_key, jitted_train_step, split_training_key

Params = Any


def check_data_for_loss(data: Dataset, loss: str, name: str = "train_data") -> int:
    """Checks that ``data`` suits ``loss`` and is non-empty; returns its number of examples."""
    n = num_examples(data)
    if n == 0:
        raise ValueError(f"{name} is empty (0 examples); training needs at least one example.")
    targets = np.asarray(data.targets)
    if loss == "cross_entropy":
        if data.num_classes is None or not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(
                f"loss 'cross_entropy' needs integer class labels and num_classes; {name} has "
                f"targets {targets.dtype} {targets.shape}, num_classes={data.num_classes}. "
                "Use TrainConfig(loss='mse') for regression.")
    elif not np.issubdtype(targets.dtype, np.floating):
        raise ValueError(f"loss 'mse' needs float targets; {name}.targets is {targets.dtype}. "
                         "Use TrainConfig(loss='cross_entropy') for classification.")
    return n


def key_data(key: jax.Array) -> np.ndarray:
    """The raw uint32 words of a (typed or legacy) PRNG key."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key)


def _raise_non_finite(losses: np.ndarray, first_step: int, steps_per_epoch: int) -> None:
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        step = first_step + int(bad[0])
        raise FloatingPointError(
            f"training loss became non-finite ({losses[bad[0]]}) at step {step} (epoch "
            f"{step // steps_per_epoch}, batch {step % steps_per_epoch} of that epoch). Lower the "
            "learning rate, or check the data for NaN/inf values.")


def train(key: jax.Array, model: nn.Module, params: Params | None, train_data: Dataset,
          config: TrainConfig, checkpoint_steps: Sequence[int] = (),
          checkpoint_dir: str | os.PathLike | None = None) -> Params:
    """Trains ``model`` on ``train_data`` with mini-batch ``config.optimizer`` steps.

    One jitted step (compiled once: every batch is padded to ``config.batch_size`` and masked) is
    called from a Python loop with a progress bar. The key convention is that of
    :mod:`tda_jax.training.step`, shared with :func:`tda_jax.training.train_many`.

    Args:
      key: PRNG key; split into an initialization key and a shuffling key.
      model: a Flax module mapping inputs ``[B, ...]`` to outputs ``[B, C]``.
      params: initial parameters, or ``None`` to initialize with ``model.init``.
      train_data: training examples.
      config: training settings.
      checkpoint_steps: steps (numbers of optimizer updates, ``0 .. num_epochs * steps_per_epoch``)
        at which to save the parameters. The final step is always saved when ``checkpoint_dir``
        is given.
      checkpoint_dir: where to save trajectory checkpoints (see
        :mod:`tda_jax.training.checkpoints`). If it already holds a run with the same arguments,
        training resumes from its last checkpoint (a finished run is just loaded); a run with
        different arguments raises ``tda_jax.io.ArgumentMismatchError``.

    Returns:
      the trained parameters.

    Raises:
      FloatingPointError: if a batch loss becomes non-finite (names the step and epoch).
      ValueError: on an empty dataset, targets unsuited to ``config.loss``, or checkpoint steps
        out of range.
    """
    n = check_data_for_loss(train_data, config.loss)
    batch_size = int(config.batch_size)
    steps_per_epoch = -(-n // batch_size)
    total_steps = int(config.num_epochs) * steps_per_epoch
    save_at = sorted({int(s) for s in checkpoint_steps})
    if save_at and (save_at[0] < 0 or save_at[-1] > total_steps):
        raise ValueError(
            f"checkpoint_steps must lie in [0, {total_steps}] (num_epochs * steps_per_epoch = "
            f"{config.num_epochs} * {steps_per_epoch}), got {save_at}")
    if save_at and checkpoint_dir is None:
        raise ValueError("checkpoint_steps were given but checkpoint_dir is None; pass one.")

    jitted = jitted_train_step(model, config)
    init_key, shuffle_key = split_training_key(key)
    if params is None:
        params, opt_state = jitted.init(init_key, jnp.asarray(train_data.inputs[:1]))
    else:
        opt_state = jitted.train_step.init_opt_state(params)
    step_fn = jitted.step

    def order_of(epoch: int) -> np.ndarray:
        return shuffled_order(epoch_key(shuffle_key, epoch), n)

    start = 0
    manager = None
    if checkpoint_dir is not None:
        save_at = sorted(set(save_at) | {total_steps})
        stage = Stage(checkpoint_dir, {
            "config": config.to_dict(),
            "key": key_data(key).tolist(),
            "model": repr(model),
            "checkpoint_steps": save_at,
            "train_data": {"num_examples": n, "fingerprint": fingerprint(tuple(train_data[:2]))},
            "initial_params": fingerprint(params),
        })
        manager = checkpoint_manager(checkpoint_dir)
        done = sorted(int(s) for s in manager.all_steps())
        if done:
            start = done[-1]
            params, opt_state = restore_checkpoint(manager, start, params, opt_state)
        else:
            write_json(stage.path(DATA_ORDER_FILE), {
                "batch_size": batch_size, "num_examples": n, "steps_per_epoch": steps_per_epoch,
                "epochs": [order_of(e).tolist() for e in range(int(config.num_epochs))]})
        if start == 0 and 0 in save_at and 0 not in done:
            save_checkpoint(manager, 0, params, opt_state)

    try:
        bar = iter(progress(range(start, total_steps), desc="train", total=total_steps - start))
        step = start
        while step < total_steps:
            epoch, first = divmod(step, steps_per_epoch)
            # Run until the end of the epoch or the next checkpoint, then check the losses once
            # (checking every step would synchronize host and device each step).
            stop = min((epoch + 1) * steps_per_epoch,
                       next((s for s in save_at if s > step), total_steps))
            batches = islice(batches_in_order(train_data, order_of(epoch), batch_size),
                             first, first + stop - step)
            losses = []
            for batch in batches:
                batch = {k: batch[k] for k in ("inputs", "targets", "mask")}
                params, opt_state, loss = step_fn(params, opt_state, batch)
                losses.append(loss)
                next(bar, None)
            _raise_non_finite(np.asarray(jnp.stack(losses)), step, steps_per_epoch)
            step = stop
            if manager is not None and step in save_at:
                save_checkpoint(manager, step, params, opt_state)
        if manager is not None:
            stage.mark_complete()
    finally:
        if manager is not None:
            manager.close()
    return params
