"""Exact ``A`` and ``B`` of every leaf in a few streaming passes, with no leaf-sized temporaries.

The selection of :mod:`topkast_jax.selection` materialises int32 keys, bin indices and a
ones-vector for every weight (three leaf-sized buffers) because XLA's scatter does not fuse with
its producers.  Here every pass walks a leaf in chunks of ``CHUNK`` weights inside a
``lax.fori_loop``, so the only temporaries are one chunk and the histograms, and each pass reads
the leaf once:

1. histogram of the high 16 bits of the keys of ``|θ|`` (one for all of ``A`` and ``B``);
2. the histograms of the next 16 bits inside the buckets of the ``k_A``-th and ``k_B``-th
   largest key (int32 keys; float64 leaves have int64 keys of their own bits,
   :func:`topkast_jax.selection.elementwise_magnitude_keys`, and take two more such passes);
3. only when ties straddle a boundary, and only over the slice groups where they do: the same
   histograms over the rank ``n − 1 − i`` of the flat index of the tied weights (one or two
   passes), so the result is the ``k``-th largest *composite* key ``(key, n − 1 − i)`` —
   unique, ordered as a stable argsort — and no pass depends on the order in which chunks are
   visited.  On one device, slices of at least ``TIE_WALK_MIN`` weights (where float32
   boundaries often straddle a few ties) take the *tie walk* instead: one pass that counts the
   tied weights chunk by chunk in index order and finds the cut inside the chunk that holds it
   (:func:`_count_ties`).

With a guess of every key (a refresh extrapolating from the last two,
:mod:`topkast_jax.warm_start`), a first pass histograms a window of 65,024 keys around each guess
(:class:`_Window`); the slices whose two keys lie inside skip passes 1 and 2.

Every pass is the same computation with the digit's level as a loop variable: one
``while_loop`` over the levels holds one histogram pass per group of stacks and one bucket
select for all rows, so the compiled program does not grow with the number of passes (what
compiling costs here is the number of kernels XLA's CPU backend emits, each an LLVM module).
A weight is counted once per pass: in ``A``'s histogram when it matches ``A``'s prefix, else
in ``B``'s — two prefixes either agree (then so do the histograms) or no key matches both.

A leaf with a layer axis (scan-stacked layers, :mod:`topkast_jax.layers`) is ``L`` slices, each
selected as a leaf of its own: the walk reads the leaf as a *stack* ``(L, *slice)`` (the layer axis
moved first; a leaf without one is a stack of one slice) and every slice is a *row* of the
histograms.  Slices walked alike — of one leaf or of several — form a group (one chunk loop for
the group, the histograms as rows of one buffer for all groups).  On one device every slice of
``n`` weights is first viewed as ``(n / c, c)`` rows, ``c = gcd(n, ROW)`` (a free reshape), and
walked in chunks of ``r`` rows: ``r = CHUNK / c``, or for a slice of fewer rows the largest power
of two not above its rows; a slice's last chunk ends at its last row, overlapping the one before
(its rows counted there are masked).  Slices of one ``c`` and one ``r`` share a loop whatever
their sizes — ResNet-50's 54 kernels of 15 sizes take 6 loops, the Transformer-XL's 43 sparse
leaves of 5 sizes take 2 — which takes one slice's chunk per iteration through a ``lax.switch``
over its stacks, so its body is compiled once; a pass that needs only some slices (the index
digits, the tie walk) walks only theirs.  The compiled program grows by one chunk loop per
group (per slice shape, on a mesh) and by one small slicing kernel per stack, and no slice is
copied out of its leaf (a layer axis other than 0 is moved first, which XLA may copy).  The
temporaries are two int32 histograms of 65,536 bins (512 KiB) per slice — those of all slices
at once, as one bucket select serves them all — and one chunk of ``CHUNK`` keys per group.

Sharded leaves are selected per shard: a chunk never cuts across a device (:func:`_walk`) — runs
of leading rows of the slice when its first axis is whole on every device, else strided rows
``j, j + c, j + 2c, …`` whose split ``(rows, c)`` of the first axis keeps its sharding on
``rows`` — so each device histograms its own weights and the only collectives the selection adds
are all-reduces of the histograms (int32 ``[rows, 2 · 65536]``).  The sets are
written elementwise in the leaf's layout.  On an auto-axis mesh the layout is not known while
tracing, so the walk assumes the first axis may be sharded over any divisor of the device count.

The result per row is two thresholds ``(t, cut)``: weight ``i`` (row-major index inside its slice)
is in the set iff ``key_i > t`` or (``key_i == t`` and ``i < cut``) — the stable-argsort order
exactly (ties to the lower index).  :func:`codes_from_thresholds` turns them into 2-bit codes in
one elementwise pass over ``θ`` that keeps the leaf's shape (and sharding).

Global top-k (one threshold over all sparse leaves, ties by leaf order, then slice order, then
index) sums the per-row histograms, and its composite key has the slice's rank between the key
and the index: ``(key, R − 1 − r, n − 1 − i)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from topkast_jax import codes as codes_lib
from topkast_jax import selection, sharding

CHUNK = 1 << 17
_BITS = 16
_BINS = 1 << _BITS


class SetThresholds(NamedTuple):
    """Per leaf, for the sets ``(A, B)``: ``key[2]`` (int32, int64 for float64 keys) and int32
    ``cut[2]``; for a leaf with a layer axis, ``[L, 2]`` (one pair per slice; a global selection
    shares ``key[2]``).

    Weight ``i`` (row-major flat index inside its slice) is in set ``j`` iff ``key_i > key[j]`` or
    ``key_i == key[j] and i < cut[j]``.
    """

    key: jax.Array
    cut: jax.Array


#: ``body(parts, starts, index, carry, valid) -> carry`` of :func:`_fold_chunks`.
Body = Callable[[Sequence[jax.Array], Sequence, jax.Array, object, jax.Array | None], object]


class _Walk(NamedTuple):
    """How a stack is walked: chunks of ``rows`` rows of the slice's first axis, ``chunks`` of
    them (the last, shorter run holds the remainder); ``strided`` chunks hold the rows
    ``j, j + chunks, j + 2·chunks, …`` (``rows · chunks`` is then the whole axis)."""

    rows: int
    chunks: int
    strided: bool


def _devices() -> int:
    """How many devices a leaf without explicit sharding may be spread over (auto mesh axes)."""
    return jax.device_count()


def _axis_shards(stack: jax.Array) -> tuple[int | None, int]:
    """``(n₀, n)``: the explicit shards of the slice's first axis and of the whole slice;
    ``(None, devices)`` when the stack carries no explicit sharding (unknown, e.g. auto axes)."""
    explicit = sharding.explicit_sharding(stack)
    if explicit is None:
        return None, _devices()
    spec = tuple(explicit.spec) + (None,) * (stack.ndim - len(explicit.spec))
    sizes = [sharding.shards(explicit.mesh, name) for name in spec[1:]]
    return sizes[0], math.prod(sizes)


def _layout_unknown(stack: jax.Array) -> bool:
    """Whether the stack may be sharded in a way not known while tracing (auto mesh axes)."""
    return _axis_shards(stack)[0] is None and _devices() > 1


def _walk(stack: jax.Array) -> _Walk:
    """Chunks of about ``CHUNK`` weights per slice *and device*, never cut across devices.

    Runs of leading rows when the slice's first axis is not sharded — on one device, or when
    the explicit sharding leaves that axis whole.  When that axis may be sharded (explicitly, or
    on an auto-axis mesh where the layout is unknown while tracing) the chunks are strided:
    ``rows`` is a divisor of the axis and a multiple of its shards (``gcd(axis, devices)`` when
    unknown), so ``(axis) → (rows, chunks)`` keeps the sharding on ``rows`` and a chunk (one
    index along ``chunks``) holds ``rows / n₀`` rows on every device, no communication.
    """
    shape = stack.shape[1:]
    d0, row_size = shape[0], max(1, math.prod(shape[1:]))
    first, total = _axis_shards(stack)
    budget = CHUNK * total
    if first == 1 or (first is None and total == 1):
        rows = max(1, min(d0, budget // row_size))
        return _Walk(rows, -(-d0 // rows), False)
    step = first if first is not None else math.gcd(d0, total)
    fits = [q for q in range(step, d0 + 1, step) if d0 % q == 0]
    small = [q for q in fits if q * row_size <= budget]
    rows = max(small) if small else min(fits, default=d0)
    return _Walk(rows, d0 // rows, rows < d0)


#: Row length of a slice walked on one device (:func:`stack_view`): ``gcd(n, ROW)``.
ROW = 1024


def _one_device(stack: jax.Array) -> bool:
    """Whether the stack is walked as one device's: no explicit sharding and one device (its
    slices are then viewed as rows of ``gcd(n, ROW)``, :func:`stack_view`)."""
    return sharding.explicit_sharding(stack) is None and _devices() == 1


def _chunk_rows(stack: jax.Array) -> int:
    """Rows per chunk of a one-device stack ``(L, rows, c)``: ``CHUNK // c`` (at least 1), or for
    slices of fewer rows the largest power of two not above ``rows`` — so stacks of one row
    length share a walk whatever their row counts, in a few classes of chunk size."""
    rows, width = stack.shape[1], stack.shape[2]
    most = max(1, CHUNK // width)
    return most if rows >= most else 1 << max(rows.bit_length() - 1, 0)


def stack_view(x: jax.Array, axis: int | None) -> jax.Array:
    """The leaf as it is walked: ``x[None]`` without a layer axis, else the layer axis moved first
    (free for axis 0); ``(L, 1)`` for scalar slices.

    On one device (no sharding to keep) every slice of ``n`` weights is viewed as
    ``(n / c, c)`` rows with ``c = gcd(n, ROW)`` — a free reshape that keeps the row-major
    index — so a chunk holds about ``CHUNK`` weights whatever the leaf's leading axes (a
    3×3×512×512 kernel's first axis would make a chunk of 786,432), and slices of one row
    length share a chunk loop whatever their shapes (:func:`_by_walk`).  Otherwise the stack
    keeps the slice's axes, ``(L, *slice)``: chunks never cross a device boundary
    (:func:`_walk`), so every chunk keeps the leaf's sharding."""
    stack = jnp.expand_dims(x, 0) if axis is None else jnp.moveaxis(x, axis, 0)
    if _one_device(stack):
        n = math.prod(stack.shape[1:])
        row = math.gcd(n, ROW) if n else 1
        return stack.reshape(stack.shape[0], n // row, row)
    return sharding.flatten_rows(stack) if stack.ndim == 1 else stack


def _rows(stacks: Sequence[jax.Array]) -> int:
    """``R``: the slices of a group of stacks, all of them."""
    return sum(s.shape[0] for s in stacks)


def _row_ranges(stacks: Sequence[jax.Array]) -> list[slice]:
    """The rows of each stack among the group's ``R`` slices (the group's row order)."""
    out, start = [], 0
    for s in stacks:
        out.append(slice(start, start + s.shape[0]))
        start += s.shape[0]
    return out


def _fold_chunks(
    stacks: Sequence[jax.Array],
    body: Body,
    init: object,
    key_dtype: np.dtype | None = None,
    run_G: jax.Array | None = None,
    done: Callable[[object, jax.Array], jax.Array] | None = None,
) -> object:
    """``carry ← body(parts, starts, index_C…, carry, valid_C…)`` over the ``R`` slices of stacks
    walked alike (:func:`_by_walk`), by chunks that each hold about ``CHUNK`` weights.

    ``parts[i]`` are magnitude keys (of ``key_dtype``; default :func:`_key_dtype` of the stacks:
    int64 when one is float64) of a chunk of ``L_i`` slices whose first is the group's slice
    ``starts[i]`` (an int, or traced).  ``index`` is the row-major flat index inside the slice of
    each position of the chunk (broadcasts against every part); ``valid`` (bool, like ``index``,
    or ``None`` when every position counts) is False at positions an earlier chunk of the slice
    held.  One loop walks the whole group (dynamic slices, no copy).

    On one device the group is walked one slice at a time (:func:`_fold_slices`), only the
    slices flagged in ``run_G`` (bool ``[R]``) when it is given, and a slice's walk ends early
    once ``done(carry, g)`` (a traced bool, when given) holds for it; sharded stacks ignore
    both.  Sharded
    stacks are walked together, one part per stack (their layouts may differ), by the chunks
    of :func:`_walk`: runs of whole leading rows of the slice (the remaining rows form one last,
    shorter chunk), or strided sets of them, so a chunk keeps the leaf's sharding on every axis.
    """
    key_dtype = _key_dtype(stacks) if key_dtype is None else key_dtype

    def keys_of(parts):
        return [selection.elementwise_magnitude_keys(p, key_dtype) for p in parts]

    if all(_one_device(s) for s in stacks):
        return _fold_slices(stacks, body, init, keys_of, run_G, done)
    shape = stacks[0].shape[1:]
    row_size = max(1, math.prod(shape[1:]))
    walk = _walk(stacks[0])
    starts = [r.start for r in _row_ranges(stacks)]

    if walk.strided:  # chunk j: rows j, j + c, j + 2c, … of the slice
        views = [sharding.split_axis(s, 1, walk.rows) for s in stacks]
        shape_C = (walk.rows, 1, *shape[1:])
        row_C = lax.broadcasted_iota(jnp.int32, shape_C, 0) * walk.chunks

        def strided(j, carry):
            keys = keys_of([lax.dynamic_slice_in_dim(v, j, 1, axis=2) for v in views])
            index_C = (row_C + j) * row_size + flat_index(shape_C, skip=0)
            return body(keys, starts, index_C, carry, None)

        return lax.fori_loop(0, walk.chunks, strided, init)

    def chunk(start, length, carry):
        parts = [lax.dynamic_slice_in_dim(s, start, length, axis=1) for s in stacks]
        index_C = start * row_size + flat_index((length, *shape[1:]))
        return body(keys_of(parts), starts, index_C, carry, None)

    full = shape[0] // walk.rows
    rest = shape[0] - full * walk.rows
    carry = (
        lax.fori_loop(0, full, lambda r, c: chunk(r * walk.rows, walk.rows, c), init)
        if full > 1
        else chunk(0, walk.rows, init)
    )
    return chunk(full * walk.rows, rest, carry) if rest else carry


def _slice_table(stacks: Sequence[jax.Array]) -> np.ndarray:
    """int32 ``[G, 3]``, per slice of the group (in the group's order): its stack, its index in
    that stack and its row count."""
    return np.array(
        [(i, layer, s.shape[1]) for i, s in enumerate(stacks) for layer in range(s.shape[0])],
        np.int32,
    ).reshape(-1, 3)


def _fold_slices(stacks, body, init, keys_of, run_G: jax.Array | None = None, done=None) -> object:
    """:func:`_fold_chunks` on one device: stacks ``(L, rows, c)`` of one row length ``c`` and
    one :func:`_chunk_rows` ``r`` (their row counts may differ), walked one slice at a time —
    an outer ``fori_loop`` over the group's slices (only those with ``run_G``, when given), an
    inner one over the slice's chunks of ``r`` rows in index order (the tie walk relies on it),
    the slice picked by a ``lax.switch`` over the stacks.  The loop body (the caller's, with one
    part) is compiled once for the group and its kernels never see several stacks at once
    (joining the stacks' chunks into one array inside the body made XLA's CPU kernels 3–4×
    slower per weight).  A slice's last chunk ends at its last row: when ``r`` does not divide
    its rows it starts inside the chunk before, whose rows it marks not ``valid``.  With
    ``done``, a slice's chunks are walked while ``done(carry, g)`` does not hold."""
    rows, width = _chunk_rows(stacks[0]), stacks[0].shape[2]
    table = jnp.asarray(_slice_table(stacks))
    overlaps = any(s.shape[1] % rows for s in stacks)
    # Stacks of one dtype: the branches only slice, and the keys are computed once after the
    # switch (one kernel for the group instead of one per stack); mixed dtypes: in each branch.
    one_dtype = len({s.dtype for s in stacks}) == 1

    def take(stack):
        def chunk_of(layer, first_row):
            one = lax.dynamic_index_in_dim(stack, layer, axis=0)
            chunk = lax.dynamic_slice_in_dim(one, first_row, rows, axis=1)
            return chunk if one_dtype else keys_of([chunk])[0]

        return chunk_of

    branches = [take(stack) for stack in stacks]

    def one_slice(g, carry):
        stack, layer, total = table[g, 0], table[g, 1], table[g, 2]

        def step(c, carry):
            new_row = c * rows
            first_row = jnp.minimum(new_row, total - rows)
            part = lax.switch(stack, branches, layer, first_row)
            keys = keys_of([part])[0] if one_dtype else part
            index_C = first_row * width + flat_index((rows, width))
            valid_C = index_C >= new_row * width if overlaps else None
            return body([keys], [g], index_C, carry, valid_C)

        chunks = (total + rows - 1) // rows
        if run_G is not None:
            chunks = jnp.where(run_G[g], chunks, 0)
        if done is None:
            return lax.fori_loop(0, chunks, step, carry)
        _, carry = lax.while_loop(
            lambda cc: (cc[0] < chunks) & ~done(cc[1], g),
            lambda cc: (cc[0] + 1, step(cc[0], cc[1])),
            (jnp.zeros((), jnp.int32), carry),
        )
        return carry

    return lax.fori_loop(0, table.shape[0], one_slice, init)


def _add_counts(
    hist_GxB: jax.Array, bins_Lx: jax.Array, first: int | jax.Array = 0, apart: bool = True
) -> jax.Array:
    """``hist[first + l, b] += #(bins[l] == b)`` (``bins`` of any shape after ``L``), or with
    ``apart=False`` every ``l`` into row ``first``; bins outside ``[0, B)`` are dropped."""
    rows, num_bins = hist_GxB.shape
    valid = (bins_Lx >= 0) & (bins_Lx < num_bins)
    row_L = first + jnp.arange(bins_Lx.shape[0], dtype=jnp.int32) if apart else first
    row_start = (jnp.asarray(row_L, jnp.int32) * num_bins).reshape(
        (-1,) + (1,) * (bins_Lx.ndim - 1)
    )
    # Invalid entries go past the end (a negative index would wrap around).
    flat = jnp.where(valid, row_start + bins_Lx, rows * num_bins)
    counts = (
        hist_GxB.reshape(-1)
        .at[flat]
        .add(jnp.ones((), jnp.int32), mode="drop", out_sharding=sharding.replicated_like(flat))
    )
    return counts.reshape(rows, num_bins)


def _key_dtype(stacks: Sequence[jax.Array]) -> np.dtype:
    """The key dtype of stacks selected together (:func:`topkast_jax.selection.key_dtype`)."""
    return selection.key_dtype(s.dtype for s in stacks)


def _per_leaf(value_L: jax.Array, like_Lx: jax.Array) -> jax.Array:
    """``value_L`` shaped to broadcast against ``like_Lx``."""
    return value_L.reshape((value_L.shape[0],) + (1,) * (like_Lx.ndim - 1))


class _Fields(NamedTuple):
    """How many 16-bit digits each field of the composite key has, most significant first:
    ``key`` (the magnitude key: 2 for int32, 4 for int64), ``row`` (the rank ``R − 1 − r`` of the
    slice among all ``R`` slices: global top-k only, 0 otherwise) and ``index`` (the rank
    ``n − 1 − i`` of the row-major index inside the slice).  Composite keys are unique per
    selection and order the weights as a stable argsort of ``−|θ|`` does (ties to the earlier
    slice, then the lower index)."""

    key: int
    row: int
    index: int

    def starts(self) -> tuple[int, int, int]:
        """The level at which each field's first digit is selected."""
        return 0, self.key, self.key + self.row


def _digits_for(count: int) -> int:
    """16-bit digits needed for ranks ``0 … count − 1`` (1 or 2; counts are below ``2³²``)."""
    return 1 if count <= _BINS else 2


def _unsigned(x: jax.Array) -> jax.Array:
    """The bits of an int32/int64 array as the unsigned integer of its width."""
    return lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))


