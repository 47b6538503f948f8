"""Two bits per weight: the forward set ``A`` and the backward set ``B`` of a leaf, packed.

A weight's *code* is ``c = 2·[i ∈ A] + [i ∈ B]``: 0 outside ``B``, 1 on ``B∖A``, 3 on ``A``
(``A ⊆ B``, so 2 never occurs).  Four codes share one byte: packing along an axis (the leading
one by default) of length ``n`` gives length ``⌈n/4⌉`` there, and entry ``r`` lives in bits
``2(r mod 4)`` and ``2(r mod 4) + 1`` of packed entry ``⌊r/4⌋``.

Packing along one axis keeps every other axis as it is, so a leaf sharded along other axes gets a
packed array sharded the same way, and unpacking reads contiguous packed rows with one constant
shift each (no gather).  Scalars are treated as shape ``(1,)``.

The same layout stores any two per-weight bits (the optional reservoir statistics use it too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

CODES_PER_BYTE = 4
IN_B = 1
IN_A = 2


def packed_shape(shape: tuple[int, ...], axis: int = 0) -> tuple[int, ...]:
    """Shape of the packed codes of a leaf of ``shape``: ``shape[axis]`` becomes
    ``⌈shape[axis]/4⌉``."""
    if not shape:
        return (1,)
    return (*shape[:axis], -(-shape[axis] // CODES_PER_BYTE), *shape[axis + 1 :])


def _shifts(ndim: int, axis: int) -> jax.Array:
    """``[0, 2, 4, 6]`` shaped to broadcast along the new axis ``axis + 1`` of a rank
    ``ndim + 1`` array."""
    shifts = jnp.arange(CODES_PER_BYTE, dtype=jnp.uint8) * 2
    return shifts.reshape((1,) * (axis + 1) + (CODES_PER_BYTE,) + (1,) * (ndim - axis - 1))


def pack(code: jax.Array, axis: int = 0) -> jax.Array:
    """uint8 codes in ``{0, 1, 2, 3}`` of any shape → packed uint8 of :func:`packed_shape`.

    Four consecutive entries along ``axis`` share a byte (entry ``r`` in bits ``2(r mod 4)``,
    ``2(r mod 4) + 1``); pick an axis the leaf is not sharded along to keep the packed array
    sharded like the leaf.
    """
    shape = code.shape
    code = code.astype(jnp.uint8).reshape(shape or (1,))
    pad = -code.shape[axis] % CODES_PER_BYTE
    if pad:
        widths = [(0, 0)] * code.ndim
        widths[axis] = (0, pad)
        code = jnp.pad(code, widths)
    s = code.shape
    grouped = code.reshape(s[:axis] + (s[axis] // CODES_PER_BYTE, CODES_PER_BYTE) + s[axis + 1 :])
    return jnp.sum(grouped << _shifts(code.ndim, axis), axis=axis + 1, dtype=jnp.uint8)


def unpack(packed: jax.Array, shape: tuple[int, ...], axis: int = 0) -> jax.Array:
    """Inverse of :func:`pack`: uint8 codes of ``shape``."""
    full = shape or (1,)
    grouped = jnp.expand_dims(packed, axis + 1) >> _shifts(len(full), axis)
    s = packed.shape
    code = (grouped & 3).reshape(s[:axis] + (s[axis] * CODES_PER_BYTE,) + s[axis + 1 :])
    return lax.slice_in_dim(code, 0, full[axis], axis=axis).reshape(shape)


def encode(forward: jax.Array, backward: jax.Array) -> jax.Array:
    """``2·A + B`` as uint8 (``forward``, ``backward`` bool of one shape)."""
    return forward.astype(jnp.uint8) * IN_A + backward.astype(jnp.uint8) * IN_B


def forward_of(code: jax.Array) -> jax.Array:
    """``A`` (bool) from codes."""
    return (code & IN_A) != 0


def backward_of(code: jax.Array) -> jax.Array:
    """``B`` (bool) from codes."""
    return (code & IN_B) != 0


#: In every packed byte, the bits that hold ``A`` (1, 3, 5, 7) and those that hold ``B``.
_PLANE = {IN_A: 0b10101010, IN_B: 0b01010101}


def plane(packed: jax.Array, bit: int) -> jax.Array:
    """The packed bits of one set (``IN_A`` or ``IN_B``), others cleared (uint8, packed shape)."""
    return packed & jnp.uint8(_PLANE[bit])


def count(packed: jax.Array, bit: int) -> jax.Array:
    """int32 number of weights in one set, counted on the packed bytes (no unpacking; padding
    holds code 0)."""
    return jnp.sum(lax.population_count(plane(packed, bit)), dtype=jnp.int32)


def count_both(first: jax.Array, second: jax.Array, bit: int) -> tuple[jax.Array, jax.Array]:
    """:func:`count` of two packed arrays of one shape (the same values).

    On one device in one (variadic) reduction: XLA's CPU backend splits each large sum into two
    reductions, each its own compiled kernel, and a variadic reduce is one (the refresh's
    statistics of a 30-leaf model compiled in a third of the time).  On several devices two
    sums, which partition into all-reduces (a variadic reduce of sharded bytes gathers)."""

    def ones(packed):
        return lax.population_count(plane(packed, bit)).astype(jnp.int32)

    if jax.device_count() > 1:
        return count(first, bit), count(second, bit)
    zero = jnp.zeros((), jnp.int32)
    return lax.reduce(
        (ones(first), ones(second)),
        (zero, zero),
        lambda x, y: (x[0] + y[0], x[1] + y[1]),
        tuple(range(first.ndim)),
    )
