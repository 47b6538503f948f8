"""Exact top-k masks whose ``k`` is a traced value (it changes with the step inside ``jit``).

:func:`topkast_jax.selection.top_k_keys_mask` needs a static ``k``; the baselines' counts follow
schedules indexed by the (traced) step.  This module finds the k-th largest key with the core's
radix select (:func:`topkast_jax.selection.kth_largest_histogram`, or ``..._bisect`` on TPU, on a
single row), which accepts a traced ``k`` and also returns how many keys lie above the threshold,
and breaks ties at the threshold by a running count along the row, so the result is the
core's tie rule: the selected set equals ``np.argsort(-key, kind="stable")[:k]`` restricted to the
valid entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from topkast_jax import selection


def top_k_mask_traced(keys_N: jax.Array, k: jax.Array, valid_N: jax.Array) -> jax.Array:
    """bool ``[N]``: the ``k`` valid entries of largest key, ties to the lower index.

    Args:
      keys_N: int32 or int64 keys ``>= 0``, shape ``[N]`` (e.g.
        :func:`topkast_jax.selection.magnitude_keys`, int64 for float64 values).
      k: int32 scalar, may be traced, ``0 <= k <= sum(valid_N)``.
      valid_N: bool ``[N]``, the candidates.

    Returns:
      bool ``[N]`` with exactly ``k`` True entries, all valid.
    """
    kth = (
        selection.kth_largest_bisect
        if selection.resolve_method("auto") == "bisect"
        else selection.kth_largest_histogram
    )
    k = jnp.asarray(k, jnp.int32)
    k_at_least_1 = jnp.maximum(k, 1)
    threshold = kth(keys_N[None], k_at_least_1[None], valid_N[None])  # one row
    above_N = valid_N & (keys_N > threshold.key[0])
    tied_N = valid_N & (keys_N == threshold.key[0])
    needed = k_at_least_1 - threshold.above[0]
    first_tied_N = tied_N & (jnp.cumsum(tied_N, dtype=jnp.int32) <= needed)
    return (above_N | first_tied_N) & (k > 0)


def top_k_magnitude_traced(x_N: jax.Array, k: jax.Array, valid_N: jax.Array) -> jax.Array:
    """bool ``[N]``: the ``k`` valid entries of largest ``|x|`` (traced ``k``, core tie rule)."""
    return top_k_mask_traced(selection.magnitude_keys(x_N), k, valid_N)