class _Level(NamedTuple):
    """One level of the radix select, per field of :class:`_Fields` (``None`` for a field without
    digits): ``mask`` keeps the digits selected before this level — a weight is in a bucket iff
    ``value & mask == prefix`` for every field, as a prefix holds zeros from this level on —,
    ``shift`` moves the level's digit to the low 16 bits and ``holds`` (0/1) says whether the
    field holds that digit."""

    mask: tuple[jax.Array | None, ...]
    shift: tuple[jax.Array | None, ...]
    holds: tuple[jax.Array | None, ...]


def _field_dtypes(key_dtype: np.dtype) -> tuple[np.dtype, np.dtype, np.dtype]:
    """The unsigned dtype of each field: the key's width, uint32 for the ranks."""
    return (np.dtype(f"uint{np.dtype(key_dtype).itemsize * 8}"), np.dtype(np.uint32)) + (
        np.dtype(np.uint32),
    )


def _level_tables(fields: _Fields, key_dtype: np.dtype, levels: int) -> list[np.ndarray | None]:
    """Per field, ``[levels, 3]`` of its dtype: ``(mask, shift, holds)`` of :class:`_Level` at
    every level (computed here, so a level costs one lookup per field, not scalar kernels); a
    level past the fields' digits (the tie walk's) holds no digit."""
    tables: list[np.ndarray | None] = []
    for start, digits, dtype in zip(fields.starts(), fields, _field_dtypes(key_dtype), strict=True):
        if not digits:
            tables.append(None)
            continue
        width = _BITS * digits  # a rank of one digit lies in the low 16 bits
        rows = []
        for level in range(levels):
            kept = min(max(level - start, 0), digits) * _BITS
            mask = ((1 << kept) - 1) << (width - kept)
            holds = 0 <= level - start < digits
            rows.append((mask, width - kept - _BITS if holds else 0, int(holds)))
        tables.append(np.array(rows, dtype))
    return tables


