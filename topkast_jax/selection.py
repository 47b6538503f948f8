"""Exact top-k masks without sorting.

Every selection in the library reduces to one question: given integer keys ``key_N`` (int32, or
int64 for float64 values, all ``>= 0``) and an optional validity mask ``valid_N``, which ``k``
valid entries have the largest keys, ties going to the lower (row-major) index?  The answer equals

    ``np.argsort(-key, kind="stable")[:k]``    (restricted to valid entries)

exactly.  Magnitude selection uses the IEEE-754 bit pattern of ``|θ|`` as the key: for
non-negative floats the bit pattern, read as an integer, is monotone in the value, so ordering keys
orders magnitudes (``-0.0`` and ``+0.0`` both become key 0).  float16 and bfloat16 widen to float32
exactly and get int32 keys; **float64** (``jax_enable_x64``) gets int64 keys of its own bits, so
values that differ below float32 precision, below float32's smallest subnormal (1.4e-45) or above
its largest finite value (3.4e38) keep their order (a float32 key would tie, flush them to 0 or
make them ``inf``).  Leaves selected together (global top-k) share the widest key: float32 values
widen to float64 exactly when any of them is float64 (:func:`key_dtype`).  **NaN rule:** a NaN
weight gets key 0, i.e. ranks as magnitude 0 — it is never preferred over a finite or infinite
weight and, like a zero, is selected only after every nonzero weight (then by index).

Methods (all exact, all give identical masks):

* ``"histogram"`` — radix select with 16-bit digits (two for int32 keys, four for int64).  Pass 1
  histograms the high 16 bits (one scatter-add over ``N``), a reverse cumulative sum over the
  65,536 bins finds the bucket holding the k-th largest key; each further pass histograms the next
  16 bits inside that bucket.  The k-th key ``t`` and the counts ``#(key > t)``, ``#(key == t)``
  then come from the histograms, and the mask is ``key >= t`` — unless ties straddle the boundary,
  when the first ``k - #(key > t)`` tied entries are found by the same select over ``~index``.
  About 3 passes over memory for int32 keys; the fastest here on CPU (see BENCHMARKS.md).
* ``"bisect"`` — the same threshold found bit by bit: 31 passes (63 for int64 keys) of
  ``count(key >= candidate)``.  Only reductions, no scatter: the choice for TPUs, where scatter is
  slow.
* ``"top_k"`` — ``jax.lax.top_k`` (documented to prefer the lower index on ties) and a scatter.
* ``"sort"`` — a full stable ``argsort`` (what jaxpruner does); the reference point.
* ``"auto"`` — ``"bisect"`` on TPU, ``"histogram"`` elsewhere.

:func:`top_k_masks` selects many vectors at once; vectors of equal length are stacked as the rows
of one matrix (``G`` rows of ``N``), which keeps the compiled program small for deep networks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from topkast_jax import sharding

METHODS = ("auto", "histogram", "bisect", "top_k", "sort")

#: Per key dtype: the float whose bits it holds, and the bit pattern of +inf in it (the bit
#: patterns of NaN magnitudes lie above).
_KEY_FLOATS = {
    np.dtype(np.int32): (np.dtype(np.float32), 0x7F800000),
    np.dtype(np.int64): (np.dtype(np.float64), 0x7FF0000000000000),
}
_DIGIT_BITS = 16
_NUM_BINS = 1 << _DIGIT_BITS


def key_dtype(dtypes: Iterable) -> np.dtype:
    """The key dtype of values of these float dtypes selected together: int64 when any is
    float64 (every value then ranks by its float64 bits), int32 otherwise."""
    wide = any(np.dtype(d) == np.float64 for d in dtypes)
    return np.dtype(np.int64 if wide else np.int32)


def key_float(dtype) -> tuple[np.dtype, int]:
    """``(float dtype, key of +inf)`` of a key dtype: the float whose bit pattern the key is.

    Raises:
      ValueError: ``dtype`` is neither int32 nor int64.
    """
    if np.dtype(dtype) not in _KEY_FLOATS:
        raise ValueError(f"magnitude keys are int32 or int64, not {dtype}.")
    return _KEY_FLOATS[np.dtype(dtype)]


def elementwise_magnitude_keys(x: jax.Array, dtype=None) -> jax.Array:
    """Integer keys ordered like ``|x|``, in the shape of ``x`` (the one definition of the key).

    Args:
      x: float array of any shape.
      dtype: the key dtype, ``None`` for ``key_dtype([x.dtype])``: int32 keys are the bits of
        ``|x|`` as float32 (bfloat16/float16 widen exactly), int64 keys those of ``|x|`` as
        float64 (float64 values, or float32 ones selected together with float64 ones).

    Returns:
      Keys shaped like ``x``, ``>= 0``, with ``key_i < key_j`` iff ``|x_i| < |x_j|`` for non-NaN
      entries; NaN gets key 0 (ranks as magnitude 0; every NaN bit pattern of ``|x|`` is above
      ``inf``'s).

    Raises:
      ValueError: ``x`` not floating, or int32 keys asked for float64 values (they would round).
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"magnitude_keys needs a floating array, got dtype {x.dtype}.")
    dtype = key_dtype([x.dtype]) if dtype is None else np.dtype(dtype)
    float_type, inf_key = key_float(dtype)
    if dtype.itemsize < key_dtype([x.dtype]).itemsize:
        raise ValueError(f"magnitude keys of {x.dtype} values cannot be {dtype}: they would round.")
    key = lax.bitcast_convert_type(jnp.abs(_as_stored(x).astype(float_type)), dtype)
    return jnp.where(key > inf_key, jnp.zeros((), dtype), key)


