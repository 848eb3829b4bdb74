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
* Per layer and batch, if the batch's ``[B, in, out]`` gradients fit in ``max_gradient_bytes`` they
  are formed and every query scored by one matrix product ``[Q, in out] @ [in out, B]``; otherwise
  the factored order ``sum_t (a_t^T V_q) g_t`` is forced, so per-example gradients of large layers
  are never formed.
* ``trim_padding=True`` (sequence data with an ``input_mask``, causal models): examples are batched
  by real length and each batch's trailing padding is cut (:func:`tda_jax.curvature.fit.trimmed_batches`);
  scores are scattered back to dataset order.
* Nothing waits for the host inside the loops: scores and non-finite counts stay on the device until
  a super-block ends.
* Queries are preconditioned from their captured ``a``, ``g`` (:meth:`CurvatureBlock.query_from_factors`):
  per layer, rotating the rank-1 factors into the eigenbasis (``T (in^2 + out^2)``) when that is
  cheaper than rotating the full gradient (``in out (in + out)``), e.g. for every MLP layer.

Sequence models (outputs ``[B, T, V]``, e.g. :class:`tda_jax.models.TransformerLM` with
:func:`tda_jax.losses.causal_lm_loss` and :func:`tda_jax.losses.completion_log_prob`) are scored the
same way. ``granularity="token"`` splits each score over the training sequence's input tokens
(``a_t^T V_q g_t`` summed over the positions of every layer call at token ``t``; ``[Q, N, T]``),
``granularity="module"`` over tracked layers (``[Q, N, L]``); both sum to the sequence score.
``query_rank=r`` is the query batching of Grosse et al. (2023): each layer's preconditioned query
gradient is replaced by its rank-``r`` truncated SVD ``u w^T`` (from the eigendecomposition of the
smaller Gram matrix, :func:`truncate_rank`; in the layer's own coordinates, so training gradients are
not rotated) and the score ``sum_t (a_t . u)(g_t . w)`` costs ``r (in + out)`` per query and
training position instead of ``in out``. Where that is dearer than scoring ``u w^T`` at full rank
(sequence scores of long sequences: ``T r (in + out) > in out``), ``u w^T`` is expanded once per
query block instead (:func:`expanded_low_rank_layers`).

With ``store=`` (a directory or an :class:`tda_jax.io.ArrayStore`) scores go to disk chunk by chunk
instead of into one host matrix: a chunk is one query super-block x ``store_chunk_batches`` training
batches, written and recorded only once complete, so a killed run loses at most the chunks in
flight and a rerun computes only the missing ones (from the same arguments; finished chunks made
from other parameters, data, curvature or settings are refused, naming what differs).

Several processes (``jax.distributed``, see :mod:`tda_jax.sharding`): with the default mesh, the
global ``"data"`` mesh, each process feeds its share of every training batch, query gradients are
computed on every process (queries are few), and each super-block's score columns are gathered so
every process returns the whole matrix. With ``store=``, process 0 alone creates the store and
writes every chunk (the others compute with it and open the store read-only), so the store's
directory must be visible to every process.

The compiled steps come from :func:`build_score_steps`, which a caller may build once and pass to
every call (``steps=``); steps compiled from equal programs share executables
(:mod:`tda_jax.compile`), so a fresh ``apply_fn`` lambda does not compile again.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tda_jax.capture.layers import ApplyFn, LayerSpec, output_shapes
from tda_jax.capture.statistics import check_compute_dtype, layer_statistics, loss_cotangents
from tda_jax.compile import CompiledStep
from tda_jax.curvature.blocks import get_block
from tda_jax.curvature.blocks.base import lapack_threads
from tda_jax.curvature.estimate import Curvature
from tda_jax.curvature.fit import (
    TRIM_MULTIPLE,
    check_compatible,
    first_bad_batch,
    inspect_model,
    nonfinite_count,
    raise_if_nonfinite,
    real_lengths,
    round_batch_size,
    start_first_bad,
    track_first_bad,
    trimmed_batches,
)
from tda_jax.data import Dataset, as_dataset, batches_in_order, num_examples, subset
from tda_jax.io import ArrayStore, fingerprint
from tda_jax.losses import Loss, MeasurementFn, check_loss, check_targets, target_kind_of
from tda_jax.progress import progress, progress_bar
from tda_jax.sharding import (
    DATA_AXIS,
    barrier,
    data_sharding,
    default_mesh,
    is_distributed,
    is_main_process,
    put_global,
    put_replicated,
    run_on_main,
    to_host,
)

Array = jax.Array
Params = Any


GRANULARITIES = ("sequence", "token", "module")


class ScoreSteps(NamedTuple):
    """Compiled steps of the score drivers (build with :func:`build_score_steps`).

    Attributes:
      query: ``(params, factors, batch) -> (preconditioned, nonfinite)``: preconditioned query
        gradients, ``{layer: [Qb, in, out]}`` in score coordinates, or with ``query_rank=r``
        ``{layer: {"u": [Qb, in, r], "w": [Qb, out, r]}}`` in layer coordinates.
      pairwise: ``(params, factors, preconditioned, batch) -> (scores, nonfinite)``; scores
        ``[S, B]``, ``[S, B, T]`` (token) or ``[S, B, L]`` (module), sharded over the batch;
        non-finite counts per device ``[num_devices]``.
      self: ``(params, factors, batch) -> (self-influence, nonfinite)``; ``[B]``, ``[B, T]`` or
        ``[B, L]``; counts as for ``pairwise``.
    """

    query: CompiledStep
    pairwise: CompiledStep
    self: CompiledStep


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}.")


def _layer_scores(precond: Array, a: Array, g: Array, max_gradient_bytes: int) -> Array:
    """``sum_t a_t^T V_q g_t`` -> ``[Q, B]`` for one layer (any coordinates, same on both sides).

    If the batch's per-example gradients ``[B, in, out]`` fit in ``max_gradient_bytes`` they are
    formed (``B T in out`` flops) and all queries are scored with one matrix product
    ``[Q, in out] @ [in out, B]`` (no transpose of either side); otherwise the factored order
    ``(a V_q) . g`` is forced, which never forms a per-example gradient.
    """
    batch, positions, fan_in = a.shape
    fan_out = g.shape[-1]
    if batch * fan_in * fan_out * a.dtype.itemsize <= max_gradient_bytes:
        grads = jnp.einsum("bti,bto->bio", a, g).reshape(batch, fan_in * fan_out)
        flat = precond.reshape(precond.shape[0], fan_in * fan_out)
        return jax.lax.dot_general(flat, grads, (((1,), (1,)), ((), ())))
    return jnp.sum(_position_scores(precond, a, g), axis=-1)