def _at_level(tables: Sequence[np.ndarray | None], level: jax.Array) -> _Level:
    """The :class:`_Level` of a traced level (one row of each table)."""
    rows = [None if t is None else jnp.asarray(t)[level] for t in tables]
    return _Level(*(tuple(None if r is None else r[j] for r in rows) for j in range(3)))


def _matches(values, prefixes, at: _Level) -> jax.Array:
    """bool: whether the composite key's digits above the level equal those of ``prefixes``
    (one value and one prefix per field, broadcast)."""
    out = jnp.ones((), bool)
    for value, prefix, mask in zip(values, prefixes, at.mask, strict=True):
        if mask is not None:
            out = out & ((value & mask) == prefix)
    return out


def _level_digit(values, at: _Level) -> jax.Array:
    """int32 ``[0, 65536)``: the level's digit of the composite key.  A sum of the fields'
    digits weighted by ``holds``, not a ``where``: the fields broadcast against each other and
    may carry different explicit shardings, which a select would have to reconcile."""
    out = jnp.zeros((), jnp.int32)
    for value, shift, holds in zip(values, at.shift, at.holds, strict=True):
        if shift is not None:
            digit = (lax.shift_right_logical(value, shift) & (_BINS - 1)) * holds
            out = out + digit.astype(jnp.int32)
    return out


