"""Host side of always-sparse execution: exact ``A``/``B`` selection in numpy and the B layout.

The selection is the one of :func:`topkast_jax.masks.topkast_masks`, computed on the host copy of
``θ`` with numpy: for each sparse leaf (or, with ``global_topk``, for all sparse leaves
concatenated in leaf order) the ``k`` largest magnitude keys, ties to the lower row-major index,
i.e. exactly ``np.argsort(-key, kind="stable")[:k]``.  The key is the IEEE-754 bit pattern of
``|θ|`` (as float32, read as int32; as float64, read as int64, for float64 leaves and, in a global
selection, for every leaf when one is float64: :func:`topkast_jax.selection.magnitude_keys`), so
``-0.0`` and ``+0.0`` tie and NaN ranks as magnitude 0.  One ``np.partition`` finds the k-th
largest key ``t``; every key ``> t`` is kept and the first ``k − #(key > t)`` entries equal to
``t`` by index.

A sparse leaf's backward set ``B`` is held as its flat indices in ascending order (``idx[k_B]``,
int32) and the flags ``in_a[k_B]`` of those in ``A``.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import numpy as np

from topkast_jax import distributions, selection
from topkast_jax import masks as masks_lib
from topkast_jax.plan import LeafDensity


class Layout(NamedTuple):
    """``B`` of one sparse leaf: ``indices[k_B]`` int32 ascending, ``in_a[k_B]`` bool."""

    indices: np.ndarray
    in_a: np.ndarray


def magnitude_keys(x: np.ndarray, dtype=None) -> np.ndarray:
    """``[x.size]`` keys ordered like ``|x|``, row-major: numpy's evaluation of
    :func:`topkast_jax.selection.elementwise_magnitude_keys` (int32, or int64 for float64 values
    or ``dtype=int64``; NaN ranks as magnitude 0)."""
    x = np.asarray(x)
    dtype = selection.key_dtype([x.dtype]) if dtype is None else np.dtype(dtype)
    float_type, inf_key = selection.key_float(dtype)
    key = np.ascontiguousarray(np.abs(x.astype(float_type)).ravel()).view(dtype)
    return np.where(key > inf_key, dtype.type(0), key)


def top_k_flat(keys_N: np.ndarray, k: int, valid_N: np.ndarray | None = None) -> np.ndarray:
    """bool ``[N]``: the ``k`` largest valid keys, ties to the lower index.

    Equals ``np.argsort(-key, kind="stable")[:k]`` over the valid entries (keys must be ``>= 0``).
    """
    if valid_N is not None:
        keys_N = np.where(valid_N, keys_N, np.int32(-1))
    n = keys_N.shape[0]
    if k <= 0:
        return np.zeros(n, bool)
    if k >= n:
        return np.ones(n, bool) if valid_N is None else valid_N.copy()
    t = np.partition(keys_N, n - k)[n - k]
    mask = keys_N > t
    need = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(keys_N == t)[:need]] = True
    return mask


def _random_keys(rng: np.ndarray, size: int) -> np.ndarray:
    """:func:`topkast_jax.masks.random_keys` evaluated on the host CPU (numpy result)."""
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(masks_lib.random_keys(jax.numpy.asarray(rng), size))


def _select(
    keys: list[np.ndarray],
    k_forward: list[int],
    k_backward: list[int],
    backward_selection: str,
    rng: np.ndarray | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(A, B)`` flat masks per key vector (``masks._select`` on the host)."""
    forward = [top_k_flat(x, k) for x, k in zip(keys, k_forward, strict=True)]
    if backward_selection == "magnitude":
        backward = [top_k_flat(x, k) for x, k in zip(keys, k_backward, strict=True)]
        return list(zip(forward, backward, strict=True))
    with jax.default_device(jax.devices("cpu")[0]):
        rngs = np.asarray(jax.random.split(jax.numpy.asarray(rng), len(keys)))
    out = []
    for r, x, a, ka, kb in zip(rngs, keys, forward, k_forward, k_backward, strict=True):
        grown = top_k_flat(_random_keys(r, x.shape[0]), kb - ka, ~a)
        out.append((a, a | grown))
    return out


def select_masks(
    thetas: list[np.ndarray],
    sparse_plan: list[LeafDensity],
    *,
    global_topk: bool,
    backward_selection: str,
    rng: np.ndarray | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Flat ``(A, B)`` bool masks of each sparse leaf's host ``θ``, as the masked transform.

    Args:
      thetas: the sparse leaves' dense host values, in plan order.
      sparse_plan: their :class:`~topkast_jax.plan.LeafDensity` entries.
      global_topk: one threshold over all leaves (ties by leaf order, then index).
      backward_selection: ``"magnitude"`` or ``"random"`` ``B∖A``.
      rng: legacy uint32[2] PRNG key, for ``"random"``.
    """
    common = selection.key_dtype(x.dtype for x in thetas) if global_topk else None
    keys = [magnitude_keys(x, common) for x in thetas]
    if not (global_topk and keys):
        return _select(
            keys,
            [leaf.k_forward for leaf in sparse_plan],
            [leaf.k_backward for leaf in sparse_plan],
            backward_selection,
            rng,
        )
    sizes = [leaf.size for leaf in sparse_plan]
    first = sparse_plan[0]
    k_fwd, k_bwd = distributions.mask_counts(first.forward, first.backward, sum(sizes))
    ((a_N, b_N),) = _select([np.concatenate(keys)], [k_fwd], [k_bwd], backward_selection, rng)
    splits = list(itertools.accumulate(sizes))[:-1]
    return list(zip(np.split(a_N, splits), np.split(b_N, splits), strict=True))


def layout(forward_N: np.ndarray, backward_N: np.ndarray) -> Layout:
    """The :class:`Layout` of flat masks ``A ⊆ B``."""
    indices = np.flatnonzero(backward_N).astype(np.int32)
    return Layout(indices, forward_N[indices])


def flat_masks(layout: Layout, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat bool ``(A[size], B[size])`` of a layout of a leaf of ``size`` weights."""
    a, b = np.zeros(size, bool), np.zeros(size, bool)
    b[layout.indices] = True
    a[layout.indices[layout.in_a]] = True
    return a, b


def carry_positions(
    old_K: np.ndarray, new_J: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where each new index sat in the old index vector (indices into a leaf of ``size``).

    Returns:
      ``(position[J] int32, found[J] bool)``: ``old[position[j]] == new[j]`` where ``found[j]``;
      entries not found entered ``B`` and start from zero inner state (their position is 0).
    """
    slot_N = np.full(size, -1, np.int32)  # one scatter and one gather: no search
    slot_N[old_K] = np.arange(old_K.shape[0], dtype=np.int32)
    position = slot_N[new_J]
    found = position >= 0
    return np.where(found, position, 0).astype(np.int32), found
