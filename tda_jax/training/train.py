"""Training one model: a jitted optax step, a Python loop over padded batches, checkpoints.

Model convention (see :mod:`tda_jax.models.apply`): ``train`` takes the Flax ``nn.Module`` and
returns its full variables (``model.init``'s dict, ``{"params": ...}``); attribution takes
``apply_fn_of(model)`` with ``variables["params"]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import chain, islice
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tda_jax.data import Dataset, batches_in_order, shuffled_order
from tda_jax.io import Stage, fingerprint, write_json
from tda_jax.optimization import run_steps
from tda_jax.training.checkpoints import (
    DATA_ORDER_FILE,
    checkpoint_manager,
    load_data_order,
    restore_checkpoint,
    save_checkpoint,
)
from tda_jax.training.checks import check_training_data
from tda_jax.training.config import TrainConfig
from tda_jax.training.step import epoch_key, jitted_train_step, split_training_key

Params = Any


def key_data(key: jax.Array) -> np.ndarray:
    """The raw uint32 words of a (typed or legacy) PRNG key."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key)


def train(key: jax.Array, model: nn.Module, params: Params | None, train_data: Dataset,
          config: TrainConfig, checkpoint_steps: Sequence[int] = (),
          checkpoint_dir: str | os.PathLike | None = None) -> Params:
    """Trains ``model`` on ``train_data`` with mini-batch ``config.optimizer`` steps.

    One jitted step (compiled once: every batch is padded to ``config.batch_size`` and masked) is
    called from a Python loop with a progress bar. The key convention is that of
    :mod:`tda_jax.training.step`, shared with :func:`tda_jax.training.train_many`.

    Args:
      key: PRNG key; split into an initialization key and a shuffling key.
      model: a Flax module mapping inputs ``[B, ...]`` to outputs ``[B, C]`` (or token ids
        ``[B, T]`` to logits ``[B, T, V]`` with ``config.loss = "causal_lm"``).
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
      FloatingPointError: if a batch loss becomes non-finite (names the step and epoch; checked
        once per epoch).
      ValueError: on an empty dataset, targets unsuited to ``config.loss`` (float targets with a
        class loss, labels outside ``[0, C)`` or token ids outside ``[0, vocab_size)``, naming the
        rows), ``num_classes`` unequal to the model's number of outputs, or checkpoint steps out
        of range.
    """
    n = check_training_data(model, train_data, config.loss)
    batch_size = int(config.batch_size)
    steps_per_epoch = -(-n // batch_size)
    num_epochs = int(config.num_epochs)
    total_steps = num_epochs * steps_per_epoch
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

    start = 0
    manager = None
    orders = None  # [num_epochs, n] example positions, epoch by epoch
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
            # Resume on the saved data order: it is the record TracIn and replays read.
            start = done[-1]
            params, opt_state = restore_checkpoint(manager, start, params, opt_state)
            orders = load_data_order(checkpoint_dir)["epochs"]
        else:
            orders = np.stack([shuffled_order(epoch_key(shuffle_key, e), n)
                               for e in range(num_epochs)]) if num_epochs else None
            write_json(stage.path(DATA_ORDER_FILE), {
                "batch_size": batch_size, "num_examples": n, "steps_per_epoch": steps_per_epoch,
                "epochs": [] if orders is None else orders.tolist()})
        if start == 0 and 0 in save_at and 0 not in done:
            save_checkpoint(manager, 0, params, opt_state)

    def order_of(epoch: int) -> np.ndarray:
        return orders[epoch] if orders is not None else shuffled_order(
            epoch_key(shuffle_key, epoch), n)

    first_epoch, skip = divmod(start, steps_per_epoch)
    batches = islice(chain.from_iterable(
        batches_in_order(train_data, order_of(e), batch_size)
        for e in range(first_epoch, num_epochs)), skip, None)
    step_fn = jitted.step

    def step(state, batch):
        params, opt_state, loss = step_fn(*state, {k: batch[k] for k in ("inputs", "targets",
                                                                          "mask")})
        return (params, opt_state), loss

    def on_check(num_updates: int, state) -> None:
        if manager is not None and num_updates in save_at:
            save_checkpoint(manager, num_updates, *state)

    try:
        # Losses are checked once per epoch and at each checkpoint (never per step).
        (params, opt_state), _ = run_steps(
            step, (params, opt_state), batches, num_steps=total_steps - start, first_step=start,
            check_every=steps_per_epoch, check_at=save_at, on_check=on_check, desc="train",
            describe_step=lambda s: (f" (epoch {s // steps_per_epoch}, batch "
                                     f"{s % steps_per_epoch} of that epoch)"))
        if manager is not None:
            stage.mark_complete()
    finally:
        if manager is not None:
            manager.close()
    return params