def _as_stored(x: jax.Array) -> jax.Array:
    """``x`` rounded to its own dtype.  A no-op in value, except where XLA keeps a narrow float's
    producer in float32 (``xla_allow_excess_precision``, on by default: on CPU a bfloat16
    ``θ + u`` fused into its keys was ranked unrounded, so two weights that the stored params
    tie were ordered by bits they do not have); ``reduce_precision`` is never elided."""
    if x.dtype.itemsize >= 4:
        return x
    info = jnp.finfo(x.dtype)
    return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def magnitude_keys(x: jax.Array, dtype=None) -> jax.Array:
    """:func:`elementwise_magnitude_keys` flattened: ``[x.size]`` keys (row-major)."""
    return sharding.flatten(elementwise_magnitude_keys(x, dtype))


def key_digits(dtype) -> int:
    """How many 16-bit digits a key of this integer dtype has: 2 (int32) or 4 (int64)."""
    return np.dtype(dtype).itemsize * 8 // _DIGIT_BITS


def _unsigned(keys: jax.Array) -> jax.Array:
    """The keys' bits as the unsigned integer of their width."""
    return lax.bitcast_convert_type(keys, jnp.dtype(f"uint{keys.dtype.itemsize * 8}"))


def key_digit(keys: jax.Array, level: int) -> jax.Array:
    """int32 ``[0, 65536)``: digit ``level`` of each key, 0 the most significant."""
    shift = _DIGIT_BITS * (key_digits(keys.dtype) - 1 - level)
    return ((_unsigned(keys) >> shift) & (_NUM_BINS - 1)).astype(jnp.int32)


def same_leading_digits(keys: jax.Array, prefix: jax.Array, level: int) -> jax.Array:
    """bool: whether each key's digits above ``level`` equal those of ``prefix`` (broadcast;
    same dtype as ``keys``); all True at level 0."""
    if level == 0:
        return jnp.ones(keys.shape, bool)
    shift = _DIGIT_BITS * (key_digits(keys.dtype) - level)
    return (_unsigned(keys) >> shift) == (_unsigned(prefix) >> shift)


