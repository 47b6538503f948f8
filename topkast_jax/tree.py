"""Small pytree helpers shared by the library: leaf paths and per-leaf maps with ``None`` holes.

Masks and per-leaf statistics are pytrees shaped like the params, holding an array on *sparse*
leaves and ``None`` on dense ones.  ``None`` is an empty pytree node, so
``jax.tree.map(f, params, masks)`` calls ``f(leaf, None)`` on dense leaves.

Under ``optax.masked`` / ``optax.multi_transform`` (and ``optax.contrib.muon``, built on them) a
transformation sees the params with the leaves of other groups replaced by ``optax.MaskedNode()``
— an empty node standing for one leaf or, with a prefix mask, a whole subtree.  Its state then
holds ``MaskedNode`` at those places: :func:`cover` puts the params' structure back (``None``
there), :func:`merge_disjoint` joins the trees of several states over disjoint leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax


def path_name(path: tuple) -> str:
    """``('params', 'Dense_0', 'kernel')``-style key path → ``"params/Dense_0/kernel"``.

    The attribute ``value`` of a Flax box (``nn.Partitioned``, ``nnx.Variable``) is left out, so a
    boxed leaf has the name of the unboxed one."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def map_sparse(fn: Callable[..., Any], params: Any, mask_tree: Any, *rest: Any) -> Any:
    """``fn(leaf, mask, *rest)`` on sparse leaves, the leaf unchanged on dense ones.

    Args:
      fn: called as ``fn(leaf, mask_leaf, *rest_leaves)`` where ``mask_leaf`` is not ``None``.
      params: a params-shaped pytree (params, grads, updates, ...).
      mask_tree: params-shaped pytree with ``None`` at dense leaves.
      *rest: further params-shaped pytrees (``None`` allowed where ``mask_tree`` is ``None``).
    """
    return jax.tree.map(lambda p, m, *r: p if m is None else fn(p, m, *r), params, mask_tree, *rest)


def sparse_leaves(mask_tree: Any, *trees: Any) -> list[tuple]:
    """``(name, mask, *leaves)`` for every sparse leaf, in tree order.

    Raises:
      ValueError: if a tree has another number of leaves than ``mask_tree`` (e.g. a mask tree
        with ``optax.MaskedNode`` against full params: :func:`cover` it first).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(mask_tree, is_leaf=lambda x: x is None)
    others = [jax.tree.leaves(t, is_leaf=lambda x: x is None) for t in trees]
    if any(len(o) != len(flat) for o in others):
        raise ValueError(
            f"trees of {[len(o) for o in others]} leaves do not align with a mask tree of "
            f"{len(flat)} leaves."
        )
    out = []
    for i, (path, mask) in enumerate(flat):
        if mask is not None:
            out.append((path_name(path), mask, *(o[i] for o in others)))
    return out


def is_masked_node(x: Any) -> bool:
    """Whether ``x`` is ``optax.MaskedNode()`` (a leaf or subtree another group owns)."""
    return isinstance(x, optax.MaskedNode)


def _is_hole(x: Any) -> bool:
    return x is None or is_masked_node(x)


def has_masked_node(tree: Any) -> bool:
    """Whether ``tree`` holds an ``optax.MaskedNode`` anywhere."""
    return any(is_masked_node(x) for x in jax.tree.leaves(tree, is_leaf=is_masked_node))


def cover(tree: Any, params: Any) -> Any:
    """``tree`` (a per-leaf tree of a state: masks, densities) with every ``optax.MaskedNode``
    replaced by ``None`` on each leaf of the params subtree it stands for, so that the result has
    the structure of ``params`` with ``None`` on leaves the state does not make sparse.

    ``tree`` is returned unchanged when it holds no ``MaskedNode``.
    """
    if not has_masked_node(tree):
        return tree

    def fill(t: Any, p: Any) -> Any:
        return jax.tree.map(lambda _: None, p) if is_masked_node(t) else t

    return jax.tree.map(fill, tree, params, is_leaf=_is_hole)


def merge_disjoint(
    first: Any, second: Any, *, is_leaf: Callable[[Any], bool] | None = None, path: tuple = ()
) -> Any:
    """One per-leaf tree from two over disjoint leaves: where one holds ``optax.MaskedNode``
    (a leaf or subtree it does not own) or ``None`` (a dense leaf), the other's entry is taken.

    Args:
      first: a per-leaf tree of the params (``None`` on dense leaves, ``MaskedNode`` on leaves or
        subtrees of other groups), e.g. the forward masks of one sparse state.
      second: another, e.g. of a second sparse state.
      is_leaf: marks further entries (e.g. packed sets) that are not walked into.
      path: the key path of ``first`` and ``second`` (for the error message).

    Raises:
      ValueError: naming the leaf when both trees hold an entry other than ``None`` at one leaf,
        or when their structures differ.
    """
    first_entry, second_entry = _is_entry(first, is_leaf), _is_entry(second, is_leaf)
    if is_masked_node(first) or (first is None and second_entry):
        return second
    if is_masked_node(second) or (second is None and first_entry):
        return first
    name = path_name(path) or "<root>"
    if first_entry and second_entry:
        raise ValueError(
            f"leaf {name!r} is made sparse by two sparse-training states: their leaves must be "
            "disjoint (e.g. separate optax.multi_transform groups)."
        )
    kids_1, def_1 = _children(first)
    kids_2, def_2 = _children(second)
    if first_entry or second_entry or def_1 != def_2:
        raise ValueError(f"the sparse states' trees differ in structure at {name!r}.")
    merged = [
        merge_disjoint(a, b, is_leaf=is_leaf, path=(*path, key))
        for (key, a), (_, b) in zip(kids_1, kids_2, strict=True)
    ]
    return jax.tree.unflatten(def_1, merged)


def _children(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """``[(key, child), ...]`` of one pytree node (one level) and the node's one-level treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return [(path[0], child) for path, child in flat], treedef


def _is_entry(x: Any, is_leaf: Callable[[Any], bool] | None) -> bool:
    """A leaf entry of a per-leaf tree: ``None``, an array (any pytree leaf) or ``is_leaf``."""
    if x is None or (is_leaf is not None and is_leaf(x)):
        return True
    return not is_masked_node(x) and jax.tree_util.treedef_is_leaf(jax.tree.structure(x))