def _position_scores(precond: Array, a: Array, g: Array) -> Array:
    """``a_t^T V_q g_t`` per position -> ``[Q, B, T]`` (factored order, no per-example gradient)."""
    batch, positions, fan_in = a.shape
    num_queries, _, fan_out = precond.shape
    rotated = a.reshape(-1, fan_in) @ jnp.transpose(precond, (1, 0, 2)).reshape(fan_in, -1)
    rotated = rotated.reshape(batch, positions, num_queries, fan_out)
    return jnp.einsum("btqo,bto->qbt", rotated, g)


def _low_rank_position_scores(factors: dict[str, Array], a: Array, g: Array) -> Array:
    """``sum_r (a_t . u_qr)(g_t . w_qr)`` per position -> ``[Q, B, T]`` (``r (in + out)`` per pair)."""
    left = jnp.einsum("bti,qir->qbtr", a, factors["u"])
    right = jnp.einsum("bto,qor->qbtr", g, factors["w"])
    return jnp.sum(left * right, axis=-1)


def _factored_is_cheaper(spec: LayerSpec, positions: int, rank: int, per_position: bool) -> bool:
    """Whether ``sum_t (a_t . u)(g_t . w)`` beats expanding ``u w^T`` and contracting at full rank.

    Per query and batch (``positions`` = batch x positions), the factored form costs
    ``positions r (in + out)``; expanding costs ``r in out`` plus the full-rank contraction:
    ``positions in out`` per position (token scores) or about ``batch in out`` (sequence scores,
    where the batch's gradients are formed once for all queries; counted as ``in out`` here).
    """
    rank = min(rank, spec.in_dim, spec.out_dim)
    factored = positions * rank * (spec.in_dim + spec.out_dim)
    expanded = rank * spec.in_dim * spec.out_dim + (positions if per_position else 1) * \
        spec.in_dim * spec.out_dim
    return factored < expanded


def back_rotated_layers(specs: tuple[LayerSpec, ...], positions: dict[str, int], num_queries: int,
                        num_train: int) -> tuple[str, ...]:
    """Layers where rotating each preconditioned query back to layer coordinates once
    (``Q (in^2 out + in out^2)`` flops) is cheaper than rotating every training position into the
    eigenbasis (``N T (in^2 + out^2)``), e.g. transformer layers scored against long sequences."""
    chosen = []
    for s in specs:
        train = num_train * positions.get(s.name, 1) * (s.in_dim ** 2 + s.out_dim ** 2)
        queries = num_queries * s.in_dim * s.out_dim * (s.in_dim + s.out_dim)
        if queries < train:
            chosen.append(s.name)
    return tuple(chosen)


def layer_positions(apply_fn: ApplyFn, params: Params, dataset: Dataset) -> dict[str, int]:
    """Positions ``T`` per example of each tracked layer (all its calls), found abstractly."""
    _, shapes, _ = output_shapes(apply_fn, params, jnp.asarray(np.asarray(dataset.inputs[:1])))
    out: dict[str, int] = {}
    for key, shape in shapes.items():
        name = key.rsplit("#", 1)[0]
        out[name] = out.get(name, 0) + int(np.prod(shape[1:-1], dtype=np.int64))
    return out


def keeps_low_rank(spec: LayerSpec, rank: int) -> bool:
    """Whether rank-``rank`` factors ``u [in, r]``, ``w [out, r]`` are smaller than ``V [in, out]``
    (otherwise ``query_rank`` keeps that layer's preconditioned query gradient at full rank)."""
    return min(rank, spec.in_dim, spec.out_dim) * (spec.in_dim + spec.out_dim) < \
        spec.in_dim * spec.out_dim


def truncate_rank(v: Array, rank: int) -> tuple[Array, Array]:
    """Best rank-``rank`` approximation ``v ~ u w^T`` of each ``v [Q, m, n]`` (the truncated SVD)
    -> ``u [Q, m, r]``, ``w [Q, n, r]``, ``r = min(rank, m, n)``.

    Computed from the eigendecomposition of the smaller Gram matrix (``v v^T`` if ``m <= n``): its
    top-``r`` eigenvectors ``E`` span the top-``r`` left singular vectors, so ``u = E`` and
    ``w = v^T E`` (``E E^T v`` is the truncated SVD); symmetric ``eigh`` of a ``min(m, n)``-sized
    matrix is much cheaper on CPU than an SVD of ``v``. Exact when ``r = min(m, n)``.
    """
    m, n = v.shape[-2:]
    r = min(rank, m, n)
    if m <= n:
        _, vecs = jnp.linalg.eigh(v @ jnp.swapaxes(v, 1, 2))
        e = vecs[..., ::-1][..., :r]  # eigh sorts ascending
        return e, jnp.swapaxes(v, 1, 2) @ e
    _, vecs = jnp.linalg.eigh(jnp.swapaxes(v, 1, 2) @ v)
    e = vecs[..., ::-1][..., :r]
    return v @ e, e


def _low_rank(block, specs, factors, precond: dict[str, Array], rank: int,
              expand: tuple[str, ...] = ()) -> dict[str, dict]:
    """Rank-``rank`` truncated SVD (:func:`truncate_rank`) of each layer's preconditioned query
    gradient (Grosse et al. 2023's query batching), returned in the layers' own coordinates:
    ``V ~ u w^T``; layers in ``expand`` get the product ``{"v_layer": u w^T}`` instead (scored at
    full rank: cheaper than the factored form when training sequences are long)."""
    bases = block.score_basis(specs, factors)
    out = {}
    for s in specs:
        v = precond[s.name]
        if not keeps_low_rank(s, rank):  # rank-r factors would be no smaller: keep V as it is
            out[s.name] = {"v": v}
            continue
        u, w = truncate_rank(v, rank)
        qa, qg = bases[s.name]
        u, w = (u if qa is None else qa @ u), (w if qg is None else qg @ w)
        out[s.name] = {"v_layer": u @ jnp.swapaxes(w, 1, 2)} if s.name in expand else \
            {"u": u, "w": w}
    return out


def expanded_low_rank_layers(specs: tuple[LayerSpec, ...], positions: dict[str, int], rank: int,
                             num_queries: int, granularity: str) -> tuple[str, ...]:
    """Layers whose rank-``rank`` query factors are cheaper to expand once per query block and
    score at full rank than to score factored, given ``positions`` per training example.

    Per training example and layer: factored ``Q T r (in + out)``; expanded ``Q in out`` plus the
    per-example gradient ``T in out`` (sequence scores) or ``Q T in out`` (token scores).
    """
    chosen = []
    for s in specs:
        if not keeps_low_rank(s, rank):
            continue
        t = positions.get(s.name, 1)
        r = min(rank, s.in_dim, s.out_dim)
        factored = num_queries * t * r * (s.in_dim + s.out_dim)
        expanded = (num_queries * t if granularity == "token" else num_queries + t) * \
            s.in_dim * s.out_dim
        if expanded < factored:
            chosen.append(s.name)
    return tuple(chosen)


