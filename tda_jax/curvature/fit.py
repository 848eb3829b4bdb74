"""Fitting curvature estimates: sharded passes over the training data, then host-side factorisation.

:func:`fit_curvature` looks the strategy up as a curvature block (:mod:`tda_jax.curvature.blocks`)
and runs the passes the block declares. Each pass is one compiled step (built by
:func:`build_fit_steps`, which a caller may hold and reuse) that shards a batch over the ``"data"``
axis of a mesh and sums the block's statistics on each device; every device adds the batches up
in its own partial totals (non-finite values are counted there too), and the partials are summed
over devices once per pass, so the loop neither communicates nor waits for the host until the
pass ends. Factors therefore do not depend on the batch size or the device count beyond float
reassociation. The block then finalises the totals on the host (eigendecompositions / Cholesky in
``eigh_dtype``) into a factor pytree (:func:`finalize_pass`): across processes, a layerwise block's
layers are shared out by cost and each process finalises only its own, then every process receives
all factors bit for bit. ``compute_dtype`` (e.g. bfloat16) sets the precision of the forward and
backward passes only: statistics are accumulated in float32.

With ``stage_dir`` the statistics of each pass are saved as they finish (with the arguments that
produced them); a rerun reuses finished passes and refuses different arguments.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tda_jax.capture.layers import (
    SUPPORTED_LAYERS,
    ApplyFn,
    LayerSpec,
    check_coverage,
    output_shapes,
)
from tda_jax.capture.statistics import check_compute_dtype, layer_statistics
from tda_jax.compile import CompiledStep
from tda_jax.curvature.blocks import CurvatureBlock, LayerwiseBlock, check_damping, get_block
from tda_jax.curvature.estimate import Curvature
from tda_jax.curvature.fisher import check_fisher_type, fisher_cotangents
from tda_jax.data import (
    Dataset,
    as_dataset,
    batch_iterator,
    batches_in_order,
    iter_row_blocks,
    num_examples,
    take_rows,
)
from tda_jax.io import Stage, fingerprint
from tda_jax.losses import Loss, check_loss, check_targets
from tda_jax.progress import progress
from tda_jax.sharding import (
    DATA_AXIS,
    assign_by_cost,
    broadcast_from_main,
    data_sharding,
    default_mesh,
    exchange_arrays,
    is_distributed,
    put_global,
    put_replicated,
    to_host,
)

Array = jax.Array
Params = Any


class ModelInfo(NamedTuple):
    """What :func:`inspect_model` found: the selected layers and the output shape."""

    specs: tuple[LayerSpec, ...]
    num_outputs: int
    positions: int | None  # T of sequence outputs [B, T, V]; None for [B, C]
    untracked: tuple[str, ...]


def select_layers(specs: dict[str, LayerSpec], layers: str | Sequence[str] | None
                  ) -> dict[str, LayerSpec]:
    """The tracked layers chosen by ``layers``: a regular expression searched in each layer's name
    (e.g. ``"mlp"`` for the MLP layers only, as Grosse et al. 2023 did), a list of exact names, or
    None for all."""
    if layers is None:
        return specs
    if isinstance(layers, str):
        pattern = re.compile(layers)
        chosen = {n: s for n, s in specs.items() if pattern.search(n)}
    else:
        missing = sorted(set(layers) - set(specs))
        if missing:
            raise ValueError(f"layers={missing} are not tracked layers of the model; tracked: "
                             f"{sorted(specs)}.")
        chosen = {n: s for n, s in specs.items() if n in set(layers)}
    if not chosen:
        raise ValueError(f"layers={layers!r} selects none of the model's tracked layers "
                         f"{sorted(specs)}.")
    return chosen


def _check_token_ids(dataset: Dataset, specs: dict[str, LayerSpec], role: str) -> None:
    """Integer inputs of a model with an embedding must be ids in ``[0, vocabulary)`` (an
    out-of-range id would be clamped by the lookup and give silently wrong numbers)."""
    embeds = [s for s in specs.values() if s.kind == "embed"]
    if not embeds or not np.issubdtype(np.dtype(dataset.inputs.dtype), np.integer):
        return
    vocab = embeds[0].in_dim  # the first embedding the model calls: its token embedding
    bad, ids = [], None
    for start, block in iter_row_blocks(dataset.inputs):  # memory maps / sources: block by block
        flat = block.reshape(len(block), -1)
        if dataset.input_mask is not None:
            mask = take_rows(dataset.input_mask, np.arange(start, start + len(block)))
            flat = np.where(mask.reshape(len(block), -1) > 0, flat, 0)
        rows = np.flatnonzero(np.any((flat < 0) | (flat >= vocab), axis=1))
        if rows.size and ids is None:
            ids = flat[rows[0]][(flat[rows[0]] < 0) | (flat[rows[0]] >= vocab)]
        bad.append(start + rows)
    bad = np.concatenate(bad or [np.zeros(0, np.int64)])
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{role}.inputs rows {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} hold "
                         f"token ids outside [0, {vocab}) (the vocabulary of layer "
                         f"{embeds[0].name!r}); e.g. row {row} has {ids[:5].tolist()}.")


def inspect_model(apply_fn: ApplyFn, params: Params, dataset: Dataset, role: str = "train",
                  allow_untracked: bool = True, layers: str | Sequence[str] | None = None
                  ) -> ModelInfo:
    """Tracked layers and output shape of the model, checked on one example of ``dataset``.

    Outputs are ``[B, C]`` (a classifier or regressor) or ``[B, T, V]`` (a sequence model). Parameters
    outside Kronecker-structured layers (LayerNorm scales, positional tables, ...) are left out of
    attribution and listed in ``untracked`` (an error with ``allow_untracked=False``).

    Raises:
      ValueError: empty data, untracked parameters when not allowed, outputs of another rank, token
        ids outside the embedding's vocabulary, a ``dataset.num_classes`` that disagrees with the
        model's outputs, or a ``layers`` selection that matches nothing.
    """
    if num_examples(dataset) == 0:
        raise ValueError(f"the {role} dataset is empty (0 examples); attribution needs at least one.")
    sample = jnp.asarray(np.asarray(dataset.inputs[:1]))
    specs, _, out = output_shapes(apply_fn, params, sample)
    if not specs:
        raise ValueError(f"the model has no tracked layers; supported: {SUPPORTED_LAYERS}.")
    _check_token_ids(dataset, specs, role)
    chosen = select_layers(specs, layers)
    untracked = tuple(check_coverage(params, chosen, allow_untracked))
    ndim = getattr(out, "ndim", 2)
    if ndim not in (2, 3):
        raise ValueError(f"apply_fn must return outputs of shape [batch, outputs] or, for sequence "
                         f"models, [batch, positions, vocabulary]; got {out.shape}.")
    num_outputs = int(out.shape[-1])
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is not None and int(num_classes) != num_outputs:
        raise ValueError(f"the {role} dataset has num_classes={num_classes} but the model returns "
                         f"{num_outputs} outputs; use the model trained on this data.")
    positions = int(out.shape[1]) if ndim == 3 else None
    return ModelInfo(tuple(chosen[name] for name in sorted(chosen)), num_outputs, positions,
                     untracked)


def discover_layers(apply_fn: ApplyFn, params: Params, dataset: Dataset,
                    allow_untracked: bool = True, layers: str | Sequence[str] | None = None
                    ) -> tuple[LayerSpec, ...]:
    """Tracked layers of the model (checked against the parameters and one example batch)."""
    return inspect_model(apply_fn, params, dataset, allow_untracked=allow_untracked,
                         layers=layers).specs


def check_compatible(curvature: Curvature, specs: tuple[LayerSpec, ...], role: str) -> None:
    """Refuses a curvature fitted on another model, naming the first difference.

    ``specs`` are all tracked layers of the model; the curvature may use a subset of them.
    """
    fitted = {s.name: s for s in curvature.specs}
    model = {s.name: s for s in specs}
    if not set(fitted) <= set(model):
        raise ValueError(f"the curvature was fitted on a model with layers {sorted(fitted)} but the "
                         f"{role} model has layers {sorted(model)}; fit the curvature on this model.")
    for name, old in fitted.items():
        spec = model[name]
        if (old.in_dim, old.out_dim, old.kind) != (spec.in_dim, spec.out_dim, spec.kind):
            raise ValueError(
                f"layer {name!r}: the curvature was fitted on a {old.kind} layer with matrix view "
                f"[{old.in_dim}, {old.out_dim}] but the {role} model's is {spec.kind} "
                f"[{spec.in_dim}, {spec.out_dim}]; fit the curvature on this model.")


def round_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh's device count."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    devices = mesh.devices.size
    return -(-batch_size // devices) * devices


def sharded_sum_step(step_fn: Callable[[Params, Any, dict], dict], mesh: jax.sharding.Mesh,
                     name: str = "pass") -> CompiledStep:
    """Compiles ``step_fn`` over a batch sharded on ``"data"``, returning per-device partial sums.

    ``step_fn(params, extra, local_batch)`` returns a dict of per-device partial sums (plus a
    ``"nonfinite"`` count); ``params`` and ``extra`` are replicated. The compiled step returns each
    statistic with a leading device axis (``[num_devices, ...]``, sharded over ``"data"``): a pass
    adds batches up on each device without communicating and reduces over devices once, at its
    end (:func:`reduce_partials`). Per-batch collectives would make every step wait for the slowest
    device (or process) and pay the collective's latency.
    """

    def body(p, e, batch):
        return jax.tree.map(lambda x: x[None], step_fn(p, e, batch))

    # check_vma=False: the zero perturbations inside capture are device-local; with varying-axis
    # checking their cotangents would be summed over devices.
    return CompiledStep(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                                      out_specs=P(DATA_AXIS), check_vma=False), name=name)


@jax.jit
def reduce_partials(partials: dict) -> dict:
    """Sums per-device partial totals ``[num_devices, ...]`` over devices (one reduction each)."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), partials)


