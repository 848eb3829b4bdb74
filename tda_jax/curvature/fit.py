"""Fitting curvature estimates: sharded passes over the training data, then host-side factorisations.

:func:`fit_curvature` runs the passes a strategy needs (see
:data:`tda_jax.curvature.strategies.REQUIRED_PASSES`). Each pass jits one step, shards every batch
over the ``"data"`` axis of a mesh (one device by default), sums the statistics locally and reduces
them with one ``psum`` per statistic, then adds the batch totals on the host side of the loop. Factors
therefore do not depend on the batch size or the device count beyond float reassociation.

Eigendecompositions (and the dense Cholesky factorisation of ``exact``) run on the host in
``eigh_dtype`` (float64 by default) so results are deterministic.

With ``stage_dir`` the statistics of each pass are saved as they finish (with the arguments that
produced them); a rerun reuses finished passes and refuses different arguments.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import PartitionSpec as P

from tda_jax.capture.layers import ApplyFn, LayerSpec, check_coverage, output_shapes
from tda_jax.capture.statistics import layer_gradients, layer_statistics
from tda_jax.curvature.fisher import check_fisher_type, fisher_cotangents
from tda_jax.curvature.strategies import (
    REQUIRED_PASSES,
    check_strategy,
    covariance_statistics,
    default_damping,
    squared_gradient_statistics,
)
from tda_jax.data import Dataset, batch_iterator, num_examples
from tda_jax.io import Stage
from tda_jax.losses import Loss
from tda_jax.progress import progress
from tda_jax.sharding import DATA_AXIS, data_sharding, make_data_mesh

Array = jax.Array
Params = Any


class Curvature(NamedTuple):
    """A fitted curvature estimate.

    Attributes:
      strategy: ``"identity"``, ``"diagonal"``, ``"kfac"``, ``"ekfac"`` or ``"exact"``.
      specs: tracked layers in a fixed order.
      factors: per-layer arrays (``{"eigvecs_A", "eigvals_A", "eigvecs_G", "eigvals_G", "lambda"}``
        for EK-FAC, ``{"diagonal"}`` for diagonal, ...); for ``exact`` a single entry ``"__dense__"``
        holding ``{"cholesky"}`` of ``F + damping I`` (host float64) and ``{"trace_mean"}``.
      damping: per-layer damping actually used (``"__dense__"`` for exact).
      settings: the arguments that produced the estimate (saved with it).
    """

    strategy: str
    specs: tuple[LayerSpec, ...]
    factors: dict[str, dict[str, Any]]
    damping: dict[str, float]
    settings: dict[str, Any]


def fingerprint(*trees: Any) -> str:
    """A short content hash of arrays (params, data) recorded in saved arguments."""
    digest = hashlib.sha1()
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            arr = np.ascontiguousarray(np.asarray(leaf))
            digest.update(str(arr.shape).encode())
            digest.update(str(arr.dtype).encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()[:16]


def discover_layers(apply_fn: ApplyFn, params: Params, dataset: Dataset,
                    allow_untracked: bool = False) -> tuple[LayerSpec, ...]:
    """Tracked layers of the model (checked against the parameters and one example batch)."""
    n = num_examples(dataset)
    if n == 0:
        raise ValueError("the dataset is empty (0 examples); attribution needs at least one.")
    sample = jnp.asarray(np.asarray(dataset.inputs[:1]))
    specs, _, out = output_shapes(apply_fn, params, sample)
    check_coverage(params, specs, allow_untracked)
    if getattr(out, "ndim", 2) != 2:
        raise ValueError(f"apply_fn must return outputs of shape [batch, outputs]; got {out.shape}.")
    return tuple(specs[name] for name in sorted(specs))


def _check_finite(nonfinite: Array, batch: dict, what: str) -> None:
    if int(nonfinite) > 0:
        rows = batch["index"][batch["mask"] > 0]
        raise FloatingPointError(
            f"non-finite {what} in the batch holding examples {int(rows.min())}..{int(rows.max())}; "
            "check the data (NaN/inf inputs) and the parameters."
        )


def sharded_sum_step(step_fn: Callable[[Params, Any, dict], dict],
                     mesh: jax.sharding.Mesh) -> Callable[[Params, Any, dict], dict]:
    """Jits ``step_fn`` over a batch sharded on ``"data"``, with one ``psum`` per statistic.

    ``step_fn(params, extra, local_batch)`` returns a dict of per-device partial sums (plus a
    ``"nonfinite"`` count); ``params`` and ``extra`` are replicated.
    """

    def body(p, e, batch):
        stats = step_fn(p, e, batch)
        return jax.tree.map(lambda x: jax.lax.psum(x, DATA_AXIS), stats)

    # check_vma=False: the zero perturbations inside capture are device-local; with varying-axis
    # checking their cotangents would be summed over devices.
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                                 out_specs=P(), check_vma=False))


_tree_add = jax.jit(lambda x, y: jax.tree.map(jnp.add, x, y))


def round_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh's device count."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    devices = mesh.devices.size
    return -(-batch_size // devices) * devices


def run_pass(step: Callable[[Params, Any, dict], dict], params: Params, extra: Any,
             dataset: Dataset, batch_size: int, mesh: jax.sharding.Mesh, desc: str) -> dict:
    """Sums a :func:`sharded_sum_step` over the dataset (fixed-size padded batches, no recompiles).

    Returns:
      The totals as host numpy arrays (``"nonfinite"`` removed after checking it is zero).
    """
    batch_size = round_batch_size(batch_size, mesh)
    sharding = data_sharding(mesh)
    total = None
    for batch in progress(batch_iterator(dataset, batch_size), desc=desc,
                          total=-(-num_examples(dataset) // batch_size)):
        stats = step(params, extra, jax.device_put(batch, sharding))
        _check_finite(stats.pop("nonfinite"), batch, "loss outputs or gradients")
        total = stats if total is None else _tree_add(total, stats)
    return jax.tree.map(np.asarray, total)


def _nonfinite(*arrays: Array) -> Array:
    return sum(jnp.sum(~jnp.isfinite(x)) for x in arrays)


def _covariance_stats(a, g, extra, mask, specs):
    return {n: covariance_statistics(a[n], g[n], mask) for n in a}


def _squared_gradient_stats(a, g, extra, mask, specs):
    bases = extra.get("bases")
    return {n: squared_gradient_statistics(a[n], g[n], *(bases[n] if bases else (None, None)))
            for n in a}


def _dense_stats(a, g, extra, mask, specs):
    rows = [jnp.reshape(layer_gradients(a[s.name], g[s.name]), (-1, s.num_params)) for s in specs]
    jac = jnp.concatenate(rows, axis=1)
    return {"F": jac.T @ jac}


_PASS_STATISTICS = {
    "covariance": _covariance_stats,
    "lambda": _squared_gradient_stats,
    "diagonal": _squared_gradient_stats,
    "dense": _dense_stats,
}


@functools.lru_cache(maxsize=32)
def _compiled_pass(pass_name: str, apply_fn: ApplyFn, loss: Loss, fisher: str, num_samples: int,
                   specs: tuple[LayerSpec, ...], mesh: jax.sharding.Mesh):
    """One compiled step per (pass, model, loss, Fisher, mesh): reruns do not recompile."""
    stats_fn = _PASS_STATISTICS[pass_name]

    def step(params, extra, batch):
        cot = fisher_cotangents(loss, fisher, batch["targets"], batch["mask"], key=extra.get("key"),
                                index=batch["index"], num_samples=num_samples)
        outputs, a, g, _ = layer_statistics(apply_fn, params, batch["inputs"], cot)
        stats = stats_fn(a, g, extra, batch["mask"], specs)
        stats["examples"] = jnp.sum(batch["mask"])
        stats["nonfinite"] = _nonfinite(outputs, *g.values())
        return stats

    return sharded_sum_step(step, mesh)


def blocked_cholesky(matrix: np.ndarray, block: int = 8192) -> np.ndarray:
    """Lower Cholesky factor of a symmetric positive definite host matrix, by 2x2 blocks.

    Multithreaded OpenBLAS ``potrf`` was seen to crash (segfault) on matrices of ~23k rows here; the
    recursion keeps every LAPACK call at most ``block`` rows and does the rest with ``trsm``/``gemm``.
    ``matrix`` is overwritten.
    """
    n = matrix.shape[0]
    if n <= block:
        return scipy.linalg.cholesky(matrix, lower=True, overwrite_a=True, check_finite=False)
    half = n // 2
    top = blocked_cholesky(np.array(matrix[:half, :half]), block)
    lower_left = scipy.linalg.solve_triangular(top, matrix[half:, :half].T, lower=True,
                                               check_finite=False).T
    schur = matrix[half:, half:] - lower_left @ lower_left.T
    bottom = blocked_cholesky(schur, block)
    matrix[:half, :half] = top
    matrix[:half, half:] = 0.0
    matrix[half:, :half] = lower_left
    matrix[half:, half:] = bottom
    return matrix


def _eigh(matrix: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh(np.asarray(matrix, dtype=dtype))
    return np.clip(vals, 0.0, None).astype(np.float32), vecs.astype(np.float32)


def fit_curvature(apply_fn: ApplyFn, params: Params, train: Dataset, *, strategy: str = "ekfac",
                  loss: Loss, fisher: str = "expected", num_samples: int = 1,
                  damping: float | None = None, batch_size: int = 256,
                  mesh: jax.sharding.Mesh | None = None, key: Array | None = None,
                  allow_untracked: bool = False, eigh_dtype: str = "float64",
                  stage_dir: str | None = None) -> Curvature:
    """Fits a curvature estimate of the training loss for influence functions.

    Args:
      apply_fn: ``(params, inputs [B, ...]) -> outputs [B, C]``, e.g.
        ``lambda p, x: model.apply({"params": p}, x)`` for an unmodified Flax model.
      params: the trained parameters.
      train: training examples (``tda_jax.data.Dataset``).
      strategy: ``"identity"``, ``"diagonal"``, ``"kfac"``, ``"ekfac"`` or ``"exact"`` (dense,
        for small models: ``P x P`` memory).
      loss: the per-example training loss (:mod:`tda_jax.losses`).
      fisher: ``"expected"`` (exact expectation over the predictive distribution, = GGN),
        ``"sampled"`` (true Fisher with ``num_samples`` sampled labels) or ``"empirical"``.
      num_samples: labels sampled per example when ``fisher="sampled"``.
      damping: absolute damping added to the curvature, or None for ``0.1 x`` the mean eigenvalue of
        each layer (of the whole matrix for ``exact``).
      batch_size: examples per step (rounded up to a multiple of the device count); does not
        change the result.
      mesh: a mesh with a ``"data"`` axis to shard batches over; default one device.
      key: PRNG key (required for ``fisher="sampled"``).
      allow_untracked: leave parameters outside tracked layers out instead of raising.
      eigh_dtype: host dtype for eigendecompositions / Cholesky.
      stage_dir: if given, save each pass's statistics there and reuse them on rerun.

    Returns:
      A :class:`Curvature`.

    Raises:
      ValueError: unknown strategy/Fisher, empty data, untracked parameters, bad damping, or a
        ``stage_dir`` holding results of other arguments.
      FloatingPointError: non-finite outputs or gradients (names the examples).
    """
    check_strategy(strategy)
    check_fisher_type(fisher)
    if fisher == "sampled" and key is None:
        raise ValueError("fisher='sampled' needs key=jax.random.key(...).")
    if damping is not None and damping < 0:
        raise ValueError(f"damping must be >= 0 or None, got {damping}.")
    specs = discover_layers(apply_fn, params, train, allow_untracked)
    settings = {
        "strategy": strategy, "loss": loss.name, "fisher": fisher,
        "num_samples": num_samples if fisher == "sampled" else None, "damping": damping,
        "eigh_dtype": eigh_dtype, "num_train": num_examples(train),
        "key": None if key is None else [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()],
        "params_fingerprint": fingerprint(params), "data_fingerprint": fingerprint(train.inputs,
                                                                                   train.targets),
        "layers": [s.name for s in specs],
    }
    stage = Stage(stage_dir, settings) if stage_dir is not None else None
    extra: dict[str, Any] = {"key": key} if key is not None else {}

    mesh = make_data_mesh(1) if mesh is None else mesh

    def cached_pass(name, extra_args):
        if stage is not None and stage.has(name):
            return stage.load_arrays(name)
        step = _compiled_pass(name, apply_fn, loss, fisher, num_samples, specs, mesh)
        stats = run_pass(step, params, extra_args, train, batch_size, mesh, desc=f"{strategy}:{name}")
        flat = _flatten_stats(stats)
        if stage is not None and not stage.is_complete():
            stage.save_arrays(name, flat)
        return flat

    factors: dict[str, dict[str, Any]] = {s.name: {} for s in specs}
    damping_used: dict[str, float] = {}
    for pass_name in REQUIRED_PASSES[strategy]:
        if pass_name == "covariance":
            stats = cached_pass("covariance", extra)
            count = float(stats["examples"])
            for s in specs:
                vals_a, vecs_a = _eigh(stats[f"{s.name}::A"] / count, eigh_dtype)
                vals_g, vecs_g = _eigh(stats[f"{s.name}::G"] / count, eigh_dtype)
                factors[s.name].update(eigvals_A=vals_a, eigvecs_A=vecs_a, eigvals_G=vals_g,
                                       eigvecs_G=vecs_g)
                damping_used[s.name] = default_damping(vals_a.mean() * vals_g.mean(), damping)
        elif pass_name in ("lambda", "diagonal"):
            args = dict(extra)
            if pass_name == "lambda":
                args["bases"] = {s.name: (jnp.asarray(factors[s.name]["eigvecs_A"]),
                                          jnp.asarray(factors[s.name]["eigvecs_G"])) for s in specs}
            stats = cached_pass(pass_name, args)
            count = float(stats["examples"])
            for s in specs:
                values = (stats[s.name] / count).astype(np.float32)
                factors[s.name][pass_name] = values
                damping_used[s.name] = default_damping(values.mean(), damping)
        elif pass_name == "dense":
            stats = cached_pass("dense", extra)
            dense = np.asarray(stats["F"], dtype=eigh_dtype) / float(stats["examples"])
            del stats
            trace_mean = float(np.trace(dense)) / dense.shape[0]
            used = default_damping(trace_mean, damping)
            dense[np.diag_indices_from(dense)] += used
            cholesky = blocked_cholesky(dense)
            factors = {"__dense__": {"cholesky": cholesky, "trace_mean": trace_mean}}
            damping_used = {"__dense__": used}
    if stage is not None and not stage.is_complete():
        stage.mark_complete()
    return Curvature(strategy, specs, factors, damping_used, settings)


def _flatten_stats(stats: dict) -> dict[str, np.ndarray]:
    flat = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            for sub, arr in value.items():
                flat[f"{key}::{sub}"] = np.asarray(arr)
        else:
            flat[key] = np.asarray(value)
    return flat
