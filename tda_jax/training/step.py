"""The single-model training step shared by ``train`` and the vectorized ``train_many``.

Both drivers use the same key convention and the same step function, so training one model on a
subset with :func:`tda_jax.training.train` and training it inside ``train_many`` follow the same
computation (equal up to floating-point reassociation under ``vmap``):

* ``init_key, shuffle_key = jax.random.split(key)``; parameters are ``model.init(init_key, x[:1])``.
* Epoch ``e`` visits examples in the order ``jax.random.permutation(fold_in(shuffle_key, e), n)``,
  in ``ceil(n / batch_size)`` batches, the last one padded and masked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import optax

from tda_jax.optimization import gradient_step
from tda_jax.training.config import TrainConfig, make_optimizer
from tda_jax.training.losses import masked_mean

Params = Any
Batch = dict[str, jax.Array]


class TrainStep(NamedTuple):
    """Pure functions of one training run (unjitted; callers jit / vmap / scan them).

    Attributes:
      init: ``init(key, example_inputs) -> (params, opt_state)``.
      init_opt_state: ``init_opt_state(params) -> opt_state``.
      step: ``step(params, opt_state, batch) -> (params, opt_state, loss)`` where ``batch`` holds
        ``"inputs"``, ``"targets"`` and ``"mask"`` and ``loss`` is the masked mean batch loss
        before the update.
      batch_loss: ``batch_loss(params, batch) -> scalar``: the mean over real rows (``mask`` 1) of
        ``config.loss.per_example``; for a causal LM that is each sequence's NLL summed over its
        positions with a target (not ``-1``), averaged over sequences (not over tokens), so the
        training objective is the mean of the per-example losses that attribution uses.
      optimizer: the optax transformation.
    """

    init: Callable[[jax.Array, jax.Array], tuple[Params, Any]]
    init_opt_state: Callable[[Params], Any]
    step: Callable[[Params, Any, Batch], tuple[Params, Any, jax.Array]]
    batch_loss: Callable[[Params, Batch], jax.Array]
    optimizer: optax.GradientTransformation


def split_training_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(init_key, shuffle_key)`` of a training run."""
    init_key, shuffle_key = jax.random.split(key)
    return init_key, shuffle_key


def epoch_key(shuffle_key: jax.Array, epoch: int | jax.Array) -> jax.Array:
    """The key whose permutation orders epoch ``epoch``."""
    return jax.random.fold_in(shuffle_key, epoch)


def make_train_step(model: nn.Module, config: TrainConfig) -> TrainStep:
    """Builds the training step for ``model`` under ``config``."""
    optimizer = make_optimizer(config)
    loss_fn = config.loss.per_example

    def batch_loss(params: Params, batch: Batch) -> jax.Array:
        outputs = model.apply(params, batch["inputs"])
        return masked_mean(loss_fn(outputs, batch["targets"]), batch["mask"])

    update = gradient_step(batch_loss, optimizer)  # the library's one optax update

    def step(params: Params, opt_state: Any, batch: Batch):
        params, opt_state, loss, _ = update(params, opt_state, batch)
        return params, opt_state, loss

    def init(init_key: jax.Array, example_inputs: jax.Array):
        params = model.init(init_key, example_inputs)
        return params, optimizer.init(params)

    return TrainStep(init=init, init_opt_state=optimizer.init, step=step, batch_loss=batch_loss,
                     optimizer=optimizer)


class JittedTrainStep(NamedTuple):
    """Jitted ``init`` and ``step`` of a :class:`TrainStep` (see :func:`jitted_train_step`)."""

    train_step: TrainStep
    init: Callable[[jax.Array, jax.Array], tuple[Params, Any]]
    step: Callable[[Params, Any, Batch], tuple[Params, Any, jax.Array]]


@functools.lru_cache(maxsize=32)
def _cached_jitted_train_step(model: nn.Module, config: TrainConfig) -> JittedTrainStep:
    train_step = make_train_step(model, config)
    return JittedTrainStep(train_step, jax.jit(train_step.init), jax.jit(train_step.step))


def jitted_train_step(model: nn.Module, config: TrainConfig) -> JittedTrainStep:
    """Jitted training functions, reused across calls for equal (hashable) models and configs.

    Repeated ``train`` calls with the same architecture and settings (ensembles, tests) then
    compile once. Modules with unhashable attributes (e.g. list-valued sizes) are not cached.
    """
    try:
        hash((model, config))
    except TypeError:
        return _cached_jitted_train_step.__wrapped__(model, config)
    return _cached_jitted_train_step(model, config)