def nonfinite_count(*arrays: Array) -> Array:
    return sum(jnp.sum(~jnp.isfinite(x)) for x in arrays)


def build_fit_steps(apply_fn: ApplyFn, strategy: str | CurvatureBlock, loss: Loss,
                    specs: tuple[LayerSpec, ...], *, fisher: str = "expected", num_samples: int = 1,
                    mesh: jax.sharding.Mesh | None = None,
                    compute_dtype: Any = None) -> dict[str, CompiledStep]:
    """The compiled step of every pass of a block: ``{pass_name: step(params, extra, batch)}``.

    Hold the result and pass it as ``fit_curvature(..., steps=...)`` to fit many times (other
    parameters, other data of the same shapes) without tracing again. Steps compiled from equal
    programs share executables (:mod:`tda_jax.compile`), so even a fresh ``apply_fn`` lambda does
    not compile twice. ``compute_dtype`` is as in :func:`fit_curvature`.
    """
    block = get_block(strategy)
    compute_dtype = check_compute_dtype(compute_dtype)
    mesh = default_mesh() if mesh is None else mesh

    def make(pass_name):
        def step(params, extra, batch):
            cot = fisher_cotangents(loss, fisher, batch["targets"], batch["mask"], key=extra.get("key"),
                                    index=batch["index"], num_samples=num_samples)
            outputs, a, g, masks, _, _ = layer_statistics(apply_fn, params, batch["inputs"], cot,
                                                          batch.get("input_mask"), compute_dtype)
            masks = {n: m * batch["mask"][:, None] for n, m in masks.items()}
            stats = block.statistics(pass_name, specs, a, g, masks, extra["inputs"])
            stats["examples"] = jnp.sum(batch["mask"])
            stats["nonfinite"] = nonfinite_count(outputs, *g.values())
            return stats

        tag = "" if compute_dtype is None else f":{compute_dtype}"
        return sharded_sum_step(step, mesh, name=f"{block.name}:{pass_name}{tag}")

    return {pass_name: make(pass_name) for pass_name in block.passes}


