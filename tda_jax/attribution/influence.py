"""Influence scores: pairwise ``[num_queries, num_train]`` and self-influence ``[num_train]``.

Sign and scale convention (shared by every attribution method in tda_jax):

    score[q, i] = - grad_theta f(z_q)^T (F + damping I)^{-1} grad_theta loss(z_i)

where ``f`` is the query *measurement* (e.g. :func:`tda_jax.losses.classification_margin`) and
``F`` the per-example-normalised curvature. A positive score means that training on example ``i``
pushes the query's measurement *up*; scores are **not** divided by the number of training examples
(removing example ``i`` changes ``f(z_q)`` by about ``-score[q, i] / N``). With the identity
strategy this is the negative gradient dot product. Self-influence is
``grad loss(z_i)^T (F + damping I)^{-1} grad loss(z_i)`` (non-negative).

Training-side per-example gradients of Kronecker-structured layers are not materialised beyond a
memory budget: the preconditioned query gradients ``M_q [in, out]`` meet each training example
through ``sum_t a_t^T M_q g_t`` (factored form) whenever a batch's ``[B, in, out]`` gradients would
exceed ``max_gradient_bytes``; below it XLA picks the faster order. Work is chunked over query
blocks and training batches, so memory is bounded by ``query_batch_size x train_batch_size`` plus
the factors.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import PartitionSpec as P

from tda_jax.capture.layers import ApplyFn
from tda_jax.capture.statistics import layer_gradients, layer_statistics, loss_cotangents
from tda_jax.curvature.fit import Curvature, discover_layers, round_batch_size
from tda_jax.curvature.strategies import precondition_layer, self_quadratic_layer
from tda_jax.data import Dataset, batch_iterator, num_examples
from tda_jax.losses import Loss, MeasurementFn
from tda_jax.progress import progress
from tda_jax.sharding import DATA_AXIS, data_sharding, make_data_mesh

Array = jax.Array
Params = Any


def _check_compatible(curvature: Curvature, apply_fn: ApplyFn, params: Params,
                      dataset: Dataset, role: str) -> None:
    if num_examples(dataset) == 0:
        raise ValueError(f"the {role} dataset is empty (0 examples).")
    specs = discover_layers(apply_fn, params, dataset, allow_untracked=True)
    if tuple(s.name for s in specs) != tuple(s.name for s in curvature.specs):
        raise ValueError(f"the {role} data/model expose layers {[s.name for s in specs]} but the "
                         f"curvature was fitted on {[s.name for s in curvature.specs]}.")


def _dense_solve(curvature: Curvature, rows: np.ndarray) -> np.ndarray:
    """``(F + damping)^{-1}`` applied to each row of ``rows [n, P]`` (exact strategy, host float64)."""
    cholesky = curvature.factors["__dense__"]["cholesky"]
    return scipy.linalg.cho_solve((cholesky, True), np.asarray(rows, np.float64).T,
                                  check_finite=False).T


def _precondition(curvature: Curvature, grads: dict[str, Array]) -> dict[str, Array]:
    """Applies ``(F + damping)^{-1}`` to per-layer gradients ``[Q, in, out]``."""
    if curvature.strategy != "exact":
        return {s.name: precondition_layer(curvature.strategy, curvature.factors[s.name],
                                           curvature.damping.get(s.name, 0.0), grads[s.name])
                for s in curvature.specs}
    flat = np.concatenate([np.asarray(grads[s.name]).reshape(grads[s.name].shape[0], -1)
                           for s in curvature.specs], axis=1)
    solved = _dense_solve(curvature, flat).astype(np.float32)
    out, offset = {}, 0
    for s in curvature.specs:
        out[s.name] = jnp.asarray(solved[:, offset:offset + s.num_params].reshape(-1, s.in_dim,
                                                                                 s.out_dim))
        offset += s.num_params
    return out


def query_gradients(apply_fn: ApplyFn, params: Params, queries: Dataset,
                    measurement: MeasurementFn, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per-query measurement gradients in matrix view: ``{layer: [num_queries, in, out]}``."""

    step = _query_step(apply_fn, measurement)
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in batch_iterator(queries, batch_size):
        grads, finite = step(params, batch)
        if not bool(finite):
            raise FloatingPointError("non-finite model outputs on the query batch holding "
                                     f"examples {batch['index'][batch['mask'] > 0].tolist()[:5]}...")
        real = int(batch["mask"].sum())
        for n, v in grads.items():
            chunks.setdefault(n, []).append(np.asarray(v)[:real])
    return {n: np.concatenate(v) for n, v in chunks.items()}


