"""Device meshes for data-parallel accumulation, on one process or several (``jax.distributed``).

Every pass over a dataset shards its batch over a ``"data"`` mesh axis, accumulates statistics on
each device and reduces them over devices once, at the end of the pass. A single-device run is a
mesh of one device, so results do not depend on the device count beyond floating-point
reassociation.

Several processes (multi-controller JAX). After :func:`initialize_distributed` (or
:func:`initialize_from_env`, which the launchers in ``launch/`` drive through environment
variables) every process runs the same program; the drivers' default mesh (:func:`default_mesh`)
is then the global ``"data"`` mesh over every process's devices, and:

* every process holds the whole dataset in host memory and builds the same padded global batch;
  :func:`put_global` hands each local device only its rows (nothing is compared or sent between
  processes);
* statistics are reduced over the devices of every process as on one process, and host-side
  results that are not reduced on the devices (factorisations) are made identical everywhere with
  :func:`broadcast_from_main`;
* sharded results (score columns, retrained models) are gathered with :func:`to_host`, so every
  process returns the full arrays;
* files are written by process 0 only (:func:`is_main_process`); stages and array stores must live
  on a file system that every process sees (the same machine, NFS, a mounted bucket).

On one process (including ``jax.distributed`` with one process) every helper reduces to the plain
single-controller call (``jax.device_put``, ``np.asarray``), so that path is unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Environment variables read by initialize_from_env (set by launch/local.py, launch/slurm.py and
# launch/tpu_vm.py).
ENV_COORDINATOR = "TDA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "TDA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "TDA_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "TDA_JAX_LOCAL_DEVICE_IDS"
ENV_DISTRIBUTED = "TDA_JAX_DISTRIBUTED"

T = TypeVar("T")


def make_data_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
    """Builds a 1-D mesh with axis ``"data"``.

    Args:
      devices: a list of devices, a device count (the first ``n`` of ``jax.devices()``), or None
        for every device.

    Returns:
      A ``jax.sharding.Mesh`` with the single axis ``"data"``.
    """
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, int):
        available = jax.devices()
        if devices < 1 or devices > len(available):
            raise ValueError(
                f"devices={devices} but {len(available)} device(s) are available; for more CPU "
                "devices set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts."
            )
        devices = available[:devices]
    return Mesh(np.asarray(list(devices)), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over ``"data"``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that replicates an array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def global_data_mesh() -> Mesh:
    """The 1-D ``"data"`` mesh over every device of every process (``jax.devices()``)."""
    return make_data_mesh(jax.devices())


def is_distributed() -> bool:
    """Whether this is one of several processes of a ``jax.distributed`` run."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_main_process() -> bool:
    """True on process 0 (and in a single-process run): the process that writes files and prints."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def default_mesh() -> Mesh:
    """The drivers' mesh when none is given: one device, or the global mesh over all processes."""
    return global_data_mesh() if is_distributed() else make_data_mesh(1)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None, *,
                           local_device_ids: Sequence[int] | None = None,
                           cpu_collectives: str | None = "gloo",
                           exit_on_error: bool = True) -> None:
    """Joins a multi-process run (a thin wrapper of :func:`jax.distributed.initialize`).

    Call it first, before any JAX computation. Without arguments JAX detects the cluster (SLURM,
    TPU VMs, Open MPI, ...); on CPU, collectives between processes use ``cpu_collectives``.

    Args:
      coordinator_address: ``host:port`` of process 0's coordination service.
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: the local devices (e.g. the GPU) this process drives; None for all.
      cpu_collectives: ``jax_cpu_collectives_implementation`` (``"gloo"``; ``"mpi"``), or None to
        keep JAX's setting.
      exit_on_error: end the process at once (exit status 1, after printing the traceback) on an
        uncaught exception. Otherwise the other processes wait for it in their next collective
        and JAX's shutdown barrier holds it for minutes, so the job hangs instead of failing.

    Raises:
      ValueError: ``process_id`` outside ``[0, num_processes)``.
    """
    if num_processes is not None and process_id is not None \
            and not 0 <= int(process_id) < int(num_processes):
        raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes}).")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=None if num_processes is None else int(num_processes),
                               process_id=None if process_id is None else int(process_id),
                               local_device_ids=local_device_ids)
    if exit_on_error:
        _exit_on_uncaught_exception()


