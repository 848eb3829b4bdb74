"""Influence scores: pairwise ``[num_queries, num_train]`` and self-influence ``[num_train]``.

Sign and scale convention (shared by every attribution method in tda_jax):

    score[q, i] = - grad_theta f(z_q)^T (F + damping I)^{-1} grad_theta loss(z_i)

where ``f`` is the query *measurement* (e.g. :func:`tda_jax.losses.classification_margin`) and
``F`` the per-example-normalised curvature. A positive score means that training on example ``i``
pushes the query's measurement *up*; scores are **not** divided by the number of training examples
(removing example ``i`` changes ``f(z_q)`` by about ``-score[q, i] / N``). With the identity
strategy this is the negative gradient dot product. Self-influence is
``grad loss(z_i)^T (F + damping I)^{-1} grad loss(z_i)`` (non-negative).

How the work is laid out (:func:`pairwise_scores`):

* Queries are processed in *super-blocks* of as many queries as fit in ``max_query_bytes`` (their
  preconditioned gradients, in the curvature block's score coordinates, at 4 bytes per parameter).
  Inside a super-block, query gradients are computed ``query_batch_size`` at a time and
  preconditioned at once, so query-side memory is bounded by the budget however many queries
  there are.
* Each training batch is captured (one forward, one backward) **once per super-block** and
  contracted with every query of the super-block. The training side's layer inputs ``a`` and output
  gradients ``g`` are mapped into the block's score coordinates (for K-FAC / EK-FAC: rotated into the
  Kronecker eigenbasis), so queries are never rotated back.
* Per layer and batch, if the batch's ``[B, in, out]`` gradients fit in ``max_gradient_bytes`` XLA
  chooses the contraction order; otherwise the factored order ``sum_t (a_t^T V_q) g_t`` is forced, so
  per-example gradients of large layers are never formed.
* Nothing waits for the host inside the loops: scores and non-finite counts stay on the device until
  a super-block ends.

The compiled steps come from :func:`build_score_steps`, which a caller may build once and pass to
every call (``steps=``); steps compiled from equal programs share executables
(:mod:`tda_jax.compile`), so a fresh ``apply_fn`` lambda does not compile again.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tda_jax.capture.layers import ApplyFn, LayerSpec
from tda_jax.capture.statistics import layer_gradients, layer_statistics, loss_cotangents
from tda_jax.compile import CompiledStep
from tda_jax.curvature.blocks import get_block
from tda_jax.curvature.estimate import Curvature
from tda_jax.curvature.fit import (
    check_compatible,
    inspect_model,
    nonfinite_count,
    raise_if_nonfinite,
    round_batch_size,
    track_first_bad,
)
from tda_jax.data import Dataset, batch_iterator, num_examples, subset
from tda_jax.losses import Loss, MeasurementFn, check_loss, check_targets, target_kind_of
from tda_jax.progress import progress
from tda_jax.sharding import DATA_AXIS, data_sharding, make_data_mesh, replicated

Array = jax.Array
Params = Any


class ScoreSteps(NamedTuple):
    """Compiled steps of the score drivers (build with :func:`build_score_steps`).

    Attributes:
      query: ``(params, factors, batch) -> ({layer: [Qb, in, out]}, nonfinite)``: preconditioned
        query gradients in score coordinates.
      pairwise: ``(params, factors, preconditioned, batch) -> ([S, B] scores, nonfinite)``.
      self: ``(params, factors, batch) -> ([B] self-influence, nonfinite)``.
    """

    query: CompiledStep
    pairwise: CompiledStep
    self: CompiledStep


def _layer_scores(precond: Array, a: Array, g: Array, max_gradient_bytes: int) -> Array:
    """``sum_t a_t^T V_q g_t`` -> ``[Q, B]`` for one layer (any coordinates, same on both sides).

    If the batch's per-example gradients ``[B, in, out]`` fit in ``max_gradient_bytes`` the
    contraction order is left to XLA (for ``T = 1`` it forms that batch-sized intermediate, the
    fastest order); otherwise the factored order ``(a V_q) . g`` is forced, which never forms a
    per-example gradient.
    """
    batch, positions, fan_in = a.shape
    if batch * fan_in * g.shape[-1] * a.dtype.itemsize <= max_gradient_bytes:
        return jnp.einsum("qio,bti,bto->qb", precond, a, g)
    num_queries, _, fan_out = precond.shape
    rotated = a.reshape(-1, fan_in) @ jnp.transpose(precond, (1, 0, 2)).reshape(fan_in, -1)
    rotated = rotated.reshape(batch, positions, num_queries, fan_out)
    return jnp.einsum("btqo,bto->qb", rotated, g)


def build_score_steps(apply_fn: ApplyFn, strategy: str, specs: tuple[LayerSpec, ...], *,
                      loss: Loss | None, measurement: MeasurementFn | None = None,
                      mesh: jax.sharding.Mesh | None = None,
                      max_gradient_bytes: int = 2**28) -> ScoreSteps:
    """Compiled query, pairwise and self-influence steps for one model, loss and curvature block.

    Hold the result and pass ``steps=`` to :func:`pairwise_scores` / :func:`self_scores` to score
    many times without tracing again.
    """
    block = get_block(strategy)
    loss = None if loss is None else check_loss(loss)
    mesh = make_data_mesh(1) if mesh is None else mesh
    max_gradient_bytes = int(max_gradient_bytes)

    def training_cotangents(batch):
        if loss is None:
            raise ValueError("these score steps were built with loss=None (query gradients only).")
        return loss_cotangents(loss.per_example, batch["targets"], batch["mask"])

    def query(params, factors, batch):
        if measurement is None:
            raise ValueError("these score steps were built without a measurement.")
        cot = loss_cotangents(measurement, batch["targets"], batch["mask"])
        outputs, a, g, _, _ = layer_statistics(apply_fn, params, batch["inputs"], cot,
                                                  batch.get("input_mask"))
        grads = {n: layer_gradients(a[n], g[n])[0] for n in a}
        values = jnp.where(batch["mask"] > 0, measurement(outputs, batch["targets"]), 0.0)
        bad = nonfinite_count(outputs, values, cot(outputs))
        return block.query_transform(specs, factors, grads), bad

    def pairwise(params, factors, precond, batch):
        cot = training_cotangents(batch)
        outputs, a, g, _, _ = layer_statistics(apply_fn, params, batch["inputs"], cot,
                                                  batch.get("input_mask"))
        a, g = block.train_transform(specs, factors, a, g)
        total = sum(_layer_scores(precond[s.name], a[s.name], g[s.name][0], max_gradient_bytes)
                    for s in specs)
        return -total, jax.lax.psum(nonfinite_count(outputs), DATA_AXIS)

    def self_influence(params, factors, batch):
        cot = training_cotangents(batch)
        outputs, a, g, _, _ = layer_statistics(apply_fn, params, batch["inputs"], cot,
                                                  batch.get("input_mask"))
        values = block.self_quadratic(specs, factors, a, g)
        return values, jax.lax.psum(nonfinite_count(outputs), DATA_AXIS)

    # check_vma=False: capture's zero perturbations are device-local (see curvature.fit).
    sharded_pairwise = jax.shard_map(pairwise, mesh=mesh, in_specs=(P(), P(), P(), P(DATA_AXIS)),
                                     out_specs=(P(None, DATA_AXIS), P()), check_vma=False)
    sharded_self = jax.shard_map(self_influence, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                                 out_specs=(P(DATA_AXIS), P()), check_vma=False)
    return ScoreSteps(CompiledStep(query, name=f"{block.name}:query"),
                      CompiledStep(sharded_pairwise, name=f"{block.name}:pairwise"),
                      CompiledStep(sharded_self, name=f"{block.name}:self"))


def _check_inputs(apply_fn, params, curvature, dataset, role, kind):
    if not isinstance(curvature, Curvature):
        raise TypeError(f"curvature must be a tda_jax.curvature.Curvature from fit_curvature; got "
                        f"{type(curvature).__name__}.")
    specs, num_outputs = inspect_model(apply_fn, params, dataset, role, allow_untracked=True)
    check_compatible(curvature, specs, role)
    if kind is not None:
        check_targets(dataset.targets, num_outputs, kind, f"{role}.targets")


def _query_plan(curvature: Curvature, num_queries: int, query_batch_size: int,
                max_query_bytes: int) -> tuple[int, int]:
    """``(query block, super-block)`` sizes: blocks of ``query_batch_size`` within the byte budget."""
    if query_batch_size < 1:
        raise ValueError(f"query_batch_size must be >= 1, got {query_batch_size}.")
    per_query = 4 * curvature.num_params
    block = max(1, min(query_batch_size, max_query_bytes // per_query, num_queries))
    blocks = max(1, max_query_bytes // (per_query * block))
    blocks = min(blocks, -(-num_queries // block))
    return block, block * blocks


def pairwise_scores(apply_fn: ApplyFn, params: Params, curvature: Curvature, queries: Dataset,
                    train: Dataset, *, loss: Loss, measurement: MeasurementFn,
                    query_batch_size: int = 64, train_batch_size: int = 256,
                    mesh: jax.sharding.Mesh | None = None, max_gradient_bytes: int = 2**28,
                    max_query_bytes: int = 2**28, steps: ScoreSteps | None = None) -> np.ndarray:
    """Influence of every training example on every query.

    Args:
      apply_fn: ``(params, inputs) -> outputs [B, C]`` (the same one the curvature was fit with).
      params: trained parameters.
      curvature: from :func:`tda_jax.curvature.fit_curvature` on this model.
      queries: query examples; their ``targets`` feed ``measurement`` (checked if the measurement
        declares ``target_kind``, as :func:`tda_jax.losses.classification_margin` does).
      train: training examples (targets checked against ``loss``).
      loss: training loss (its per-example gradient is the training-side vector).
      measurement: ``(outputs [B, C], targets) -> [B]`` measured on queries.
      query_batch_size: queries whose gradients are computed together.
      train_batch_size: training examples per step (rounded up to the device count).
      mesh: mesh with a ``"data"`` axis over which training batches are sharded.
      max_gradient_bytes: per layer and training batch, the largest ``[B, in, out]`` intermediate
        allowed; above it the factored contraction is used (0 forces it everywhere).
      max_query_bytes: memory for preconditioned queries held at once (a super-block); each
        training batch is captured once per super-block.
      steps: compiled steps from :func:`build_score_steps` to reuse (built here if None).

    Returns:
      ``[num_queries, num_train]`` float32 scores (sign convention in the module docstring).
    """
    loss = check_loss(loss)
    _check_inputs(apply_fn, params, curvature, queries, "query", target_kind_of(measurement))
    _check_inputs(apply_fn, params, curvature, train, "train", loss.target_kind)
    mesh = make_data_mesh(1) if mesh is None else mesh
    train_batch_size = round_batch_size(train_batch_size, mesh)
    num_q, num_t = num_examples(queries), num_examples(train)
    if steps is None:
        steps = build_score_steps(apply_fn, curvature.strategy, curvature.specs, loss=loss,
                                  measurement=measurement, mesh=mesh,
                                  max_gradient_bytes=max_gradient_bytes)
    block, super_block = _query_plan(curvature, num_q, query_batch_size, max_query_bytes)
    params, factors = jax.device_put((params, curvature.factors), replicated(mesh))
    sharding = data_sharding(mesh)
    scores = np.zeros((num_q, num_t), np.float32)
    for q0 in range(0, num_q, super_block):
        q1 = min(q0 + super_block, num_q)
        precond = _preconditioned_queries(steps.query, params, factors, queries, q0, q1, block,
                                          super_block)
        precond = jax.device_put(precond, replicated(mesh))
        values, first_bad = [], jnp.int32(-1)
        for number, batch in enumerate(progress(batch_iterator(train, train_batch_size),
                                                desc="pairwise scores",
                                                total=-(-num_t // train_batch_size))):
            batch_scores, bad = steps.pairwise(params, factors, precond,
                                               jax.device_put(batch, sharding))
            values.append(batch_scores)
            first_bad = track_first_bad(first_bad, bad, number)
        raise_if_nonfinite(first_bad, train_batch_size, num_t, "training outputs")
        scores[q0:q1] = np.asarray(jnp.concatenate(values, axis=1))[: q1 - q0, :num_t]
    return scores


def _preconditioned_queries(step, params, factors, queries, q0, q1, block, super_block):
    """Preconditioned query gradients of queries ``q0..q1`` padded to ``super_block`` rows."""
    rows = np.arange(q0, q1)
    part = subset(queries, rows)
    chunks, first_bad = [], jnp.int32(-1)
    for number, batch in enumerate(batch_iterator(part, block)):
        grads, bad = step(params, factors, jax.device_put(batch))
        chunks.append(grads)
        first_bad = track_first_bad(first_bad, bad, number)
    if int(first_bad) >= 0:
        lo = q0 + int(first_bad) * block
        raise FloatingPointError(
            f"non-finite model outputs or measurement on the query batch holding examples "
            f"{lo}..{min(lo + block, q1) - 1}; check the query data and targets.")
    stacked = {n: jnp.concatenate([c[n] for c in chunks])[: q1 - q0] for n in chunks[0]}
    pad = super_block - (q1 - q0)
    if pad > 0:
        stacked = {n: jnp.pad(v, ((0, pad), (0, 0), (0, 0))) for n, v in stacked.items()}
    return stacked


def self_scores(apply_fn: ApplyFn, params: Params, curvature: Curvature, train: Dataset, *,
                loss: Loss, batch_size: int = 256, mesh: jax.sharding.Mesh | None = None,
                steps: ScoreSteps | None = None) -> np.ndarray:
    """Self-influence ``grad loss_i^T (F + damping)^{-1} grad loss_i`` of each training example.

    Returns:
      ``[num_train]`` float32, non-negative.
    """
    loss = check_loss(loss)
    _check_inputs(apply_fn, params, curvature, train, "train", loss.target_kind)
    mesh = make_data_mesh(1) if mesh is None else mesh
    batch_size = round_batch_size(batch_size, mesh)
    num_t = num_examples(train)
    if steps is None:
        steps = build_score_steps(apply_fn, curvature.strategy, curvature.specs, loss=loss, mesh=mesh)
    params, factors = jax.device_put((params, curvature.factors), replicated(mesh))
    sharding = data_sharding(mesh)
    values, first_bad = [], jnp.int32(-1)
    for number, batch in enumerate(progress(batch_iterator(train, batch_size), desc="self scores",
                                            total=-(-num_t // batch_size))):
        batch_values, bad = steps.self(params, factors, jax.device_put(batch, sharding))
        values.append(batch_values)
        first_bad = track_first_bad(first_bad, bad, number)
    raise_if_nonfinite(first_bad, batch_size, num_t, "training outputs")
    out = np.asarray(jnp.concatenate(values))[:num_t]
    if not np.all(np.isfinite(out)):
        raise FloatingPointError("non-finite self-influence scores; check data and parameters.")
    return out


def query_gradients(apply_fn: ApplyFn, params: Params, queries: Dataset,
                    measurement: MeasurementFn, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-query measurement gradients in matrix view: ``{layer: [num_queries, in, out]}``."""
    specs, _ = inspect_model(apply_fn, params, queries, "query", allow_untracked=True)
    identity = get_block("identity")
    step = build_score_steps(apply_fn, "identity", specs, loss=None, measurement=measurement).query
    factors = identity.initial_factors(specs)
    num_q = num_examples(queries)
    grads = _preconditioned_queries(step, params, factors, queries, 0, num_q, batch_size, num_q)
    return {n: np.asarray(v) for n, v in grads.items()}