def pairwise_scores(apply_fn: ApplyFn, params: Params, curvature: Curvature, queries: Dataset,
                    train: Dataset, *, loss: Loss, measurement: MeasurementFn,
                    query_batch_size: int = 256, train_batch_size: int = 256,
                    mesh: jax.sharding.Mesh | None = None,
                    max_gradient_bytes: int = 2**28) -> np.ndarray:
    """Influence of every training example on every query.

    Args:
      apply_fn: ``(params, inputs) -> outputs [B, C]`` (the same one the curvature was fit with).
      params: trained parameters.
      curvature: from :func:`tda_jax.curvature.fit_curvature`.
      queries: query examples; their ``targets`` feed ``measurement``.
      train: training examples.
      loss: training loss (its per-example gradient is the training-side vector).
      measurement: ``(outputs [B, C], targets) -> [B]`` measured on queries.
      query_batch_size: queries preconditioned and scored together.
      train_batch_size: training examples per step (rounded up to the device count).
      mesh: mesh with a ``"data"`` axis over which training batches are sharded.
      max_gradient_bytes: per layer and training batch, the largest ``[B, in, out]`` intermediate
        allowed; above it the factored contraction is used, so per-example gradients of large
        layers are never formed (0 forces the factored form everywhere).

    Returns:
      ``[num_queries, num_train]`` float32 scores (sign convention in the module docstring).
    """
    _check_compatible(curvature, apply_fn, params, queries, "query")
    _check_compatible(curvature, apply_fn, params, train, "train")
    mesh = make_data_mesh(1) if mesh is None else mesh
    train_batch_size = round_batch_size(train_batch_size, mesh)
    num_q, num_t = num_examples(queries), num_examples(train)
    scores = np.zeros((num_q, num_t), np.float32)

    step = _pairwise_step(apply_fn, loss, mesh, int(max_gradient_bytes))
    sharding = data_sharding(mesh)
    qgrads = query_gradients(apply_fn, params, queries, measurement, query_batch_size)
    for q0 in range(0, num_q, query_batch_size):
        q1 = min(q0 + query_batch_size, num_q)
        block = {n: jnp.asarray(v[q0:q1]) for n, v in qgrads.items()}
        if q1 - q0 < query_batch_size and num_q > query_batch_size:
            block = {n: jnp.pad(v, ((0, query_batch_size - (q1 - q0)), (0, 0), (0, 0)))
                     for n, v in block.items()}
        precond = _precondition(curvature, block)
        for batch in progress(batch_iterator(train, train_batch_size), desc="pairwise scores",
                              total=-(-num_t // train_batch_size)):
            values, bad = step(params, precond, jax.device_put(batch, sharding))
            if int(bad) > 0:
                raise FloatingPointError("non-finite outputs on the training batch holding "
                                         f"examples from {int(batch['index'][0])}.")
            real = batch["mask"] > 0
            scores[q0:q1, batch["index"][real]] = np.asarray(values)[: q1 - q0, real]
    return scores


def self_scores(apply_fn: ApplyFn, params: Params, curvature: Curvature, train: Dataset, *,
                loss: Loss, batch_size: int = 256,
                mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """Self-influence ``grad loss_i^T (F + damping)^{-1} grad loss_i`` of each training example.

    Returns:
      ``[num_train]`` float32, non-negative.
    """
    _check_compatible(curvature, apply_fn, params, train, "train")
    mesh = make_data_mesh(1) if mesh is None else mesh
    batch_size = round_batch_size(batch_size, mesh)
    num_t = num_examples(train)
    out = np.zeros((num_t,), np.float32)
    exact = curvature.strategy == "exact"

    step = _self_step(apply_fn, loss, curvature.strategy, curvature.specs, mesh)
    factors = {} if exact else (jax.tree.map(jnp.asarray, curvature.factors),
                                {n: jnp.float32(v) for n, v in curvature.damping.items()})
    sharding = data_sharding(mesh)
    for batch in progress(batch_iterator(train, batch_size), desc="self scores",
                          total=-(-num_t // batch_size)):
        values = np.asarray(step(params, factors, jax.device_put(batch, sharding)))
        if exact:
            values = np.sum(values * _dense_solve(curvature, values), axis=1)
        real = batch["mask"] > 0
        out[batch["index"][real]] = values[real]
    if not np.all(np.isfinite(out)):
        raise FloatingPointError("non-finite self-influence scores; check data and parameters.")
    return out


@functools.lru_cache(maxsize=32)
def _query_step(apply_fn: ApplyFn, measurement: MeasurementFn):
    @jax.jit
    def step(p, batch):
        cot = loss_cotangents(measurement, batch["targets"], batch["mask"])
        outputs, a, g, _ = layer_statistics(apply_fn, p, batch["inputs"], cot)
        finite = jnp.all(jnp.isfinite(outputs))
        return {n: layer_gradients(a[n], g[n])[0] for n in a}, finite

    return step


def _layer_scores(precond: Array, a: Array, g: Array, max_gradient_bytes: int) -> Array:
    """``sum_t a_t^T M_q g_t`` -> ``[Q, B]`` for one layer.

    If the batch's per-example gradients ``[B, in, out]`` fit in ``max_gradient_bytes`` the
    contraction order is left to XLA (for ``T = 1`` it forms that batch-sized intermediate, the
    fastest order); otherwise the factored order ``(a M_q) . g`` is forced, which never forms a
    per-example gradient.
    """
    batch, positions, fan_in = a.shape
    if batch * fan_in * g.shape[-1] * a.dtype.itemsize <= max_gradient_bytes:
        return jnp.einsum("qio,bti,bto->qb", precond, a, g)
    num_queries, _, fan_out = precond.shape
    rotated = a.reshape(-1, fan_in) @ jnp.transpose(precond, (1, 0, 2)).reshape(fan_in, -1)
    rotated = rotated.reshape(batch, positions, num_queries, fan_out)
    return jnp.einsum("btqo,bto->qb", rotated, g)


# check_vma=False below: capture's zero perturbations are device-local (see curvature.fit).
@functools.lru_cache(maxsize=32)
def _pairwise_step(apply_fn: ApplyFn, loss: Loss, mesh: jax.sharding.Mesh,
                   max_gradient_bytes: int):
    def body(p, precond, batch):
        cot = loss_cotangents(loss.per_example, batch["targets"], batch["mask"])
        outputs, a, g, _ = layer_statistics(apply_fn, p, batch["inputs"], cot)
        total = sum(_layer_scores(precond[n], a[n], g[n][0], max_gradient_bytes) for n in a)
        bad = jnp.sum(~jnp.isfinite(outputs))
        return -total, jax.lax.psum(bad, DATA_AXIS)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                                 out_specs=(P(None, DATA_AXIS), P()), check_vma=False))


@functools.lru_cache(maxsize=32)
def _self_step(apply_fn: ApplyFn, loss: Loss, strategy: str, specs: tuple, mesh: jax.sharding.Mesh):
    def body(p, factors, batch):
        cot = loss_cotangents(loss.per_example, batch["targets"], batch["mask"])
        _, a, g, _ = layer_statistics(apply_fn, p, batch["inputs"], cot)
        if strategy == "exact":
            return jnp.concatenate([jnp.reshape(layer_gradients(a[s.name], g[s.name])[0],
                                                (a[s.name].shape[0], -1)) for s in specs], axis=1)
        layer_factors, damping = factors
        return sum(self_quadratic_layer(strategy, layer_factors[n], damping.get(n, 0.0), a[n], g[n])
                   for n in a)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                                 out_specs=P(DATA_AXIS), check_vma=False))
