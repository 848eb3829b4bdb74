"""Trajectory checkpoints of a training run (orbax), with the data order saved as JSON.

Layout of a checkpoint directory written by :func:`tda_jax.training.train`::

    arguments.json      config, key, model, data fingerprint, checkpoint steps (tda_jax.io.Stage)
    data_order.json     {"batch_size", "num_examples", "steps_per_epoch", "epochs": [[perm], ...]}
    checkpoints/<step>/ orbax items "params" and "opt_state" after <step> optimizer updates
    COMPLETE            written when training finished

Step ``s`` counts optimizer updates; step ``s`` (0-based) of the run is batch
``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, i.e. the examples
``epochs[e][b * batch_size:(b + 1) * batch_size]`` (positions in the training ``Dataset``). The
checkpoint at step ``s`` holds the parameters *before* update ``s`` is applied (after ``s``
updates); step 0 is the initialization and the last saved step is the final model.

Several processes (``jax.distributed``): every process trains the same model on its own device;
checkpoints hold that model as an array replicated over the global mesh (orbax writes one copy and
refuses host-local arrays), and restored values come back as local arrays on every process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tda_jax.sharding import global_data_mesh, is_distributed, put_replicated, replicated

_SUBDIR = "checkpoints"
DATA_ORDER_FILE = "data_order.json"


def checkpoint_manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
    """A synchronous orbax manager for ``directory/checkpoints`` that keeps every step."""
    path = Path(directory).absolute() / _SUBDIR
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False,
                                           create=True)
    return ocp.CheckpointManager(path, options=options)


def _global(tree: Any) -> Any:
    """Across processes: the (identical) local values as arrays replicated on the global mesh."""
    return put_replicated(tree, global_data_mesh()) if is_distributed() else tree


def _local(tree: Any) -> Any:
    """Across processes: each replicated global array as this process's local copy."""
    if not is_distributed():
        return tree
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, params: Any,
                    opt_state: Any) -> None:
    """Saves ``params`` and ``opt_state`` as checkpoint ``step``."""
    params, opt_state = _global((params, opt_state))
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               opt_state=ocp.args.StandardSave(opt_state)))
    manager.wait_until_finished()


def _abstract(tree: Any) -> Any:
    if is_distributed():  # restored replicated on the global mesh, then taken locally
        sharding = replicated(global_data_mesh())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                            tree)
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, params_like: Any,
                       opt_state_like: Any) -> tuple[Any, Any]:
    """Restores ``(params, opt_state)`` of checkpoint ``step`` into the ``*_like`` structures."""
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params_like)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state_like))))
    return _local((restored["params"], restored["opt_state"]))


def saved_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """The steps saved in ``checkpoint_dir`` (ascending); empty if there are none."""
    if not (Path(checkpoint_dir) / _SUBDIR).exists():
        return []
    manager = checkpoint_manager(checkpoint_dir)
    try:
        return sorted(int(s) for s in manager.all_steps())
    finally:
        manager.close()


def load_params(checkpoint_dir: str | os.PathLike, step: int | None = None,
                params_like: Any = None) -> Any:
    """Parameters of the checkpoint at ``step`` (default: the last one).

    Args:
      checkpoint_dir: the directory given to ``train``.
      step: saved step; ``None`` for the latest.
      params_like: optional pytree with the parameters' structure (restores into it exactly).

    Returns:
      the parameter pytree.
    """
    steps = saved_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"{checkpoint_dir} holds no training checkpoints")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise ValueError(f"no checkpoint at step {step} in {checkpoint_dir}; saved steps: {steps}")
    manager = checkpoint_manager(checkpoint_dir)
    try:
        restore = (ocp.args.StandardRestore() if params_like is None
                   else ocp.args.StandardRestore(_abstract(params_like)))
        return _local(manager.restore(step, args=ocp.args.Composite(params=restore))["params"])
    finally:
        manager.close()


def load_data_order(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The data order of a run: ``batch_size``, ``steps_per_epoch`` and ``epochs`` ``[E, n]``.

    ``epochs`` is returned as an int32 array of shape ``[num_epochs, num_examples]``.
    """
    order = json.loads((Path(checkpoint_dir) / DATA_ORDER_FILE).read_text())
    order["epochs"] = np.asarray(order["epochs"], dtype=np.int32).reshape(
        len(order["epochs"]), order["num_examples"])
    return order
