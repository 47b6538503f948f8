"""Exact ``A`` and ``B`` of every leaf in a few streaming passes, with no leaf-sized temporaries.

The selection of :mod:`topkast_jax.selection` materialises int32 keys, bin indices and a
ones-vector for every weight (three leaf-sized buffers) because XLA's scatter does not fuse with
its producers.  Here every pass walks a leaf in chunks of ``CHUNK`` weights inside a
``lax.fori_loop``, so the only temporaries are one chunk and the histograms, and each pass reads
the leaf once:

1. histogram of the high 16 bits of the keys of ``|θ|`` (one for all of ``A`` and ``B``);
2. the two low-16-bit histograms inside the buckets of the ``k_A``-th and ``k_B``-th largest key;
3. only when ties straddle a boundary (rare for trained weights): the flat index just past the
   last tie that is kept.

A leaf with a layer axis (scan-stacked layers, :mod:`topkast_jax.layers`) is ``L`` slices, each
selected as a leaf of its own: the walk reads the leaf as a *stack* ``(L, *slice)`` (the layer axis
moved first; a leaf without one is a stack of one slice) and every slice is a *row* of the
histograms.  Slices of equal shape — of one leaf or of several — are walked together (one loop per
pass for the group, the histograms as rows of one scatter), so the compiled program grows with the
number of distinct slice shapes, and no slice is copied out of its leaf (a layer axis other than
0 is moved first, which XLA may copy).  The temporaries are per slice: three int32 histograms of
65,536 bins (768 KiB) and one chunk of ``CHUNK`` keys — e.g. 10 MiB for a ``(8, 512, 256)`` stack
selected per layer, 1.75 MiB for it as one leaf (``jit(...).compile().memory_analysis()``, CPU).

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
from jax import lax

from topkast_jax import codes as codes_lib
from topkast_jax import selection, sharding

CHUNK = 1 << 16
_BITS = 16
_BINS = 1 << _BITS


class SetThresholds(NamedTuple):
    """Per leaf, for the sets ``(A, B)``: int32 ``key[2]`` and ``cut[2]``; for a leaf with a layer
    axis, ``[L, 2]`` (one pair per slice; a global selection shares ``key[2]``).

    Weight ``i`` (row-major flat index inside its slice) is in set ``j`` iff ``key_i > key[j]`` or
    ``key_i == key[j] and i < cut[j]``.
    """

    key: jax.Array
    cut: jax.Array


Body = Callable[[jax.Array, jax.Array, object], object]


def _walks_flat(x: jax.Array, axis: int | None) -> bool:
    """Whether the slices of ``x`` are walked flat (and replicated): scalar slices, or a slice
    whose first axis is explicitly sharded (chunks of leading rows would cut across devices)."""
    if x.ndim - (axis is not None) == 0:
        return True
    explicit = sharding.explicit_sharding(x)
    if explicit is None:
        return False
    spec = tuple(explicit.spec) + (None,) * (x.ndim - len(explicit.spec))
    spec = spec if axis is None else spec[:axis] + spec[axis + 1 :]
    return next((i for i, name in enumerate(spec) if name is None), 0) != 0


def stack_view(x: jax.Array, axis: int | None) -> jax.Array:
    """The leaf as it is walked, ``(L, *slice)``: ``x[None]`` without a layer axis, else the layer
    axis moved first (free for axis 0); ``(L, n)`` when its slices are walked flat
    (:func:`_walks_flat`).  Chunks are runs of leading slice rows, so other axes keep their
    sharding."""
    stack = jnp.expand_dims(x, 0) if axis is None else jnp.moveaxis(x, axis, 0)
    return sharding.flatten_rows(stack) if _walks_flat(x, axis) else stack


def _rows(stacks: Sequence[jax.Array]) -> int:
    """``R``: the slices of a group of stacks, all of them."""
    return sum(s.shape[0] for s in stacks)


def _fold_chunks(stacks: Sequence[jax.Array], body: Body, init: object) -> object:
    """``carry ← body(keys_RxC…, index_C…, carry)`` over the ``R`` slices of stacks of one slice
    shape (:func:`stack_view`), by chunks of about ``CHUNK`` weights per slice: runs of whole
    leading rows of the slice, so a chunk is contiguous in row-major order and keeps the leaf's
    sharding on the other axes.

    Full chunks run in one ``fori_loop`` for the whole group (dynamic slices, no copy); the
    remaining rows form one last, shorter chunk.  ``index`` is the row-major flat index inside
    the slice of each position of the chunk.
    """
    shape = stacks[0].shape[1:]
    row_size = max(1, math.prod(shape[1:]))
    rows = max(1, min(shape[0], CHUNK // row_size))
    full = shape[0] // rows

    def chunk(start, length):
        keys = jnp.concatenate(
            [
                selection.elementwise_magnitude_keys(
                    lax.dynamic_slice_in_dim(s, start, length, axis=1)
                )
                for s in stacks
            ]
        )
        return keys, start * row_size + flat_index((length, *shape[1:]))

    def step(r, carry):
        return body(*chunk(r * rows, rows), carry)

    carry = lax.fori_loop(0, full, step, init) if full > 1 else step(0, init)
    if shape[0] > full * rows:
        carry = body(*chunk(full * rows, shape[0] - full * rows), carry)
    return carry


def _add_counts(hist_GxB: jax.Array, bins_Gx: jax.Array) -> jax.Array:
    """``hist[g, b] += #(bins[g] == b)`` (``bins`` of any shape after ``G``); bins outside
    ``[0, B)`` are dropped."""
    rows, num_bins = hist_GxB.shape
    valid = (bins_Gx >= 0) & (bins_Gx < num_bins)
    row_start = (jnp.arange(rows, dtype=jnp.int32) * num_bins).reshape(
        (rows,) + (1,) * (bins_Gx.ndim - 1)
    )
    # Invalid entries go past the end (a negative index would wrap around).
    flat = jnp.where(valid, row_start + bins_Gx, rows * num_bins)
    counts = (
        hist_GxB.reshape(-1)
        .at[flat]
        .add(jnp.ones((), jnp.int32), mode="drop", out_sharding=sharding.replicated_like(flat))
    )
    return counts.reshape(rows, num_bins)


def high_histograms(stacks: Sequence[jax.Array]) -> jax.Array:
    """int32 ``[R, 65536]``: per slice, how many keys have each high 16-bit digit (pass 1)."""

    def body(keys_Rx, _, hist_RxB):
        return _add_counts(hist_RxB, keys_Rx >> _BITS)

    return _fold_chunks(stacks, body, jnp.zeros((_rows(stacks), _BINS), jnp.int32))


def _per_leaf(value_G: jax.Array, like_Gx: jax.Array) -> jax.Array:
    """``value_G`` shaped to broadcast against ``like_Gx``."""
    return value_G.reshape((value_G.shape[0],) + (1,) * (like_Gx.ndim - 1))


def low_histograms(stacks: Sequence[jax.Array], high_GxS: jax.Array) -> jax.Array:
    """int32 ``[G, S, 65536]``: per slice ``g`` (of ``G = R``) and set ``s``, the low-digit
    histogram of the keys whose high digit is ``high_GxS[g, s]`` (pass 2)."""
    rows = high_GxS.shape[1]

    def body(keys_Gx, _, hist_SxGxB):
        high_Gx, low_Gx = keys_Gx >> _BITS, keys_Gx & (_BINS - 1)
        return jnp.stack(
            [
                _add_counts(
                    hist_SxGxB[s],
                    jnp.where(high_Gx == _per_leaf(high_GxS[:, s], high_Gx), low_Gx, -1),
                )
                for s in range(rows)
            ]
        )

    hist_SxGxB = _fold_chunks(stacks, body, jnp.zeros((rows, _rows(stacks), _BINS), jnp.int32))
    return jnp.swapaxes(hist_SxGxB, 0, 1)


def tie_cuts(
    stacks: Sequence[jax.Array], key_GxS: jax.Array, needed_GxS: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per slice and set: the flat index just past the ``needed``-th entry whose key is ``key``
    (0 when ``needed <= 0``; the slice size when there are fewer), and how many such entries the
    slice has (pass 3; only run when ties straddle a boundary)."""

    def body(keys_Gx, index_x, carry):
        seen_GxS, cut_GxS = carry
        keys_GxC = sharding.flatten_rows(keys_Gx)
        index_C = sharding.flatten(index_x)
        tied_GxSxC = keys_GxC[:, None, :] == key_GxS[:, :, None]
        running = seen_GxS[:, :, None] + jnp.cumsum(tied_GxSxC, axis=-1, dtype=jnp.int32)
        hit = tied_GxSxC & (running == needed_GxS[:, :, None])
        found = jnp.max(jnp.where(hit, index_C + 1, 0), axis=-1)
        return running[:, :, -1], jnp.where(jnp.any(hit, axis=-1), found, cut_GxS)

    n = math.prod(stacks[0].shape[1:])
    init = (jnp.zeros(key_GxS.shape, jnp.int32), jnp.full(key_GxS.shape, n, jnp.int32))
    seen_GxS, cut_GxS = _fold_chunks(stacks, body, init)
    return jnp.where(needed_GxS <= 0, 0, cut_GxS), seen_GxS


