"""Exact top-k masks without sorting.

Every selection in the library reduces to one question: given integer keys ``key_N`` (int32, all
``>= 0``) and an optional validity mask ``valid_N``, which ``k`` valid entries have the largest
keys, ties going to the lower (row-major) index?  The answer equals

    ``np.argsort(-key, kind="stable")[:k]``    (restricted to valid entries)

exactly.  Magnitude selection uses the IEEE-754 bit pattern of ``|θ|`` as the key: for
non-negative floats the bit pattern, read as an integer, is monotone in the value, so ordering keys
orders magnitudes (``-0.0`` and ``+0.0`` both become key 0; ``NaN`` sorts above ``inf``).

Methods (all exact, all give identical masks):

* ``"histogram"`` — radix select with two 16-bit digits.  Pass 1 histograms the high 16 bits
  (one scatter-add over ``N``), a reverse cumulative sum over the 65,536 bins finds the bucket
  holding the k-th largest key; pass 2 histograms the low 16 bits inside that bucket.  The k-th key
  ``t`` is then exact, and the mask is ``key > t`` plus the first ``k - #(key > t)`` entries equal
  to ``t`` (found, only when ties straddle the boundary, by the same select over ``~index``).
  About 3 passes over memory; the fastest here on CPU (see BENCHMARKS.md).
* ``"bisect"`` — the same threshold found bit by bit: 31 passes of ``count(key >= candidate)``.
  Only reductions, no scatter: the choice for TPUs, where scatter is slow.
* ``"top_k"`` — ``jax.lax.top_k`` (documented to prefer the lower index on ties) and a scatter.
* ``"sort"`` — a full stable ``argsort`` (what jaxpruner does); the reference point.
* ``"auto"`` — ``"bisect"`` on TPU, ``"histogram"`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

METHODS = ("auto", "histogram", "bisect", "top_k", "sort")

_DIGIT_BITS = 16
_NUM_BINS = 1 << _DIGIT_BITS


def magnitude_keys(x: jax.Array) -> jax.Array:
    """Integer keys ordered like ``|x|``.

    Args:
      x: float array of any shape (bfloat16/float16 are widened to float32 exactly).

    Returns:
      int32 array of ``x.size`` keys ``>= 0`` (row-major), with ``key_i < key_j`` iff
      ``|x_i| < |x_j|``.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"magnitude_keys needs a floating array, got dtype {x.dtype}.")
    x32 = jnp.abs(x.astype(jnp.float32)).ravel()
    return lax.bitcast_convert_type(x32, jnp.int32)


