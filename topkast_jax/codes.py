"""Two bits per weight: the forward set ``A`` and the backward set ``B`` of a leaf, packed.

A weight's *code* is ``c = 2·[i ∈ A] + [i ∈ B]``: 0 outside ``B``, 1 on ``B∖A``, 3 on ``A``
(``A ⊆ B``, so 2 never occurs).  Four codes share one byte: for a leaf of shape ``(n₀, …)`` the
packed array has shape ``(⌈n₀/4⌉, …)`` and row ``r`` of the leaf lives in bits ``2(r mod 4)`` and
``2(r mod 4) + 1`` of packed row ``⌊r/4⌋``.

Packing along the leading axis keeps every other axis as it is, so a leaf sharded along any axis
but the first gets a packed array sharded the same way, and unpacking one row reads one contiguous
packed row with one constant shift (no gather).  Scalars are treated as shape ``(1,)``.

The same layout stores any two per-weight bits (the optional reservoir statistics use it too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CODES_PER_BYTE = 4
IN_B = 1
IN_A = 2


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the packed codes of a leaf of ``shape``: ``(⌈n₀/4⌉, n₁, …)``."""
    if not shape:
        return (1,)
    return (-(-shape[0] // CODES_PER_BYTE), *shape[1:])


def _row_shifts(ndim: int) -> jax.Array:
    """``[0, 2, 4, 6]`` shaped ``(1, 4, 1, …)`` to broadcast against ``(m, 4, n₁, …)``."""
    shifts = jnp.arange(CODES_PER_BYTE, dtype=jnp.uint8) * 2
    return shifts.reshape((1, CODES_PER_BYTE) + (1,) * (ndim - 1))


def pack(code: jax.Array) -> jax.Array:
    """uint8 codes in ``{0, 1, 2, 3}`` of any shape → packed uint8 of :func:`packed_shape`."""
    shape = code.shape
    code = code.astype(jnp.uint8).reshape(shape or (1,))
    rows = code.shape[0]
    pad = -rows % CODES_PER_BYTE
    if pad:
        code = jnp.pad(code, [(0, pad)] + [(0, 0)] * (code.ndim - 1))
    grouped = code.reshape((code.shape[0] // CODES_PER_BYTE, CODES_PER_BYTE) + code.shape[1:])
    shifted = grouped << _row_shifts(code.ndim)
    return jnp.sum(shifted, axis=1, dtype=jnp.uint8)


def unpack(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`pack`: uint8 codes of ``shape``."""
    full = shape or (1,)
    grouped = packed[:, None] >> _row_shifts(len(full))
    code = (grouped & 3).reshape((packed.shape[0] * CODES_PER_BYTE,) + full[1:])
    return code[: full[0]].reshape(shape)


def encode(forward: jax.Array, backward: jax.Array) -> jax.Array:
    """``2·A + B`` as uint8 (``forward``, ``backward`` bool of one shape)."""
    return forward.astype(jnp.uint8) * IN_A + backward.astype(jnp.uint8) * IN_B


def forward_of(code: jax.Array) -> jax.Array:
    """``A`` (bool) from codes."""
    return (code & IN_A) != 0


def backward_of(code: jax.Array) -> jax.Array:
    """``B`` (bool) from codes."""
    return (code & IN_B) != 0
