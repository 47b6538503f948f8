"""Exact ``A`` and ``B`` of every leaf in a few streaming passes, with no leaf-sized temporaries.

The selection of :mod:`topkast_jax.selection` materialises int32 keys, bin indices and a
ones-vector for every weight (three leaf-sized buffers) because XLA's scatter does not fuse with
its producers.  Here every pass walks a leaf in chunks of ``CHUNK`` weights inside a
``lax.fori_loop``, so the only temporaries are one chunk and the histograms, and each pass reads
the leaf once:

1. histogram of the high 16 bits of the keys of ``|θ|`` (one for all of ``A`` and ``B``);
2. the two histograms of the next 16 bits inside the buckets of the ``k_A``-th and ``k_B``-th
   largest key (int32 keys; float64 leaves have int64 keys of their own bits,
   :func:`topkast_jax.selection.elementwise_magnitude_keys`, and take two more such passes);
3. only when ties straddle a boundary (rare for trained weights): the flat index just past the
   last tie that is kept — the ``needed``-th smallest index among the tied weights, selected by
   the same two 16-bit histograms over the index (two passes), so no pass depends on the order
   in which chunks are visited.

A leaf with a layer axis (scan-stacked layers, :mod:`topkast_jax.layers`) is ``L`` slices, each
selected as a leaf of its own: the walk reads the leaf as a *stack* ``(L, *slice)`` (the layer axis
moved first; a leaf without one is a stack of one slice) and every slice is a *row* of the
histograms.  Slices of equal shape — of one leaf or of several — are walked together (one loop per
pass for the group, the histograms as rows of one scatter), so the compiled program grows with the
number of distinct slice shapes, and no slice is copied out of its leaf (a layer axis other than
0 is moved first, which XLA may copy).  The temporaries are per slice: three int32 histograms of
65,536 bins (768 KiB) and one chunk of ``CHUNK`` keys — e.g. 10 MiB for a ``(8, 512, 256)`` stack
selected per layer, 1.75 MiB for it as one leaf (``jit(...).compile().memory_analysis()``, CPU).

Sharded leaves are selected per shard: a chunk never cuts across a device (:func:`_walk`) — runs
of leading rows of the slice when its first axis is whole on every device, else strided rows
``j, j + c, j + 2c, …`` whose split ``(rows, c)`` of the first axis keeps its sharding on
``rows`` — so each device histograms its own weights and the only collectives the selection adds
are all-reduces of the histograms (int32 ``[rows, 65536]``) and of per-slice counts.  The sets are
written elementwise in the leaf's layout.  On an auto-axis mesh the layout is not known while
tracing, so the walk assumes the first axis may be sharded over any divisor of the device count.

The result per row is two thresholds ``(t, cut)``: weight ``i`` (row-major index inside its slice)
is in the set iff ``key_i > t`` or (``key_i == t`` and ``i < cut``) — the stable-argsort order
exactly (ties to the lower index).  :func:`codes_from_thresholds` turns them into 2-bit codes in
one elementwise pass over ``θ`` that keeps the leaf's shape (and sharding).

Global top-k (one threshold over all sparse leaves, ties by leaf order, then slice order, then
index) sums the per-row histograms and splits the tie budget over the rows in order.
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

CHUNK = 1 << 16
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


Body = Callable[[Sequence[jax.Array], jax.Array, object], object]


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


def stack_view(x: jax.Array, axis: int | None) -> jax.Array:
    """The leaf as it is walked, ``(L, *slice)``: ``x[None]`` without a layer axis, else the layer
    axis moved first (free for axis 0); ``(L, 1)`` for scalar slices.  Chunks never cross a
    device boundary (:func:`_walk`), so every chunk keeps the leaf's sharding."""
    stack = jnp.expand_dims(x, 0) if axis is None else jnp.moveaxis(x, axis, 0)
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
    stacks: Sequence[jax.Array], body: Body, init: object, key_dtype: np.dtype | None = None
) -> object:
    """``carry ← body(parts, index_C…, carry)`` over the ``R`` slices of stacks walked alike
    (:func:`_by_walk`), by the chunks of :func:`_walk`: runs of whole leading rows of the slice,
    or strided sets of them, so a chunk keeps the leaf's sharding on every axis.

    ``parts[i]`` are the magnitude keys of stack ``i``'s chunk (its slices first, the rows of
    :func:`_row_ranges`), of ``key_dtype`` (default: :func:`_key_dtype` of the stacks: int64 when
    one is float64); stacks are not concatenated, as their layouts may differ.  Chunks run
    in one ``fori_loop`` for the whole group (dynamic slices, no copy); a run's remaining rows
    form one last, shorter chunk.  ``index`` is the row-major flat index inside the slice of each
    position of the chunk (broadcasts against every part).
    """
    shape = stacks[0].shape[1:]
    row_size = max(1, math.prod(shape[1:]))
    walk = _walk(stacks[0])

    key_dtype = _key_dtype(stacks) if key_dtype is None else key_dtype

    def keys_of(parts):
        return [selection.elementwise_magnitude_keys(p, key_dtype) for p in parts]

    if walk.strided:  # chunk j: rows j, j + c, j + 2c, … of the slice
        views = [sharding.split_axis(s, 1, walk.rows) for s in stacks]
        shape_C = (walk.rows, 1, *shape[1:])
        row_C = lax.broadcasted_iota(jnp.int32, shape_C, 0) * walk.chunks

        def strided(j, carry):
            keys = keys_of([lax.dynamic_slice_in_dim(v, j, 1, axis=2) for v in views])
            return body(keys, (row_C + j) * row_size + flat_index(shape_C, skip=0), carry)

        return lax.fori_loop(0, walk.chunks, strided, init)

    def chunk(start, length):
        keys = keys_of([lax.dynamic_slice_in_dim(s, start, length, axis=1) for s in stacks])
        return keys, start * row_size + flat_index((length, *shape[1:]))

    def step(r, carry):
        return body(*chunk(r * walk.rows, walk.rows), carry)

    full = shape[0] // walk.rows
    carry = lax.fori_loop(0, full, step, init) if full > 1 else step(0, init)
    if shape[0] > full * walk.rows:
        carry = body(*chunk(full * walk.rows, shape[0] - full * walk.rows), carry)
    return carry


