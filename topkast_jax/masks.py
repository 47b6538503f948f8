"""Computing the forward set ``A`` and backward set ``B`` from the dense parameters.

``A`` = the ``k_A`` weights of largest ``|θ|``; ``B`` = the ``k_B`` of largest ``|θ|`` (so
``A ⊆ B``), or — the Table 1 ablation — ``A`` plus ``k_B − k_A`` weights drawn uniformly at random
among the rest.  Per leaf by default; with ``global_topk`` one threshold over all sparse leaves
(paper footnote 1), ties ordered by leaf order then row-major index.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp

from topkast_jax import distributions, selection
from topkast_jax.plan import LeafDensity, unflatten_sparse
from topkast_jax.state import Masks

BACKWARD_SELECTIONS = ("magnitude", "random")


def random_keys(rng: jax.Array, size: int) -> jax.Array:
    """``size`` uniformly random int32 keys in ``[0, 2³¹)``."""
    bits = jax.random.bits(rng, (size,), jnp.uint32) >> 1
    return bits.astype(jnp.int32)


def _select_flat(
    keys_N: jax.Array,
    k_forward: int,
    k_backward: int,
    backward_selection: str,
    rng: jax.Array,
    method: str,
) -> tuple[jax.Array, jax.Array]:
    """``(A_N, B_N)`` for one flat key vector."""
    forward_N = selection.top_k_keys_mask(keys_N, k_forward, method=method)
    if backward_selection == "magnitude":
        backward_N = selection.top_k_keys_mask(keys_N, k_backward, method=method)
    else:
        extra = k_backward - k_forward
        grown_N = selection.top_k_keys_mask(
            random_keys(rng, keys_N.shape[0]), extra, ~forward_N, method=method
        )
        backward_N = forward_N | grown_N
    return forward_N, backward_N


def _unflatten_leaves(flat_N: jax.Array, splits: list[int], leaves: list[Any]) -> list[jax.Array]:
    """Cuts a concatenation of flattened leaves back into leaf-shaped pieces."""
    pieces = jnp.split(flat_N, splits)
    return [piece.reshape(p.shape) for piece, p in zip(pieces, leaves, strict=True)]


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
    if rng is None:
        rng = jax.random.PRNGKey(0)
    if global_topk and sparse_plan:
        keys_N = jnp.concatenate([selection.magnitude_keys(p) for p in leaves])
        total = keys_N.shape[0]
        k_fwd, k_bwd = distributions.mask_counts(
            sparse_plan[0].forward, sparse_plan[0].backward, total
        )
        fwd_N, bwd_N = _select_flat(keys_N, k_fwd, k_bwd, backward_selection, rng, method)
        splits = list(itertools.accumulate(leaf.size for leaf in sparse_plan))[:-1]
        forward = [
            m.reshape(p.shape) for m, p in zip(jnp.split(fwd_N, splits), leaves, strict=True)
        ]
        backward = [
            m.reshape(p.shape) for m, p in zip(jnp.split(bwd_N, splits), leaves, strict=True)
        ]
    else:
        forward, backward = [], []
        leaf_rngs = jax.random.split(rng, max(1, len(leaves)))
        for p, leaf, leaf_rng in zip(leaves, sparse_plan, leaf_rngs, strict=False):
            fwd_N, bwd_N = _select_flat(
                selection.magnitude_keys(p),
                leaf.k_forward,
                leaf.k_backward,
                backward_selection,
                leaf_rng,
                method,
            )
            forward.append(fwd_N.reshape(p.shape))
            backward.append(bwd_N.reshape(p.shape))
    return Masks(unflatten_sparse(params, plan, forward), unflatten_sparse(params, plan, backward))
