"""Small pytree helpers shared by the library: leaf paths and per-leaf maps with ``None`` holes.

Masks and per-leaf statistics are pytrees shaped like the params, holding an array on *sparse*
leaves and ``None`` on dense ones.  ``None`` is an empty pytree node, so
``jax.tree.map(f, params, masks)`` calls ``f(leaf, None)`` on dense leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


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
    """``(name, mask, *leaves)`` for every sparse leaf, in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(mask_tree, is_leaf=lambda x: x is None)
    others = [jax.tree.leaves(t, is_leaf=lambda x: x is None) for t in trees]
    out = []
    for i, (path, mask) in enumerate(flat):
        if mask is not None:
            out.append((path_name(path), mask, *(o[i] for o in others)))
    return out