def _exit_on_uncaught_exception() -> None:
    """Makes an uncaught exception print its traceback and end this process immediately."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skips the shutdown barrier that would wait for the other processes

    sys.excepthook = hook


def initialize_from_env(environ: dict[str, str] | None = None) -> bool:
    """Joins a multi-process run if the launcher asked for one through environment variables.

    * ``TDA_JAX_COORDINATOR`` (``host:port``), ``TDA_JAX_NUM_PROCESSES`` and ``TDA_JAX_PROCESS_ID``
      (and optionally ``TDA_JAX_LOCAL_DEVICE_IDS``, comma-separated): explicit settings
      (``launch/local.py``, ``launch/slurm.py``);
    * ``TDA_JAX_DISTRIBUTED=auto``: JAX's cluster detection (``launch/tpu_vm.py``);
    * none of them: a single-process run; nothing is done.

    Experiments call this first in ``main``. Returns whether ``jax.distributed`` was initialized.

    Raises:
      ValueError: a coordinator without a process count and id (or the reverse), or non-integers.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    coordinator = env.get(ENV_COORDINATOR)
    count, index = env.get(ENV_NUM_PROCESSES), env.get(ENV_PROCESS_ID)
    devices = env.get(ENV_LOCAL_DEVICE_IDS)
    local = None if not devices else [int(d) for d in devices.split(",")]
    if coordinator or count or index:
        if not (coordinator and count and index):
            raise ValueError(f"set all of {ENV_COORDINATOR} (host:port), {ENV_NUM_PROCESSES} and "
                             f"{ENV_PROCESS_ID} for a multi-process run; got {ENV_COORDINATOR}="
                             f"{coordinator!r}, {ENV_NUM_PROCESSES}={count!r}, {ENV_PROCESS_ID}="
                             f"{index!r}.")
        try:
            count_value, index_value = int(count), int(index)
        except ValueError:
            raise ValueError(f"{ENV_NUM_PROCESSES}={count!r} and {ENV_PROCESS_ID}={index!r} must be "
                             "integers.") from None
        initialize_distributed(coordinator, count_value, index_value, local_device_ids=local)
        return True
    mode = env.get(ENV_DISTRIBUTED, "").strip().lower()
    if mode in ("", "0", "off", "false", "no"):
        return False
    if mode not in ("auto", "1", "on", "true", "yes"):
        raise ValueError(f"{ENV_DISTRIBUTED}={mode!r}: use 'auto' (JAX detects the cluster) or "
                         "unset it.")
    initialize_distributed(local_device_ids=local)
    return True


def _single_device_pieces(value: Any, sharding: NamedSharding) -> list[jax.Array]:
    """``value``'s shard on every device of ``sharding`` that this process drives."""
    shape = np.shape(value)
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        if isinstance(value, jax.Array):  # device to device, no trip through the host
            piece = value[index] if any(i != slice(None) for i in index) else value
        else:
            piece = np.asarray(value[index])
        pieces.append(jax.device_put(piece, device))
    return pieces


def _put_leaf(value: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:  # already global
        if value.sharding.is_equivalent_to(sharding, value.ndim):
            return value
        return jax.jit(lambda x: x, out_shardings=sharding)(value)
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = _put_leaf(jax.random.key_data(value), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    if not isinstance(value, jax.Array):
        value = np.asarray(value)
    return jax.make_array_from_single_device_arrays(np.shape(value), sharding,
                                                    _single_device_pieces(value, sharding))


def put_global(tree: T, sharding: NamedSharding) -> T:
    r"""Places host (or local device) values that every process holds in full onto ``sharding``.

    Each process transfers only the rows its own devices hold (the padded global batch is built
    the same way everywhere, so no process compares or sends data). On one process this is
    ``jax.device_put(tree, sharding)``.

    Args:
      tree: a pytree of arrays with the *global* shapes (numpy, or ``jax.Array`` on a local device).
      sharding: e.g. :func:`data_sharding` (batch rows split) or :func:`replicated`.

    Returns:
      the pytree of global ``jax.Array``\ s.
    """
    if not is_distributed():
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda leaf: _put_leaf(leaf, sharding), tree)


def put_replicated(tree: T, mesh: Mesh) -> T:
    """``tree`` (the same on every process) replicated on every device of ``mesh``."""
    return put_global(tree, replicated(mesh))


def to_host(tree: T) -> T:
    """The full values of (possibly sharded) arrays as numpy, on every process.

    On one process this is ``np.asarray``; across processes a replicated array is read locally
    and a sharded one is gathered from every process (a collective: call it on every process).
    """
    if not is_distributed():
        return jax.tree.map(np.asarray, tree)

    def leaf(value):
        if not isinstance(value, jax.Array) or value.is_fully_addressable:
            return np.asarray(value)
        if value.is_fully_replicated:
            return np.asarray(value.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))

    return jax.tree.map(leaf, tree)


