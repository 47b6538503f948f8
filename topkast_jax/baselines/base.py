"""One optax transformation shared by the baselines; each baseline is a :class:`MaskRule`.

For a sparse leaf with mask ``M`` (``|M| = k`` active weights) the model sees ``α = θ ⊙ M``
(:func:`topkast_jax.forward_params`) and the gradient ``g = ∂L/∂α``, which is the dense gradient:
for ``i ∉ M``, ``∂L/∂α_i`` is exactly what RigL needs to regrow.  ``update(g, state, θ)``, the
``c``-th call (``c = state.count`` updates before it):

1. the inner optimizer runs on ``g ⊙ M``; its updates ``u`` and its param-shaped state are zeroed
   outside ``M`` (:func:`topkast_jax.transform.sparse_inner_update`), so a weight outside ``M``
   never moves, not even through momentum;
2. if the rule's :class:`~topkast_jax.baselines.schedules.EventTable` has an event for this call,
   the rule computes the new mask ``M'`` per leaf from the weights it ranks, ``g`` and the table's
   count.  Two timings (:attr:`MaskRule.skip_gradient`):

   * *after the step* (pruning, SET): the event is keyed ``c + 1`` (the updates done once this one
     is applied) and the rule ranks ``θ + u``;
   * *instead of the step* (RigL, as google-research/rigl's ``SparseRigLOptimizer`` and jaxpruner
     do): the event is keyed ``c`` and the rule ranks ``θ``; this call applies no gradient step —
     ``u = 0`` on every leaf, dense ones included, and the inner state is not advanced (so an
     optax schedule inside it counts gradient steps, like RigL's ``global_step``);
3. the returned update is ``u`` on ``M ∩ M'`` and ``−θ`` elsewhere, so after
   ``optax.apply_updates`` every weight outside ``M ∩ M'`` is exactly 0: dropped weights are
   zeroed, grown weights (``M' ∖ M``) start at 0, and from the first update on ``θ ⊙ M = θ``;
   the inner state is zeroed outside ``M ∩ M'`` too, so grown weights start with zero moments.

Dense leaves (not selected by ``sparsify``) get the inner optimizer's update untouched (zero on a
call that skips the gradient step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from topkast_jax import boxes, layers
from topkast_jax import sparsify as sparsify_lib
from topkast_jax import stats as stats_lib
from topkast_jax.baselines.schedules import EventTable
from topkast_jax.baselines.state import BaselineState
from topkast_jax.plan import (
    LeafDensity,
    check_sparsity,
    layer_densities,
    slice_plan,
    unflatten_sparse,
)
from topkast_jax.state import Masks
from topkast_jax.transform import sparse_inner_update, zero_inner_state_outside, zero_outside
from topkast_jax.tree import map_sparse
from topkast_jax.validation import check_distribution


class LeafUpdate(NamedTuple):
    """What a rule sees of one sparse leaf at a mask update (all flattened, shape ``[N]``).

    Attributes:
      mask_N: bool, the current mask ``M``.
      params_N: the weights the rule ranks (zero outside ``M`` from the first update on):
        ``θ + u`` after this call's update, or ``θ`` for a rule that skips the gradient step.
      grads_N: the dense gradient ``∂L/∂α`` of this step.
      count: int32 scalar, the schedule's count for this leaf at this step.
      rng: PRNG key for this leaf.
    """

    mask_N: jax.Array
    params_N: jax.Array
    grads_N: jax.Array
    count: jax.Array
    rng: jax.Array


class MaskRule(NamedTuple):
    """How one baseline chooses its masks.

    Attributes:
      initial_counts: sparse plan -> active weights per sparse leaf at initialisation.
      initial_mask: ``(θ₀_N, k, rng) -> M₀_N`` with exactly ``k`` True entries.
      schedule: sparse plan -> the steps and per-leaf counts of the mask updates.
      update_mask: ``LeafUpdate -> M'_N``, the new mask of one leaf at a scheduled step.
      skip_gradient: ``False``: the mask changes after the call's gradient step, at the table's
        steps ``c + 1`` (``c = state.count`` before the call), from ``θ + u``.  ``True`` (RigL):
        the mask changes instead of the gradient step, at the table's steps ``c``, from ``θ``.
    """

    initial_counts: Callable[[list[LeafDensity]], list[int]]
    initial_mask: Callable[[jax.Array, int, jax.Array], jax.Array]
    schedule: Callable[[list[LeafDensity]], EventTable]
    update_mask: Callable[[LeafUpdate], jax.Array]
    skip_gradient: bool = False


def sparse_values(tree: Any, plan: list[LeafDensity]) -> list[Any]:
    """The leaves of a params-shaped ``tree`` (``None`` holes allowed) marked sparse by the plan."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: x is None)
    return [x for x, leaf in zip(leaves, plan, strict=True) if leaf.sparse]


