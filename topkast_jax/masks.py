"""Computing the forward set ``A`` and backward set ``B`` from the dense parameters.

``A`` = the ``k_A`` weights of largest ``|θ|``; ``B`` = the ``k_B`` of largest ``|θ|`` (so
``A ⊆ B``), or — the Table 1 ablation — ``A`` plus ``k_B − k_A`` weights drawn uniformly at random
among the rest.  Per leaf by default; with ``global_topk`` one threshold over all sparse leaves
(paper footnote 1), ties ordered by leaf order then row-major index.  A leaf with a layer axis is
selected per slice (:mod:`topkast_jax.layers`): its slices are rows like separate leaves.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp

from topkast_jax import distributions, layers, selection
from topkast_jax.plan import LeafDensity, unflatten_sparse
from topkast_jax.state import Masks

BACKWARD_SELECTIONS = ("magnitude", "random")


def random_keys(rng: jax.Array, size: int) -> jax.Array:
    """``size`` uniformly random int32 keys in ``[0, 2³¹)``."""
    bits = jax.random.bits(rng, (size,), jnp.uint32) >> 1
    return bits.astype(jnp.int32)


def _select(
    keys: list[jax.Array],
    k_forward: list[int],
    k_backward: list[int],
    backward_selection: str,
    rng: jax.Array | None,
    method: str,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """``(A, B)`` flat masks for each flat key vector."""
    if backward_selection == "magnitude":  # one batched selection for A and B
        both = selection.top_k_masks(keys + keys, k_forward + k_backward, method=method)
        return both[: len(keys)], both[len(keys) :]
    forward = selection.top_k_masks(keys, k_forward, method=method)
    rngs = jax.random.split(rng, len(keys))
    grown = selection.top_k_masks(
        [random_keys(r, x.shape[0]) for r, x in zip(rngs, keys, strict=True)],
        [kb - ka for ka, kb in zip(k_forward, k_backward, strict=True)],
        [~a for a in forward],
        method=method,
    )
    return forward, [a | g for a, g in zip(forward, grown, strict=True)]


def topkast_masks(
    params: Any,
    plan: list[LeafDensity],
    *,
    global_topk: bool = False,
    backward_selection: str = "magnitude",
    rng: jax.Array | None = None,
    method: str = "auto",
) -> Masks:
    """``Masks(A, B)`` for ``params`` following ``plan``.

    Args:
      params: dense params ``θ``.
      plan: from :func:`topkast_jax.plan.layer_densities`.
      global_topk: one magnitude threshold across all sparse leaves (densities from the plan's
        first sparse leaf, which are uniform in that mode).
      backward_selection: ``"magnitude"`` or ``"random"`` (for ``B∖A``).
      rng: PRNG key, needed for ``"random"``.
      method: selection method (see :mod:`topkast_jax.selection`).
    """
    leaves = [p for p, leaf in zip(jax.tree.leaves(params), plan, strict=True) if leaf.sparse]
    sparse_plan = [leaf for leaf in plan if leaf.sparse]
    if backward_selection == "random" and rng is None:
        raise ValueError('backward_selection="random" needs a PRNG key: pass rng.')
    # Global top-k compares keys across leaves: one key dtype for all (float64 bits if any).
    common = selection.key_dtype(p.dtype for p in leaves) if global_topk else None
    rows = [
        list(layers.to_rows(selection.elementwise_magnitude_keys(p, common), leaf.layer_axis))
        for p, leaf in zip(leaves, sparse_plan, strict=True)
    ]
    keys = [row for leaf_rows in rows for row in leaf_rows]  # leaf order, then slice order
    if global_topk and keys:
        sizes = [row.shape[0] for row in keys]
        first = sparse_plan[0]
        k_fwd, k_bwd = distributions.mask_counts(first.forward, first.backward, sum(sizes))
        (fwd_N,), (bwd_N,) = _select(
            [jnp.concatenate(keys)], [k_fwd], [k_bwd], backward_selection, rng, method
        )
        splits = list(itertools.accumulate(sizes))[:-1]
        forward, backward = jnp.split(fwd_N, splits), jnp.split(bwd_N, splits)
    else:
        forward, backward = _select(
            keys,
            [leaf.slice_k_forward for leaf in sparse_plan for _ in range(leaf.layers)],
            [leaf.slice_k_backward for leaf in sparse_plan for _ in range(leaf.layers)],
            backward_selection,
            rng,
            method,
        )

    def per_leaf(masks: list[jax.Array]) -> Any:
        out, start = [], 0
        for p, leaf in zip(leaves, sparse_plan, strict=True):
            rows_LxN = jnp.stack(masks[start : start + leaf.layers])
            out.append(layers.from_rows(rows_LxN, p, leaf.layer_axis))
            start += leaf.layers
        return unflatten_sparse(params, plan, out)

    return Masks(per_leaf(list(forward)), per_leaf(list(backward)))