def _add_counts(hist_GxB: jax.Array, bins_Lx: jax.Array, first: int = 0) -> jax.Array:
    """``hist[first + l, b] += #(bins[l] == b)`` (``bins`` of any shape after ``L``); bins
    outside ``[0, B)`` are dropped."""
    rows, num_bins = hist_GxB.shape
    valid = (bins_Lx >= 0) & (bins_Lx < num_bins)
    row_start = ((first + jnp.arange(bins_Lx.shape[0], dtype=jnp.int32)) * num_bins).reshape(
        (bins_Lx.shape[0],) + (1,) * (bins_Lx.ndim - 1)
    )
    # Invalid entries go past the end (a negative index would wrap around).
    flat = jnp.where(valid, row_start + bins_Lx, rows * num_bins)
    counts = (
        hist_GxB.reshape(-1)
        .at[flat]
        .add(jnp.ones((), jnp.int32), mode="drop", out_sharding=sharding.replicated_like(flat))
    )
    return counts.reshape(rows, num_bins)


#: ``digits(keys_Lx, index_x, rows)``: per set, the 16-bit digit of every key of the slices
#: ``rows`` of the group (``-1``: not counted).
Digits = Callable[[jax.Array, jax.Array, slice], Sequence[jax.Array]]


def _key_dtype(stacks: Sequence[jax.Array]) -> np.dtype:
    """The key dtype of stacks selected together (:func:`topkast_jax.selection.key_dtype`)."""
    return selection.key_dtype(s.dtype for s in stacks)


def _histograms(
    stacks: Sequence[jax.Array], digits: Digits, sets: int, key_dtype: np.dtype
) -> jax.Array:
    """int32 ``[G, S, 65536]``: per slice ``g`` and ``s < sets``, how many positions have each
    digit of ``digits`` of the ``key_dtype`` keys (one pass).  The counts of every device add up
    in a histogram-sized all-reduce."""
    ranges = _row_ranges(stacks)

    def body(keys, index_x, hist_SxGxB):
        hists = list(hist_SxGxB)
        for keys_Lx, rows in zip(keys, ranges, strict=True):
            for s, digit_Lx in enumerate(digits(keys_Lx, index_x, rows)):
                hists[s] = _add_counts(hists[s], digit_Lx, rows.start)
        return jnp.stack(hists)

    init = jnp.zeros((sets, _rows(stacks), _BINS), jnp.int32)
    hist_SxGxB = _fold_chunks(stacks, body, init, key_dtype)
    return jnp.swapaxes(hist_SxGxB, 0, 1)


def high_histograms(stacks: Sequence[jax.Array], key_dtype: np.dtype) -> jax.Array:
    """int32 ``[R, 65536]``: per slice, how many keys have each high 16-bit digit (pass 1)."""
    return digit_histograms(stacks, 0, None, key_dtype)[:, 0]


