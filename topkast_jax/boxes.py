"""Flax metadata boxes in a params tree: Linen ``nn.Partitioned`` and NNX ``nnx.Variable``.

A boxed tree wraps each array in a pytree node that carries metadata — Linen's
``flax.core.meta.AxisMetadata`` (``nn.Partitioned`` and ``nn.LogicallyPartitioned``, with
``names``, one logical or mesh axis name per array axis) or an NNX ``nnx.Variable`` (with the
``out_sharding`` metadata, the same per-axis names).  ``nn.scan`` and ``nnx.scan``/``nnx.vmap``
insert the name given as ``metadata_params={nn.PARTITION_NAME: ...}`` /
``transform_metadata={nnx.PARTITION_NAME: ...}`` at the stacked axis.

The library reads those names (to find a leaf's layer axis) and never imports Flax: a tree can only
hold Flax boxes when Flax is already imported.  A per-leaf value that does not have its leaf's rank
(a scalar density, a mask-change fraction) must not sit in its leaf's box, whose names would
shard it like the leaf: :func:`strip` takes the boxes away.
"""

from __future__ import annotations

import sys
from typing import Any

import jax


def _linen_box_type() -> type | None:
    meta = sys.modules.get("flax.core.meta")
    return getattr(meta, "AxisMetadata", None)


def _nnx_variable_type() -> type | None:
    variables = sys.modules.get("flax.nnx.variablelib")
    return getattr(variables, "Variable", None)


def is_box(x: Any) -> bool:
    """Whether ``x`` is a Flax metadata box (Linen ``AxisMetadata`` or ``nnx.Variable``)."""
    return any(
        t is not None and isinstance(x, t) for t in (_linen_box_type(), _nnx_variable_type())
    )


def axis_names(box: Any) -> tuple[Any, ...] | None:
    """The per-axis names of a box (``names`` of Linen boxes, ``out_sharding`` of NNX variables),
    or ``None`` when it has none."""
    names = getattr(box, "names", None)
    if names is None and hasattr(box, "get_metadata"):
        names = box.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


def leaf_axis_names(tree: Any) -> list[tuple[Any, ...] | None]:
    """For every leaf of ``tree`` (``jax.tree.leaves`` order): the axis names of the box holding
    it, ``None`` when it is not boxed or its box has no names."""
    out: list[tuple[Any, ...] | None] = []
    for node in jax.tree.leaves(tree, is_leaf=is_box):
        names = axis_names(node) if is_box(node) else None
        out.extend([names] * len(jax.tree.leaves(node)))
    return out


def _value(box: Any) -> Any:
    """The subtree a box wraps (its only pytree child), without applying any constraint."""
    children, _ = jax.tree_util.tree_flatten(box, is_leaf=lambda x: x is not box)
    (value,) = children
    return value


def strip(tree: Any) -> Any:
    """``tree`` with every Flax box replaced by the value it wraps (``None`` values kept)."""
    return jax.tree.map(
        lambda x: _value(x) if is_box(x) else x, tree, is_leaf=lambda x: x is None or is_box(x)
    )


def rebox(like: Any, tree: Any) -> Any:
    """``tree`` — ``like``'s structure with or without its boxes, ``None`` allowed at leaves — with
    each value put back in the box ``like`` has at its place (e.g. per-leaf scalars, stored
    unboxed, mapped together with boxed params inside a step)."""
    nodes, treedef = jax.tree.flatten(like, is_leaf=is_box)
    values = jax.tree.leaves(strip(tree), is_leaf=lambda x: x is None)
    out = [
        jax.tree.unflatten(jax.tree.structure(node), [value]) if is_box(node) else value
        for node, value in zip(nodes, values, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)
