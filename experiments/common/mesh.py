"""Data-parallel mesh and sharding helpers (``jax.jit`` + ``NamedSharding``, multi-host aware).

The global batch is split over one mesh axis, ``"data"``, that spans every device of every
process. Each process feeds only its own rows (``local_batch_slice``) and the global array is
assembled with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_data_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D mesh over all (global) devices with the single axis ``"data"``.

    The axis is ``AxisType.Auto`` (jax.make_mesh defaults to Explicit in recent JAX): shardings
    are given at the ``jax.jit`` boundary and XLA propagates them inside, so model code needs
    no sharding annotations.
    """
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device (params, optimizer state)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Sharding that splits axis ``batch_axis`` of an ``ndim``-D array over ``"data"``."""
    if not 0 <= batch_axis < ndim:
        raise ValueError(f"batch_axis={batch_axis} out of range for ndim={ndim}")
    spec = [None] * ndim
    spec[batch_axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))


def check_batch_divisible(global_batch_size: int, name: str = "batch_size") -> None:
    """Raise ValueError unless the global batch divides over all devices (and so processes)."""
    n = jax.device_count()
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(
            f"{name}={global_batch_size} must be a positive multiple of the device count {n}"
        )


def local_batch_slice(global_batch_size: int) -> slice:
    """Rows ``[start, stop)`` of the global batch that this process feeds.

    Rows are assigned in process order, matching the device order of ``make_data_mesh``, so the
    global batch is the same whatever the number of processes.
    """
    check_batch_divisible(global_batch_size)
    per_process = global_batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def global_batch(local_BxN: np.ndarray, mesh: Mesh, global_batch_size: int) -> jax.Array:
    """Assemble this process's rows ``local_BxN`` (B = local batch) into the global array.

    Args:
      local_BxN: host array whose first axis holds this process's ``local_batch_slice`` rows.
      mesh: the data mesh.
      global_batch_size: size of axis 0 of the result.

    Returns:
      A ``jax.Array`` of shape ``(global_batch_size, *local_BxN.shape[1:])`` sharded on axis 0.
    """
    shape = (global_batch_size, *local_BxN.shape[1:])
    sharding = batch_sharded(mesh, local_BxN.ndim, 0)
    return jax.make_array_from_process_local_data(sharding, local_BxN, shape)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` (identical on all processes) replicated over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
        tree,
    )


def is_primary() -> bool:
    """True on the process that writes logs, metrics and summaries (process 0)."""
    return jax.process_index() == 0