@jax.jit
def track_first_bad(first_bad: Array, nonfinite: Array, batch_number: Array) -> Array:
    """The number of the first batch with a non-finite value so far, -1 if none (on the device)."""
    return jnp.where((first_bad < 0) & (nonfinite > 0), batch_number, first_bad)


@jax.jit
def first_bad_batch(first_bad: Array) -> Array:
    """The earliest batch number in per-device records of :func:`track_first_bad`, -1 if none."""
    flat = jnp.ravel(first_bad)
    never = jnp.iinfo(jnp.int32).max
    earliest = jnp.min(jnp.where(flat >= 0, flat, never))
    return jnp.where(earliest == never, -1, earliest)


def start_first_bad(nonfinite: Array) -> Array:
    """A record of "no bad batch yet" (-1) shaped and sharded like a step's non-finite counts."""
    return jnp.full_like(nonfinite, -1, dtype=jnp.int32)


@jax.jit
def _accumulate(total, stats, first_bad, batch_number):
    """Adds a batch's totals and tracks the first batch with non-finite values (all on device)."""
    first_bad = track_first_bad(first_bad, stats.pop("nonfinite"), batch_number)
    return jax.tree.map(jnp.add, total, stats), first_bad


def raise_if_nonfinite(first_bad: Array, batch_size: int, num: int, what: str,
                       order: np.ndarray | None = None) -> None:
    """One host sync per pass: raises naming the examples of the first batch with a non-finite value.

    ``first_bad`` is a scalar or per-device record of :func:`track_first_bad`; ``order`` the
    example order the batches were drawn in (None: dataset order).
    """
    first = int(first_bad_batch(first_bad))
    if first >= 0:
        lo, hi = first * batch_size, min((first + 1) * batch_size, num) - 1
        held = f"{lo}..{hi}" if order is None else \
            str(sorted(int(i) for i in np.asarray(order)[lo:hi + 1]))
        raise FloatingPointError(
            f"non-finite {what} in the batch holding examples {held}; check the data "
            "(NaN/inf inputs, out-of-range targets) and the parameters.")