class _Kth(NamedTuple):
    key: jax.Array  # int32 [R]: the k-th largest key of each row
    above: jax.Array  # int32 [R]: #(key > t)
    tied: jax.Array  # int32 [R]: #(key == t)


def _kth(high_RxB: jax.Array, low_hists: Callable[[jax.Array], jax.Array], k_R: jax.Array) -> _Kth:
    """The ``k_R``-th largest keys from high histograms and a function giving the low
    histograms of chosen high buckets (:func:`selection._select_bucket` does both levels)."""
    high_R, above_high_R, _ = selection._select_bucket(high_RxB, k_R)
    low_R, above_low_R, tied_R = selection._select_bucket(low_hists(high_R), k_R - above_high_R)
    return _Kth((high_R << _BITS) | low_R, above_high_R + above_low_R, tied_R)


def group_thresholds(
    stacks: Sequence[jax.Array], k_forward: Sequence[int], k_backward: Sequence[int]
) -> SetThresholds:
    """:class:`SetThresholds` ``[R, 2]`` of ``A`` (top ``k_forward[r]``) and ``B`` (top
    ``k_backward[r]``) of ``|θ|`` for the ``R`` slices of stacks of one slice shape, selected
    together (one loop per pass for the group)."""
    rows = _rows(stacks)
    k_GxS = jnp.array(list(zip(k_forward, k_backward, strict=True)), jnp.int32)
    high_GxB = high_histograms(stacks)
    kth = _kth(
        jnp.repeat(high_GxB, 2, axis=0),
        lambda high_R: low_histograms(stacks, high_R.reshape(rows, 2)).reshape(2 * rows, _BINS),
        k_GxS.reshape(-1),
    )
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