def resolve_method(method: str) -> str:
    """Maps ``"auto"`` to the fastest exact method of the default backend."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method != "auto":
        return method
    return "bisect" if jax.default_backend() == "tpu" else "histogram"


def _reverse_cumsum(h: jax.Array) -> jax.Array:
    """``out[..., b] = sum(h[..., b:])`` along the last axis."""
    return jnp.cumsum(h[..., ::-1], axis=-1)[..., ::-1]


def _digit_histogram(digit_N: jax.Array, valid_N: jax.Array) -> jax.Array:
    """Counts of each 16-bit digit value among valid entries (shape ``[65536]``)."""
    bins = jnp.where(valid_N, digit_N, _NUM_BINS)
    return jnp.zeros(_NUM_BINS + 1, jnp.int32).at[bins].add(1, mode="drop")[:_NUM_BINS]


def _largest_at_least(at_least: jax.Array, k: jax.Array, beyond: jax.Array):
    """For non-increasing ``at_least`` (``at_least[b] = #(digit >= b)``): the largest ``b`` with
    ``at_least[b] >= k``, and ``at_least[b + 1]`` (``beyond`` past the end)."""
    b = jnp.sum(at_least >= k) - 1
    return b, jnp.concatenate([at_least, beyond[None]])[b + 1]


def _select_bucket(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Largest bucket ``b`` with ``#(digit >= b) >= k``, and ``#(digit > b)``.

    Two levels of 256 (rows of 256 buckets, then the buckets of one row), so the scan costs
    2 × 256 instead of 65,536 sequential additions.
    """
    hist_RxC = hist.reshape(256, 256)
    row_at_least = _reverse_cumsum(hist_RxC.sum(axis=1))
    row, above_row = _largest_at_least(row_at_least, k, jnp.int32(0))
    col_at_least = _reverse_cumsum(hist_RxC[row]) + above_row
    col, above = _largest_at_least(col_at_least, k, above_row)
    return row * 256 + col, above


def kth_largest_histogram(keys_N: jax.Array, k: jax.Array, valid_N: jax.Array) -> jax.Array:
    """The k-th largest valid key (1-based), by a two-digit radix select.

    Args:
      keys_N: int32 keys ``>= 0``, shape ``[N]``.
      k: number of entries to keep, ``1 <= k <= sum(valid_N)``.
      valid_N: bool, shape ``[N]``; invalid entries are ignored.

    Returns:
      int32 scalar ``t`` with ``#(valid & key > t) < k <= #(valid & key >= t)``.
    """
    ukeys = lax.bitcast_convert_type(keys_N, jnp.uint32)
    high = (ukeys >> _DIGIT_BITS).astype(jnp.int32)
    high_bucket, above = _select_bucket(_digit_histogram(high, valid_N), k)
    low = (ukeys & (_NUM_BINS - 1)).astype(jnp.int32)
    in_bucket = valid_N & (high == high_bucket)
    low_bucket, _ = _select_bucket(_digit_histogram(low, in_bucket), k - above)
    threshold = (high_bucket.astype(jnp.uint32) << _DIGIT_BITS) | low_bucket.astype(jnp.uint32)
    return lax.bitcast_convert_type(threshold, jnp.int32)


def kth_largest_bisect(keys_N: jax.Array, k: jax.Array, valid_N: jax.Array) -> jax.Array:
    """Same contract as :func:`kth_largest_histogram`, found bit by bit (31 counting passes)."""
    masked = jnp.where(valid_N, keys_N, -1)

    def set_bit(i, prefix):
        candidate = prefix | (jnp.int32(1) << (30 - i))
        count = jnp.sum(masked >= candidate, dtype=jnp.int32)
        return jnp.where(count >= k, candidate, prefix)

    return lax.fori_loop(0, 31, set_bit, jnp.int32(0))


def _mask_from_threshold(
    keys_N: jax.Array,
    k: jax.Array,
    valid_N: jax.Array,
    kth: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """Top-k mask given a k-th-largest routine; ties at the threshold go to lower indices."""
    threshold = kth(keys_N, k, valid_N)
    above_N = valid_N & (keys_N > threshold)
    tied_N = valid_N & (keys_N == threshold)
    needed = k - jnp.sum(above_N, dtype=jnp.int32)

    def first_needed_ties():
        # Lower index == larger key ~index; select `needed` of them among the tied entries.
        index_keys_N = jnp.int32(keys_N.shape[0] - 1) - jnp.arange(keys_N.shape[0], dtype=jnp.int32)
        index_threshold = kth(index_keys_N, needed, tied_N)
        return above_N | (tied_N & (index_keys_N >= index_threshold))

    all_ties_fit = jnp.sum(tied_N, dtype=jnp.int32) == needed
    return lax.cond(all_ties_fit, lambda: above_N | tied_N, first_needed_ties)


def _mask_top_k(keys_N: jax.Array, k: int, valid_N: jax.Array) -> jax.Array:
    _, index_K = lax.top_k(jnp.where(valid_N, keys_N, -1), k)
    return jnp.zeros(keys_N.shape, bool).at[index_K].set(True)


def _mask_sort(keys_N: jax.Array, k: int, valid_N: jax.Array) -> jax.Array:
    order_N = jnp.argsort(-jnp.where(valid_N, keys_N, -1), stable=True)
    return jnp.zeros(keys_N.shape, bool).at[order_N[:k]].set(True)


def top_k_keys_mask(
    keys_N: jax.Array, k: int, valid_N: jax.Array | None = None, *, method: str = "auto"
) -> jax.Array:
    """Bool mask of the ``k`` largest valid keys, ties to the lower index.

    Args:
      keys_N: int32 keys ``>= 0``, shape ``[N]``.
      k: static count, ``0 <= k <= #valid``.
      valid_N: optional bool mask of candidates (default: all).
      method: see the module docstring.

    Returns:
      bool ``[N]`` with exactly ``k`` True entries, all valid.
    """
    n = keys_N.shape[0]
    method = resolve_method(method)
    if valid_N is None:
        if k >= n:
            return jnp.ones((n,), bool)
        valid_N = jnp.ones((n,), bool)
    if k <= 0:
        return jnp.zeros((n,), bool)
    if method == "top_k":
        return _mask_top_k(keys_N, k, valid_N)
    if method == "sort":
        return _mask_sort(keys_N, k, valid_N)
    kth = kth_largest_histogram if method == "histogram" else kth_largest_bisect
    return _mask_from_threshold(keys_N, jnp.int32(k), valid_N, kth)


def top_k_magnitude_mask(x: jax.Array, k: int, *, method: str = "auto") -> jax.Array:
    """Mask of the ``k`` entries of largest ``|x|``; same shape as ``x``.

    Equals ``np.isin(arange(x.size), np.argsort(-abs(x).ravel(), kind="stable")[:k])`` reshaped.
    """
    return top_k_keys_mask(magnitude_keys(x), k, method=method).reshape(x.shape)