#: With ``trim_padding=True`` each batch is cut to its longest sequence rounded up to a multiple of
#: this many positions (few distinct shapes, so few compilations).
TRIM_MULTIPLE = 8


def real_lengths(dataset: Dataset, role: str) -> np.ndarray:
    """``[N]`` real length of each sequence (one past its last real position) for
    ``trim_padding=True``; checks that trailing padding carries no loss or measurement.

    Raises:
      ValueError: no ``input_mask``, or integer token targets ``>= 0`` (a loss or measurement
        target) after a sequence's last real input position (named by row).
    """
    if dataset.input_mask is None or np.ndim(dataset.inputs) < 2:
        raise ValueError(f"trim_padding=True needs sequence inputs [N, T] with {role}.input_mask "
                         "(1 = real token) to find each sequence's trailing padding.")
    lengths, bad = [], []
    targets = dataset.targets
    aligned = np.ndim(targets) == 2 and np.shape(targets)[:2] == np.shape(dataset.input_mask) \
        and np.issubdtype(np.dtype(targets.dtype), np.integer)
    for start, block in iter_row_blocks(dataset.input_mask):
        real = np.asarray(block) > 0
        length = np.where(real.any(axis=1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)
        lengths.append(length)
        if aligned:
            rows = np.arange(start, start + len(block))
            after = np.arange(real.shape[1])[None, :] >= length[:, None]
            bad.append(rows[np.any(after & (take_rows(targets, rows) >= 0), axis=1)])
    bad = np.concatenate(bad) if bad else np.zeros(0, np.int64)
    if bad.size:
        raise ValueError(f"trim_padding=True: {role}.targets rows {bad[:5].tolist()}"
                         f"{' ...' if bad.size > 5 else ''} have targets >= 0 after the last real "
                         f"input position ({role}.input_mask); trailing padding must carry no loss "
                         "or measurement (targets -1) to be trimmed.")
    return np.concatenate(lengths).astype(np.int64)


def trimmed_batches(dataset: Dataset, batch_size: int, trim_padding: bool, role: str = "train",
                    rows: np.ndarray | None = None, lengths: np.ndarray | None = None
                    ) -> tuple[np.ndarray | None, Any]:
    """``(order, batches)`` over the examples ``rows`` (default all): the batches of
    :func:`tda_jax.data.batches_in_order`, or with ``trim_padding`` batches of those examples sorted
    by real length (``lengths``, default :func:`real_lengths`), each cut to its longest sequence
    rounded up to :data:`TRIM_MULTIPLE` positions.

    Trimming is exact only for models in which trailing padding does not change the outputs at real
    positions (causal or padding-masked models) and whose losses ignore padding: then every real
    position's activations and gradients are unchanged, padded positions had ``g = 0`` and masked
    statistics, and nothing else differs. ``order`` gives, for each batch row in turn, its position
    in ``rows`` (None: ``rows`` order): results are scattered back with it.
    """
    if not trim_padding:
        if rows is None:
            return None, batch_iterator(dataset, batch_size)
        return None, batches_in_order(dataset, rows, batch_size)
    if lengths is None:
        lengths = real_lengths(dataset, role)
    rows = np.arange(len(lengths)) if rows is None else np.asarray(rows)
    order = np.argsort(lengths[rows], kind="stable").astype(np.int32)
    full = int(np.shape(dataset.inputs)[1])
    aligned = np.ndim(dataset.targets) >= 2 and np.shape(dataset.targets)[1] == full

    def batches():
        for start, batch in zip(range(0, len(order), batch_size),
                                batches_in_order(dataset, rows[order], batch_size), strict=True):
            longest = int(lengths[rows[order[start:start + batch_size]]].max())
            keep = min(full, max(TRIM_MULTIPLE, -(-longest // TRIM_MULTIPLE) * TRIM_MULTIPLE))
            batch = dict(batch, inputs=batch["inputs"][:, :keep],
                         input_mask=batch["input_mask"][:, :keep])
            if aligned:
                batch["targets"] = batch["targets"][:, :keep]
            yield batch

    return order, batches()


def run_pass(step: CompiledStep, params: Params, extra: Any, dataset: Dataset, batch_size: int,
             mesh: jax.sharding.Mesh, desc: str, trim_padding: bool = False) -> dict:
    """Sums a :func:`sharded_sum_step` over the dataset (fixed-size padded batches, no recompiles;
    with ``trim_padding``, batches of similar lengths cut to their longest sequence, one
    compilation per distinct length, see :func:`trimmed_batches`).

    Each device adds its share of every batch to its own partial totals; they are summed over
    devices once, at the end. Across processes each one feeds its devices' rows of every global
    batch, and the totals are the same on every process.

    Returns:
      The totals as host numpy arrays (``"nonfinite"`` checked once at the end of the pass).
    """
    batch_size = round_batch_size(batch_size, mesh)
    sharding = data_sharding(mesh)
    params, extra = put_replicated((params, extra), mesh)
    num = num_examples(dataset)
    total, first_bad = None, None
    order, batches = trimmed_batches(dataset, batch_size, trim_padding)
    for number, batch in enumerate(progress(batches, desc=desc, total=-(-num // batch_size))):
        stats = step(params, extra, put_global(batch, sharding))
        if total is None:
            total = jax.tree.map(jnp.zeros_like, {k: v for k, v in stats.items() if k != "nonfinite"})
            first_bad = start_first_bad(stats["nonfinite"])
        total, first_bad = _accumulate(total, stats, first_bad, jnp.int32(number))
    raise_if_nonfinite(first_bad, batch_size, num, "loss outputs or gradients", order)
    return to_host(reduce_partials(total))


def _settings(block, loss, fisher, num_samples, damping, eigh_dtype, key, params, train, specs):
    return {
        "strategy": block.name, "loss": loss.name, "fisher": fisher,
        "num_samples": num_samples if fisher == "sampled" else None, "damping": damping,
        "eigh_dtype": eigh_dtype, "num_train": num_examples(train),
        "key": None if key is None else [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()],
        "params_fingerprint": fingerprint(params),
        "data_fingerprint": fingerprint(train.inputs, train.targets,
                                        *(() if train.input_mask is None else (train.input_mask,))),
        "layers": [s.name for s in specs],
    }


def fit_curvature(apply_fn: ApplyFn, params: Params, train: Dataset, *,
                  strategy: str | CurvatureBlock = "ekfac", loss: Loss, fisher: str = "expected",
                  num_samples: int = 1, damping: float | None = None, batch_size: int = 256,
                  mesh: jax.sharding.Mesh | None = None, key: Array | None = None,
                  allow_untracked: bool = True, layers: str | Sequence[str] | None = None,
                  eigh_dtype: str = "float64", compute_dtype: Any = None,
                  trim_padding: bool = False, stage_dir: str | None = None,
                  steps: dict[str, CompiledStep] | None = None) -> Curvature:
    """Fits a curvature estimate of the training loss for influence functions.

    Args:
      apply_fn: ``(params, inputs [B, ...]) -> outputs [B, C]`` (or ``[B, T, V]`` for a sequence
        model with a sequence loss such as :func:`tda_jax.losses.causal_lm_loss`), e.g.
        ``model.apply`` with ``params = {"params": ...}``, ``lambda p, x: model.apply({"params": p},
        x)``, or :func:`tda_jax.models.apply_fn_of` (linen and NNX).
      params: the trained parameters.
      train: training examples (``tda_jax.data.Dataset``); targets are checked against ``loss``.
        Its arrays may be memory maps, or it may be a random-access record source
        (:mod:`tda_jax.data.source`): data is read one batch at a time and checked block by block.
      strategy: a registered curvature block (``"identity"``, ``"diagonal"``, ``"kfac"``,
        ``"ekfac"``, ``"exact"`` (dense, ``P x P`` memory)) or a block object.
      loss: the per-example training loss (:mod:`tda_jax.losses`), e.g. ``softmax_cross_entropy()``.
      fisher: ``"expected"`` (exact expectation over the predictive distribution, = GGN),
        ``"sampled"`` (true Fisher with ``num_samples`` sampled labels) or ``"empirical"``.
      num_samples: labels sampled per example when ``fisher="sampled"``.
      damping: absolute damping added to the curvature, or None for ``0.1 x`` the mean eigenvalue of
        each layer (of the whole matrix for ``exact``). Must be finite and ``>= 0``; refused for
        ``identity``, which has no curvature to damp.
      batch_size: examples per step (rounded up to a multiple of the device count); does not
        change the result.
      mesh: a mesh with a ``"data"`` axis to shard batches over; default one device (in a
        multi-process run, :func:`tda_jax.sharding.global_data_mesh` over every process's
        devices: each process feeds its share of every batch, and every process returns the
        same factors, process 0's).
      key: PRNG key (required for ``fisher="sampled"``).
      allow_untracked: parameters outside Kronecker-structured layers (LayerNorm, positional
        tables, layers not selected by ``layers``) are left out of attribution and listed in
        ``curvature.settings["untracked"]``; pass False to make that an error instead.
      layers: which tracked layers to use: a regular expression searched in layer names (e.g.
        ``"mlp"``) or a list of names; None for all.
      eigh_dtype: host dtype for eigendecompositions / Cholesky (``"float64"`` or ``"float32"``).
      compute_dtype: e.g. ``jnp.bfloat16``: the model's forward and backward passes (parameters,
        activations ``a`` and output gradients ``g``) run in this dtype; losses and cotangents are
        computed in float32, and ``a``, ``g`` are cast to float32 before any statistic is formed,
        so statistics are accumulated in float32 and factorised in ``eigh_dtype``. None: the
        parameters' own dtype. Must be the same for the scores (``pairwise_scores(...,
        compute_dtype=...)``) to score in the same precision; it is not taken from the curvature.
        The model must compute in the dtype of its parameters (Flax modules built with
        ``dtype=None``); layers whose inputs are not in ``compute_dtype`` are named in a warning.
      trim_padding: sequence data only (needs ``train.input_mask``): batch the examples by real
        length and cut each batch's trailing padding (to a multiple of 8 positions), so padded
        positions cost nothing. Exact (up to float reassociation) only for models whose outputs at
        real positions do not depend on trailing padding (causal or padding-masked models, e.g.
        :class:`tda_jax.models.TransformerLM`) with losses that ignore padded targets (``-1``);
        a target after a sequence's last real token is refused. Off by default: a bidirectional
        model without a padding mask would give different numbers.
      stage_dir: if given, save each pass's statistics there and reuse them on rerun (written by
        process 0 of a multi-process run; the directory must be visible to every process).
      steps: compiled steps from :func:`build_fit_steps` to reuse (built here if None).

    Returns:
      A :class:`Curvature` (a pytree).

    Raises:
      ValueError: unknown strategy/Fisher, empty data, untracked parameters, bad targets or
        damping, a singular preconditioner, or a ``stage_dir`` holding results of other arguments.
      TypeError: ``loss`` is not a Loss (e.g. the factory passed uncalled).
      FloatingPointError: non-finite outputs or gradients (names the examples).
    """
    block = get_block(strategy)
    loss = check_loss(loss)
    train = as_dataset(train, "train")
    check_fisher_type(fisher)
    compute_dtype = check_compute_dtype(compute_dtype)
    eigh_dtype = check_eigh_dtype(eigh_dtype)
    if fisher == "sampled" and key is None:
        raise ValueError("fisher='sampled' needs key=jax.random.key(...).")
    damping = check_damping(damping, block.name)
    if damping is not None and not block.accepts_damping:
        raise ValueError(f"strategy={block.name!r} has no curvature, so damping={damping} would only "
                         "rescale every score; pass damping=None.")
    info = inspect_model(apply_fn, params, train, "train", allow_untracked, layers)
    specs = info.specs
    check_targets(train.targets, info.num_outputs, loss.target_kind, "train.targets", info.positions)
    settings = _settings(block, loss, fisher, num_samples, damping, eigh_dtype, key, params, train,
                         specs)
    settings["untracked"] = list(info.untracked)
    if compute_dtype is not None:  # recorded only when set: stages of earlier runs stay valid
        settings["compute_dtype"] = compute_dtype
    if info.untracked:
        logging.getLogger(__name__).info(
            "left out of the curvature (not in a selected Kronecker-structured layer): %s",
            ", ".join(info.untracked))
    stage = Stage(stage_dir, settings) if stage_dir is not None else None
    mesh = default_mesh() if mesh is None else mesh
    if steps is None and block.passes:
        steps = build_fit_steps(apply_fn, block, loss, specs, fisher=fisher, num_samples=num_samples,
                                mesh=mesh, compute_dtype=compute_dtype)

    factors = block.initial_factors(specs)
    for pass_name in block.passes:
        if stage is not None and stage.has(pass_name):
            stats = _unflatten_stats(stage.load_arrays(pass_name))
        else:
            extra = {"inputs": block.pass_inputs(pass_name, specs, factors)}
            if key is not None:
                extra["key"] = key
            stats = run_pass(steps[pass_name], params, extra, train, batch_size, mesh,
                             desc=f"{block.name}:{pass_name}", trim_padding=trim_padding)
            if stage is not None and not stage.is_complete():
                stage.save_arrays(pass_name, _flatten_stats(stats))
        count = float(stats.pop("examples"))
        factors = finalize_pass(block, pass_name, specs, stats, count, factors, damping,
                                eigh_dtype)
    if stage is not None and not stage.is_complete():
        stage.mark_complete()
    return Curvature(block.name, specs, factors, settings)


def check_eigh_dtype(eigh_dtype: Any) -> str:
    """``"float64"`` or ``"float32"`` (host LAPACK precisions); raises naming the argument."""
    try:
        name = np.dtype(eigh_dtype).name
    except (TypeError, ValueError):
        name = None
    if name not in ("float64", "float32"):
        raise ValueError(f"eigh_dtype must be 'float64' or 'float32' (the host precision of "
                         f"eigendecompositions / Cholesky), got {eigh_dtype!r}.")
    return name


def finalize_pass(block: CurvatureBlock, pass_name: str, specs: tuple[LayerSpec, ...], stats: dict,
                  count: float, factors: Any, damping: float | None, eigh_dtype: str) -> Any:
    """The block's factors after ``pass_name`` from the pass's totals (every process holds them).

    On one process this is ``block.finalize``. Across processes a layerwise block's layers are
    shared out by cost (:meth:`LayerwiseBlock.layer_finalize_cost`, ``in^3 + out^3`` for the
    eigendecompositions of K-FAC / EK-FAC) with :func:`tda_jax.sharding.assign_by_cost`: each
    process finalises only its own layers, then every process receives every layer's new factor
    arrays from its owner (:func:`tda_jax.sharding.exchange_arrays`, bytes, so all processes hold the
    same bits). A failure (e.g. a singular preconditioner) is raised on every process: that of the
    first failing layer, as on one process.
    Blocks that are not layerwise (``exact``: one Cholesky couples all layers), or that override
    ``finalize``, are finalised by every process and process 0's result is taken everywhere.
    """
    if not is_distributed():
        return block.finalize(pass_name, specs, stats, count, factors, damping, eigh_dtype)
    if not isinstance(block, LayerwiseBlock) or type(block).finalize is not LayerwiseBlock.finalize:
        # Every process factorised the same totals; process 0's result is taken everywhere so that
        # later passes and scores agree bit for bit whatever each host's LAPACK does.
        new = block.finalize(pass_name, specs, stats, count, factors, damping, eigh_dtype)
        return jax.tree.map(lambda value, old: jnp.asarray(value) if isinstance(old, jax.Array)
                            else value, broadcast_from_main(new), new)
    owners = assign_by_cost([block.layer_finalize_cost(pass_name, s) for s in specs],
                            jax.process_count())
    factors = {name: dict(layer) for name, layer in (factors or {}).items()}
    local, error, failed_at = {}, None, 0
    for index, (spec, owner) in enumerate(zip(specs, owners)):
        if owner != jax.process_index():
            continue
        old = factors.get(spec.name, {})
        try:
            new = block.finalize_layer(pass_name, spec, stats[spec.name], count, dict(old),
                                       damping, eigh_dtype)
        except Exception as err:  # raised on every process by exchange_arrays
            error, failed_at = err, index
            break
        # Only what this pass changed travels (EK-FAC's lambda pass keeps the eigenbases).
        local.update({f"{spec.name}::{key}": value for key, value in new.items()
                      if key not in old or old[key] is not value})
    # The first failing layer in ``specs`` order is raised everywhere, as on one process.
    for key, value in exchange_arrays(local, error, failed_at).items():
        name, leaf = key.split("::", 1)
        factors.setdefault(name, {})[leaf] = value
    return factors


def _flatten_stats(stats: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            flat.update(_flatten_stats(value, f"{prefix}{key}::"))
        else:
            flat[f"{prefix}{key}"] = np.asarray(value)
    return flat


def _unflatten_stats(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("::")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
