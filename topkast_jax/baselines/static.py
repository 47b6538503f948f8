"""Static random sparsity, and dense training in the same interface.

A mask drawn uniformly at random at initialisation (per leaf, ``k`` of the ``n`` weights with the
core's uniform or ERK densities), never changed.  Weights outside it are zero from the first
update on and never move.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from topkast_jax import selection
from topkast_jax.baselines import schedules
from topkast_jax.baselines.base import LeafUpdate, MaskRule, masked_baseline
from topkast_jax.masks import random_keys
from topkast_jax.plan import LeafDensity


def random_mask(params_N: jax.Array, k: int, rng: jax.Array) -> jax.Array:
    """bool ``[N]``: ``k`` entries drawn uniformly at random (exact count; ``params_N`` unused)."""
    return selection.top_k_keys_mask(random_keys(rng, params_N.shape[0]), k)


def planned_counts(sparse_plan: list[LeafDensity]) -> list[int]:
    """``k`` per sparse leaf at the plan's density (the core's rounding)."""
    return [leaf.k_forward for leaf in sparse_plan]


def no_updates(sparse_plan: list[LeafDensity]) -> schedules.EventTable:
    """The schedule of a mask that never changes."""
    return schedules.make_table([], [], len(sparse_plan))


def unchanged(leaf: LeafUpdate) -> jax.Array:
    """The current mask (never called: the schedule is empty)."""
    return leaf.mask_N


STATIC_RULE = MaskRule(
    initial_counts=planned_counts,
    initial_mask=random_mask,
    schedule=no_updates,
    update_mask=unchanged,
)


def static_sparse(
    inner: optax.GradientTransformation,
    *,
    sparsity: float,
    sparsify: Any = None,
    distribution: str = "uniform",
    seed: int = 0,
    layer_axis: Any = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Static random sparsity: a random mask at init, never changed.

    Args:
      inner: the optimizer that turns masked gradients into updates.
      sparsity: fraction of zeros on the sparse leaves, in ``[0, 1)``; leaf ``l`` keeps
        ``k_l = max(1, ⌊d_l n_l + ½⌋)`` weights (``d_l`` from ``distribution``).
      sparsify: which leaves are sparse, as in :func:`topkast_jax.topkast` (default:
        :func:`topkast_jax.sparsify.default`, Flax naming).
      distribution: ``"uniform"`` or ``"erk"`` densities over the sparse leaves.
      seed: PRNG seed of the mask.
      layer_axis: stacked-layer axes, as in :func:`topkast_jax.topkast` (default: the axis named
        ``"layers"`` in Flax metadata): each slice gets its own ``k`` and its own random mask.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`~topkast_jax.baselines.BaselineState`; ``update`` requires ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, topkast_jax as tk
      >>> from topkast_jax import baselines
      >>> params = {"w": jnp.ones((4, 5))}
      >>> tx = baselines.static_sparse(optax.sgd(0.1), sparsity=0.8)
      >>> int(tk.get_masks(tx.init(params)).forward["w"].sum())
      4
    """
    options = dict(locals())  # exactly the arguments above
    return masked_baseline(options.pop("inner"), STATIC_RULE, name="static_sparse", **options)


def dense(
    inner: optax.GradientTransformation, *, sparsify: Any = None
) -> optax.GradientTransformationExtraArgs:
    """Dense training in the baselines' interface: every mask is all-True, nothing is masked.

    Equivalent to ``inner`` (and to ``tk.topkast`` with both sparsities 0 and no penalty), but its
    state answers :func:`topkast_jax.forward_params`, :func:`topkast_jax.get_masks` and
    :func:`topkast_jax.mask_stats`, so a training loop needs no special case.
    """
    return static_sparse(inner, sparsity=0.0, sparsify=sparsify)