def resolve_method(method: str) -> str:
    """Maps ``"auto"`` to the fastest exact method of the default backend."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method != "auto":
        return method
    return "bisect" if jax.default_backend() == "tpu" else "histogram"


def _at_least(h_SxB: jax.Array) -> jax.Array:
    """``out[s, b] = sum(h[s, b:])``, as one int32 product with an upper-triangular matrix
    (few instructions to compile; exact, as counts stay below 2³¹)."""
    bins = h_SxB.shape[-1]
    upper_BxB = (jnp.arange(bins)[:, None] >= jnp.arange(bins)[None, :]).astype(jnp.int32)
    return jnp.matmul(h_SxB, upper_BxB, preferred_element_type=jnp.int32)


def _reduce_last(operands, inits, combine) -> tuple[jax.Array, ...]:
    """One variadic int32 reduction over the last axis (XLA's CPU backend compiles it as one
    kernel, where each ``jnp.sum`` over a long axis becomes two)."""
    inits = tuple(jnp.asarray(i, jnp.int32) for i in inits)
    return lax.reduce(tuple(operands), inits, combine, (operands[0].ndim - 1,))


def _gathers() -> bool:
    """Whether :func:`rows_of` gathers (one device)."""
    return jax.device_count() == 1


def rows_of(hist_SxRxC: jax.Array, row_SxJ: jax.Array) -> jax.Array:
    """``[S, J, C]``: ``hist[s, row[s, j], :]``, zeros where ``row[s, j] < 0`` (``k`` exceeds
    every count).  On one device a gather, which reads ``S × J × C`` counts; on several a
    masked sum over every row (a gather may partition into all-gathers there), which reads them
    all ``J`` times — twice the time of the gather on XLA's CPU backend for ResNet-50's 108
    rows."""
    if _gathers():
        index_SxJ = jnp.clip(row_SxJ, 0, hist_SxRxC.shape[1] - 1)
        row_SxJxC = jnp.take_along_axis(hist_SxRxC, index_SxJ[:, :, None], axis=1)
        return jnp.where(row_SxJ[:, :, None] >= 0, row_SxJxC, 0)
    rows_R = jnp.arange(hist_SxRxC.shape[1], dtype=jnp.int32)
    in_row_SxJxRx1 = rows_R[:, None] == row_SxJ[:, :, None, None]
    hist_Sx1xRxC = hist_SxRxC[:, None]
    return jnp.sum(jnp.where(in_row_SxJxRx1, hist_Sx1xRxC, 0), axis=2, dtype=jnp.int32)


def select_bucket(hist_SxD: jax.Array, k_S: jax.Array) -> tuple[jax.Array, ...]:
    """Per segment: the largest bucket ``b`` with ``#(digit >= b) >= k``, ``#(digit > b)`` and
    ``#(digit == b)`` (:func:`select_bucket_in_rows` over the histograms ``[S, 65536]``)."""
    hist_SxRxC = hist_SxD.reshape(-1, 256, 256)
    row_total_SxR = hist_SxRxC.sum(axis=-1, dtype=jnp.int32)  # int32 also under jax_enable_x64
    return select_bucket_in_rows(
        row_total_SxR, lambda row_S: rows_of(hist_SxRxC, row_S[:, None])[:, 0], k_S
    )


def select_bucket_in_rows(
    row_total_SxR: jax.Array, row_of: Callable[[jax.Array], jax.Array], k_S: jax.Array
) -> tuple[jax.Array, ...]:
    """:func:`select_bucket` of histograms of 65,536 buckets given as 256 rows of 256: their row
    totals ``[S, 256]`` and ``row_of(row_S) -> [S, 256]``, the counts of row ``row_S[s]`` of
    segment ``s`` (zeros where ``row_S[s] = −1``).  The histograms need not exist as one array
    (:func:`topkast_jax.streaming._select_sets` reads each set's from one of two halves).

    Two levels of 256 (rows of 256 buckets, then the buckets of one row), so the scan costs
    2 × 256 instead of 65,536 sequential additions.  ``at_least[j] = #(digit >= j)`` does not
    increase with ``j``, so at each level one reduction gives the bucket (how many ``j`` have
    ``at_least[j] >= k``, less one), ``#(digit > b)`` (the largest ``at_least`` below ``k``)
    and ``#(digit >= b)`` (the smallest at or above ``k``).
    """
    at_least_SxR = _at_least(row_total_SxR)
    ok_SxR = at_least_SxR >= k_S[:, None]
    count_S, above_row_S = _reduce_last(
        (ok_SxR.astype(jnp.int32), jnp.where(ok_SxR, 0, at_least_SxR)),
        (0, 0),
        lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])),
    )
    row_S = count_S - 1
    row_hist_SxC = row_of(row_S)
    at_least_SxC = _at_least(row_hist_SxC) + above_row_S[:, None]
    ok_SxC = at_least_SxC >= k_S[:, None]
    most = jnp.iinfo(jnp.int32).max
    count_S, above_S, at_or_above_S = _reduce_last(
        (
            ok_SxC.astype(jnp.int32),
            jnp.where(ok_SxC, above_row_S[:, None], at_least_SxC),
            jnp.where(ok_SxC, at_least_SxC, most),
        ),
        (0, 0, most),
        lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1]), jnp.minimum(a[2], b[2])),
    )
    tied_S = jnp.where(count_S > 0, at_or_above_S - above_S, 0)  # 0 when k exceeds every count
    return row_S * 256 + count_S - 1, above_S, tied_S