def _per_leaf(value_L: jax.Array, like_Lx: jax.Array) -> jax.Array:
    """``value_L`` shaped to broadcast against ``like_Lx``."""
    return value_L.reshape((value_L.shape[0],) + (1,) * (like_Lx.ndim - 1))


def digit_histograms(
    stacks: Sequence[jax.Array], level: int, prefix_GxS: jax.Array | None, key_dtype: np.dtype
) -> jax.Array:
    """int32 ``[G, S, 65536]``: per slice ``g`` (of ``G = R``) and set ``s``, the histogram of
    digit ``level`` (:func:`topkast_jax.selection.key_digit`) of the keys whose digits above it
    equal those of ``prefix_GxS[g, s]`` (pass ``level + 1``; ``None``: every key, one set)."""

    def digits(keys_Lx, _, rows):
        digit_Lx = selection.key_digit(keys_Lx, level)
        if prefix_GxS is None:
            return [digit_Lx]
        prefix_LxS = prefix_GxS[rows]
        return [
            jnp.where(
                selection.same_leading_digits(keys_Lx, _per_leaf(prefix_LxS[:, s], keys_Lx), level),
                digit_Lx,
                -1,
            )
            for s in range(prefix_LxS.shape[1])
        ]

    sets = 1 if prefix_GxS is None else prefix_GxS.shape[1]
    return _histograms(stacks, digits, sets, key_dtype)


def tie_counts(stacks: Sequence[jax.Array], key_GxS: jax.Array) -> jax.Array:
    """int32 ``[G, S]``: per slice and set, how many entries have the key ``key_GxS[g, s]``."""
    ranges = _row_ranges(stacks)

    def count(keys_Lx, rows):
        axes = tuple(range(1, keys_Lx.ndim))
        return jnp.stack(
            [
                jnp.sum(keys_Lx == _per_leaf(key_GxS[rows, s], keys_Lx), axis=axes, dtype=jnp.int32)
                for s in range(key_GxS.shape[1])
            ],
            axis=1,
        )

    def body(keys, _, count_GxS):
        return count_GxS + jnp.concatenate(
            [count(k, rows) for k, rows in zip(keys, ranges, strict=True)]
        )

    return _fold_chunks(stacks, body, jnp.zeros(key_GxS.shape, jnp.int32), key_GxS.dtype)