def mask_densities(params: Any, mask_tree: Any, plan: list[LeafDensity]) -> Any:
    """float32 ``|M| / n`` per sparse leaf (``None`` on dense leaves): a scalar, or per slice for a
    leaf with a layer axis (:func:`topkast_jax.layers.slice_mean`); no Flax box around them."""
    values = [
        layers.slice_mean(m, leaf.layer_axis)
        for m, leaf in zip(sparse_values(mask_tree, plan), _sparse(plan), strict=True)
    ]
    return boxes.strip(unflatten_sparse(params, plan, values))


def _sparse(plan: list[LeafDensity]) -> list[LeafDensity]:
    return [leaf for leaf in plan if leaf.sparse]


def per_slice(
    fn: Callable[..., jax.Array],
    leaf: LeafDensity,
    arrays: list[jax.Array],
    slice_args: list[jax.Array],
) -> jax.Array:
    """``fn(*flat arrays, *args)`` → a flat mask, for every slice of one sparse leaf: once on the
    flattened leaf without a layer axis, vmapped over its ``L`` slices (rows of
    :func:`topkast_jax.layers.to_rows`, ``slice_args`` with a leading ``L`` axis) otherwise;
    returns the leaf-shaped mask."""
    like = arrays[0]
    if leaf.layer_axis is None:
        flat = fn(*[a.ravel() for a in arrays], *[v[0] for v in slice_args])
        return flat.reshape(like.shape)
    rows = [layers.to_rows(a, leaf.layer_axis) for a in arrays]
    return layers.from_rows(jax.vmap(fn)(*rows, *slice_args), like, leaf.layer_axis)


def drop_to_zero(updates: Any, kept: Any, params: Any) -> Any:
    """``u`` on the kept weights, ``−θ`` elsewhere, so ``θ + update`` is exactly 0 there."""
    return map_sparse(lambda u, k, p: jnp.where(k, u, -p.astype(u.dtype)), updates, kept, params)


