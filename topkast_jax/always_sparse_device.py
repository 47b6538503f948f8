"""Device side of always-sparse execution: one training step on the ``k_B``-vectors.

The device holds, per sparse leaf with backward set ``B`` (``k_B`` entries):
``θ_B[k_B]`` (the leaf's dtype), ``idx[k_B]`` (int32 flat indices, ascending) and
``in_a[k_B]`` (bool, ``A ⊆ B``); dense leaves are held as they are.  A step:

1. ``z = θ_B ⊙ in_a`` and ``α = scatter(z at idx into zeros(shape))`` — the masked transform's
   ``α = θ ⊙ A``, built per leaf inside the jitted step;
2. ``g_B = ∂L/∂z = gather(∂L/∂α, idx)`` — plain autodiff of the scatter with respect to ``z``
   (not ``θ_B``, so ``B∖A`` gets ``∂L/∂α`` as in the masked transform);
3. ``g_B += λ s ⊙ θ_B`` with ``s = 1`` on ``A``, ``1/D`` on ``B∖A``
   (:func:`topkast_jax.penalty.penalty_scale`, the one definition);
4. the inner optimizer on the ``k_B``-vector pytree, ``θ_B ← θ_B + u_B``.

This is the masked :func:`topkast_jax.topkast` restricted to ``B``: the masked gradient, updates
and inner state are zero outside ``B``, so nothing outside ``B`` needs storing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from topkast_jax.penalty import penalty_scale


class DeviceState(NamedTuple):
    """What lives on the device between steps (params-shaped pytrees, ``None`` on dense leaves).

    Attributes:
      params: sparse leaves ``θ_B[k_B]``; dense leaves the dense array.
      indices: sparse leaves int32 ``[k_B]`` flat indices of ``B``, ascending.
      in_a: sparse leaves bool ``[k_B]``, which entries of ``B`` are in ``A``.
      inner_state: the inner optimizer's state for ``params`` (``k_B``-vectors on sparse leaves).
    """

    params: Any
    indices: Any
    in_a: Any
    inner_state: Any


class LeafSpec(NamedTuple):
    """Static description of a sparse leaf: dense ``shape`` and forward density ``D``."""

    shape: tuple[int, ...]
    forward: float


_SCATTER_DIMS = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
)


def densify(z_K: jax.Array, idx_K: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``α``: ``z`` scattered at flat ``idx`` into zeros of ``shape`` (gradient: gather at idx).

    ``lax.scatter`` directly: the indices are valid and unique by construction, so no
    negative-index normalisation (a leaf-of-``B``-sized copy of the indices) is needed.
    """
    size = math.prod(shape)
    # A zero that depends on this leaf's indices (they are >= 0): XLA cannot merge the leaves'
    # zero buffers into one shared broadcast that every scatter would have to copy.
    zero = jnp.minimum(idx_K[0], 0).astype(z_K.dtype)
    flat = jax.lax.scatter(
        jnp.broadcast_to(zero, (size,)),
        idx_K[:, None],
        z_K,
        _SCATTER_DIMS,
        indices_are_sorted=True,
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return flat.reshape(shape)


def _is_none(x: Any) -> bool:
    return x is None


def forward_values(params: Any, in_a: Any) -> Any:
    """``z = θ_B ⊙ in_a`` on sparse leaves, dense leaves unchanged."""
    return jax.tree.map(
        lambda p, a: p if a is None else jnp.where(a, p, jnp.zeros((), p.dtype)), params, in_a
    )


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["values", "indices"], meta_fields=["shape"]
)
@dataclasses.dataclass(frozen=True)
class SparseLeaf:
    """A sparse leaf's ``α`` not yet built: ``z[k_B]`` at flat ``indices[k_B]`` of ``shape``.

    With ``AlwaysSparse(..., lazy_alpha=True)`` the loss receives these in place of dense sparse
    leaves; the model densifies each where it is used (:func:`densify_leaves`, or
    :func:`topkast_jax.always_sparse_linen.layerwise` inside each Linen layer), so only the
    layers being computed hold a dense ``α``.
    """

    values: jax.Array
    indices: jax.Array
    shape: tuple[int, ...]

    def dense(self) -> jax.Array:
        """The dense ``α`` of this leaf."""
        return densify(self.values, self.indices, self.shape)


