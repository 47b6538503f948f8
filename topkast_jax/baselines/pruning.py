"""Gradual magnitude pruning (Zhu & Gupta 2018, "To prune, or not to prune").

Dense until ``begin_step``; at each pruning step ``t`` (every ``frequency`` steps from
``begin_step`` to ``end_step``) each sparse leaf keeps the ``k_t`` weights of largest ``|θ|``
among those still active, where ``k_t`` follows the cubic target sparsity
``s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³`` (see :mod:`topkast_jax.baselines.schedules`).
Pruned weights are set to exactly 0 by the update and never come back (the masks are nested:
``M_{t'} ⊆ M_t`` for ``t' > t``); after ``end_step`` the mask is fixed at ``s_f``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from topkast_jax import selection
from topkast_jax.baselines import schedules
from topkast_jax.baselines.base import LeafUpdate, MaskRule, masked_baseline
from topkast_jax.baselines.select import top_k_magnitude_traced
from topkast_jax.plan import LeafDensity, check_sparsity
from topkast_jax.validation import check_int


def magnitude_mask(params_N: jax.Array, k: int, rng: jax.Array) -> jax.Array:
    """bool ``[N]``: the ``k`` entries of largest magnitude (``rng`` unused)."""
    return selection.top_k_magnitude_mask(params_N, k)


def prune_by_magnitude(leaf: LeafUpdate) -> jax.Array:
    """The ``count`` weights of largest ``|θ|`` among the active ones (nested masks)."""
    return top_k_magnitude_traced(leaf.params_N, leaf.count, leaf.mask_N)


def pruning_rule(
    *,
    sparsity: float,
    initial_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int,
    distribution: str,
) -> MaskRule:
    """The :class:`MaskRule` of gradual magnitude pruning."""
    steps = schedules.pruning_steps(begin_step, end_step, frequency)

    def counts_at_steps(sparse_plan: list[LeafDensity]) -> list[list[int]]:
        shapes = [leaf.shape for leaf in sparse_plan]
        previous = [leaf.size for leaf in sparse_plan]
        rows = []
        for t in steps:
            target = schedules.pruning_sparsity(
                t,
                initial_sparsity=initial_sparsity,
                final_sparsity=sparsity,
                begin_step=begin_step,
                end_step=end_step,
            )
            counts = schedules.leaf_keep_counts(shapes, target, distribution)
            previous = [min(a, b) for a, b in zip(previous, counts, strict=True)]
            rows.append(previous)
        return rows

    def initial_counts(sparse_plan: list[LeafDensity]) -> list[int]:
        if begin_step == 0:
            return counts_at_steps(sparse_plan)[0]
        return [leaf.size for leaf in sparse_plan]

    def schedule(sparse_plan: list[LeafDensity]) -> schedules.EventTable:
        rows = counts_at_steps(sparse_plan)
        later = [(t, row) for t, row in zip(steps, rows, strict=True) if t > 0]
        return schedules.make_table(
            [t for t, _ in later], [row for _, row in later], len(sparse_plan)
        )

    return MaskRule(
        initial_counts=initial_counts,
        initial_mask=magnitude_mask,
        schedule=schedule,
        update_mask=prune_by_magnitude,
    )


def magnitude_pruning(
    inner: optax.GradientTransformation,
    *,
    sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int = 100,
    initial_sparsity: float = 0.0,
    sparsify: Any = None,
    distribution: str = "uniform",
    seed: int = 0,
    layer_axis: Any = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Gradual magnitude pruning of Zhu & Gupta (2018) around any optax optimizer.

    Args:
      inner, sparsify: as in :func:`~topkast_jax.baselines.static_sparse`.
      sparsity: final sparsity ``s_f`` of the sparse leaves, in ``[0, 1)``.
      begin_step: ``t₀``, the first pruning step (dense before it).
      end_step: the last pruning step ``t₀ + nΔt`` (``>= begin_step``); ``s_f`` from there on.
      frequency: ``Δt``, steps between pruning steps (Zhu & Gupta: 100 to 1000).
      initial_sparsity: ``s_i``, the target at ``begin_step`` (``<= sparsity``).
      distribution: ``"uniform"`` or ``"erk"`` — how each step's target spreads over leaves.
      seed: unused by the rule (kept for a uniform interface).
      layer_axis: stacked-layer axes, as in :func:`topkast_jax.topkast` (pruned per slice).

    Returns:
      A transformation like :func:`~topkast_jax.baselines.static_sparse`'s.

    Example:
      >>> import jax.numpy as jnp, optax, topkast_jax as tk
      >>> from topkast_jax import baselines
      >>> params = {"w": jnp.arange(1.0, 21.0).reshape(4, 5)}
      >>> tx = baselines.magnitude_pruning(
      ...     optax.sgd(0.0), sparsity=0.8, begin_step=0, end_step=0)
      >>> tk.get_masks(tx.init(params)).forward["w"].sum()
      Array(4, dtype=int32)

    References:
      Zhu & Gupta, 2018. https://arxiv.org/abs/1710.01878
    """
    sparsity = check_sparsity("sparsity", sparsity)
    initial_sparsity = check_sparsity("initial_sparsity", initial_sparsity)
    if initial_sparsity > sparsity:
        raise ValueError(
            f"initial_sparsity ({initial_sparsity}) must be <= sparsity ({sparsity}): pruning "
            "only removes weights."
        )
    begin_step = check_int("begin_step", begin_step, 0)
    end_step = check_int("end_step", end_step, begin_step)
    frequency = check_int("frequency", frequency, 1)
    rule = pruning_rule(
        sparsity=sparsity,
        initial_sparsity=initial_sparsity,
        begin_step=begin_step,
        end_step=end_step,
        frequency=frequency,
        distribution=distribution,
    )
    common = dict(
        sparsity=sparsity,
        sparsify=sparsify,
        distribution=distribution,
        seed=seed,
        layer_axis=layer_axis,
    )
    return masked_baseline(inner, rule, name="magnitude_pruning", **common)