def _by_slice_shape(stacks: Sequence[jax.Array]) -> dict[tuple, list[int]]:
    """Indices of the stacks walked together: same slice shape (:func:`stack_view`)."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(stacks):
        groups.setdefault(tuple(s.shape[1:]), []).append(i)
    return groups


def _split_rows(rows: jax.Array, members: Sequence[int], stacks: Sequence[jax.Array]) -> dict:
    """``{leaf index: its slices' rows of rows}`` for a group's leaves (the group's row order)."""
    out, start = {}, 0
    for i in members:
        out[i] = rows[start : start + stacks[i].shape[0]]
        start += stacks[i].shape[0]
    return out


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
    for members in _by_slice_shape(stacks).values():
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
    groups = [
        ([stacks[i] for i in members], members) for members in _by_slice_shape(stacks).values()
    ]
    high_B = sum(high_histograms(group).sum(axis=0) for group, _ in groups)

    def low(high_S):
        return sum(
            low_histograms(group, jnp.broadcast_to(high_S, (_rows(group), 2))).sum(axis=0)
            for group, _ in groups
        )

    kth = _kth(jnp.broadcast_to(high_B, (2, _BINS)), low, k_S)
    needed_S = k_S - kth.above

    def cuts_per_slice():
        key_S = jnp.broadcast_to(kth.key, (1, 2))
        tied: dict[int, jax.Array] = {}
        for group, members in groups:  # pass 3a: every slice's tie count
            none_GxS = jnp.full((_rows(group), 2), -1, jnp.int32)
            key_GxS = jnp.broadcast_to(kth.key, (_rows(group), 2))
            _, seen_GxS = tie_cuts(group, key_GxS, none_GxS)
            tied.update(_split_rows(seen_GxS, members, stacks))
        before_S, take = jnp.zeros(2, jnp.int32), {}
        for i in range(len(xs)):  # the tie budget, in leaf order, then slice order
            cum_LxS = before_S + jnp.cumsum(tied[i], axis=0)
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
    the layer ``axis``, if it has one)."""
    keys = selection.elementwise_magnitude_keys(x)
    forward = in_set(keys, th.key[..., 0], th.cut[..., 0], axis)
    backward = in_set(keys, th.key[..., 1], th.cut[..., 1], axis)
    return codes_lib.encode(forward, backward)
