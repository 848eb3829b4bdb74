"""Device meshes for data-parallel accumulation.

Every pass over a dataset shards its batch over a ``"data"`` mesh axis, accumulates statistics
locally and reduces them once (one ``psum`` per statistic). A single-device run is a mesh of one
device, so results do not depend on the device count beyond floating-point reassociation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


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