class Threshold(NamedTuple):
    """Per segment ``s``: the k-th largest valid key ``key[s]`` with ``above[s] = #(valid & key >
    t)`` and ``tied[s] = #(valid & key == t)``; they satisfy ``above < k <= above + tied``."""

    key: jax.Array
    above: jax.Array
    tied: jax.Array


def _row_histogram(digit_GxN: jax.Array, valid_GxN: jax.Array | None) -> jax.Array:
    """``hist[g, d]`` = number of valid entries of row ``g`` with 16-bit digit ``d``.

    ``valid_GxN=None`` (all valid) skips the masking, which costs as much as the scatter itself.
    """
    rows = digit_GxN.shape[0]
    bins_GxN = jnp.arange(rows, dtype=jnp.int32)[:, None] * _NUM_BINS + digit_GxN
    if valid_GxN is None:
        return jnp.zeros(rows * _NUM_BINS, jnp.int32).at[bins_GxN].add(1).reshape(rows, _NUM_BINS)
    bins_GxN = jnp.where(valid_GxN, bins_GxN, rows * _NUM_BINS)
    hist = jnp.zeros(rows * _NUM_BINS + 1, jnp.int32).at[bins_GxN].add(1, mode="drop")
    return hist[:-1].reshape(rows, _NUM_BINS)


def _and_valid(mask_GxN: jax.Array, valid_GxN: jax.Array | None) -> jax.Array:
    return mask_GxN if valid_GxN is None else mask_GxN & valid_GxN


#: ``histogram(level, prefix_R)``: int32 ``[R, 65536]``, per row how many valid keys whose digits
#: above ``level`` equal those of ``prefix_R[r]`` have each digit ``level``.
DigitHistogram = Callable[[int, jax.Array], jax.Array]


def radix_kth(histogram: DigitHistogram, k_R: jax.Array, dtype) -> Threshold:
    """Per row, the ``k_R``-th largest key (1-based) of integer ``dtype``, digit by digit.

    Level 0 histograms the most significant 16 bits and finds the bucket holding the k-th largest
    key; each further level histograms the next digit of the keys in the buckets found so far and
    finds the ``k − #(keys above the bucket)``-th largest there.  The counts of the result come
    from the histograms: ``key_digits(dtype)`` passes, no further pass over the keys.
    """
    unsigned = jnp.dtype(f"uint{np.dtype(dtype).itemsize * 8}")
    digits = key_digits(dtype)
    prefix_R = jnp.zeros(k_R.shape, unsigned)
    above_R = jnp.zeros(k_R.shape, jnp.int32)
    tied_R = above_R
    for level in range(digits):
        bucket_R, above_level_R, tied_R = select_bucket(
            histogram(level, lax.bitcast_convert_type(prefix_R, dtype)), k_R - above_R
        )
        above_R = above_R + above_level_R
        shift = _DIGIT_BITS * (digits - 1 - level)
        prefix_R = prefix_R | (bucket_R.astype(unsigned) << shift)
    return Threshold(lax.bitcast_convert_type(prefix_R, dtype), above_R, tied_R)