def token_map(calls: tuple[int, ...], length: int, name: str) -> np.ndarray:
    """``[P, T]`` 0/1 matrix sending a layer's positions (its calls concatenated) to input tokens.

    A call over ``T`` positions maps position ``t`` to token ``t``; over ``k T`` positions
    (position-major, e.g. ``[T, heads]``) position ``p`` to token ``p // k``.
    """
    blocks = []
    for positions in calls:
        if positions % length:
            raise ValueError(f"layer {name!r} has a call over {positions} positions, which do not map "
                             f"onto the {length} input tokens; per-token scores need every tracked "
                             "layer to act per token (select layers with layers=... when fitting).")
        rows = np.arange(positions) // (positions // length)
        blocks.append(np.eye(length, dtype=np.float32)[rows])
    return np.concatenate(blocks, axis=0)


def _reduce(per_layer: dict[str, Array], calls, granularity: str, length: int | None) -> Array:
    """Per-layer ``[Q, B, P_l]`` (or ``[Q, B]``) contributions -> the requested granularity."""
    if granularity == "sequence":
        return sum(per_layer.values())
    if granularity == "module":
        return jnp.stack([per_layer[n] for n in per_layer], axis=-1)
    total = 0.0
    for name, values in per_layer.items():
        total = total + values @ jnp.asarray(token_map(calls[name], length, name))
    return total


def build_score_steps(apply_fn: ApplyFn, strategy: str, specs: tuple[LayerSpec, ...], *,
                      loss: Loss | None, measurement: MeasurementFn | None = None,
                      mesh: jax.sharding.Mesh | None = None,
                      max_gradient_bytes: int = 2**28, granularity: str = "sequence",
                      query_rank: int | None = None,
                      layer_coordinates: tuple[str, ...] = (),
                      compute_dtype: Any = None,
                      expand_low_rank: tuple[str, ...] = ()) -> ScoreSteps:
    """Compiled query, pairwise and self-influence steps for one model, loss and curvature block.

    Hold the result and pass ``steps=`` to :func:`pairwise_scores` / :func:`self_scores` to score
    many times without tracing again. ``granularity`` and ``query_rank`` are as in
    :func:`pairwise_scores`. ``layer_coordinates`` names layers whose preconditioned queries are
    rotated back into the layer's own coordinates once (so training gradients of those layers are
    not rotated): cheaper when the training side has many more positions than there are queries
    (:func:`back_rotated_layers` chooses). ``compute_dtype`` (e.g. ``jnp.bfloat16``): the model's
    forward and backward passes on queries and training examples run in it; the captured ``a``,
    ``g`` are cast to float32 before scoring (:func:`tda_jax.capture.layer_statistics`).
    ``expand_low_rank`` (with ``query_rank``) names layers whose rank-r query factors are expanded
    to ``u w^T`` once per query block and scored at full rank (:func:`expanded_low_rank_layers`
    chooses); the other low-rank layers are scored in factored form, or expanded per batch where
    that is cheaper for the batch's shape.
    """
    block = get_block(strategy)
    compute_dtype = check_compute_dtype(compute_dtype)
    loss = None if loss is None else check_loss(loss)
    check_granularity(granularity)
    by_name = {s.name: s for s in specs}
    unknown = sorted((set(layer_coordinates) | set(expand_low_rank)) - set(by_name))
    if unknown:
        raise ValueError(f"layer_coordinates / expand_low_rank name layers {unknown} that are not "
                         "scored.")
    if query_rank is not None and (int(query_rank) != query_rank or query_rank < 1):
        raise ValueError(f"query_rank must be a positive integer or None, got {query_rank!r}.")
    mesh = default_mesh() if mesh is None else mesh
    max_gradient_bytes = int(max_gradient_bytes)
    per_position = granularity == "token"

    def training_cotangents(batch):
        if loss is None:
            raise ValueError("these score steps were built with loss=None (query gradients only).")
        return loss_cotangents(loss.per_example, batch["targets"], batch["mask"])

    def capture(params, batch, cot):
        return layer_statistics(apply_fn, params, batch["inputs"], cot, batch.get("input_mask"),
                                compute_dtype)

    def query(params, factors, batch):
        if measurement is None:
            raise ValueError("these score steps were built without a measurement.")
        cot = loss_cotangents(measurement, batch["targets"], batch["mask"])
        captured = capture(params, batch, cot)
        outputs = captured.outputs
        g = {n: v[0] for n, v in captured.g.items()}
        precond = block.query_from_factors(specs, factors, captured.a, g)
        if layer_coordinates:
            bases = block.score_basis(specs, factors)
            for name in layer_coordinates:
                qa, qg = bases[name]
                low_rank = query_rank is not None and keeps_low_rank(by_name[name], int(query_rank))
                if not low_rank:  # low-rank factors are moved to layer coordinates by _low_rank
                    v = precond[name] if qa is None else qa @ precond[name]
                    precond[name] = v if qg is None else v @ jnp.swapaxes(qg, 0, 1)
        if query_rank is not None:
            precond = _low_rank(block, specs, factors, precond, int(query_rank), expand_low_rank)
        values = jnp.where(batch["mask"] > 0, measurement(outputs, batch["targets"]), 0.0)
        bad = nonfinite_count(outputs, values, cot(outputs))
        return precond, bad

    def pairwise(params, factors, precond, batch):
        captured = capture(params, batch, training_cotangents(batch))
        a, g = block.train_transform(specs, factors, captured.a, captured.g)
        per_layer = {}
        for s in specs:
            x, y = a[s.name], g[s.name][0]
            layer_query = precond[s.name]
            if s.name in layer_coordinates:  # queries were rotated back: raw training side
                x, y = captured.a[s.name], captured.g[s.name][0]
            if query_rank is not None and "v_layer" in layer_query:  # expanded u w^T
                x, y = captured.a[s.name], captured.g[s.name][0]
                per_layer[s.name] = (_position_scores(layer_query["v_layer"], x, y) if per_position
                                     else _layer_scores(layer_query["v_layer"], x, y,
                                                        max_gradient_bytes))
                continue
            if query_rank is not None and "v" in layer_query:  # kept at full rank
                per_layer[s.name] = (_position_scores(layer_query["v"], x, y) if per_position else
                                     _layer_scores(layer_query["v"], x, y, max_gradient_bytes))
                continue
            if query_rank is not None:  # low-rank factors are in the layers' own coordinates
                x, y = captured.a[s.name], captured.g[s.name][0]
            if query_rank is not None and _factored_is_cheaper(s, x.shape[0] * x.shape[1],
                                                               int(query_rank), per_position):
                values = _low_rank_position_scores(precond[s.name], x, y)
                per_layer[s.name] = values if per_position else jnp.sum(values, axis=-1)
            elif query_rank is not None:  # expand u w^T once per batch, then contract as full rank
                full = jnp.einsum("qir,qor->qio", precond[s.name]["u"], precond[s.name]["w"])
                per_layer[s.name] = (_position_scores(full, x, y) if per_position else
                                     _layer_scores(full, x, y, max_gradient_bytes))
            elif per_position:
                per_layer[s.name] = _position_scores(precond[s.name], x, y)
            else:
                per_layer[s.name] = _layer_scores(precond[s.name], x, y, max_gradient_bytes)
        total = _reduce(per_layer, captured.calls, granularity, batch["inputs"].shape[1]
                        if per_position else None)
        return -total, nonfinite_count(captured.outputs)[None]

    def self_influence(params, factors, batch):
        captured = capture(params, batch, training_cotangents(batch))
        if granularity == "sequence":
            values = block.self_quadratic(specs, factors, captured.a, captured.g)
        else:
            own = block.query_from_factors(specs, factors, captured.a,
                                           {n: v[0] for n, v in captured.g.items()})
            a, g = block.train_transform(specs, factors, captured.a, captured.g)
            per_layer = {}
            for s in specs:  # <a_t g_t^T, (F + damping)^-1 DW_b> per position, own example only
                rotated = jnp.einsum("bti,bio->bto", a[s.name], own[s.name])
                contrib = jnp.sum(rotated * g[s.name][0], axis=-1)
                per_layer[s.name] = contrib if per_position else jnp.sum(contrib, axis=-1)
            values = _reduce(per_layer, captured.calls, granularity,
                             batch["inputs"].shape[1] if per_position else None)
        return values, nonfinite_count(captured.outputs)[None]

    # check_vma=False: capture's zero perturbations are device-local (see curvature.fit). Non-finite
    # counts stay per device ([num_devices]), so a step needs no collective.
    sharded_pairwise = jax.shard_map(pairwise, mesh=mesh, in_specs=(P(), P(), P(), P(DATA_AXIS)),
                                     out_specs=(P(None, DATA_AXIS), P(DATA_AXIS)), check_vma=False)
    sharded_self = jax.shard_map(self_influence, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                                 out_specs=(P(DATA_AXIS), P(DATA_AXIS)), check_vma=False)
    tag = f"{block.name}:{granularity}" + ("" if query_rank is None else f":r{query_rank}")
    tag += "" if compute_dtype is None else f":{compute_dtype}"
    return ScoreSteps(CompiledStep(query, name=f"{tag}:query"),
                      CompiledStep(sharded_pairwise, name=f"{tag}:pairwise"),
                      CompiledStep(sharded_self, name=f"{tag}:self"))


