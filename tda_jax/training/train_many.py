"""Vectorized retraining: many models, each on its own data subset and seed, in one program.

Used for linear datamodeling score (LDS) ground truth and ensembles. For each model ``m`` the
whole run (initialization, per-epoch shuffles, every optimizer step) is one ``lax.scan`` under
``jax.vmap`` over ``(keys[m], subset of masks[m])``, compiled once with ``jax.jit``. The per-model
computation is the one of :func:`tda_jax.training.train` on ``subset(train_data, masks[m])`` with
``keys[m]`` (same key convention, same step function), so the results agree with sequential
training up to floating-point reassociation.

:func:`train_in_chunks` is the one retraining driver: :func:`train_many` (which returns the stacked
parameters) and :func:`tda_jax.evaluation.retrain_ground_truth` (which keeps one measurement per
model, chunk by chunk in a resumable stage) both call it.

Several processes (``jax.distributed``): the models of a chunk are split over the global ``"data"``
mesh (every process trains its devices' share; there is no communication while training), the
training set is replicated on every device, and each chunk's losses and summaries (or parameters)
are gathered so that every process returns all of them. Stages are written by process 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from tda_jax.data import Dataset
from tda_jax.io import Stage
from tda_jax.progress import progress
from tda_jax.sharding import (
    DATA_AXIS,
    data_sharding,
    global_data_mesh,
    is_distributed,
    put_global,
    put_replicated,
    to_host,
)
from tda_jax.training.checks import check_training_data
from tda_jax.training.config import TrainConfig
from tda_jax.training.step import epoch_key, make_train_step, split_training_key

Params = Any


def subset_indices(masks: np.ndarray, num_train: int) -> np.ndarray:
    """``[M, k]`` sorted example indices selected by boolean ``masks`` ``[M, num_train]``.

    Raises:
      ValueError: if ``masks`` has the wrong shape or its rows select different numbers of
        examples (all models in one call must have equal-size subsets), or an empty subset.
    """
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.shape[1] != num_train:
        raise ValueError(f"masks must have shape [num_models, {num_train}] (one row per model over "
                         f"the training set), got {masks.shape}")
    if masks.dtype != bool:
        if not np.isin(masks, (0, 1)).all():
            raise ValueError(f"masks must be boolean (or 0/1), got dtype {masks.dtype}")
        masks = masks.astype(bool)
    sizes = masks.sum(axis=1)
    if masks.shape[0] and (sizes != sizes[0]).any():
        raise ValueError(
            "all subsets in one train_many call must have the same size (so every model's epoch "
            f"has the same number of steps); got sizes {sorted(set(sizes.tolist()))} (first rows: "
            f"{sizes[:8].tolist()}). Group models by subset size and call train_many per group.")
    if masks.shape[0] and sizes[0] == 0:
        raise ValueError("masks select no examples; every model needs a non-empty subset")
    return np.stack([np.flatnonzero(row) for row in masks]).astype(np.int32) if masks.shape[0] \
        else np.zeros((0, 0), np.int32)


def make_train_one(model: nn.Module, config: TrainConfig, subset_size: int):
    """``train_one(key, indices, inputs, targets) -> (params, losses [num_epochs, steps])``.

    Trains one model on ``inputs[indices]`` (``indices`` ``[subset_size]``); pure and unjitted so
    that callers can ``vmap`` and ``jit`` it.
    """
    train_step = make_train_step(model, config)
    batch_size = int(config.batch_size)
    steps_per_epoch = -(-subset_size // batch_size)
    padded = steps_per_epoch * batch_size
    mask = (jnp.arange(padded) < subset_size).astype(jnp.float32).reshape(steps_per_epoch,
                                                                            batch_size)

    def train_one(key, indices, inputs, targets):
        init_key, shuffle_key = split_training_key(key)
        params, opt_state = train_step.init(init_key, inputs[:1])

        def run_epoch(carry, epoch):
            order = jax.random.permutation(epoch_key(shuffle_key, epoch), subset_size)
            # Padding positions point at subset row 0; their mask is 0 so they never count.
            order = jnp.concatenate([order, jnp.zeros(padded - subset_size, order.dtype)])
            rows = indices[order].reshape(steps_per_epoch, batch_size)

            def run_step(carry, xs):
                params, opt_state = carry
                rows_b, mask_b = xs
                batch = {"inputs": inputs[rows_b], "targets": targets[rows_b], "mask": mask_b}
                params, opt_state, loss = train_step.step(params, opt_state, batch)
                return (params, opt_state), loss

            return jax.lax.scan(run_step, carry, (rows, mask))

        (params, _), losses = jax.lax.scan(run_epoch, (params, opt_state),
                                           jnp.arange(int(config.num_epochs)))
        return params, losses

    return train_one


@functools.lru_cache(maxsize=8)
def _cached_train_chunk(model: nn.Module, config: TrainConfig, subset_size: int,
                        mesh: Mesh | None):
    train_chunk = jax.vmap(make_train_one(model, config, subset_size), in_axes=(0, 0, None, None))
    if mesh is not None:
        # Models are independent: each device trains its share of the chunk, no communication.
        # check_vma=False: with it, gradients of device-invariant values inside the body (e.g.
        # zero-initialized biases, which do not depend on the key) would be psummed over devices.
        models, shared = PartitionSpec(DATA_AXIS), PartitionSpec()
        train_chunk = jax.shard_map(train_chunk, mesh=mesh,
                                    in_specs=(models, models, shared, shared),
                                    out_specs=models, check_vma=False)
    return jax.jit(train_chunk)


def _jitted_train_chunk(model: nn.Module, config: TrainConfig, subset_size: int,
                        mesh: Mesh | None):
    """The jitted vmapped trainer, reused across calls when ``model`` is hashable."""
    try:
        hash(model)
    except TypeError:
        return _cached_train_chunk.__wrapped__(model, config, subset_size, mesh)
    return _cached_train_chunk(model, config, subset_size, mesh)


def train_in_chunks(keys: jax.Array, model: nn.Module, train_data: Dataset, indices: np.ndarray,
                    config: TrainConfig, *, models_per_chunk: int = 50, mesh: Mesh | None = None,
                    summarize: Callable[[Params], Mapping[str, jax.Array]] | None = None,
                    stage: Stage | None = None, desc: str = "train_many") -> Any:
    """Trains ``M`` models, model ``m`` on rows ``indices[m]`` with ``keys[m]``, chunk by chunk.

    Every chunk of ``models_per_chunk`` models (rounded up to a multiple of the mesh size; the last
    chunk padded with repeats of its first model) is one call of the same compiled vmapped program
    (:func:`make_train_one`), so nothing recompiles. Each chunk's losses are checked once, on the
    host, after the chunk.

    Args:
      keys: ``[M, 2]`` legacy uint32 keys or ``[M]`` typed keys.
      model: the Flax module.
      train_data: the full training set ``[N, ...]`` (checked with
        :func:`tda_jax.training.checks.check_training_data`).
      indices: ``[M, k]`` training rows of each model (:func:`subset_indices`).
      config: training settings.
      models_per_chunk: models per compiled call (bounds memory).
      mesh: optional 1-D ``"data"`` mesh; a chunk's models are split over its devices. In a
        multi-process run the default is the global mesh over every process's devices.
      summarize: optional jitted ``summarize(stacked_params) -> {name: [chunk, ...]}``; the driver
        then keeps only these arrays (e.g. query measurements) instead of the parameters and checks
        that they are finite.
      stage: optional :class:`tda_jax.io.Stage` (needs ``summarize``): chunk ``i`` is saved as
        ``chunk_{i:05d}`` as soon as it is done and loaded instead of retrained on a rerun.
      desc: progress bar label.

    Returns:
      the ``summarize`` arrays (or the parameters) of all models, numpy, leading axis ``M``.

    Raises:
      FloatingPointError: naming the model, step and epoch of the first non-finite loss, or the
        model whose summary is non-finite.
    """
    n = check_training_data(model, train_data, config.loss)
    keys = jnp.asarray(keys)
    indices = np.asarray(indices, dtype=np.int32)
    num_models = keys.shape[0]
    if indices.ndim != 2 or indices.shape[0] != num_models:
        raise ValueError(f"keys has {num_models} rows but indices has shape {indices.shape}; give "
                         "one key and one row of training indices per model.")
    if num_models == 0:
        raise ValueError("training needs at least one model (got 0 keys)")
    if int(models_per_chunk) < 1:
        raise ValueError(f"models_per_chunk must be >= 1, got {models_per_chunk}")
    if stage is not None and summarize is None:
        raise ValueError("a stage saves per-chunk summaries; pass summarize as well")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}), got [{indices.min()}, {indices.max()}]")
    subset_size = indices.shape[1]
    chunk = min(int(models_per_chunk), num_models)
    if mesh is None and is_distributed():
        mesh = global_data_mesh()
    if mesh is not None:
        if tuple(mesh.axis_names) != (DATA_AXIS,):
            raise ValueError(f"mesh must have the single axis {DATA_AXIS!r} "
                             f"(tda_jax.sharding.make_data_mesh), got axes {mesh.axis_names}")
        chunk = -(-chunk // mesh.size) * mesh.size
    steps_per_epoch = -(-subset_size // int(config.batch_size))

    train_chunk = _jitted_train_chunk(model, config, subset_size, mesh)
    if mesh is not None and is_distributed():
        # Global arrays: the data replicated on every device, each chunk's models split over them.
        inputs, targets = put_replicated((np.asarray(train_data.inputs),
                                          np.asarray(train_data.targets)), mesh)
        place = functools.partial(put_global, sharding=data_sharding(mesh))
    else:
        inputs, targets = jnp.asarray(train_data.inputs), jnp.asarray(train_data.targets)
        place = jnp.asarray
    outputs = []
    starts = range(0, num_models, chunk)
    for chunk_index, begin in enumerate(progress(starts, desc=desc, total=len(starts))):
        name = f"chunk_{chunk_index:05d}"
        if stage is not None and stage.has(name):
            outputs.append(stage.load_arrays(name))
            continue
        take = np.arange(begin, begin + chunk)
        take = np.where(take < num_models, take, begin)  # pad the chunk with its first model
        params, losses = train_chunk(place(keys[take]), place(indices[take]), inputs, targets)
        real = min(chunk, num_models - begin)
        losses = to_host(losses)[:real].reshape(real, -1)  # the chunk's one host sync
        finite = np.isfinite(losses)
        if not finite.all():
            m, s = np.argwhere(~finite)[0]
            raise FloatingPointError(
                f"training loss of model {begin + m} became non-finite ({losses[m, s]}) at step "
                f"{s} (epoch {s // steps_per_epoch}, batch {s % steps_per_epoch}). Lower the "
                "learning rate, or check the data for NaN/inf values.")
        if summarize is None:
            outputs.append(jax.tree.map(lambda leaf: leaf[:real], to_host(params)))
            continue
        values = {k: v[:real] for k, v in to_host(summarize(params)).items()}
        for key_name, value in values.items():
            bad = ~np.isfinite(value.reshape(real, -1)).all(axis=1)
            if bad.any():
                raise FloatingPointError(
                    f"{key_name} of trained model {begin + int(np.argmax(bad))} is non-finite; "
                    "lower the learning rate or check the data.")
        if stage is not None:
            stage.save_arrays(name, values)
        outputs.append(values)
    return jax.tree.map(lambda *leaves: np.concatenate(leaves), *outputs)


def train_many(keys: jax.Array, model: nn.Module, train_data: Dataset, masks: np.ndarray,
               config: TrainConfig, models_per_chunk: int = 50,
               mesh: Mesh | None = None) -> Params:
    """Trains ``M`` models at once: model ``m`` on ``subset(train_data, masks[m])``, ``keys[m]``.

    Models are processed in chunks of ``models_per_chunk`` (the last chunk is padded so the program
    compiles once) to bound memory, with a progress bar over chunks (:func:`train_in_chunks`).

    Args:
      keys: ``[M, 2]`` legacy uint32 keys or ``[M]`` typed keys, one per model.
      model: the Flax module (shared architecture).
      train_data: the full training set ``[N, ...]``.
      masks: ``[M, N]`` boolean; row ``m`` selects model ``m``'s training examples. All rows must
        select the same number of examples.
      config: training settings (shared).
      models_per_chunk: models per compiled vmapped call (rounded up to a multiple of the mesh
        size).
      mesh: optional 1-D mesh with axis ``"data"`` (``tda_jax.sharding.make_data_mesh``); each
        chunk's models are split over its devices (e.g. several CPU devices use several cores).
        Results do not depend on the mesh.

    Returns:
      stacked variables (``model.init``'s dict): every leaf has a leading axis ``M``.

    Raises:
      ValueError: on mismatched shapes, unequal subset sizes, or data unsuited to ``config.loss``
        or to the model (labels outside ``[0, C)``, naming the rows; ``num_classes`` unequal to
        the model's number of outputs).
      FloatingPointError: if some model's loss becomes non-finite (names the model, step, epoch).
    """
    n = check_training_data(model, train_data, config.loss)
    keys = jnp.asarray(keys)
    indices = subset_indices(masks, n)
    if indices.shape[0] != keys.shape[0]:
        raise ValueError(f"keys has {keys.shape[0]} rows but masks has {indices.shape[0]}; give "
                         "one key per model.")
    stacked = train_in_chunks(keys, model, train_data, indices, config,
                              models_per_chunk=models_per_chunk, mesh=mesh)
    return jax.tree.map(jnp.asarray, stacked)