def kth_largest_histogram(
    keys_GxN: jax.Array, k_G: jax.Array, valid_GxN: jax.Array | None
) -> Threshold:
    """Per row, the k-th largest valid key (1-based), by a radix select (:func:`radix_kth`).

    Pass 1 histograms the high 16 bits of every valid key (one scatter-add for all rows) and finds,
    per row, the bucket ``h`` holding the k-th largest; the next pass histograms the next 16 bits
    of the keys in bucket ``h`` and finds the k'-th largest there (``k' = k − #(high > h)``), and
    so on: two passes for int32 keys, four for int64.

    Args:
      keys_GxN: int32 or int64 keys ``>= 0``, ``G`` independent rows of ``N``.
      k_G: int32, ``1 <= k[g] <= #valid in row g``.
      valid_GxN: bool, or ``None`` for all valid; invalid entries are ignored.
    """

    def histogram(level: int, prefix_G: jax.Array) -> jax.Array:
        digit_GxN = key_digit(keys_GxN, level)
        if level == 0:
            return _row_histogram(digit_GxN, valid_GxN)
        in_bucket_GxN = same_leading_digits(keys_GxN, prefix_G[:, None], level)
        return _row_histogram(digit_GxN, _and_valid(in_bucket_GxN, valid_GxN))

    return radix_kth(histogram, k_G, keys_GxN.dtype)


def kth_largest_bisect(
    keys_GxN: jax.Array, k_G: jax.Array, valid_GxN: jax.Array | None
) -> Threshold:
    """Same contract as :func:`kth_largest_histogram`, found bit by bit: 31 (int32) or 63 (int64)
    passes of ``count(key >= candidate)`` — reductions only, no scatter."""
    dtype = keys_GxN.dtype
    masked_GxN = keys_GxN if valid_GxN is None else jnp.where(valid_GxN, keys_GxN, -1)
    bits = dtype.itemsize * 8 - 1  # the sign bit of a key is 0

    def count(op, t_G):
        return jnp.sum(op(masked_GxN, t_G[:, None]), axis=1, dtype=jnp.int32)

    def set_bit(i, prefix_G):
        candidate_G = prefix_G | (jnp.ones((), dtype) << (bits - 1 - i).astype(dtype))
        return jnp.where(count(jnp.greater_equal, candidate_G) >= k_G, candidate_G, prefix_G)

    t_G = lax.fori_loop(0, bits, set_bit, jnp.zeros(keys_GxN.shape[0], dtype))
    return Threshold(t_G, count(jnp.greater, t_G), count(jnp.equal, t_G))


Kth = Callable[[jax.Array, jax.Array, jax.Array], Threshold]


def _mask_from_threshold(
    keys_GxN: jax.Array, k_G: jax.Array, valid_GxN: jax.Array | None, kth: Kth
) -> jax.Array:
    """Top-k mask per row given a k-th-largest routine; ties go to lower indices.

    Entries above the threshold are kept; of those equal to it, the first ``k − above`` of each
    row — found only when some row's ties straddle the boundary, by a second select on
    ``index key = N − 1 − position`` (unique, larger for lower positions) among the tied entries.
    """
    t = kth(keys_GxN, k_G, valid_GxN)
    needed_G = k_G - t.above

    def all_at_or_above():
        return _and_valid(keys_GxN >= t.key[:, None], valid_GxN)

    def first_needed_ties():
        above_GxN = _and_valid(keys_GxN > t.key[:, None], valid_GxN)
        tied_GxN = _and_valid(keys_GxN == t.key[:, None], valid_GxN)
        n = keys_GxN.shape[1]
        index_keys_N = jnp.int32(n - 1) - jnp.arange(n, dtype=jnp.int32)
        index_keys_GxN = jnp.broadcast_to(index_keys_N, keys_GxN.shape)
        index_t = kth(index_keys_GxN, needed_G, tied_GxN)
        return above_GxN | (tied_GxN & (index_keys_GxN >= index_t.key[:, None]))

    return lax.cond(jnp.all(t.tied == needed_G), all_at_or_above, first_needed_ties)


def _mask_top_k(keys_N: jax.Array, k: int, valid_N: jax.Array) -> jax.Array:
    _, index_K = lax.top_k(jnp.where(valid_N, keys_N, -1), k)
    return jnp.zeros(keys_N.shape, bool).at[index_K].set(True)


