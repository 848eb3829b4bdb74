"""One process of the multi-process test (tests/test_distributed.py), started by launch.local.

Every process fits EK-FAC factors (and K-FAC factors of a 4-layer MLP; each process
eigendecomposes only the layers assigned to it, then all factors are exchanged), computes
pairwise scores (in memory, over two query
super-blocks, and into an array store), self scores, a tiny LDS ground truth and one model
trained with checkpoints, and records the error of a fit whose preconditioner is singular in
one layer, with the library's defaults (the global ``"data"`` mesh), then saves
what it got to ``<out>/process_<i>.npz``. The test computes the same with one process and one
device through :func:`compute`.

    python -m launch.local --num_processes=2 --devices_per_process=2 -- \\
        tests/distributed_worker.py --out=DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import numpy as np

from tda_jax import sharding
from tda_jax.attribution import fit_curvature, pairwise_scores, self_scores
from tda_jax.curvature.blocks import LayerwiseBlock
from tda_jax.data import Dataset
from tda_jax.evaluation import retrain_ground_truth, sample_subsets
from tda_jax.losses import classification_margin, softmax_cross_entropy
from tda_jax.models import MLP, apply_fn_of
from tda_jax.training import TrainConfig, train

NUM_TRAIN = 37  # not a multiple of the global batch (8 rows over 4 devices)
BATCH = 8


def problem():
    """A small classification problem: data, queries, model and its parameters."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_TRAIN + 5, 5)).astype(np.float32)
    y = np.argmax(x[:, :3] + 0.5 * rng.normal(size=(len(x), 3)), axis=1).astype(np.int32)
    train, queries = Dataset(x[:NUM_TRAIN], y[:NUM_TRAIN], 3), Dataset(x[NUM_TRAIN:],
                                                                         y[NUM_TRAIN:], 3)
    model = MLP(hidden_sizes=(6,), num_outputs=3)
    variables = model.init(jax.random.key(0), x[:1])
    return train, queries, model, variables


def compute(workdir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Everything the test compares, with the default mesh of this process (count)."""
    workdir = Path(workdir)
    train_set, queries, model, variables = problem()
    apply_fn, params, loss = apply_fn_of(model), variables["params"], softmax_cross_entropy()
    curvature = fit_curvature(apply_fn, params, train_set, strategy="ekfac", loss=loss,
                              batch_size=BATCH, stage_dir=workdir / "curvature")
    # Again from the saved statistics (a stage read by every process).
    reloaded = fit_curvature(apply_fn, params, train_set, strategy="ekfac", loss=loss,
                             batch_size=BATCH, stage_dir=workdir / "curvature")
    kwargs = dict(loss=loss, measurement=classification_margin, query_batch_size=2,
                  train_batch_size=BATCH, max_query_bytes=4 * 4 * curvature.num_params)
    scores = pairwise_scores(apply_fn, params, curvature, queries, train_set, **kwargs)
    store = pairwise_scores(apply_fn, params, curvature, queries, train_set, **kwargs,
                            store=workdir / "scores", store_chunk_batches=2)
    own = self_scores(apply_fn, params, curvature, train_set, loss=loss, batch_size=BATCH)
    masks = sample_subsets(jax.random.key(1), NUM_TRAIN, 3, 0.5)
    ground_truth = retrain_ground_truth(
        jax.random.key(2), model, train_set, queries, masks, seeds_per_subset=2,
        config=TrainConfig(num_epochs=2, batch_size=BATCH, learning_rate=1e-2, loss=loss),
        measurement=classification_margin, directory=workdir / "ground_truth",
        models_per_chunk=4)
    # One model trained with orbax checkpoints (every process trains it; one copy is saved), then
    # loaded back from the finished run.
    config = TrainConfig(num_epochs=2, batch_size=BATCH, learning_rate=1e-2, loss=loss)
    trained = [train(jax.random.key(3), model, None, train_set, config, checkpoint_steps=[3],
                     checkpoint_dir=workdir / "trained") for _ in range(2)]
    factors = {f"factor/{jax.tree_util.keystr(path)}": np.asarray(leaf) for path, leaf in
               jax.tree_util.tree_flatten_with_path(curvature.factors)[0]}
    # K-FAC on a deeper MLP: its 4 layers' eigendecompositions are shared out between processes.
    deep = MLP(hidden_sizes=(6, 5, 4), num_outputs=3)
    deep_params = deep.init(jax.random.key(4), np.asarray(train_set.inputs[:1]))["params"]
    kfac = fit_curvature(apply_fn_of(deep), deep_params, train_set, strategy="kfac", loss=loss,
                         batch_size=BATCH)
    factors.update({f"kfac/{jax.tree_util.keystr(path)}": np.asarray(leaf) for path, leaf in
                    jax.tree_util.tree_flatten_with_path(kfac.factors)[0]})
    # A constant input feature makes layer Dense_0's preconditioner singular without damping:
    # whichever process owns that layer, every process must raise (none may wait forever).
    constant = Dataset(np.asarray(train_set.inputs) * np.asarray([1, 1, 1, 1, 0], np.float32),
                       train_set.targets, 3)
    try:
        fit_curvature(apply_fn, params, constant, strategy="kfac", loss=loss, damping=0.0,
                      batch_size=BATCH)
        singular = "no error"
    except ValueError as err:
        singular = str(err)
    trained = {f"trained{i}/{jax.tree_util.keystr(path)}": np.asarray(leaf)
               for i, run in enumerate(trained)
               for path, leaf in jax.tree_util.tree_flatten_with_path(run)[0]}
    return {**factors, "dense": np.asarray(curvature.to_dense(damped=True)),
            "kfac_dense": np.asarray(kfac.to_dense(damped=True)), "singular_error": singular,
            "dense_reloaded": np.asarray(reloaded.to_dense(damped=True)),
            "pairwise": scores, "stored": np.asarray(store), "self": own,
            "ground_truth": ground_truth, **trained}


def record_finalized_layers() -> list[str]:
    """Patches :meth:`LayerwiseBlock.finalize_layer` to list ``block:pass:layer`` of every call."""
    done: list[str] = []
    original = LayerwiseBlock.finalize_layer

    def recording(self, pass_name, spec, *args, **kwargs):
        done.append(f"{self.name}:{pass_name}:{spec.name}")
        return original(self, pass_name, spec, *args, **kwargs)

    LayerwiseBlock.finalize_layer = recording
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    if not sharding.initialize_from_env():
        sys.exit("expected the environment of launch.local (TDA_JAX_COORDINATOR, ...)")
    jax.config.update("jax_numpy_dtype_promotion", "strict")  # as the test suite runs
    finalized = record_finalized_layers()
    results = compute(out / "work")
    results["finalized"] = np.asarray(finalized)
    results["devices"] = np.asarray([jax.device_count(), jax.local_device_count()])
    np.savez(out / f"process_{jax.process_index()}.npz", **results)


if __name__ == "__main__":
    main()