def _slices_of(value_G: jax.Array, start, like_Lx: jax.Array) -> jax.Array:
    """The ``L`` entries of a per-slice ``value_G`` from slice ``start`` (an int or traced) on,
    shaped to broadcast against ``like_Lx``."""
    return _per_leaf(lax.dynamic_slice_in_dim(value_G, start, like_Lx.shape[0]), like_Lx)


class _Ties(NamedTuple):
    """The tie walk of a per-leaf selection on one device (:func:`_count_ties`), per slice ``g``
    and set ``s`` (``[G, 2]`` each): ``key`` the ``k``-th largest key ``t``; ``need`` how many of
    the weights with key ``t`` the set takes, ``k − #(key > t)``, where they straddle the
    boundary (0 elsewhere); ``seen`` how many weights with key ``t`` the chunks walked so far
    hold; ``cut`` one past the index of the ``need``-th of them in row-major order (−1 until
    the chunk that holds it is walked)."""

    key: jax.Array
    need: jax.Array
    seen: jax.Array
    cut: jax.Array


def _sum_both(a_LxM: jax.Array, b_LxM: jax.Array) -> jax.Array:
    """``[L, 2]``: the int32 sums of two bool arrays over their last axis, in one variadic
    reduction (:func:`topkast_jax.selection._reduce_last`; on XLA's CPU backend 15× faster than
    summing their stack)."""
    ints = (a_LxM.astype(jnp.int32), b_LxM.astype(jnp.int32))
    sums = selection._reduce_last(ints, (0, 0), lambda x, y: (x[0] + y[0], x[1] + y[1]))
    return jnp.stack(sums, axis=-1)


def _count_ties(
    keys_Lx: jax.Array, index_x: jax.Array, ties: _Ties, start, valid_x: jax.Array | None = None
) -> _Ties:
    """``ties`` after one chunk of ``L`` slices from slice ``start`` (an int or traced), counting
    only the positions ``valid_x`` (bool like ``index_x``; ``None``: all).

    The one-device walk visits the chunks of a slice in index order, each a run of consecutive
    indices from ``index_x``'s first, so the ``need``-th weight with key ``t`` lies in the first
    chunk where ``seen + #(key == t) >= need``.  Inside that chunk (a ``cond``: once per slice
    and set) a bisection over positions ``p`` finds the least ``p`` with
    ``#(key == t at positions < p) >= need − seen``; the cut is the chunk's first index plus
    ``p``.  A pass costs one comparison and one count per weight and set, where the index
    digits of :class:`_Fields` cost two histogram passes."""
    length = keys_Lx.shape[0]
    key_L2, need_L2, seen_L2, cut_L2 = (lax.dynamic_slice_in_dim(v, start, length) for v in ties)
    valid_x = True if valid_x is None else valid_x
    tied_LxM = [
        ((keys_Lx == _per_leaf(key_L2[:, s], keys_Lx)) & valid_x).reshape(length, -1)
        for s in (0, 1)
    ]
    count_L2 = _sum_both(*tied_LxM)
    hit_L2 = (need_L2 > seen_L2) & (need_L2 <= seen_L2 + count_L2)

    def locate(cut_L2):
        size = tied_LxM[0].shape[1]
        position_M = jnp.arange(size, dtype=jnp.int32)
        wanted_L2 = need_L2 - seen_L2

        def halve(_, bounds):  # invariant: the answer lies in [low, high]
            low, high = bounds
            middle = (low + high) // 2
            before = [t & (position_M < middle[:, s, None]) for s, t in enumerate(tied_LxM)]
            enough = _sum_both(*before) >= wanted_L2
            return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

        bounds = (jnp.zeros_like(wanted_L2), jnp.full_like(wanted_L2, size))
        low, _ = lax.fori_loop(0, max(1, size.bit_length()), halve, bounds)
        first_index = jnp.reshape(index_x, -1)[0]
        return jnp.where(hit_L2, first_index + low, cut_L2)

    cut_L2 = lax.cond(jnp.any(hit_L2), locate, lambda c: c, cut_L2)

    def put(whole, part):
        return lax.dynamic_update_slice_in_dim(whole, part, start, 0)

    return ties._replace(seen=put(ties.seen, seen_L2 + count_L2), cut=put(ties.cut, cut_L2))


#: Slices of at least this many weights resolve straddling ties with the tie walk
#: (:func:`_count_ties`, one pass) instead of the index digits (two histogram passes); smaller
#: ones rarely straddle (float32), and the walk compiles a chunk loop of its own.
TIE_WALK_MIN = 1 << 22


def _walks_ties(stack: jax.Array) -> bool:
    """Whether the slices of a stack take the tie walk: on one device (its chunks come in index
    order) and of at least ``TIE_WALK_MIN`` weights."""
    return _devices() == 1 and math.prod(stack.shape[1:]) >= TIE_WALK_MIN


def _tie_walk(stacks: Sequence[jax.Array], ties: _Ties, key_dtype: np.dtype) -> _Ties:
    """:func:`_count_ties` over the chunks of the slices of a group of stacks whose ties
    straddle a boundary (group-local ``ties``), each slice's only until both its cuts are found
    (the chunks come in index order: the rest hold no cut)."""

    def body(keys, starts, index_x, ties, valid_x):
        for keys_Lx, start in zip(keys, starts, strict=True):
            ties = _count_ties(keys_Lx, index_x, ties, start, valid_x)
        return ties

    def found(ties: _Ties, g: jax.Array) -> jax.Array:
        return jnp.all((ties.need[g] == 0) | (ties.cut[g] >= 0))

    return _fold_chunks(stacks, body, ties, key_dtype, jnp.any(ties.need > 0, axis=1), found)


#: The keys a guessed window (:class:`_Window`) resolves, one per bin: ``base … base + 65023``,
#: ``base = guess − WINDOW_HALF``; ``_SPREAD`` bins below and above it count the keys below and
#: above (:func:`_window_bins`).
_SPREAD = 256
_WINDOW = _BINS - 2 * _SPREAD
WINDOW_HALF = _WINDOW // 2


class _Window(NamedTuple):
    """A pass that finds the whole key of the ``k``-th largest weight at once when it lies near a
    guess (a *warm start*, :func:`leaf_thresholds`): per row and set, bin ``256 + j`` counts the
    keys equal to ``base + j`` (``j < 65024``) and the 256 bins below and above the window the
    keys below and above it, spread by their low bits (:func:`_window_bins`).  ``on`` (traced
    bool) says whether this pass is the window's; ``base_GxS`` (unsigned, like the keys) starts
    each row's windows — ``A``'s and ``B``'s are either the same or ``A``'s lies wholly above
    ``B``'s (:func:`_window_bases`)."""

    on: jax.Array
    base_GxS: jax.Array


