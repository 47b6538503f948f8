"""Reshaping leaves that carry explicit shardings (``jax.make_mesh``'s default axis type).

The selection methods of :mod:`topkast_jax.selection` work on flat vectors.  With *explicit* mesh
axes, JAX cannot infer how a reshape of a sharded array should be laid out, so the flat keys are
gathered (replicated) and the masks are reshaped back with the leaf's own sharding.  The
streaming selection (:mod:`topkast_jax.streaming`) never flattens a sharded leaf: it splits one
axis so that the sharding stays on the outer part (:func:`split_axis`).  With auto axes (or no
mesh) these are plain reshapes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """The leaf's sharding when it is sharded over explicit mesh axes, else ``None``."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(axis is None for axis in spec):
        return None
    return sharding


def flatten(x: jax.Array) -> jax.Array:
    """``x.ravel()``, replicated when ``x`` is explicitly sharded."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return x.ravel()
    return jnp.reshape(x, (-1,), out_sharding=NamedSharding(sharding.mesh, PartitionSpec()))


def replicated_like(x: jax.Array) -> NamedSharding | None:
    """A replicated sharding on ``x``'s mesh when ``x`` is explicitly sharded, else ``None``
    (e.g. the ``out_sharding`` of a histogram scattered from sharded indices: XLA sums the
    per-device counts with a histogram-sized all-reduce)."""
    sharding = explicit_sharding(x)
    return None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec())


def flatten_rows(x_Gx: jax.Array) -> jax.Array:
    """``x.reshape(G, -1)``, replicated when ``x`` is explicitly sharded."""
    sharding = explicit_sharding(x_Gx)
    if sharding is None:
        return x_Gx.reshape(x_Gx.shape[0], -1)
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    return jnp.reshape(x_Gx, (x_Gx.shape[0], -1), out_sharding=replicated)


def unflatten_like(flat_N: jax.Array, like: jax.Array) -> jax.Array:
    """``flat_N`` reshaped to ``like.shape``, with ``like``'s explicit sharding if it has one."""
    sharding = explicit_sharding(like)
    if sharding is None:
        return flat_N.reshape(like.shape)
    return jnp.reshape(flat_N, like.shape, out_sharding=sharding)


def shards(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, name: object) -> int:
    """How many pieces a spec entry cuts an axis into: ``None`` → 1, a mesh axis name → its size,
    a tuple of names → the product of their sizes."""
    if name is None:
        return 1
    names = name if isinstance(name, tuple) else (name,)
    return math.prod(mesh.shape[n] for n in names)


def split_axis(x: jax.Array, axis: int, outer: int) -> jax.Array:
    """``x`` with ``axis`` (size ``d``) split row-major into ``(outer, d // outer)``; an explicit
    sharding of ``axis`` stays on ``outer`` (no communication when ``outer`` is a multiple of
    its shards)."""
    shape = x.shape[:axis] + (outer, x.shape[axis] // outer) + x.shape[axis + 1 :]
    explicit = explicit_sharding(x)
    if explicit is None:
        return x.reshape(shape)
    spec = tuple(explicit.spec) + (None,) * (x.ndim - len(explicit.spec))
    split = PartitionSpec(*spec[:axis], spec[axis], None, *spec[axis + 1 :])
    return jnp.reshape(x, shape, out_sharding=NamedSharding(explicit.mesh, split))


def packing_axis(x: jax.Array, per_byte: int = 4) -> int:
    """The axis to pack ``per_byte`` entries of ``x`` per byte along: of the axes not explicitly
    sharded (so the packed array keeps the leaf's sharding), the one that pads least — an axis
    of length ``n`` packs into ``⌈n / per_byte⌉`` bytes — the first of those on a tie; 0 for
    scalars or when every axis is sharded.  (The first axis alone would cost a byte per weight
    on a 1×1 convolution's ``(1, 1, I, O)`` kernel.)"""
    if x.ndim == 0:
        return 0
    sharding = explicit_sharding(x)
    spec = () if sharding is None else tuple(sharding.spec)
    spec = spec + (None,) * (x.ndim - len(spec))
    free = [axis for axis, name in enumerate(spec) if name is None]
    if not free:
        return 0

    def padded(axis: int) -> int:
        n = x.shape[axis]
        return -(-n // per_byte) * per_byte * (math.prod(x.shape) // n if n else 0)

    return min(free, key=lambda axis: (padded(axis), axis))