def broadcast_from_main(tree: T) -> T:
    """Process 0's values of ``tree`` on every process, bit for bit (any dtype, float64 included).

    Every process must pass leaves of the same shapes and dtypes. On one process the values are
    returned unchanged. Returns numpy arrays for array leaves.
    """
    if not is_distributed():
        return tree
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    hosts = [np.asarray(leaf) for leaf in leaves]
    # Bytes, so that no dtype is narrowed (float64 without jax_enable_x64) or rounded.
    raw = [np.ascontiguousarray(h).reshape(-1).view(np.uint8) for h in hosts]
    sent = multihost_utils.broadcast_one_to_all(raw)
    out = [np.asarray(r).view(h.dtype).reshape(h.shape) for r, h in zip(sent, hosts)]
    return jax.tree.unflatten(treedef, out)


def run_on_main(fn: Callable[[], T], what: str) -> T | None:
    """Runs ``fn`` on process 0 only (e.g. writing a stage's files) between two barriers.

    Every process must call it at the same point of the program. Process 0 starts ``fn`` only
    once every process has arrived, and every process returns only once ``fn`` has finished, so
    files that every process checks before or after the call (a stage's marker, its arrays) look
    the same to all of them. Returns ``fn()`` on process 0 and None elsewhere. If ``fn`` raises
    on process 0, it re-raises there and every other process raises :class:`RuntimeError` naming
    ``what`` (instead of waiting forever for process 0). On one process this is ``fn()``.
    """
    if not is_distributed():
        return fn()
    broadcast_from_main(np.int32(0))  # the barrier before: nobody is still reading the old state
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as err:  # reported to the other processes, then re-raised
            error = err
    failed = int(broadcast_from_main(np.int32(error is not None)))
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"process 0 failed while {what}; its log names the error.")
    return result


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing on one process)."""
    if is_distributed():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def assign_by_cost(costs: Sequence[float], num_workers: int) -> list[int]:
    """A balanced, deterministic assignment of tasks to ``num_workers`` workers by cost.

    Longest processing time first (Graham 1969): tasks in order of decreasing cost (ties: lower
    index first) go one by one to the least loaded worker (ties: lower worker index). The largest
    load is at most ``4/3 - 1/(3 num_workers)`` times the best possible one. The result depends only
    on ``costs`` and ``num_workers``, so every process computes the same assignment.

    Args:
      costs: the cost of each task (finite, ``>= 0``), e.g. ``in^3 + out^3`` for a layer's two
        eigendecompositions.
      num_workers: processes (or devices) to share the tasks.

    Returns:
      ``owner[i]`` in ``[0, num_workers)`` for every task ``i``.

    Raises:
      ValueError: ``num_workers < 1`` or a negative or non-finite cost (naming the task).
    """
    if int(num_workers) != num_workers or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}.")
    values = [float(c) for c in costs]
    for index, value in enumerate(values):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"costs[{index}] = {costs[index]!r} must be finite and >= 0.")
    loads = [0.0] * int(num_workers)
    owners = [0] * len(values)
    for index in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        worker = min(range(len(loads)), key=lambda w: (loads[w], w))
        owners[index] = worker
        loads[worker] += values[index]
    return owners


def allgather_bytes(data: bytes | np.ndarray) -> list[np.ndarray]:
    """Every process's ``data`` (bytes or a 1-D ``uint8`` array, any length), in process order, on
    every process, as ``uint8`` arrays (a collective).

    Lengths are gathered first, then the buffers padded to the longest; bytes travel as ``uint8``,
    so nothing is rounded. On one process: ``[data]``.
    """
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) \
        else np.asarray(data, np.uint8).reshape(-1)
    if not is_distributed():
        return [buffer]
    from jax.experimental import multihost_utils

    length = np.frombuffer(np.asarray([buffer.size], np.int64).tobytes(), np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(length))
    lengths = [int(np.frombuffer(row.tobytes(), np.int64)[0]) for row in rows]
    longest = max(max(lengths), 1)
    if buffer.size < longest:
        buffer = np.concatenate([buffer, np.zeros(longest - buffer.size, np.uint8)])
    gathered = np.asarray(multihost_utils.process_allgather(buffer))
    return [gathered[p, :lengths[p]] for p in range(len(lengths))]


def _pack_arrays(arrays: dict[str, Any], error: BaseException | None,
                 error_rank: float = 0.0) -> np.ndarray:
    """Named arrays (and an error, if any) as one ``uint8`` buffer: the length of a JSON header,
    the header (names, dtypes, shapes, offsets), then the raw bytes of every array (one copy)."""
    import json

    hosts, entries, offset = [], [], 0
    for name, value in arrays.items():
        host = np.asarray(value)
        entries.append([name, host.dtype.name, list(host.shape), offset, int(host.nbytes),
                        isinstance(value, jax.Array)])
        hosts.append(host)
        offset += int(host.nbytes)
    failure = None if error is None else [type(error).__name__, str(error), float(error_rank)]
    header = json.dumps({"entries": entries, "error": failure}).encode()
    start = 8 + len(header)
    buffer = np.empty(start + offset, np.uint8)
    buffer[:8] = np.frombuffer(np.asarray([len(header)], np.int64).tobytes(), np.uint8)
    buffer[8:start] = np.frombuffer(header, np.uint8)
    for host, entry in zip(hosts, entries):
        at = start + entry[3]
        buffer[at:at + entry[4]] = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
    return buffer


def _unpack_arrays(data: bytes | np.ndarray) -> tuple[dict[str, Any], list | None]:
    import json

    import jax.numpy as jnp

    data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    size = int(data[:8].view(np.int64)[0]) if data[:8].flags.c_contiguous else \
        int(np.frombuffer(data[:8].tobytes(), np.int64)[0])
    header = json.loads(data[8:8 + size].tobytes().decode())
    start = 8 + size
    out = {}
    for name, dtype, shape, offset, nbytes, on_device in header["entries"]:
        raw = data[start + offset:start + offset + nbytes]  # a view, no copy
        value = np.ascontiguousarray(raw).view(jnp.dtype(dtype)).reshape(shape)
        # jnp.asarray copies onto the device; a host value is copied out of the shared buffer.
        out[name] = jnp.asarray(value) if on_device else value.copy()
    return out, header["error"]


_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, FloatingPointError,
                                         ArithmeticError, np.linalg.LinAlgError)}


def exchange_arrays(local: dict[str, Any], error: BaseException | None = None,
                    error_rank: float = 0.0) -> dict[str, Any]:
    """The union of every process's named arrays, on every process, bit for bit (a collective).

    Each process contributes the arrays it computed (e.g. the factors of the layers it was
    assigned); every process gets all of them: numpy arrays, or ``jax.Array`` where the owner held
    one (the same bytes, any dtype). If processes failed (``error``), every process raises the
    failure with the lowest ``(error_rank, process)`` (e.g. the first failing layer, as one
    process would): its process its own error, the others the same kind of error with the
    process and message. On one process ``local`` is returned (``error`` re-raised).

    Raises:
      ValueError: two processes contributed the same name; or the error of a failing process.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return dict(local)
    parts = allgather_bytes(_pack_arrays(local, error, error_rank))
    merged: dict[str, Any] = {}
    failures = []
    for process, data in enumerate(parts):
        arrays, failure = _unpack_arrays(data)
        if failure is not None:
            failures.append((process, failure))
        for name, value in arrays.items():
            if name in merged:
                raise ValueError(f"array {name!r} was computed by more than one process.")
            merged[name] = local[name] if process == jax.process_index() else value
    if failures:
        process, (kind, message, _) = min(failures, key=lambda f: (f[1][2], f[0]))
        if process == jax.process_index():
            raise error
        raise _ERRORS.get(kind, RuntimeError)(f"process {process}: {message}")
    return merged