def _tie_cuts_in_order(
    stacks: Sequence[jax.Array], key_GxS: jax.Array, needed_GxS: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """:func:`tie_cuts` of stacks walked in runs of rows (row-major order) on one device: a
    running count of the tied entries, chunk after chunk (one pass)."""

    def body(keys, index_x, carry):
        seen_GxS, cut_GxS = carry
        keys_GxC = jnp.concatenate([k.reshape(k.shape[0], -1) for k in keys])
        index_C = jnp.broadcast_to(index_x, keys[0].shape[1:]).reshape(-1)
        tied_GxSxC = keys_GxC[:, None, :] == key_GxS[:, :, None]
        running = seen_GxS[:, :, None] + jnp.cumsum(tied_GxSxC, axis=-1, dtype=jnp.int32)
        hit = tied_GxSxC & (running == needed_GxS[:, :, None])
        found = jnp.max(jnp.where(hit, index_C + 1, 0), axis=-1)
        return running[:, :, -1], jnp.where(jnp.any(hit, axis=-1), found, cut_GxS)

    n = math.prod(stacks[0].shape[1:])
    init = (jnp.zeros(key_GxS.shape, jnp.int32), jnp.full(key_GxS.shape, n, jnp.int32))
    seen_GxS, cut_GxS = _fold_chunks(stacks, body, init, key_GxS.dtype)
    return jnp.where(needed_GxS <= 0, 0, cut_GxS), seen_GxS


def tie_cuts(
    stacks: Sequence[jax.Array], key_GxS: jax.Array, needed_GxS: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per slice and set: the flat index just past the ``needed``-th entry whose key is ``key``
    (0 when ``needed <= 0``; the slice size when there are fewer), and how many such entries the
    slice has (pass 3; only run when ties straddle a boundary).

    Unsharded stacks on one device are walked in row-major order, and a running count finds the
    entry in one pass (:func:`_tie_cuts_in_order`).  Otherwise (chunks strided, or split across
    devices) the ``needed``-th smallest row-major index ``i`` of the tied entries is the
    ``needed``-th largest ``n - 1 - i``, selected digit by digit like a key (two histogram
    passes, :func:`topkast_jax.selection.radix_kth`), whatever the order of the chunks and
    wherever they are.
    """
    if sharding.explicit_sharding(stacks[0]) is None and _devices() == 1:
        return _tie_cuts_in_order(stacks, key_GxS, needed_GxS)
    if len(stacks) > 1 and _layout_unknown(stacks[0]):
        # XLA would lay out the one index of the group like one of its stacks, and move it for
        # the others (auto axes may shard stacks of one shape differently): one stack at a time.
        cuts = [
            tie_cuts([stack], key_GxS[rows], needed_GxS[rows])
            for stack, rows in zip(stacks, _row_ranges(stacks), strict=True)
        ]
        return tuple(jnp.concatenate(parts) for parts in zip(*cuts, strict=True))
    n = math.prod(stacks[0].shape[1:])
    rows, sets = key_GxS.shape

    def digits_of(level: int, prefix_GxS: jax.Array) -> Digits:
        def digits(keys_Lx, index_x, rows):
            rank_x = (n - 1) - index_x  # larger for lower indices
            digit_x = selection.key_digit(rank_x, level)
            out = []
            for s in range(sets):
                tied = keys_Lx == _per_leaf(key_GxS[rows, s], keys_Lx)
                prefix = _per_leaf(prefix_GxS[rows, s], keys_Lx)
                tied = tied & selection.same_leading_digits(rank_x, prefix, level)
                out.append(jnp.where(tied, digit_x, -1))
            return out

        return digits

    def histogram(level: int, prefix_R: jax.Array) -> jax.Array:
        digits = digits_of(level, prefix_R.reshape(rows, sets))
        return _histograms(stacks, digits, sets, key_GxS.dtype).reshape(rows * sets, _BINS)

    high_RxB = histogram(0, jnp.zeros(rows * sets, jnp.int32))
    count_GxS = jnp.sum(high_RxB, axis=-1, dtype=jnp.int32).reshape(rows, sets)
    kth = selection.radix_kth(
        lambda level, prefix_R: high_RxB if level == 0 else histogram(level, prefix_R),
        jnp.maximum(needed_GxS, 1).reshape(-1),
        jnp.int32,
    )
    cut_GxS = n - kth.key.reshape(rows, sets)  # (n - 1 - rank) + 1
    cut_GxS = jnp.where(needed_GxS > count_GxS, n, cut_GxS)
    return jnp.where(needed_GxS <= 0, 0, cut_GxS), count_GxS


def group_thresholds(
    stacks: Sequence[jax.Array], k_forward: Sequence[int], k_backward: Sequence[int]
) -> SetThresholds:
    """:class:`SetThresholds` ``[R, 2]`` of ``A`` (top ``k_forward[r]``) and ``B`` (top
    ``k_backward[r]``) of ``|θ|`` for the ``R`` slices of stacks of one slice shape, selected
    together (one loop per pass for the group)."""
    rows = _rows(stacks)
    k_GxS = jnp.array(list(zip(k_forward, k_backward, strict=True)), jnp.int32)
    key_dtype = _key_dtype(stacks)
    high_RxB = jnp.repeat(high_histograms(stacks, key_dtype), 2, axis=0)  # one pass for A and B

    def histogram(level: int, prefix_R: jax.Array) -> jax.Array:
        if level == 0:
            return high_RxB
        prefix_GxS = prefix_R.reshape(rows, 2)
        return digit_histograms(stacks, level, prefix_GxS, key_dtype).reshape(2 * rows, _BINS)

    kth = selection.radix_kth(histogram, k_GxS.reshape(-1), key_dtype)
    key_GxS = kth.key.reshape(rows, 2)
    needed_GxS = k_GxS - kth.above.reshape(rows, 2)
    straddles = jnp.any(kth.tied.reshape(rows, 2) != needed_GxS)
    size = math.prod(stacks[0].shape[1:])
    cut_GxS = lax.cond(
        straddles,
        lambda: tie_cuts(stacks, key_GxS, needed_GxS)[0],
        lambda: jnp.full((rows, 2), size, jnp.int32),
    )
    return SetThresholds(key_GxS, cut_GxS)


def _by_walk(stacks: Sequence[jax.Array]) -> dict[tuple, list[int]]:
    """Indices of the stacks walked together (one loop per pass): same slice shape and same
    :func:`_walk`."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(stacks):
        groups.setdefault((tuple(s.shape[1:]), _walk(s)), []).append(i)
    return groups


def _split_rows(rows: jax.Array, members: Sequence[int], stacks: Sequence[jax.Array]) -> dict:
    """``{leaf index: its slices' rows of rows}`` for a group's leaves (the group's row order)."""
    ranges = _row_ranges([stacks[i] for i in members])
    return {i: rows[r] for i, r in zip(members, ranges, strict=True)}


def leaf_thresholds(
    xs: Sequence[jax.Array],
    k_forward: Sequence[int],
    k_backward: Sequence[int],
    axes: Sequence[int | None] | None = None,
) -> list[SetThresholds]:
    """Per-leaf :class:`SetThresholds` for any leaves; slices of equal shape share their loops.

    ``k_forward[i]``, ``k_backward[i]`` are per slice of leaf ``i`` (its layer axis ``axes[i]``,
    ``None`` for a whole leaf): ``1 <= k_forward[i] <= k_backward[i] <= slice size``.
    """
    axes = list(axes) if axes is not None else [None] * len(xs)
    stacks = [stack_view(x, a) for x, a in zip(xs, axes, strict=True)]
    out: list[SetThresholds | None] = [None] * len(xs)
    for members in _by_walk(stacks).values():
        slices = [stacks[i].shape[0] for i in members]
        th = group_thresholds(
            [stacks[i] for i in members],
            [k_forward[i] for i, n in zip(members, slices, strict=True) for _ in range(n)],
            [k_backward[i] for i, n in zip(members, slices, strict=True) for _ in range(n)],
        )
        keys, cuts = _split_rows(th.key, members, stacks), _split_rows(th.cut, members, stacks)
        for i in members:
            whole = axes[i] is None  # one row: thresholds [2]
            out[i] = (
                SetThresholds(keys[i][0], cuts[i][0]) if whole else SetThresholds(keys[i], cuts[i])
            )
    return out


def global_thresholds(
    xs: Sequence[jax.Array],
    k_forward: int,
    k_backward: int,
    axes: Sequence[int | None] | None = None,
) -> list[SetThresholds]:
    """One pair of thresholds over all leaves (global top-k): the keys are shared, the cuts are
    per slice — ties are kept in leaf order, then slice order (along the layer axis ``axes[i]``),
    then row-major order inside a slice."""
    axes = list(axes) if axes is not None else [None] * len(xs)
    stacks = [stack_view(x, a) for x, a in zip(xs, axes, strict=True)]
    k_S = jnp.array([k_forward, k_backward], jnp.int32)
    key_dtype = _key_dtype(stacks)  # one key for all leaves: float64 bits when one is float64
    groups = [([stacks[i] for i in members], members) for members in _by_walk(stacks).values()]

    def histogram(level: int, prefix_S: jax.Array) -> jax.Array:
        if level == 0:
            hists = [high_histograms(group, key_dtype)[:, None] for group, _ in groups]
        else:
            hists = [
                digit_histograms(
                    group, level, jnp.broadcast_to(prefix_S, (_rows(group), 2)), key_dtype
                )
                for group, _ in groups
            ]
        return jnp.broadcast_to(sum(h.sum(axis=0, dtype=jnp.int32) for h in hists), (2, _BINS))

    kth = selection.radix_kth(histogram, k_S, key_dtype)
    needed_S = k_S - kth.above

    def cuts_per_slice():
        key_S = jnp.broadcast_to(kth.key, (1, 2))
        tied: dict[int, jax.Array] = {}
        for group, members in groups:  # pass 3a: every slice's tie count
            key_GxS = jnp.broadcast_to(kth.key, (_rows(group), 2))
            tied.update(_split_rows(tie_counts(group, key_GxS), members, stacks))
        before_S, take = jnp.zeros(2, jnp.int32), {}
        for i in range(len(xs)):  # the tie budget, in leaf order, then slice order
            cum_LxS = before_S + jnp.cumsum(tied[i], axis=0, dtype=jnp.int32)
            take[i] = jnp.clip(needed_S - (cum_LxS - tied[i]), 0, tied[i])
            before_S = cum_LxS[-1]
        cuts: dict[int, jax.Array] = {}
        for group, members in groups:  # pass 3b: where each slice's share of ties ends
            take_GxS = jnp.concatenate([take[i] for i in members])
            key_GxS = jnp.broadcast_to(key_S, (_rows(group), 2))
            cut_GxS, _ = tie_cuts(group, key_GxS, take_GxS)
            cuts.update(_split_rows(cut_GxS, members, stacks))
        return jnp.concatenate([cuts[i] for i in range(len(xs))])

    def all_ties():
        return jnp.concatenate(
            [jnp.full((s.shape[0], 2), math.prod(s.shape[1:]), jnp.int32) for s in stacks]
        )

    cut_RxS = lax.cond(jnp.any(kth.tied != needed_S), cuts_per_slice, all_ties)
    out, start = [], 0
    for s, axis in zip(stacks, axes, strict=True):
        cut = cut_RxS[start : start + s.shape[0]]
        out.append(SetThresholds(kth.key, cut if axis is not None else cut[0]))
        start += s.shape[0]
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
