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

Leaves of equal shape are walked together (one loop per pass for the group, the histograms as
rows of one scatter), so the compiled program grows with the number of distinct leaf shapes.

The result per leaf is two thresholds ``(t, cut)``: weight ``i`` is in the set iff
``key_i > t`` or (``key_i == t`` and ``i < cut``) — the stable-argsort order exactly (ties to the
lower row-major index).  :func:`codes_from_thresholds` turns them into 2-bit codes in one
elementwise pass over ``θ`` that keeps the leaf's shape (and sharding).

Global top-k (one threshold over all sparse leaves, ties by leaf order then index) sums the
per-leaf histograms and splits the tie budget over the leaves in order.
"""

from __future__ import annotations

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
    """Per leaf, for the sets ``(A, B)``: int32 ``key[2]`` and ``cut[2]``.

    Weight ``i`` (row-major flat index) is in set ``j`` iff ``key_i > key[j]`` or
    ``key_i == key[j] and i < cut[j]``.
    """

    key: jax.Array
    cut: jax.Array


Body = Callable[[jax.Array, jax.Array, object], object]


def _chunk_view(x: jax.Array) -> jax.Array:
    """The leaf as it is walked: its own shape (chunks are runs of leading rows, so other axes
    keep their sharding), or flat and replicated when its first axis is explicitly sharded."""
    if x.ndim == 0 or sharding.unsharded_axis(x) != 0:
        return sharding.flatten(x)
    return x


def _fold_chunks(xs: Sequence[jax.Array], body: Body, init: object) -> object:
    """``carry ← body(keys_GxC…, index_C…, carry)`` over ``G`` leaves of one shape, by chunks of
    about ``CHUNK`` weights: runs of whole leading rows, so a chunk is contiguous in row-major
    order and keeps the leaf's sharding on the other axes.

    Full chunks run in one ``fori_loop`` for the whole group (dynamic slices, no copy); the
    remaining rows form one last, shorter chunk.  ``index`` is the row-major flat index of each
    position of the chunk.
    """
    views = [_chunk_view(x) for x in xs]
    shape = views[0].shape
    row_size = max(1, views[0].size // shape[0])
    rows = max(1, min(shape[0], CHUNK // row_size))
    full = shape[0] // rows

    def chunk(start, length):
        keys = jnp.stack(
            [
                selection.elementwise_magnitude_keys(lax.dynamic_slice_in_dim(v, start, length))
                for v in views
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


def high_histograms(xs: Sequence[jax.Array]) -> jax.Array:
    """int32 ``[G, 65536]``: per leaf, how many keys have each high 16-bit digit (pass 1)."""

    def body(keys_Gx, _, hist_GxB):
        return _add_counts(hist_GxB, keys_Gx >> _BITS)

    return _fold_chunks(xs, body, jnp.zeros((len(xs), _BINS), jnp.int32))


def _per_leaf(value_G: jax.Array, like_Gx: jax.Array) -> jax.Array:
    """``value_G`` shaped to broadcast against ``like_Gx``."""
    return value_G.reshape((value_G.shape[0],) + (1,) * (like_Gx.ndim - 1))


def low_histograms(xs: Sequence[jax.Array], high_GxS: jax.Array) -> jax.Array:
    """int32 ``[G, S, 65536]``: per leaf ``g`` and row ``s``, the low-digit histogram of the keys
    whose high digit is ``high_GxS[g, s]`` (pass 2)."""
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

    hist_SxGxB = _fold_chunks(xs, body, jnp.zeros((rows, len(xs), _BINS), jnp.int32))
    return jnp.swapaxes(hist_SxGxB, 0, 1)


def tie_cuts(
    xs: Sequence[jax.Array], key_GxS: jax.Array, needed_GxS: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per leaf and row: the flat index just past the ``needed``-th entry whose key is ``key``
    (0 when ``needed <= 0``; the leaf size when there are fewer), and how many such entries the
    leaf has (pass 3; only run when ties straddle a boundary)."""

    def body(keys_Gx, index_x, carry):
        seen_GxS, cut_GxS = carry
        keys_GxC = sharding.flatten_rows(keys_Gx)
        index_C = sharding.flatten(index_x)
        tied_GxSxC = keys_GxC[:, None, :] == key_GxS[:, :, None]
        running = seen_GxS[:, :, None] + jnp.cumsum(tied_GxSxC, axis=-1, dtype=jnp.int32)
        hit = tied_GxSxC & (running == needed_GxS[:, :, None])
        found = jnp.max(jnp.where(hit, index_C + 1, 0), axis=-1)
        return running[:, :, -1], jnp.where(jnp.any(hit, axis=-1), found, cut_GxS)

    n = xs[0].size
    init = (jnp.zeros(key_GxS.shape, jnp.int32), jnp.full(key_GxS.shape, n, jnp.int32))
    seen_GxS, cut_GxS = _fold_chunks(xs, body, init)
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
    xs: Sequence[jax.Array], k_forward: Sequence[int], k_backward: Sequence[int]
) -> list[SetThresholds]:
    """:class:`SetThresholds` of ``A`` (top ``k_forward[g]``) and ``B`` (top ``k_backward[g]``)
    of ``|θ|`` for leaves of one shape, selected together (one loop per pass for the group)."""
    groups = len(xs)
    k_GxS = jnp.array(list(zip(k_forward, k_backward, strict=True)), jnp.int32)
    high_GxB = high_histograms(xs)
    kth = _kth(
        jnp.repeat(high_GxB, 2, axis=0),
        lambda high_R: low_histograms(xs, high_R.reshape(groups, 2)).reshape(2 * groups, _BINS),
        k_GxS.reshape(-1),
    )
    key_GxS = kth.key.reshape(groups, 2)
    needed_GxS = k_GxS - kth.above.reshape(groups, 2)
    straddles = jnp.any(kth.tied.reshape(groups, 2) != needed_GxS)
    cut_GxS = lax.cond(
        straddles,
        lambda: tie_cuts(xs, key_GxS, needed_GxS)[0],
        lambda: jnp.full((groups, 2), xs[0].size, jnp.int32),
    )
    return [SetThresholds(key_GxS[g], cut_GxS[g]) for g in range(groups)]


