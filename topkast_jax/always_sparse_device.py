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

Optionally (``grad_norm=True``) the step also returns ``‖∂L/∂α‖₂`` over every leaf — the dense
gradient, outside ``B`` included, before the penalty: the masked trainers' ``grad_norm``
(``optax.tree.norm`` of ``∂L/∂α``).  The dense ``∂L/∂α`` of a sparse leaf exists only inside the
backward pass of its scatter, so :func:`densify_probed` reports ``‖∂L/∂α_ℓ‖²`` there, as the
gradient of a scalar "probe" input that the forward pass ignores.

This is the masked :func:`topkast_jax.topkast` restricted to ``B``: the masked gradient, updates
and inner state are zero outside ``B``, so nothing outside ``B`` needs storing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
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


_GATHER_DIMS = jax.lax.GatherDimensionNumbers(
    offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def densify_probed(
    z_K: jax.Array, idx_K: jax.Array, probe: jax.Array, shape: tuple[int, ...]
) -> jax.Array:
    """:func:`densify`, with ``∂L/∂probe = ‖∂L/∂α‖²`` (``probe``: a float32 scalar, unused).

    The backward pass gathers ``∂L/∂α`` at ``idx`` for ``z`` — what autodiff of the scatter
    does — and returns ``optax.tree.norm(∂L/∂α, squared=True)`` as the probe's cotangent.
    """
    del probe
    return densify(z_K, idx_K, shape)


def _densify_probed_fwd(z_K, idx_K, probe, shape):
    del probe
    return densify(z_K, idx_K, shape), idx_K


def _densify_probed_bwd(shape, idx_K, g):
    g_z = jax.lax.gather(
        g.reshape(-1),
        idx_K[:, None],
        _GATHER_DIMS,
        slice_sizes=(1,),
        indices_are_sorted=True,
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    squared = optax.tree.norm(g, squared=True).astype(jnp.float32)
    return g_z, None, squared


densify_probed.defvjp(_densify_probed_fwd, _densify_probed_bwd)


def _is_none(x: Any) -> bool:
    return x is None


def forward_values(params: Any, in_a: Any) -> Any:
    """``z = θ_B ⊙ in_a`` on sparse leaves, dense leaves unchanged."""
    return jax.tree.map(
        lambda p, a: p if a is None else jnp.where(a, p, jnp.zeros((), p.dtype)), params, in_a
    )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "indices", "probe"],
    meta_fields=["shape"],
)
@dataclasses.dataclass(frozen=True)
class SparseLeaf:
    """A sparse leaf's ``α`` not yet built: ``z[k_B]`` at flat ``indices[k_B]`` of ``shape``
    (``probe``: ``None``, or the scalar of :func:`densify_probed` when the step measures the
    gradient norm).

    With ``AlwaysSparse(..., lazy_alpha=True)`` the loss receives these in place of dense sparse
    leaves; the model densifies each where it is used (:func:`densify_leaves`, or
    :func:`topkast_jax.always_sparse_linen.layerwise` inside each Linen layer), so only the
    layers being computed hold a dense ``α``.
    """

    values: jax.Array
    indices: jax.Array
    shape: tuple[int, ...]
    probe: jax.Array | None = None

    def dense(self) -> jax.Array:
        """The dense ``α`` of this leaf."""
        if self.probe is None:
            return densify(self.values, self.indices, self.shape)
        return densify_probed(self.values, self.indices, self.probe, self.shape)


def is_sparse_leaf(x: Any) -> bool:
    return isinstance(x, SparseLeaf)


def densify_leaves(tree: Any) -> Any:
    """``tree`` with every :class:`SparseLeaf` replaced by its dense ``α``."""
    return jax.tree.map(
        lambda x: x.dense() if is_sparse_leaf(x) else x, tree, is_leaf=is_sparse_leaf
    )


def model_alpha(
    z: Any,
    indices: Any,
    specs: tuple[LeafSpec | None, ...],
    lazy: bool,
    probes: tuple[jax.Array | None, ...] | None = None,
) -> Any:
    """What the loss receives: dense ``α`` leaves, or :class:`SparseLeaf` ones with ``lazy``
    (``probes``: one scalar per sparse leaf for :func:`densify_probed`, ``None`` on dense ones)."""
    leaves, treedef = jax.tree.flatten(z)
    idx = jax.tree.leaves(indices, is_leaf=_is_none)
    probes = probes if probes is not None else (None,) * len(specs)
    out = [
        x if spec is None else SparseLeaf(x, i, spec.shape, probe)
        for x, i, spec, probe in zip(leaves, idx, specs, probes, strict=True)
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
    grad_norm: bool = False,
) -> tuple[DeviceState, Any] | tuple[DeviceState, Any, jax.Array]:
    """One always-sparse training step (steps 1–4 of the module docstring).

    Returns:
      ``(new_state, loss)`` — ``(new_state, (loss, aux))`` with ``has_aux`` (``loss_fn`` then
      returns ``(loss, aux)``); indices and ``in_a`` are unchanged (they change at a refresh).
      With ``grad_norm`` a third element, the float32 ``‖∂L/∂α‖₂`` over all leaves
      (:func:`gradient_norm`).
    """
    l2 = jnp.asarray(exploration_l2, jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    probes = tuple(None if spec is None else zero for spec in specs) if grad_norm else None

    def loss_of(z, probes):
        return loss_fn(model_alpha(z, state.indices, specs, lazy_alpha, probes), batch)

    out, (grads, probe_grads) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=has_aux)(
        forward_values(state.params, state.in_a), probes
    )
    norm = gradient_norm(grads, probe_grads) if grad_norm else None
    grads = add_penalty(grads, state.params, state.in_a, specs, l2)
    updates, inner_state = optax.with_extra_args_support(inner).update(
        grads, state.inner_state, state.params
    )
    params = optax.apply_updates(state.params, updates)
    new_state = DeviceState(params, state.indices, state.in_a, inner_state)
    return (new_state, out) if norm is None else (new_state, out, norm)


def gradient_norm(grads: Any, probe_grads: tuple[jax.Array | None, ...]) -> jax.Array:
    """``‖∂L/∂α‖₂`` over all leaves, summed as ``optax.tree.norm`` sums it (leaf by leaf in tree
    order): dense leaves from their gradient, sparse ones from their probe's gradient
    ``‖∂L/∂α_ℓ‖²`` (:func:`densify_probed`)."""
    squared = [
        optax.tree.norm(g, squared=True) if p is None else p
        for g, p in zip(jax.tree.leaves(grads), probe_grads, strict=True)
    ]
    return jnp.sqrt(functools.reduce(operator.add, squared, 0))


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