def masked_baseline(
    inner: optax.GradientTransformation,
    rule: MaskRule,
    *,
    name: str,
    sparsity: float,
    sparsify: Any,
    distribution: str,
    seed: int,
    layer_axis: Any = "auto",
) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of a baseline (see the module docstring).

    Args:
      inner: the optimizer that turns masked gradients into updates.
      rule: the baseline's mask rule.
      name: the baseline's name, for error messages.
      sparsity: the (final) fraction of zeros on sparse leaves, in ``[0, 1)``.
      sparsify: bool pytree or callable ``params -> bool pytree``; ``None``:
        :func:`topkast_jax.sparsify.default` (Flax naming: ``kernel`` and ``embedding`` leaves).
      distribution: ``"uniform"`` or ``"erk"``.
      seed: PRNG seed of the random masks.
      layer_axis: stacked-layer axes, as in :func:`topkast_jax.topkast`: every slice is masked,
        counted and scheduled as a leaf of its own.

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1)`` or an unknown ``distribution`` (here), a bad
        ``sparsify`` (at ``init``).
    """
    sparsity = check_sparsity("sparsity", sparsity)
    check_distribution(distribution)
    sparsify = sparsify if sparsify is not None else sparsify_lib.default()

    def plan_for(params: Any) -> list[LeafDensity]:
        return layer_densities(
            params,
            sparsify=sparsify,
            forward_sparsity=sparsity,
            distribution=distribution,
            layer_axis=layer_axis,
        )

    def init_fn(params: Any) -> BaselineState:
        plan = plan_for(params)
        counts = rule.initial_counts(slice_plan(_sparse(plan)))
        rng, mask_rng = jax.random.split(jax.random.PRNGKey(seed))
        slice_rngs = jax.random.split(mask_rng, max(1, len(counts)))
        masks, start = [], 0
        for p, leaf in zip(sparse_values(params, plan), _sparse(plan), strict=True):
            k = counts[start]  # the slices of a leaf share their shape, hence their count

            def initial(x_N, r, k=k):
                return rule.initial_mask(x_N, k, r)

            masks.append(per_slice(initial, leaf, [p], [slice_rngs[start : start + leaf.layers]]))
            start += leaf.layers
        mask_tree = unflatten_sparse(params, plan, masks)
        masks = Masks(forward=mask_tree, backward=mask_tree)
        return BaselineState(
            count=jnp.zeros((), jnp.int32),
            masks=masks,
            densities=mask_densities(params, mask_tree, plan),
            exploration_l2=jnp.zeros((), jnp.float32),
            stats=stats_lib.init_stats(masks),
            rng=rng,
            inner_state=inner.init(params),
        )

    def new_mask_tree(step, table, mask_tree, new_params, grads, plan, rng):
        counts_L = table.row(step)  # one count per slice
        slice_rngs = jax.random.split(rng, max(1, counts_L.shape[0]))
        rows = zip(
            sparse_values(mask_tree, plan),
            sparse_values(new_params, plan),
            sparse_values(grads, plan),
            _sparse(plan),
            strict=True,
        )

        def update(m_N, p_N, g_N, count, r):
            return rule.update_mask(LeafUpdate(m_N, p_N, g_N, count, r))

        masks, start = [], 0
        for m, p, g, leaf in rows:
            stop = start + leaf.layers
            masks.append(
                per_slice(update, leaf, [m, p, g], [counts_L[start:stop], slice_rngs[start:stop]])
            )
            start = stop
        return unflatten_sparse(new_params, plan, masks)

    def update_fn(grads, state: BaselineState, params=None, **extra_args):
        if params is None:
            raise ValueError(f"{name}'s update needs params: call tx.update(grads, state, params).")
        plan = plan_for(params)
        mask_tree = state.masks.forward
        updates, inner_state = sparse_inner_update(
            inner,
            zero_outside(grads, mask_tree),
            state.inner_state,
            params,
            mask_tree,
            **extra_args,
        )
        table = rule.schedule(slice_plan(_sparse(plan)))
        if rule.skip_gradient:  # the mask update replaces this call's gradient step
            step = state.count
            due = table.due(step)
            updates = jax.tree.map(lambda u: jnp.where(due, jnp.zeros((), u.dtype), u), updates)
            state_before = state.inner_state

            def ranked():
                return params

        else:  # the mask update follows this call's gradient step
            step = state.count + 1
            due = table.due(step)
            state_before = inner_state

            def ranked():
                return optax.apply_updates(params, updates)

        def refresh():
            rng, mask_rng = jax.random.split(state.rng)
            new_tree = new_mask_tree(step, table, mask_tree, ranked(), grads, plan, mask_rng)
            new_masks = Masks(forward=new_tree, backward=new_tree)
            stats = stats_lib.refresh_stats(state.stats, state.masks, new_masks)
            kept = jax.tree.map(jnp.logical_and, mask_tree, new_tree)
            return new_masks, stats, rng, zero_inner_state_outside(inner, state_before, kept)

        def keep():
            return state.masks, state.stats, state.rng, inner_state

        new_masks, stats, rng, inner_state = jax.lax.cond(due, refresh, keep)
        kept = jax.tree.map(jnp.logical_and, mask_tree, new_masks.forward)
        new_state = BaselineState(
            count=state.count + 1,
            masks=new_masks,
            densities=mask_densities(params, new_masks.forward, plan),
            exploration_l2=state.exploration_l2,
            stats=stats,
            rng=rng,
            inner_state=inner_state,
        )
        return drop_to_zero(updates, kept, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