def _check_inputs(apply_fn, params, curvature, dataset, role, kind):
    if not isinstance(curvature, Curvature):
        raise TypeError(f"curvature must be a tda_jax.curvature.Curvature from fit_curvature; got "
                        f"{type(curvature).__name__}.")
    info = inspect_model(apply_fn, params, dataset, role, allow_untracked=True)
    check_compatible(curvature, info.specs, role)
    if kind is not None:
        check_targets(dataset.targets, info.num_outputs, kind, f"{role}.targets", info.positions)
    return info


def _query_plan(curvature: Curvature, num_queries: int, query_batch_size: int,
                max_query_bytes: int, query_rank: int | None) -> tuple[int, int]:
    """``(query block, super-block)`` sizes: blocks of ``query_batch_size`` within the byte budget."""
    if query_batch_size < 1:
        raise ValueError(f"query_batch_size must be >= 1, got {query_batch_size}.")
    if query_rank is None:
        per_query = 4 * curvature.num_params
    else:  # the rank-r factors kept per query, plus one block's full gradients while factoring
        per_query = 4 * sum(min(query_rank, s.in_dim, s.out_dim) * (s.in_dim + s.out_dim)
                            if keeps_low_rank(s, query_rank) else s.num_params
                            for s in curvature.specs)
    full = 4 * curvature.num_params
    # With query_rank, the full gradients of one block being factorised take at most half the
    # budget, so that the low-rank factors of many blocks fit in the rest.
    factorising = max_query_bytes if query_rank is None else max_query_bytes // 2
    block = max(1, min(query_batch_size, factorising // full, num_queries))
    blocks = max(1, (max_query_bytes - (0 if query_rank is None else full * block))
                 // (per_query * block))
    blocks = min(blocks, -(-num_queries // block))
    return block, block * blocks


def _score_shape(granularity: str, curvature: Curvature, dataset: Dataset) -> tuple[int, ...]:
    if granularity == "token":
        if np.ndim(dataset.inputs) < 2:
            raise ValueError("granularity='token' needs sequence inputs [N, T].")
        return (int(np.shape(dataset.inputs)[1]),)
    if granularity == "module":
        return (len(curvature.specs),)
    return ()


def pairwise_scores(apply_fn: ApplyFn, params: Params, curvature: Curvature, queries: Dataset,
                    train: Dataset, *, loss: Loss, measurement: MeasurementFn,
                    granularity: str = "sequence", query_rank: int | None = None,
                    query_batch_size: int = 64, train_batch_size: int = 256,
                    mesh: jax.sharding.Mesh | None = None, max_gradient_bytes: int = 2**28,
                    max_query_bytes: int = 2**28, steps: ScoreSteps | None = None,
                    store: str | os.PathLike | ArrayStore | None = None,
                    store_chunk_batches: int = 16,
                    compute_dtype: Any = None, trim_padding: bool = False) -> np.ndarray | ArrayStore:
    """Influence of every training example (or token, or layer) on every query.

    Args:
      apply_fn: ``(params, inputs) -> outputs [B, C]`` or ``[B, T, V]`` (the same one the
        curvature was fit with).
      params: trained parameters.
      curvature: from :func:`tda_jax.curvature.fit_curvature` on this model; its layers are the
        ones scored.
      queries: query examples; their ``targets`` feed ``measurement`` (checked if the measurement
        declares ``target_kind``, as :func:`tda_jax.losses.classification_margin` and
        :func:`tda_jax.losses.completion_log_prob` do).
      train: training examples (targets checked against ``loss``).
      loss: training loss (its per-example gradient is the training-side vector).
      measurement: ``(outputs, targets) -> [B]`` measured on queries.
      granularity: ``"sequence"`` (one score per training example, ``[Q, N]``), ``"token"`` (the
        contribution of each training input token, ``[Q, N, T]``; sums to the sequence score) or
        ``"module"`` (per tracked layer in ``curvature.specs`` order, ``[Q, N, L]``; sums to the
        sequence score).
      query_rank: if set, each layer's preconditioned query gradient is replaced by its rank-r SVD
        and scores are contracted in factored form (Grosse et al. 2023's query batching): the cost
        per (query, training position) falls from ``in x out`` to ``r (in + out)``. Exact when
        ``r >= min(in, out)``.
      query_batch_size: queries whose gradients are computed together.
      train_batch_size: training examples per step (rounded up to the device count).
      mesh: mesh with a ``"data"`` axis over which training batches are sharded.
      max_gradient_bytes: per layer and training batch, the largest ``[B, in, out]`` intermediate
        allowed; above it the factored contraction is used (0 forces it everywhere).
      max_query_bytes: memory for preconditioned queries held at once (a super-block); each
        training batch is captured once per super-block.
      steps: compiled steps from :func:`build_score_steps` to reuse (built here if None; must
        match ``granularity`` and ``query_rank``).
      store: a directory (or a writable :class:`tda_jax.io.ArrayStore`) to write the scores to,
        chunk by chunk, instead of returning them in memory. Completed chunks found there are
        skipped; the arguments of :func:`score_arguments` are recorded and a store holding
        finished chunks made with other ones is refused (:class:`tda_jax.io.ArgumentMismatchError`;
        one without finished chunks is replaced). An existing store keeps its chunk layout.
      store_chunk_batches: training batches per stored chunk (a chunk is one query super-block x
        ``store_chunk_batches * train_batch_size`` training examples); a kill loses at most one
        chunk's work.
      compute_dtype: e.g. ``jnp.bfloat16``: forward and backward passes (queries and training
        examples) in this dtype, the captured activations and output gradients cast to float32
        before they are preconditioned and contracted; None: the parameters' dtype. Usually the
        one the curvature was fitted with (``fit_curvature(..., compute_dtype=...)``). ``steps``
        must have been built with the same one.
      trim_padding: sequence data only (needs ``input_mask`` on both datasets): training examples
        (and queries) are batched by real length and each batch's trailing padding is cut to a
        multiple of 8 positions (:func:`tda_jax.curvature.fit.trimmed_batches`), so padded positions
        cost nothing; scores come back in dataset order, token scores padded back to ``T`` (0 at
        padding). Exact up to float reassociation only for models whose outputs at real positions
        do not depend on trailing padding (causal or padding-masked, e.g.
        :class:`tda_jax.models.TransformerLM`) and losses / measurements that ignore padded targets
        (``-1``; a target after a sequence's last real token is refused). Off by default.

    Returns:
      float32 scores ``[num_queries, num_train]``  (``[..., T]`` / ``[..., L]`` by granularity; sign
      convention in the module docstring); with ``store``, the complete :class:`ArrayStore` holding
      them (``np.asarray(store)`` or ``store.read(rows=..., cols=...)`` to load any block).
    """
    loss = check_loss(loss)
    check_granularity(granularity)
    compute_dtype = check_compute_dtype(compute_dtype)
    queries, train = as_dataset(queries, "queries"), as_dataset(train, "train")
    _check_inputs(apply_fn, params, curvature, queries, "query", target_kind_of(measurement))
    _check_inputs(apply_fn, params, curvature, train, "train", loss.target_kind)
    mesh = default_mesh() if mesh is None else mesh
    train_batch_size = round_batch_size(train_batch_size, mesh)
    num_q, num_t = num_examples(queries), num_examples(train)
    if store is not None:
        return _pairwise_into_store(
            store, apply_fn, params, curvature, queries, train, loss=loss, measurement=measurement,
            granularity=granularity, query_rank=query_rank, query_batch_size=query_batch_size,
            train_batch_size=train_batch_size, mesh=mesh, max_gradient_bytes=max_gradient_bytes,
            max_query_bytes=max_query_bytes, steps=steps, chunk_batches=store_chunk_batches,
            compute_dtype=compute_dtype, trim_padding=trim_padding)
    lengths = real_lengths(train, "train") if trim_padding else None
    if trim_padding:
        real_lengths(queries, "queries")  # checked before anything is computed
    if steps is None:
        steps = _pairwise_steps(apply_fn, params, curvature, queries, train, loss, measurement,
                                mesh, max_gradient_bytes, granularity, query_rank, compute_dtype,
                                _trimmed_fraction(lengths, train_batch_size,
                                                  int(np.shape(train.inputs)[-1])))
    block, super_block = _query_plan(curvature, num_q, query_batch_size, max_query_bytes,
                                     query_rank)
    params, factors = put_replicated((params, curvature.factors), mesh)
    sharding = data_sharding(mesh)
    shape = _score_shape(granularity, curvature, train)
    scores = np.zeros((num_q, num_t, *shape), np.float32)
    num_batches = -(-num_t // train_batch_size)
    # One bar for the whole call: every super-block passes over every training batch.
    bar = progress_bar(-(-num_q // super_block) * num_batches, desc="pairwise scores")
    for q0 in range(0, num_q, super_block):
        q1 = min(q0 + super_block, num_q)
        precond = _preconditioned_queries(steps.query, params, factors, queries, q0, q1, block,
                                          super_block, mesh, trim_padding)
        values, first_bad = [], None
        order, batches = trimmed_batches(train, train_batch_size, trim_padding, "train",
                                         lengths=lengths)
        for number, batch in enumerate(batches):
            batch_scores, bad = steps.pairwise(params, factors, precond,
                                               put_global(batch, sharding))
            values.append(_pad_positions(batch_scores, granularity, shape))
            first_bad = track_first_bad(start_first_bad(bad) if first_bad is None else first_bad,
                                        bad, number)
            bar.update(1)
        raise_if_nonfinite(first_bad, train_batch_size, num_t, "training outputs", order)
        computed = to_host(jnp.concatenate(values, axis=1))[: q1 - q0, :num_t]
        if order is None:
            scores[q0:q1] = computed
        else:  # batches came sorted by length: back to dataset order
            scores[q0:q1, order] = computed
    bar.close()
    return scores


def _pad_positions(values: Array, granularity: str, shape: tuple[int, ...]) -> Array:
    """Token scores of a padding-trimmed batch ``[..., B, L]`` padded back to ``[..., B, T]``
    (trimmed positions are padding: their scores are 0)."""
    if granularity != "token" or values.shape[-1] == shape[0]:
        return values
    return jnp.pad(values, ((0, 0),) * (values.ndim - 1) + ((0, shape[0] - values.shape[-1]),))


def _trimmed_fraction(lengths: np.ndarray | None, batch_size: int, full: int) -> float:
    """Mean positions per example left by :func:`tda_jax.curvature.fit.trimmed_batches`, as a
    fraction of the full length ``full`` (1 without trimming; used to estimate the work)."""
    if lengths is None or not len(lengths):
        return 1.0
    ordered = np.sort(lengths)
    kept = sum(min(full, max(TRIM_MULTIPLE, -(-int(part.max()) // TRIM_MULTIPLE) * TRIM_MULTIPLE))
               * len(part) for part in np.split(ordered, range(batch_size, len(ordered), batch_size)))
    return kept / (len(ordered) * full)


def measurement_name(measurement: MeasurementFn) -> str:
    """The name recorded for a measurement: ``fn.name`` if set, else its module and qualified name."""
    name = getattr(measurement, "name", None)
    if isinstance(name, str):
        return name
    module = getattr(measurement, "__module__", "?")
    return f"{module}.{getattr(measurement, '__qualname__', repr(measurement))}"


def _data_fingerprint(dataset: Dataset) -> str:
    return fingerprint(dataset.inputs, dataset.targets, dataset.input_mask)


def score_arguments(params: Params, curvature: Curvature, queries: Dataset, train: Dataset, *,
                    loss: Loss, measurement: MeasurementFn, granularity: str = "sequence",
                    query_rank: int | None = None, compute_dtype: Any = None) -> dict[str, Any]:
    """What a stored pairwise score matrix is tied to (recorded in, and checked against, its store).

    The curvature's settings (which pin the data and parameters it was fitted on) and a fingerprint
    of its factors, the scored parameters, both datasets, the loss and measurement names,
    granularity and ``query_rank`` (and ``compute_dtype`` when set). Batch sizes, memory budgets
    and meshes are left out: they do not change the scores beyond float reassociation.
    """
    arguments = {
        "scores": "pairwise",
        "curvature": curvature.settings,
        "curvature_fingerprint": fingerprint(curvature.factors),
        "params_fingerprint": fingerprint(params),
        "query_fingerprint": _data_fingerprint(queries),
        "train_fingerprint": _data_fingerprint(train),
        "loss": loss.name,
        "measurement": measurement_name(measurement),
        "granularity": granularity,
        "query_rank": None if query_rank is None else int(query_rank),
    }
    compute_dtype = check_compute_dtype(compute_dtype)
    if compute_dtype is not None:  # recorded only when set: stores of earlier runs stay valid
        arguments["compute_dtype"] = compute_dtype
    return arguments


def _score_store(store, shape: tuple[int, ...], arguments: dict, chunks: tuple[int, ...],
                 what: str = "pairwise scores need float32 {shape} chunked over (queries, training "
                             "examples)") -> ArrayStore:
    """The store to fill: an existing one with these arguments (its own chunk layout), or new."""
    if isinstance(store, ArrayStore):
        store.check_arguments(arguments)
        if store.shape != shape or store.dtype != np.float32 or len(store.chunks) != len(chunks):
            raise ValueError(f"store {store.path} holds {store.dtype} {store.shape} chunked over "
                             f"{len(store.chunks)} axes; " + what.format(shape=shape) + ".")
        if not store.writable and not store.complete:
            raise ValueError(f"store {store.path} is read-only and incomplete; open it with "
                             "ArrayStore.open(path, mode='r+').")
        return store
    if ArrayStore.exists(store):
        existing = ArrayStore.open(store)
        if len(existing.chunks) == len(chunks):  # resume in the layout it was started with
            chunks = existing.chunks
        existing.close()
    return ArrayStore.create(store, shape, "float32", chunks, arguments)


def _open_score_store(given, shape: tuple[int, ...], arguments: dict, chunks: tuple[int, ...],
                      *what: str) -> ArrayStore:
    """:func:`_score_store` on process 0 alone (it creates or checks the store); the other
    processes open it once it is there."""
    store = run_on_main(lambda: _score_store(given, shape, arguments, chunks, *what),
                        f"opening the score store {getattr(given, 'path', given)}")
    if store is None:
        store = given if isinstance(given, ArrayStore) else ArrayStore.open(given)
        store.refresh()
    return store


def _pairwise_into_store(store, apply_fn, params, curvature, queries, train, *, loss, measurement,
                         granularity, query_rank, query_batch_size, train_batch_size, mesh,
                         max_gradient_bytes, max_query_bytes, steps, chunk_batches,
                         compute_dtype=None, trim_padding=False) -> ArrayStore:
    """:func:`pairwise_scores` written chunk by chunk into an :class:`ArrayStore`."""
    if int(chunk_batches) != chunk_batches or chunk_batches < 1:
        raise ValueError(f"store_chunk_batches must be a positive integer, got {chunk_batches!r}.")
    num_q, num_t = num_examples(queries), num_examples(train)
    block, super_block = _query_plan(curvature, num_q, query_batch_size, max_query_bytes,
                                     query_rank)
    shape = (num_q, num_t, *_score_shape(granularity, curvature, train))
    arguments = score_arguments(params, curvature, queries, train, loss=loss,
                                measurement=measurement, granularity=granularity,
                                query_rank=query_rank, compute_dtype=compute_dtype)
    layout = (super_block, min(int(chunk_batches) * train_batch_size, num_t))
    store = _open_score_store(store, shape, arguments, layout)
    missing = store.missing_chunks()
    if not missing:
        return store
    lengths = real_lengths(train, "train") if trim_padding else None
    if trim_padding:
        real_lengths(queries, "queries")
    if steps is None:
        steps = _pairwise_steps(apply_fn, params, curvature, queries, train, loss, measurement,
                                mesh, max_gradient_bytes, granularity, query_rank, compute_dtype,
                                _trimmed_fraction(lengths, train_batch_size,
                                                  int(np.shape(train.inputs)[-1])))
    super_block = store.chunks[0]
    block = min(block, super_block)
    params, factors = put_replicated((params, curvature.factors), mesh)
    sharding = data_sharding(mesh)
    precond, precond_row, pending = None, None, None
    bar = progress_bar(sum(-(-(c.stop - c.start) // train_batch_size)
                           for _, c in map(store.chunk_region, missing)), desc="pairwise scores")
    for chunk in missing:
        rows, cols = store.chunk_region(chunk)
        if precond_row != chunk[0]:  # missing chunks come row by row: one super-block at a time
            precond = _preconditioned_queries(steps.query, params, factors, queries, rows.start,
                                              rows.stop, block, super_block, mesh, trim_padding)
            precond_row = chunk[0]
        values, first_bad = [], None  # the chunk's rows, read one batch at a time
        order, batches = trimmed_batches(train, train_batch_size, trim_padding, "train",
                                         rows=np.arange(cols.start, cols.stop), lengths=lengths)
        for number, batch in enumerate(batches):
            batch_scores, bad = steps.pairwise(params, factors, precond,
                                               put_global(batch, sharding))
            values.append(_pad_positions(batch_scores, granularity, shape[2:]))
            first_bad = track_first_bad(start_first_bad(bad) if first_bad is None else first_bad,
                                        bad, number)
            bar.update(1)
        # Write the previous chunk only now, so the device works on this one meanwhile.
        if pending is not None:
            _write_score_chunk(store, *pending, train_batch_size)
        pending = (chunk, rows, cols, values, first_bad, order)
    _write_score_chunk(store, *pending, train_batch_size)
    bar.close()
    if is_distributed():
        barrier(f"score store {store.path} written")
        if not is_main_process():
            store.refresh()  # the chunks that process 0 recorded
    return store


def _write_score_chunk(store: ArrayStore, chunk, rows: slice, cols: slice, values, first_bad,
                       order, train_batch_size: int) -> None:
    first = int(first_bad_batch(first_bad))
    if first >= 0:
        lo = cols.start + first * train_batch_size
        held = f"{lo}..{min(lo + train_batch_size, cols.stop) - 1}" if order is None else str(
            sorted(cols.start + int(i) for i in
                   order[first * train_batch_size:(first + 1) * train_batch_size]))
        raise FloatingPointError(
            f"non-finite training outputs in the batch holding examples {held}; check the data "
            "(NaN/inf inputs, out-of-range targets) and the parameters.")
    scores = to_host(jnp.concatenate(values, axis=1))  # gathered on every process
    scores = scores[: rows.stop - rows.start, : cols.stop - cols.start]
    if order is not None:  # the chunk's columns came sorted by length
        scores = scores[:, np.argsort(order)]
    if is_main_process():
        store.write_chunk(chunk, scores)


def _pairwise_steps(apply_fn, params, curvature, queries, train, loss, measurement, mesh,
                    max_gradient_bytes, granularity, query_rank, compute_dtype=None,
                    trimmed: float = 1.0) -> ScoreSteps:
    """The score steps :func:`pairwise_scores` builds when not given ``steps`` (``trimmed``: the
    fraction of positions left by ``trim_padding``, for the choice of back-rotated layers)."""
    positions = {k: max(1, round(v * trimmed))
                 for k, v in layer_positions(apply_fn, params, train).items()}
    expand = () if query_rank is None else expanded_low_rank_layers(
        curvature.specs, positions, int(query_rank), num_examples(queries), granularity)
    return build_score_steps(apply_fn, curvature.strategy, curvature.specs, loss=loss,
                             measurement=measurement, mesh=mesh,
                             max_gradient_bytes=max_gradient_bytes, granularity=granularity,
                             query_rank=query_rank, expand_low_rank=expand,
                             layer_coordinates=back_rotated_layers(
                                 curvature.specs, positions,
                                 num_examples(queries), num_examples(train)),
                             compute_dtype=compute_dtype)


def pairwise_score_steps(apply_fn: ApplyFn, params: Params, curvature: Curvature,
                         queries: Dataset, train: Dataset, *, loss: Loss,
                         measurement: MeasurementFn, granularity: str = "sequence",
                         query_rank: int | None = None, train_batch_size: int = 256,
                         trim_padding: bool = False, mesh: jax.sharding.Mesh | None = None,
                         max_gradient_bytes: int = 2**28, compute_dtype: Any = None) -> ScoreSteps:
    """The steps :func:`pairwise_scores` builds for these arguments (back-rotated and expanded
    layers chosen for these data); hold them and pass ``steps=`` to score again without tracing."""
    loss = check_loss(loss)
    mesh = default_mesh() if mesh is None else mesh
    lengths = real_lengths(train, "train") if trim_padding else None
    return _pairwise_steps(apply_fn, params, curvature, queries, train, loss, measurement, mesh,
                           max_gradient_bytes, granularity, query_rank,
                           check_compute_dtype(compute_dtype),
                           _trimmed_fraction(lengths, round_batch_size(train_batch_size, mesh),
                                             int(np.shape(train.inputs)[-1])))


def _preconditioned_queries(step, params, factors, queries, q0, q1, block, super_block,
                            mesh=None, trim_padding=False):
    """Preconditioned query gradients of queries ``q0..q1`` padded to ``super_block`` rows,
    replicated on ``mesh`` (computed on every device of it; queries are few). With
    ``trim_padding`` the queries are batched by length with trailing padding cut
    (:func:`tda_jax.curvature.fit.trimmed_batches`) and put back in order."""
    part = subset(queries, np.arange(q0, q1))
    chunks, first_bad = [], jnp.int32(-1)
    order, batches = trimmed_batches(part, block, trim_padding, "queries")
    for number, batch in enumerate(batches):
        # Across processes the (small) query batch is put on every device of the global mesh.
        batch = put_replicated(batch, mesh) if mesh is not None and is_distributed() \
            else jax.device_put(batch)
        with lapack_threads(0):  # query_rank's small eigh: one LAPACK thread (see there)
            grads, bad = jax.block_until_ready(step(params, factors, batch))
        chunks.append(grads)
        first_bad = track_first_bad(first_bad, bad, number)
    if int(first_bad) >= 0:
        lo = q0 + int(first_bad) * block
        held = f"{lo}..{min(lo + block, q1) - 1}" if order is None else str(sorted(
            q0 + int(i) for i in order[int(first_bad) * block:(int(first_bad) + 1) * block]))
        raise FloatingPointError(
            f"non-finite model outputs or measurement on the query batch holding examples "
            f"{held}; check the query data and targets.")
    pad = super_block - (q1 - q0)
    back = None if order is None else jnp.asarray(np.argsort(order))

    def stack(*parts):
        value = jnp.concatenate(parts)[: q1 - q0]
        value = value if back is None else value[back]
        return value if pad <= 0 else jnp.pad(value, ((0, pad),) + ((0, 0),) * (value.ndim - 1))

    stacked = jax.tree.map(stack, *chunks)
    return stacked if mesh is None else put_replicated(stacked, mesh)


def self_scores(apply_fn: ApplyFn, params: Params, curvature: Curvature, train: Dataset, *,
                loss: Loss, granularity: str = "sequence", batch_size: int = 256,
                mesh: jax.sharding.Mesh | None = None,
                steps: ScoreSteps | None = None,
                store: str | os.PathLike | ArrayStore | None = None,
                store_chunk_batches: int = 16,
                compute_dtype: Any = None, trim_padding: bool = False) -> np.ndarray | ArrayStore:
    """Self-influence ``grad loss_i^T (F + damping)^{-1} grad loss_i`` of each training example.

    With ``granularity="token"`` (``"module"``) it is split into the contribution of each input
    token (layer): ``<a_t g_t^T, (F + damping)^-1 DW_i>`` summed over the layer's positions at that
    token; the parts sum to the sequence value. ``compute_dtype`` and ``trim_padding`` (in-memory
    results only, not with ``store=``) are as in :func:`pairwise_scores`.

    ``train`` may be memory-mapped or a random-access record source (read one batch at a time).
    With ``store=`` (a directory or a writable :class:`tda_jax.io.ArrayStore`) the values go to
    disk in chunks of ``store_chunk_batches * batch_size`` training examples, each written and
    recorded once complete, as for :func:`pairwise_scores`: a killed run loses at most the chunk in
    flight, a rerun computes only the missing chunks, and a store holding finished chunks made
    from other arguments (:func:`self_score_arguments`) is refused.

    Returns:
      ``[num_train]`` float32, non-negative (``[num_train, T]`` / ``[num_train, L]`` by
      granularity; the parts may be negative); with ``store``, the complete :class:`ArrayStore`.
    """
    loss = check_loss(loss)
    check_granularity(granularity)
    compute_dtype = check_compute_dtype(compute_dtype)
    train = as_dataset(train, "train")
    _check_inputs(apply_fn, params, curvature, train, "train", loss.target_kind)
    mesh = default_mesh() if mesh is None else mesh
    batch_size = round_batch_size(batch_size, mesh)
    num_t = num_examples(train)
    if steps is None and compute_dtype is not None:
        steps = build_score_steps(apply_fn, curvature.strategy, curvature.specs, loss=loss, mesh=mesh,
                                  granularity=granularity, compute_dtype=compute_dtype)
    if store is not None and trim_padding:
        raise ValueError("self_scores: trim_padding=True is not supported with store=; pass one.")
    if store is not None:
        return _self_into_store(store, apply_fn, params, curvature, train, loss=loss,
                                granularity=granularity, batch_size=batch_size, mesh=mesh,
                                steps=steps, chunk_batches=store_chunk_batches,
                                compute_dtype=compute_dtype)
    if steps is None:
        steps = build_score_steps(apply_fn, curvature.strategy, curvature.specs, loss=loss, mesh=mesh,
                                  granularity=granularity)
    params, factors = put_replicated((params, curvature.factors), mesh)
    sharding = data_sharding(mesh)
    values, first_bad = [], None
    shape = _score_shape(granularity, curvature, train)
    order, batches = trimmed_batches(train, batch_size, trim_padding, "train")
    for number, batch in enumerate(progress(batches, desc="self scores",
                                            total=-(-num_t // batch_size))):
        batch_values, bad = steps.self(params, factors, put_global(batch, sharding))
        values.append(_pad_positions(batch_values, granularity, shape))
        first_bad = track_first_bad(start_first_bad(bad) if first_bad is None else first_bad,
                                    bad, number)
    raise_if_nonfinite(first_bad, batch_size, num_t, "training outputs", order)
    out = to_host(jnp.concatenate(values))[:num_t]
    if order is not None:  # batches came sorted by length: back to dataset order
        out = out[np.argsort(order)]
    if not np.all(np.isfinite(out)):
        raise FloatingPointError("non-finite self-influence scores; check data and parameters.")
    return out


def query_gradients(apply_fn: ApplyFn, params: Params, queries: Dataset,
                    measurement: MeasurementFn, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-query measurement gradients in matrix view: ``{layer: [num_queries, in, out]}``."""
    queries = as_dataset(queries, "queries")
    specs = inspect_model(apply_fn, params, queries, "query", allow_untracked=True).specs
    identity = get_block("identity")
    step = build_score_steps(apply_fn, "identity", specs, loss=None, measurement=measurement).query
    factors = identity.initial_factors(specs)
    num_q = num_examples(queries)
    grads = _preconditioned_queries(step, params, factors, queries, 0, num_q, batch_size, num_q)
    return {n: np.asarray(v) for n, v in grads.items()}


def self_score_arguments(params: Params, curvature: Curvature, train: Dataset, *, loss: Loss,
                         granularity: str = "sequence", compute_dtype: Any = None) -> dict[str, Any]:
    """What a stored self-influence vector is tied to (as :func:`score_arguments` for pairwise
    scores): the curvature's settings and factors, the parameters, the training data, the loss and
    the granularity (and ``compute_dtype`` when set); batch sizes and meshes are left out."""
    arguments = {
        "scores": "self",
        "curvature": curvature.settings,
        "curvature_fingerprint": fingerprint(curvature.factors),
        "params_fingerprint": fingerprint(params),
        "train_fingerprint": _data_fingerprint(train),
        "loss": loss.name,
        "granularity": granularity,
    }
    compute_dtype = check_compute_dtype(compute_dtype)
    if compute_dtype is not None:
        arguments["compute_dtype"] = compute_dtype
    return arguments


def _self_into_store(store, apply_fn, params, curvature, train, *, loss, granularity, batch_size,
                     mesh, steps, chunk_batches, compute_dtype=None) -> ArrayStore:
    """:func:`self_scores` written chunk by chunk (rows of training examples) into an
    :class:`ArrayStore`; process 0 alone writes, as in :func:`pairwise_scores`."""
    if int(chunk_batches) != chunk_batches or chunk_batches < 1:
        raise ValueError(f"store_chunk_batches must be a positive integer, got {chunk_batches!r}.")
    num_t = num_examples(train)
    shape = (num_t, *_score_shape(granularity, curvature, train))
    arguments = self_score_arguments(params, curvature, train, loss=loss, granularity=granularity,
                                     compute_dtype=compute_dtype)
    layout = (min(int(chunk_batches) * batch_size, num_t),)
    store = _open_score_store(store, shape, arguments, layout,
                              "self-influence scores need float32 {shape} chunked over training "
                              "examples")
    missing = store.missing_chunks()
    if not missing:
        return store
    if steps is None:
        steps = build_score_steps(apply_fn, curvature.strategy, curvature.specs, loss=loss, mesh=mesh,
                                  granularity=granularity, compute_dtype=compute_dtype)
    params, factors = put_replicated((params, curvature.factors), mesh)
    sharding = data_sharding(mesh)
    regions = [store.chunk_region(chunk)[0] for chunk in missing]
    bar = progress_bar(sum(-(-(r.stop - r.start) // batch_size) for r in regions),
                       desc="self scores")
    pending = None
    for chunk, rows in zip(missing, regions):
        values, first_bad = [], None
        for number, batch in enumerate(batches_in_order(train, np.arange(rows.start, rows.stop),
                                                        batch_size)):
            batch_values, bad = steps.self(params, factors, put_global(batch, sharding))
            values.append(batch_values)
            first_bad = track_first_bad(start_first_bad(bad) if first_bad is None else first_bad,
                                        bad, number)
            bar.update(1)
        if pending is not None:  # written only now, so the device works on this chunk meanwhile
            _write_self_chunk(store, *pending, batch_size)
        pending = (chunk, rows, values, first_bad)
    _write_self_chunk(store, *pending, batch_size)
    bar.close()
    if is_distributed():
        barrier(f"score store {store.path} written")
        if not is_main_process():
            store.refresh()
    return store


def _write_self_chunk(store: ArrayStore, chunk, rows: slice, values, first_bad,
                      batch_size: int) -> None:
    first = int(first_bad_batch(first_bad))
    if first >= 0:
        lo = rows.start + first * batch_size
        raise FloatingPointError(
            f"non-finite training outputs in the batch holding examples {lo}.."
            f"{min(lo + batch_size, rows.stop) - 1}; check the data (NaN/inf inputs, out-of-range "
            "targets) and the parameters.")
    out = to_host(jnp.concatenate(values))[: rows.stop - rows.start]  # gathered on every process
    if not np.all(np.isfinite(out)):
        raise FloatingPointError(f"non-finite self-influence scores for examples {rows.start}.."
                                 f"{rows.stop - 1}; check data and parameters.")
    if is_main_process():
        store.write_chunk(chunk, out)
