"""topkast_jax: Top-KAST (Top-K Always Sparse Training) for JAX and optax.

Public API::

    tx = topkast(inner, forward_sparsity=..., backward_sparsity=..., exploration_l2=..., ...)
    alpha = forward_params(params, opt_state)          # θ ⊙ A
    loss, grads = value_and_grad(loss_fn)(params, opt_state, batch)  # ∂L/∂α, not through A
    tx = check_exploration(tx, patience=5)             # debug: warn if B∖A gets no gradient
    masks = get_masks(opt_state)                       # Masks(forward=A, backward=B)
    penalty = exploration_penalty(params, opt_state)   # λ(½‖θ_A‖² + ½‖θ_{B∖A}‖²/D)
    stats = mask_stats(opt_state)                      # densities, mask change, reservoir
    inner = inner_state(opt_state)                     # the wrapped optimizer's own state
    exported = export.sparse_params(params, opt_state) # θ ⊙ A, compact: export.save/load
    tx = topkast(inner, structure=NM(2, 4), ...)       # N:M sets (extension of the paper)
    refresh = refresh_sets(tx)                         # A, B selected by a program of its own
"""

from topkast_jax import baselines, export, flops, nm, nnx, selection, sparsify
from topkast_jax.always_sparse import AlwaysSparse, AlwaysSparseState
from topkast_jax.debug import check_exploration
from topkast_jax.distributions import erk_densities, keep_count, leaf_densities, mask_counts
from topkast_jax.flops import LayerCost, train_flops_vs_dense
from topkast_jax.grad import value_and_grad
from topkast_jax.nm import NM
from topkast_jax.penalty import exploration_penalty
from topkast_jax.plan import LeafDensity, layer_densities
from topkast_jax.state import (
    Masks,
    MaskStats,
    TopKastState,
    find_sparse_state,
    forward_params,
    get_masks,
    inner_state,
)
from topkast_jax.stats import mask_stats
from topkast_jax.transform import refresh_sets, topkast

__version__ = "0.1.0"

__all__ = [
    "AlwaysSparse",
    "AlwaysSparseState",
    "LayerCost",
    "baselines",
    "flops",
    "train_flops_vs_dense",
    "LeafDensity",
    "MaskStats",
    "Masks",
    "NM",
    "TopKastState",
    "check_exploration",
    "erk_densities",
    "export",
    "exploration_penalty",
    "find_sparse_state",
    "forward_params",
    "get_masks",
    "inner_state",
    "keep_count",
    "layer_densities",
    "leaf_densities",
    "mask_counts",
    "mask_stats",
    "nm",
    "nnx",
    "refresh_sets",
    "selection",
    "sparsify",
    "topkast",
    "value_and_grad",
]
