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


def _fold_chunks(
    x: jax.Array, body: Callable[[jax.Array, jax.Array, object], object], init: object
) -> object:
    """``carry ← body(keys_C, index_C, carry)`` over the leaf in chunks of ``CHUNK`` weights.

    Full chunks run in a ``fori_loop`` (dynamic slices of the flat leaf, no copy); the remaining
    ``n mod CHUNK`` weights form one last, shorter chunk.
    """
    x_n = sharding.flatten(x)
    n = x_n.shape[0]
    size = min(CHUNK, n)
    full = n // size

    def chunk(start, length):
        keys = selection.elementwise_magnitude_keys(lax.dynamic_slice_in_dim(x_n, start, length))
        return keys, start + jnp.arange(length, dtype=jnp.int32)

    def step(r, carry):
        return body(*chunk(r * size, size), carry)

    carry = lax.fori_loop(0, full, step, init) if full > 1 else step(0, init)
    if n > full * size:
        carry = body(*chunk(full * size, n - full * size), carry)
    return carry


def _add_counts(hist: jax.Array, bins: jax.Array) -> jax.Array:
    """``hist[b] += #(bins == b)``; out-of-range bins are dropped."""
    return hist.at[bins].add(jnp.ones((), jnp.int32), mode="drop")


def high_histogram(x: jax.Array) -> jax.Array:
    """int32 ``[65536]``: how many keys of ``θ'`` have each high 16-bit digit (pass 1)."""

    def body(keys, _, hist):
        return _add_counts(hist, keys >> _BITS)

    return _fold_chunks(x, body, jnp.zeros(_BINS, jnp.int32))


def low_histograms(x: jax.Array, high_S: jax.Array) -> jax.Array:
    """int32 ``[S, 65536]``: per row ``s``, the low-digit histogram of the keys whose high digit
    is ``high_S[s]`` (pass 2)."""

    def body(keys, _, hist_SxB):
        high, low = keys >> _BITS, keys & (_BINS - 1)
        rows = [
            _add_counts(hist_SxB[s], jnp.where(high == high_S[s], low, _BINS))
            for s in range(high_S.shape[0])
        ]
        return jnp.stack(rows)

    return _fold_chunks(x, body, jnp.zeros((high_S.shape[0], _BINS), jnp.int32))


def tie_cut(x: jax.Array, key: jax.Array, needed: jax.Array) -> jax.Array:
    """The flat index just past the ``needed``-th entry of key ``key`` (0 if ``needed == 0``,
    the leaf size if the leaf has fewer such entries) — pass 3."""

    def body(keys, index, carry):
        seen, cut = carry
        tied = keys == key
        running = seen + jnp.cumsum(tied, dtype=jnp.int32)
        hit = tied & (running == needed)
        cut = jnp.where(jnp.any(hit), jnp.max(jnp.where(hit, index + 1, 0)), cut)
        return running[-1], cut

    n = x.size
    _, cut = _fold_chunks(x, body, (jnp.zeros((), jnp.int32), jnp.int32(n)))
    return jnp.where(needed <= 0, 0, cut)


class _Kth(NamedTuple):
    key: jax.Array  # int32 [S]: the k-th largest key
    above: jax.Array  # int32 [S]: #(key > t)
    tied: jax.Array  # int32 [S]: #(key == t)


def _kth_from_histograms(
    high_hist: jax.Array, low_hists: Callable[[jax.Array], jax.Array], k_S: jax.Array
) -> _Kth:
    """The ``k_S``-th largest keys from the high histogram and a function giving the low
    histograms of chosen high buckets (:func:`selection._select_bucket` does both levels)."""
    rows = k_S.shape[0]
    high_S, above_high_S, _ = selection._select_bucket(
        jnp.broadcast_to(high_hist, (rows, _BINS)), k_S
    )
    low_S, above_low_S, tied_S = selection._select_bucket(low_hists(high_S), k_S - above_high_S)
    key_S = (high_S << _BITS) | low_S
    return _Kth(key_S, above_high_S + above_low_S, tied_S)


def leaf_thresholds(x: jax.Array, k_forward: int, k_backward: int):
    """:class:`SetThresholds` of ``A`` (top ``k_forward``) and ``B`` (top ``k_backward``) of
    ``|θ|`` for one leaf.  ``1 <= k_forward <= k_backward <= x.size``."""
    k_S = jnp.array([k_forward, k_backward], jnp.int32)
    kth = _kth_from_histograms(high_histogram(x), lambda high_S: low_histograms(x, high_S), k_S)
    needed_S = k_S - kth.above

    def cuts():
        return jnp.stack([tie_cut(x, kth.key[s], needed_S[s]) for s in range(2)])

    straddles = jnp.any(kth.tied != needed_S)
    cut_S = lax.cond(straddles, cuts, lambda: jnp.full((2,), x.size, jnp.int32))
    return SetThresholds(kth.key, cut_S)


def global_thresholds(
    xs: Sequence[jax.Array], k_forward: int, k_backward: int
) -> list[SetThresholds]:
    """One pair of thresholds over all leaves (global top-k): the keys are shared, the cuts are
    per leaf — ties are kept in leaf order, then row-major order inside a leaf."""
    k_S = jnp.array([k_forward, k_backward], jnp.int32)
    high = sum(high_histogram(x) for x in xs)

    def low(high_S):
        return sum(low_histograms(x, high_S) for x in xs)

    kth = _kth_from_histograms(high, low, k_S)
    needed_S = k_S - kth.above

    def cuts_per_leaf():
        out, before_S = [], jnp.zeros(2, jnp.int32)
        for x in xs:
            tied_S = jnp.stack(
                [jnp.sum(selection.elementwise_magnitude_keys(x) == kth.key[s])
                 for s in range(2)]
            )  # fmt: skip
            take_S = jnp.clip(needed_S - before_S, 0, tied_S)
            out.append(
                jnp.stack(
                    [
                        jnp.where(take_S[s] == tied_S[s], x.size, tie_cut(x, kth.key[s], take_S[s]))
                        for s in range(2)
                    ]
                )
            )
            before_S = before_S + tied_S
        return jnp.stack(out)

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