def is_sparse_leaf(x: Any) -> bool:
    return isinstance(x, SparseLeaf)


def densify_leaves(tree: Any) -> Any:
    """``tree`` with every :class:`SparseLeaf` replaced by its dense ``α``."""
    return jax.tree.map(
        lambda x: x.dense() if is_sparse_leaf(x) else x, tree, is_leaf=is_sparse_leaf
    )


def model_alpha(z: Any, indices: Any, specs: tuple[LeafSpec | None, ...], lazy: bool) -> Any:
    """What the loss receives: dense ``α`` leaves, or :class:`SparseLeaf` ones with ``lazy``."""
    leaves, treedef = jax.tree.flatten(z)
    idx = jax.tree.leaves(indices, is_leaf=_is_none)
    out = [
        x if spec is None else SparseLeaf(x, i, spec.shape)
        for x, i, spec in zip(leaves, idx, specs, strict=True)
    ]
    tree = jax.tree.unflatten(treedef, out)
    return tree if lazy else densify_leaves(tree)


def add_penalty(
    grads: Any, params: Any, in_a: Any, specs: tuple[LeafSpec | None, ...], l2: jax.Array
) -> Any:
    """``g_B + λ s ⊙ θ_B`` on sparse leaves (``s`` = 1 on ``A``, ``1/D`` on ``B∖A``)."""
    g_leaves, treedef = jax.tree.flatten(grads)
    p_leaves = jax.tree.leaves(params)
    a_leaves = jax.tree.leaves(in_a, is_leaf=_is_none)
    out = []
    for g, p, a, spec in zip(g_leaves, p_leaves, a_leaves, specs, strict=True):
        if spec is not None:
            d = jnp.asarray(spec.forward, jnp.float32)
            g = (g + l2 * penalty_scale(a, True, d) * p).astype(g.dtype)
        out.append(g)
    return jax.tree.unflatten(treedef, out)


def device_step(
    state: DeviceState,
    batch: Any,
    *,
    loss_fn: Callable[[Any, Any], jax.Array],
    inner: optax.GradientTransformation,
    specs: tuple[LeafSpec | None, ...],
    exploration_l2: float,
    lazy_alpha: bool = False,
    has_aux: bool = False,
) -> tuple[DeviceState, Any]:
    """One always-sparse training step (steps 1–4 of the module docstring).

    Returns:
      ``(new_state, loss)`` — ``(new_state, (loss, aux))`` with ``has_aux`` (``loss_fn`` then
      returns ``(loss, aux)``); indices and ``in_a`` are unchanged (they change at a refresh).
    """
    l2 = jnp.asarray(exploration_l2, jnp.float32)

    def loss_of(z):
        return loss_fn(model_alpha(z, state.indices, specs, lazy_alpha), batch)

    out, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(
        forward_values(state.params, state.in_a)
    )
    grads = add_penalty(grads, state.params, state.in_a, specs, l2)
    updates, inner_state = optax.with_extra_args_support(inner).update(
        grads, state.inner_state, state.params
    )
    params = optax.apply_updates(state.params, updates)
    return DeviceState(params, state.indices, state.in_a, inner_state), out


def carry_inner_state(
    inner: optax.GradientTransformation, inner_state: Any, positions: Any, found: Any
) -> Any:
    """Inner state for a new ``B``: entries still in ``B`` keep theirs, entering ones get zero.

    ``positions``/``found`` are params-shaped (``None`` on dense leaves): new entry ``j`` of a
    leaf takes old entry ``positions[j]`` where ``found[j]``, else zero.
    """

    def carry(v, pos, hit):
        if pos is None:
            return v
        return jnp.where(hit, v[pos], jnp.zeros((), v.dtype))

    return otu.tree_map_params(
        inner, carry, inner_state, positions, found, transform_non_params=lambda v: v
    )