def _by_size(xs: Sequence[jax.Array]) -> dict[tuple, list[int]]:
    """Indices of the leaves walked together: same shape, same walk (:func:`_chunk_view`)."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        walk = x.ndim == 0 or sharding.unsharded_axis(x) != 0
        groups.setdefault((tuple(x.shape), walk), []).append(i)
    return groups


def leaf_thresholds(
    xs: Sequence[jax.Array], k_forward: Sequence[int], k_backward: Sequence[int]
) -> list[SetThresholds]:
    """Per-leaf :class:`SetThresholds` for any leaves; leaves of equal shape share their loops.
    ``1 <= k_forward[i] <= k_backward[i] <= xs[i].size``."""
    out: list[SetThresholds | None] = [None] * len(xs)
    for members in _by_size(xs).values():
        found = group_thresholds(
            [xs[i] for i in members], [k_forward[i] for i in members],
            [k_backward[i] for i in members],
        )  # fmt: skip
        for i, th in zip(members, found, strict=True):
            out[i] = th
    return out


def global_thresholds(
    xs: Sequence[jax.Array], k_forward: int, k_backward: int
) -> list[SetThresholds]:
    """One pair of thresholds over all leaves (global top-k): the keys are shared, the cuts are
    per leaf — ties are kept in leaf order, then row-major order inside a leaf."""
    k_S = jnp.array([k_forward, k_backward], jnp.int32)
    groups = [([xs[i] for i in members], members) for members in _by_size(xs).values()]
    high_B = sum(high_histograms(group).sum(axis=0) for group, _ in groups)

    def low(high_S):
        return sum(
            low_histograms(group, jnp.broadcast_to(high_S, (len(group), 2))).sum(axis=0)
            for group, _ in groups
        )

    kth = _kth(jnp.broadcast_to(high_B, (2, _BINS)), low, k_S)
    needed_S = k_S - kth.above

    def cuts_per_leaf():
        key_S = jnp.broadcast_to(kth.key, (1, 2))
        tied = [None] * len(xs)
        for group, members in groups:  # pass 3a: every leaf's tie count
            none_GxS = jnp.full((len(group), 2), -1, jnp.int32)
            _, seen_GxS = tie_cuts(group, jnp.broadcast_to(kth.key, (len(group), 2)), none_GxS)
            for g, i in enumerate(members):
                tied[i] = seen_GxS[g]
        before_S, take = jnp.zeros(2, jnp.int32), [None] * len(xs)
        for i in range(len(xs)):  # the tie budget, in leaf order
            take[i] = jnp.clip(needed_S - before_S, 0, tied[i])
            before_S = before_S + tied[i]
        cuts = [None] * len(xs)
        for group, members in groups:  # pass 3b: where each leaf's share of ties ends
            take_GxS = jnp.stack([take[i] for i in members])
            cut_GxS, _ = tie_cuts(group, jnp.broadcast_to(key_S, (len(group), 2)), take_GxS)
            for g, i in enumerate(members):
                cuts[i] = cut_GxS[g]
        return jnp.stack(cuts)

    def all_ties():
        return jnp.stack([jnp.full((2,), x.size, jnp.int32) for x in xs])

    cut_LxS = lax.cond(jnp.any(kth.tied != needed_S), cuts_per_leaf, all_ties)
    return [SetThresholds(kth.key, cut_LxS[i]) for i in range(len(xs))]


def flat_index(shape: tuple[int, ...]) -> jax.Array:
    """int32 row-major flat index of every position of ``shape`` (fuses into its consumer)."""
    index = jnp.zeros(shape, jnp.int32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return index


def in_set(keys: jax.Array, key: jax.Array, cut: jax.Array) -> jax.Array:
    """``key_i > t or (key_i == t and i < cut)`` for keys shaped like the leaf."""
    return (keys > key) | ((keys == key) & (flat_index(keys.shape) < cut))


def codes_from_thresholds(x: jax.Array, th: SetThresholds) -> jax.Array:
    """uint8 codes ``2·A + B`` of ``θ + u`` (leaf shape) from its thresholds."""
    keys = selection.elementwise_magnitude_keys(x)
    forward = in_set(keys, th.key[0], th.cut[0])
    backward = in_set(keys, th.key[1], th.cut[1])
    return codes_lib.encode(forward, backward)