def _window_bases(guess_PxS: jax.Array, key_dtype: np.dtype) -> jax.Array:
    """Unsigned ``[P, 2]`` window starts centred on the guessed keys (non-negative, of
    ``key_dtype``): ``A``'s and ``B``'s apart when ``A``'s lies at or above the end of ``B``'s
    (each weight is then counted in one window: ``A``'s takes every key from its base up,
    :func:`_select_sets` counts them above ``B``'s keys), else one window centred between
    the two guesses."""
    guess_PxS = guess_PxS.astype(key_dtype)

    def start(center):
        return jnp.maximum(center - WINDOW_HALF, 0)

    base_a, base_b = start(guess_PxS[:, 0]), start(guess_PxS[:, 1])
    apart = base_a - base_b >= _WINDOW
    shared = start(guess_PxS[:, 1] + (guess_PxS[:, 0] - guess_PxS[:, 1]) // 2)
    base_PxS = jnp.stack([jnp.where(apart, base_a, shared), jnp.where(apart, base_b, shared)], 1)
    return _unsigned(base_PxS)


def _window_bins(key_x: jax.Array, base_a, base_b, valid_x: jax.Array | None) -> jax.Array:
    """int32 bins of the window pass, every weight in one: a key at or above ``A``'s base in
    ``A``'s half, else in ``B``'s; in a half, ``256 + key − base`` inside the window, above it
    ``65280 + key mod 256``, and (``B``'s half) below ``B``'s base ``key mod 256`` — so XLA's
    CPU scatter drops no weight but those not ``valid_x`` (a scatter that drops half its
    entries at random ran 3× slower than one that drops none: each drop is a mispredicted
    branch) and the bins outside the window stay few (one bin: every add waits on the last)."""
    spread = (key_x & (_SPREAD - 1)).astype(jnp.int32)

    def digit(base):  # for keys at or above base
        offset = key_x - base
        return jnp.where(
            offset < _WINDOW, offset.astype(jnp.int32) + _SPREAD, spread + _BINS - _SPREAD
        )

    bins = jnp.where(
        key_x >= base_a, digit(base_a), jnp.where(key_x >= base_b, digit(base_b), spread) + _BINS
    )
    return bins if valid_x is None else jnp.where(valid_x, bins, -1)


def _level_histograms(
    stacks: Sequence[jax.Array],
    at: _Level,
    prefixes_GxS: tuple[jax.Array, ...],
    key_dtype: np.dtype,
    row_rank_G: jax.Array | None,
    hist_Px2B: jax.Array,
    first: int,
    apart: bool = True,
    run_G: jax.Array | None = None,
    window: _Window | None = None,
) -> jax.Array:
    """``hist_Px2B`` (int32 ``[P, 2 · 65536]``, the histograms of every group's slices) plus, in
    rows ``first + g``, per slice ``g`` of these stacks and set ``s`` (``A``, ``B``), how many
    weights whose composite key (:class:`_Fields`) has the digits of ``prefixes_GxS[:, g, s]``
    above the level ``at`` have each digit of that level (one pass over the stacks; on one
    device only over the slices flagged in ``run_G``, when given); with ``apart=False`` all the
    slices' counts go to row ``first`` (global top-k).

    A weight is counted once: in ``A``'s histogram if it matches ``A``'s prefix, else in ``B``'s
    if it matches ``B``'s (two prefixes either agree on the digits above the level — then so do
    their histograms, :func:`_select_sets` — or no key matches both).  ``row_rank_G``
    (uint32) is the row field of each slice (global top-k).  With a ``window`` that is ``on``,
    the bins are the window's (:func:`_window_bins`) instead.  The counts of every device add
    up in a histogram-sized all-reduce."""
    size_G = np.array([math.prod(s.shape[1:]) for s in stacks for _ in range(s.shape[0])])
    no_row = jnp.zeros((), jnp.uint32)

    def count(hist_Gx2B, keys_Lx, start, index_x, valid_x):
        if np.all(size_G == size_G[0]):
            n = int(size_G[0])
        else:  # slices of several sizes share the walk (one device)
            n = _slices_of(jnp.asarray(size_G, jnp.int32), start, keys_Lx)
        rank_x = ((n - 1) - index_x).astype(jnp.uint32)  # larger for lower indices
        row_x = no_row if row_rank_G is None else _slices_of(row_rank_G, start, keys_Lx)
        values = (_unsigned(keys_Lx), row_x, rank_x)
        digit_Lx = _level_digit(values, at)
        a, b = (
            _matches(values, [_slices_of(p[:, s], start, keys_Lx) for p in prefixes_GxS], at)
            for s in (0, 1)
        )
        if valid_x is not None:
            a, b = a & valid_x, b & valid_x
        bins_Lx = jnp.where(a, digit_Lx, jnp.where(b, digit_Lx + _BINS, -1))
        if window is not None:
            base_a, base_b = (_slices_of(window.base_GxS[:, s], start, keys_Lx) for s in (0, 1))
            bins_Lx = jnp.where(
                window.on, _window_bins(values[0], base_a, base_b, valid_x), bins_Lx
            )
        return _add_counts(hist_Gx2B, bins_Lx, first + start if apart else first, apart)

    def body(keys, starts, index_x, hist_Gx2B, valid_x):
        for keys_Lx, start in zip(keys, starts, strict=True):
            hist_Gx2B = count(hist_Gx2B, keys_Lx, start, index_x, valid_x)
        return hist_Gx2B

    return _fold_chunks(stacks, body, hist_Px2B, key_dtype, run_G)


def _select_sets(
    hist_Px2xB: jax.Array, own_PxS: jax.Array, add_a_PxS: jax.Array, k_PxS: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`topkast_jax.selection.select_bucket` of every set's histogram, ``[P, 2]`` each,
    without writing those histograms: set ``s`` of row ``p`` has the counts of half
    ``own[p, s]`` of ``hist_Px2xB`` (0: ``A``'s, 1: ``B``'s) and, where ``add_a[p, s]``, every
    weight ``A``'s half counted lies above all of them.

    A pass counts each weight once (:func:`_level_histograms`): where ``B``'s prefix equals
    ``A``'s, ``B``'s histogram is ``A``'s half; where the window pass's two windows are apart,
    ``B``'s ``k``-th largest key is the ``(k − total_A)``-th of its own half, with ``total_A``
    more above it (a ``k − total_A <= 0`` selects the top bucket, outside the window).  Reading
    the halves in place costs one reduction of ``[P, 2, 65536]`` to row totals and a gather of
    one row of 256 per set, where writing the sets' histograms first cost a pass over
    ``[P, 2, 65536]`` at every level (a tenth of a ResNet-50 selection)."""
    rows = hist_Px2xB.shape[0]
    hist_Px2xRxC = hist_Px2xB.reshape(rows, 2, 256, 256)
    total_Px2xR = hist_Px2xRxC.sum(axis=-1, dtype=jnp.int32)
    ones_R = np.ones(256, np.int32)  # a sum as a product: a library call, not two kernels
    total_a_Px1 = jnp.matmul(total_Px2xR[:, 0], ones_R, preferred_element_type=jnp.int32)[:, None]
    above_a_PxS = jnp.where(add_a_PxS, total_a_Px1, 0)
    total_PxSxR = jnp.where(own_PxS[:, :, None] == 0, total_Px2xR[:, :1], total_Px2xR[:, 1:])

    def row_of(row_S: jax.Array) -> jax.Array:
        row_PxS = row_S.reshape(rows, 2)
        in_halves_PxS = jnp.where(row_PxS >= 0, own_PxS * 256 + row_PxS, -1)
        row_PxSxC = selection.rows_of(hist_Px2xRxC.reshape(rows, 512, 256), in_halves_PxS)
        return row_PxSxC.reshape(rows * 2, 256)

    bucket, above, tied = (
        v.reshape(rows, 2)
        for v in selection.select_bucket_in_rows(
            total_PxSxR.reshape(rows * 2, 256), row_of, (k_PxS - above_a_PxS).reshape(-1)
        )
    )
    return bucket, above + above_a_PxS, tied


def _own_halves(same_P: jax.Array) -> jax.Array:
    """int32 ``[P, 2]``: the half of the pass's histograms each set reads (:func:`_select_sets`):
    ``A`` its own; ``B`` ``A``'s where ``same_P`` (one prefix, or one window), else its own."""
    return jnp.stack([jnp.zeros_like(same_P), same_P == 0], axis=1).astype(jnp.int32)


class _Selected(NamedTuple):
    """The radix select's state after ``level`` levels: per row ``p`` and set ``s``, the digits
    found so far of the ``k``-th largest composite key (one array per field, unsigned, zeros
    below the digits found), how many keys are above them, how many share them, and whether
    the ties at the key straddle the boundary (``#(key == t) ≠ k − #(key > t)``, known after the
    key's digits); ``levels``: how many levels run (the key's, plus the tie fields' — or the
    tie walk's one — when ties straddle some boundary); ``cut``: the tie walk's cuts
    (:class:`_Ties`; −1 where it did not run); ``search``: per row, whether its key's digits
    are still to be found (a row whose guessed windows held both keys skips them).  Level −1
    is the window pass (:class:`_Window`), when there are guesses."""

    level: jax.Array
    levels: jax.Array
    prefixes: tuple[jax.Array, jax.Array, jax.Array]
    above: jax.Array
    tied: jax.Array
    straddles: jax.Array
    cut: jax.Array
    search: jax.Array


#: ``histogram(at, prefixes_PxS, run_P, ties, tie_level, window)``: ``(hist, cut)``, int32
#: ``[P, 2, 65536]`` of :func:`_level_histograms` (rows with ``run_P`` False may be left zero:
#: their result is unused; the window's bins when ``window`` is on) and, with ``ties``
#: (:class:`_Ties` over all rows), the tie walk's cuts where ``tie_level`` (else ``None``).
LevelHistogram = Callable[
    [_Level, tuple[jax.Array, ...], jax.Array, _Ties | None, jax.Array, _Window | None],
    tuple[jax.Array, jax.Array | None],
]


def _radix_select(
    histogram: LevelHistogram,
    k_PxS: jax.Array,
    fields: _Fields,
    key_dtype: np.dtype,
    tie_rows_P: np.ndarray | None = None,
    guess_PxS: jax.Array | None = None,
) -> _Selected:
    """Per row and set, the ``k``-th largest composite key, one 16-bit digit per level, in one
    ``while_loop`` whose body (one histogram pass and one bucket select) serves every level.

    The key's digits always run; the row and index fields only when some row's ties straddle
    its boundary (``#(key == t) ≠ k − #(key > t)``), and then only those rows need their
    histograms (``run_P``).  Rows flagged in ``tie_rows_P`` (per-leaf selection on one device,
    slices of at least ``TIE_WALK_MIN`` weights) take the tie walk of :func:`_count_ties`
    instead, at the first level after the key's: one pass where the index digits take two
    (ties straddle 9 of the 12 boundaries of the four 4096 × 4096 float32 kernels of
    ``scripts/benchmark_step.py``), and no histogram at any later level.

    With ``guess_PxS`` (int32 keys only), a first pass (level −1) histograms a window of 65,024
    keys centred on each guess (:class:`_Window`); a row whose ``k``-th keys of both sets lie
    inside their windows has its whole key then, and only the other rows search the key's
    digits — one histogram pass instead of two when the guesses are close (a refresh guessing
    from the last ones, :func:`leaf_thresholds`)."""
    rows = k_PxS.shape[0]
    tie_walk = tie_rows_P is not None and bool(np.any(tie_rows_P))
    straddled_levels = fields.key + max(fields.row + fields.index, int(tie_walk))
    tables = _level_tables(fields, key_dtype, straddled_levels)
    guessed = guess_PxS is not None and fields.key == 2  # a window spans 16 bits of an int32 key
    base_PxS = _window_bases(guess_PxS, key_dtype) if guessed else None

    def levels_after_key(straddles_PxS: jax.Array) -> jax.Array:
        """How many levels run once every key is found: the tie levels too if a tie straddles."""
        return jnp.where(jnp.any(straddles_PxS), straddled_levels, fields.key)

    def after_window(c: _Selected, bucket_PxS, above_PxS, tied_PxS) -> _Selected:
        """The state after the window pass: rows whose windows held both keys have them."""
        # Inside the window iff the bucket is: a k-th key below it lands in B's bins below the
        # window, or (A's half, or one shared window: no such bins) past every count, where
        # select_bucket returns a negative bucket.
        bucket_PxS = bucket_PxS - _SPREAD
        inside_PxS = (bucket_PxS >= 0) & (bucket_PxS < _WINDOW)
        found_Px1 = jnp.all(inside_PxS, axis=1, keepdims=True)
        key_PxS = base_PxS + bucket_PxS.astype(base_PxS.dtype)
        prefixes = (jnp.where(found_Px1, key_PxS, 0), *c.prefixes[1:])
        above_PxS, tied_PxS = (jnp.where(found_Px1, v, 0) for v in (above_PxS, tied_PxS))
        straddles_PxS = found_Px1 & (tied_PxS != k_PxS - above_PxS)
        search_P = ~found_Px1[:, 0]
        done = ~jnp.any(search_P)
        return c._replace(
            level=jnp.where(done, fields.key, 0),
            levels=jnp.where(done, levels_after_key(straddles_PxS), fields.key),
            prefixes=prefixes,
            above=above_PxS,
            tied=tied_PxS,
            straddles=straddles_PxS,
            search=search_P,
        )

    def after_digit(c: _Selected, at: _Level, run_P, bucket_PxS, above_PxS, tied_PxS):
        """The state after one digit's pass (rows with ``run_P`` take the digit)."""
        run_Px1 = run_P[:, None]
        prefixes = tuple(
            p
            if shift is None
            else jnp.where(
                run_Px1, p | (lax.shift_left(bucket_PxS.astype(p.dtype), shift) * holds), p
            )
            for p, shift, holds in zip(c.prefixes, at.shift, at.holds, strict=True)
        )
        # (Past the key's digits a tie row's counts are unused: its cut comes from the walk.)
        above_PxS = jnp.where(run_Px1, c.above + above_PxS, c.above)
        tied_PxS = jnp.where(run_Px1, tied_PxS, c.tied)
        last_key_digit = c.level == fields.key - 1
        straddles_PxS = jnp.where(
            last_key_digit & run_Px1, tied_PxS != k_PxS - above_PxS, c.straddles
        )
        levels = jnp.where(last_key_digit, levels_after_key(straddles_PxS), c.levels)
        return c._replace(
            level=c.level + 1,
            levels=levels,
            prefixes=prefixes,
            above=above_PxS,
            tied=tied_PxS,
            straddles=straddles_PxS,
        )

    def body(c: _Selected) -> _Selected:
        at = _at_level(tables, jnp.maximum(c.level, 0))
        straddle_P = jnp.any(c.straddles, axis=1)
        tie_level = c.level == fields.key
        if tie_walk:  # tie rows walk their ties at the tie level only
            straddle_P = straddle_P & (tie_level | ~jnp.asarray(tie_rows_P))
        run_P = jnp.where(c.level < fields.key, c.search, straddle_P)
        ties = None
        if tie_walk:
            key_PxS = lax.bitcast_convert_type(c.prefixes[0], key_dtype)
            need_PxS = jnp.where(c.straddles, k_PxS - c.above, 0)
            ties = _Ties(key_PxS, need_PxS, jnp.zeros_like(need_PxS), c.cut)
        window = None if base_PxS is None else _Window(c.level < 0, base_PxS)
        hist, cut_PxS = histogram(at, c.prefixes, run_P, ties, tie_level, window)
        c = c if cut_PxS is None else c._replace(cut=cut_PxS)
        k_left_PxS = k_PxS - c.above  # the window's rows start with nothing above
        same_P = jnp.ones(rows, bool)
        for p in c.prefixes:
            same_P = same_P & (p[:, 0] == p[:, 1])
        if window is not None:  # one bucket select for both kinds of pass
            same_window_P = base_PxS[:, 0] == base_PxS[:, 1]
            same_P = jnp.where(window.on, same_window_P, same_P)
        own_PxS = _own_halves(same_P)
        # the window pass's apart windows: A's keys all lie above B's
        add_a_PxS = (own_PxS == 1) & (False if window is None else window.on)
        found = _select_sets(hist, own_PxS, add_a_PxS, k_left_PxS)
        digit = after_digit(c, at, run_P, *found)
        if window is None:
            return digit
        return jax.tree.map(lambda w, d: jnp.where(window.on, w, d), after_window(c, *found), digit)

    zeros = jnp.zeros((rows, 2), jnp.int32)
    init = _Selected(
        jnp.full((), -1 if guessed else 0, jnp.int32),
        jnp.full((), fields.key, jnp.int32),
        tuple(jnp.zeros((rows, 2), d) for d in _field_dtypes(key_dtype)),
        zeros,
        zeros,
        jnp.zeros((rows, 2), bool),
        jnp.full((rows, 2), -1, jnp.int32),
        jnp.ones(rows, bool),
    )
    return lax.while_loop(lambda c: c.level < c.levels, body, init)


def _by_walk(stacks: Sequence[jax.Array]) -> list[list[int]]:
    """Indices of the stacks walked together (one loop per pass).  On one device: the same row
    length, the same :func:`_chunk_rows` and the same way of resolving ties
    (:func:`_walks_ties`) — slices of several sizes share a loop (ResNet-50's 54 kernels, 15
    sizes, take 6 loops).  Sharded: the same slice shape and the same :func:`_walk`; on an
    auto-axis mesh every stack alone (XLA would lay out the group's one index like one of its
    stacks and move it for the others)."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(stacks):
        if _one_device(s):
            key: tuple = ("rows", s.shape[2], _chunk_rows(s), _walks_ties(s))
        else:
            key = (tuple(s.shape[1:]), _walk(s), *((i,) if _layout_unknown(s) else ()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _group_histograms(
    groups: Sequence[Sequence[jax.Array]],
    key_dtype: np.dtype,
    row_ranks: Sequence[jax.Array | None],
    tie_groups: Sequence[bool] | None = None,
) -> Callable[..., tuple[jax.Array, jax.Array | None]]:
    """``histograms(at, prefixes, run, shared, ties=None, tie_level=None, window=None)``:
    ``(hist, cut)``.

    ``hist``: int32 ``[P, 2, 65536]``, every group's :func:`_level_histograms` in one buffer (no
    copy per group), the prefixes ``[P, 2]`` over the groups' rows in order, with ``run``
    ``[P]`` (a group none of whose rows run is not walked: its histograms are zero); or
    ``[1, 2, 65536]`` summed over every group, the prefixes one ``[1, 2]`` for all (``shared``,
    global top-k: every group walked).  ``cut``: with ``ties`` (:class:`_Ties` ``[P, 2]``), its
    cuts after the tie walk (:func:`_tie_walk`) of the groups flagged in ``tie_groups`` where
    ``tie_level`` (those groups histogram nothing at that level); else ``None``.  ``window``
    (:class:`_Window`, bases ``[P, 2]``, or one ``[1, 2]`` when ``shared``) goes to every
    group's pass."""
    tie_groups = list(tie_groups) if tie_groups is not None else [False] * len(groups)

    def histograms(at, prefixes, run, shared, ties=None, tie_level=None, window=None):
        total = sum(_rows(group) for group in groups)
        hist = jnp.zeros((1 if shared else total, 2 * _BINS), jnp.int32)
        cut = None if ties is None else ties.cut
        start = 0
        for group, row_rank, tie_group in zip(groups, row_ranks, tie_groups, strict=True):
            rows = _rows(group)
            span = slice(start, start + rows)

            def of_group(per_row, rows=rows, span=span):  # this group's rows of a [P, 2] value
                return jnp.broadcast_to(per_row, (rows, 2)) if shared else per_row[span]

            mine = tuple(of_group(p) for p in prefixes)
            mine_window = None
            if window is not None:
                mine_window = window._replace(base_GxS=of_group(window.base_GxS))
            if shared:
                hist = _level_histograms(
                    group, at, mine, key_dtype, row_rank, hist, 0, False, window=mine_window
                )
            else:

                def walk(h, g=group, m=mine, r=row_rank, f=start, run_G=run[span], w=mine_window):
                    return _level_histograms(g, at, m, key_dtype, r, h, f, run_G=run_G, window=w)

                runs = jnp.any(run[span])
                if ties is not None and tie_group:
                    mine_ties = _Ties(*(v[span] for v in ties))
                    hist, group_cut = lax.switch(
                        jnp.where(runs, jnp.where(tie_level, 2, 1), 0),
                        [
                            lambda h, t: (h, t.cut),
                            lambda h, t, walk=walk: (walk(h), t.cut),
                            lambda h, t, g=group: (h, _tie_walk(g, t, key_dtype).cut),
                        ],
                        hist,
                        mine_ties,
                    )
                    cut = cut.at[span].set(group_cut)
                else:
                    hist = lax.cond(runs, walk, lambda h: h, hist)
            start += rows
        return hist.reshape(-1, 2, _BINS), cut

    return histograms


def _guess_rows(
    guess_RxS: jax.Array, stacks: Sequence[jax.Array], order: Sequence[int]
) -> jax.Array:
    """``[P, 2]``: the guessed keys ``guess_RxS`` (the slices of every leaf, in leaf order) in
    the selection's row order (the leaves of each walk group together, ``order``)."""
    first = np.cumsum([0] + [s.shape[0] for s in stacks])
    rows = np.concatenate([np.arange(first[i], first[i + 1]) for i in order])
    if tuple(guess_RxS.shape) != (int(first[-1]), 2):
        raise ValueError(
            f"guess must have shape ({int(first[-1])}, 2) — two keys per slice of every leaf, in "
            f"leaf order — got {tuple(guess_RxS.shape)}."
        )
    return guess_RxS if np.array_equal(rows, np.arange(rows.size)) else guess_RxS[rows]


def leaf_thresholds(
    xs: Sequence[jax.Array],
    k_forward: Sequence[int],
    k_backward: Sequence[int],
    axes: Sequence[int | None] | None = None,
    guess: jax.Array | None = None,
) -> list[SetThresholds]:
    """Per-leaf :class:`SetThresholds` for any leaves, all selected in one radix select.

    ``k_forward[i]``, ``k_backward[i]`` are per slice of leaf ``i`` (its layer axis ``axes[i]``,
    ``None`` for a whole leaf): ``1 <= k_forward[i] <= k_backward[i] <= slice size``.  Slices
    walked alike share a chunk loop (:func:`_by_walk`); one loop over the digits serves every
    pass.  No leaves (``sparsify`` selected none): no thresholds.

    ``guess`` (optional, int ``[R, 2]``: the keys of ``A`` and ``B`` of every slice of every
    leaf, leaves in order — a leaf without a layer axis is one slice) are keys the thresholds
    are expected near, e.g. extrapolated from the last selections (a *warm start*,
    :mod:`topkast_jax.warm_start`): with int32 keys a first pass looks for each ``k``-th largest
    key within ``±WINDOW_HALF`` of its guess and only the rows it misses search the key's
    digits, so a refresh whose thresholds moved by less than that costs one histogram pass
    instead of two.  The result does not depend on the guesses.
    """
    if not xs:
        return []
    axes = list(axes) if axes is not None else [None] * len(xs)
    stacks = [stack_view(x, a) for x, a in zip(xs, axes, strict=True)]
    groups = _by_walk(stacks)
    order = [i for members in groups for i in members]  # the rows' leaf order
    k_PxS = jnp.array(
        [(k_forward[i], k_backward[i]) for i in order for _ in range(stacks[i].shape[0])],
        jnp.int32,
    )
    size_P = np.array(
        [math.prod(stacks[i].shape[1:]) for i in order for _ in range(stacks[i].shape[0])],
        np.int32,
    )
    key_dtype = _key_dtype(stacks)
    tie_groups = [_walks_ties(stacks[m[0]]) for m in groups]
    tie_rows_P = np.array(
        [
            t
            for m, t in zip(groups, tie_groups, strict=True)
            for i in m
            for _ in range(stacks[i].shape[0])
        ],
        bool,
    )
    digit_sizes = size_P[~tie_rows_P]  # slices whose ties take the index digits
    index_digits = _digits_for(int(digit_sizes.max())) if digit_sizes.size else 0
    fields = _Fields(selection.key_digits(key_dtype), 0, index_digits)
    histograms = _group_histograms(
        [[stacks[i] for i in m] for m in groups], key_dtype, [None] * len(groups), tie_groups
    )
    selected = _radix_select(
        lambda at, prefixes, run, ties, tie_level, window: histograms(
            at, prefixes, run, False, ties, tie_level, window
        ),
        k_PxS,
        fields,
        key_dtype,
        tie_rows_P,
        None if guess is None else _guess_rows(jnp.asarray(guess), stacks, order),
    )
    key_PxS = lax.bitcast_convert_type(selected.prefixes[0], key_dtype)
    size_Px1 = jnp.asarray(size_P)[:, None]
    past_index = size_Px1 - selected.prefixes[2].astype(jnp.int32)  # just past the k-th's index
    ties = jnp.where(jnp.asarray(tie_rows_P)[:, None], selected.cut, past_index)
    cut_PxS = jnp.where(selected.straddles, ties, size_Px1)
    out: list[SetThresholds | None] = [None] * len(xs)
    start = 0
    for i in order:
        rows = slice(start, start + stacks[i].shape[0])
        start = rows.stop
        whole = axes[i] is None  # one row: thresholds [2]
        key, cut = key_PxS[rows], cut_PxS[rows]
        out[i] = SetThresholds(key[0], cut[0]) if whole else SetThresholds(key, cut)
    return out


def leaf_keys(thresholds: Sequence[SetThresholds]) -> jax.Array:
    """``[R, 2]``: the keys of ``A`` and ``B`` of every slice of :func:`leaf_thresholds`'
    result, leaves in order (the layout of its ``guess``)."""
    if not thresholds:
        return jnp.zeros((0, 2), jnp.int32)
    return jnp.concatenate([jnp.reshape(t.key, (-1, 2)) for t in thresholds])


def global_thresholds(
    xs: Sequence[jax.Array],
    k_forward: int,
    k_backward: int,
    axes: Sequence[int | None] | None = None,
    guess: jax.Array | None = None,
) -> list[SetThresholds]:
    """One pair of thresholds over all leaves (global top-k): the keys are shared, the cuts are
    per slice — ties are kept in leaf order, then slice order (along the layer axis ``axes[i]``),
    then row-major order inside a slice (the row field of :class:`_Fields`).  ``guess`` (``[2]``,
    or ``[1, 2]``, optional): the keys expected, as in :func:`leaf_thresholds`."""
    axes = list(axes) if axes is not None else [None] * len(xs)
    stacks = [stack_view(x, a) for x, a in zip(xs, axes, strict=True)]
    key_dtype = _key_dtype(stacks)  # one key for all leaves: float64 bits when one is float64
    first = np.cumsum([0] + [s.shape[0] for s in stacks])  # each stack's first global row
    total = int(first[-1])
    rank_R = (total - 1) - np.arange(total)  # larger for earlier slices
    groups = _by_walk(stacks)
    row_ranks = [
        jnp.asarray(np.concatenate([rank_R[first[i] : first[i + 1]] for i in m]), jnp.uint32)
        for m in groups
    ]
    size_R = np.concatenate([np.full(s.shape[0], math.prod(s.shape[1:]), np.int32) for s in stacks])
    fields = _Fields(
        selection.key_digits(key_dtype), _digits_for(total), _digits_for(int(size_R.max()))
    )
    histograms = _group_histograms([[stacks[i] for i in m] for m in groups], key_dtype, row_ranks)

    k_1xS = jnp.array([[k_forward, k_backward]], jnp.int32)
    selected = _radix_select(
        lambda at, prefixes, run, ties, tie_level, window: histograms(
            at, prefixes, run, True, window=window
        ),
        k_1xS,
        fields,
        key_dtype,
        guess_PxS=None if guess is None else jnp.reshape(guess, (1, 2)),
    )
    key_S = lax.bitcast_convert_type(selected.prefixes[0][0], key_dtype)
    row_S, index_S = (p[0].astype(jnp.int32) for p in selected.prefixes[1:])
    rank_Rx1 = jnp.asarray(rank_R, row_S.dtype)[:, None]
    size_Rx1 = jnp.asarray(size_R)[:, None]
    at_cut = jnp.where(rank_Rx1 == row_S, size_Rx1 - index_S, 0)
    cut_RxS = jnp.where((selected.levels == fields.key) | (rank_Rx1 > row_S), size_Rx1, at_cut)
    out = []
    for s, axis, start in zip(stacks, axes, first, strict=False):
        cut = cut_RxS[start : start + s.shape[0]]
        out.append(SetThresholds(key_S, cut if axis is not None else cut[0]))
    return out


def flat_index(shape: tuple[int, ...], skip: int | None = None) -> jax.Array:
    """int32 row-major flat index of every position of ``shape`` (fuses into its consumer); with
    ``skip``, the index inside the slice along that axis (the axis itself does not count)."""
    index = jnp.zeros(shape, jnp.int32)
    stride = 1
    for axis in reversed(range(len(shape))):
        if axis == skip:
            continue
        index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return index


def _along(value: jax.Array, axis: int | None, ndim: int) -> jax.Array:
    """A per-slice ``[L]`` value shaped to broadcast along ``axis`` of a rank-``ndim`` leaf
    (a scalar as it is)."""
    if value.ndim == 0:
        return value
    return value.reshape([-1 if d == axis else 1 for d in range(ndim)])


def in_set(keys: jax.Array, key: jax.Array, cut: jax.Array, axis: int | None = None) -> jax.Array:
    """``key_i > t or (key_i == t and i < cut)`` for keys shaped like the leaf; with a layer
    ``axis``, ``t`` and ``cut`` may be per slice (``[L]``) and ``i`` is the index in the slice."""
    key, cut = _along(key, axis, keys.ndim), _along(cut, axis, keys.ndim)
    return (keys > key) | ((keys == key) & (flat_index(keys.shape, axis) < cut))


def codes_from_thresholds(x: jax.Array, th: SetThresholds, axis: int | None = None) -> jax.Array:
    """uint8 codes ``2·A + B`` of ``θ + u`` (leaf shape) from its thresholds (per slice along
    the layer ``axis``, if it has one), the keys of ``x`` of the thresholds' key dtype."""
    keys = selection.elementwise_magnitude_keys(x, th.key.dtype)
    forward = in_set(keys, th.key[..., 0], th.cut[..., 0], axis)
    backward = in_set(keys, th.key[..., 1], th.cut[..., 1], axis)
    return codes_lib.encode(forward, backward)