def _mask_sort(keys_N: jax.Array, k: int, valid_N: jax.Array) -> jax.Array:
    order_N = jnp.argsort(-jnp.where(valid_N, keys_N, -1), stable=True)
    return jnp.zeros(keys_N.shape, bool).at[order_N[:k]].set(True)


def _batched_masks(
    keys: list[jax.Array], ks: list[int], valids: list[jax.Array | None], kth: Kth
) -> list[jax.Array]:
    """Masks for several key vectors of one length, selected together as rows of a matrix."""
    stack = (lambda xs: xs[0][None]) if len(keys) == 1 else jnp.stack
    if all(v is None for v in valids):
        valid_GxN = None
    else:
        valid_GxN = stack(
            [jnp.ones(x.shape, bool) if v is None else v for x, v in zip(keys, valids, strict=True)]
        )
    mask_GxN = _mask_from_threshold(stack(keys), jnp.array(ks, jnp.int32), valid_GxN, kth)
    return list(mask_GxN)


def top_k_masks(
    keys: list[jax.Array],
    ks: list[int],
    valids: list[jax.Array | None] | None = None,
    *,
    method: str = "auto",
) -> list[jax.Array]:
    """Bool masks of the ``ks[i]`` largest valid entries of each ``keys[i]``, ties to lower index.

    Vectors of equal length are selected together as the rows of one matrix, so the compiled
    program grows with the number of distinct lengths, not of leaves.

    Args:
      keys: int32 or int64 key vectors ``>= 0`` (e.g. :func:`magnitude_keys`); keys of one
        length but different dtypes are compared within their own vector only.
      ks: static counts, ``0 <= ks[i] <= #valid in keys[i]``.
      valids: optional candidate masks (``None`` entries: all valid).
      method: see the module docstring.

    Returns:
      One bool vector per input with exactly ``ks[i]`` True entries, all valid.
    """
    method = resolve_method(method)
    valids = list(valids) if valids is not None else [None] * len(keys)
    out: list[jax.Array | None] = [None] * len(keys)
    todo = []
    for i, (key, k, valid) in enumerate(zip(keys, ks, valids, strict=True)):
        n = int(key.shape[0])
        if k <= 0:
            out[i] = jnp.zeros((n,), bool)
        elif valid is None and k >= n:
            out[i] = jnp.ones((n,), bool)
        else:
            todo.append(i)
    full = [v if v is not None else jnp.ones(keys[i].shape, bool) for i, v in enumerate(valids)]
    if method == "top_k":
        for i in todo:
            out[i] = _mask_top_k(keys[i], ks[i], full[i])
    elif method == "sort":
        for i in todo:
            out[i] = _mask_sort(keys[i], ks[i], full[i])
    else:
        kth = kth_largest_bisect if method == "bisect" else kth_largest_histogram
        by_length: dict[int, list[int]] = {}
        for i in todo:
            by_length.setdefault(int(keys[i].shape[0]), []).append(i)
        for group in by_length.values():
            masks = _batched_masks(
                [keys[i] for i in group], [ks[i] for i in group], [valids[i] for i in group], kth
            )
            for i, m in zip(group, masks, strict=True):
                out[i] = m
    return out


def top_k_keys_mask(
    keys_N: jax.Array, k: int, valid_N: jax.Array | None = None, *, method: str = "auto"
) -> jax.Array:
    """Bool ``[N]`` mask of the ``k`` largest valid keys (exactly ``k`` True), ties to the lower
    index.  See :func:`top_k_masks`."""
    return top_k_masks([keys_N], [k], [valid_N], method=method)[0]


def top_k_magnitude_mask(x: jax.Array, k: int, *, method: str = "auto") -> jax.Array:
    """Mask of the ``k`` entries of largest ``|x|``; same shape as ``x``.

    Equals ``np.isin(arange(x.size), np.argsort(-abs(x).ravel(), kind="stable")[:k])`` reshaped.
    """
    return sharding.unflatten_like(top_k_keys_mask(magnitude_keys(x), k, method=method), x)
