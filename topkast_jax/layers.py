"""Scan-stacked layers: the ``layer_axis`` argument and the slices it cuts a leaf into.

Models built with ``nn.scan`` / ``nnx.scan`` keep all ``L`` layers of a kind in one leaf of shape
``(L, ...)``.  A leaf with layer axis ``a`` is ``L = shape[a]`` independent *slices* of shape
``shape[:a] + shape[a+1:]``, and every sparse method selects, counts and reports per slice exactly
as it would for ``L`` separate leaves: slice ``l`` keeps ``k = max(1, ⌊d·n_slice + ½⌋)`` of its
own weights, ties to the lower row-major index inside the slice.

``layer_axis`` (of :func:`topkast_jax.topkast`, the baselines and
:func:`topkast_jax.layer_densities`) is one of

* ``"auto"`` (default): the axis named ``"layers"`` in the leaf's Flax partitioning metadata —
  Linen ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` ``names`` (``nn.scan(...,
  metadata_params={nn.PARTITION_NAME: "layers"})``) or an NNX variable's ``out_sharding``
  (``nnx.vmap``/``nnx.scan(..., transform_metadata={nnx.PARTITION_NAME: "layers"})``); a leaf
  with no such name (unboxed, or not stacked) is selected whole;
* a string: the axis with that name in the same metadata (a warning when no sparse leaf has it);
* an int: that axis of every sparse leaf (negative counts from the end);
* ``None``: every leaf whole (no stacked layers);
* a pytree like params, or a callable ``params -> pytree``, holding one of the above per leaf
  (``None`` there: whole leaf).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from topkast_jax import boxes, sharding
from topkast_jax.tree import path_name

AUTO = "auto"
#: The names ``layer_axis="auto"`` recognises as a stacked-layer axis.
LAYER_AXIS_NAMES = ("layers",)


def _spec_leaves(layer_axis: Any, params: Any) -> list[Any]:
    """One spec (int, str or None) per params leaf, from a scalar spec, a pytree or a callable."""
    num_leaves = len(jax.tree.leaves(params))
    if layer_axis is None or isinstance(layer_axis, int | str | np.integer):
        return [layer_axis] * num_leaves
    tree = layer_axis(params) if callable(layer_axis) else layer_axis
    source = "the result of the `layer_axis` callable" if callable(layer_axis) else "`layer_axis`"
    is_leaf = lambda x: x is None  # noqa: E731
    want = jax.tree.structure(boxes.strip(params))
    got = jax.tree.structure(boxes.strip(tree), is_leaf=is_leaf)
    if got != want:
        raise ValueError(
            f"{source} must be an int, a name, None, or a pytree with the structure of params "
            f"holding one of those per leaf.\n  params: {want}\n  layer_axis: {got}"
        )
    return jax.tree.leaves(boxes.strip(tree), is_leaf=is_leaf)


def _named_axis(names: tuple[Any, ...] | None, wanted: Sequence[str]) -> int | None:
    """The first axis whose name is one of ``wanted`` (``None`` when none is)."""
    if names is None:
        return None
    return next((axis for axis, name in enumerate(names) if name in wanted), None)


def _check_axis(name: str, axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise ValueError(
            f"layer_axis of leaf {name!r} must be an int, a name or None, got {axis!r}."
        )
    if not -ndim <= int(axis) < ndim:
        raise ValueError(
            f"layer_axis {int(axis)} is out of range for leaf {name!r} of rank {ndim}."
        )
    return int(axis) % ndim


def resolve(layer_axis: Any, params: Any, sparse: Sequence[bool]) -> list[int | None]:
    """The layer axis of every params leaf (``None``: selected whole; always ``None`` on dense
    leaves), validated.

    Args:
      layer_axis: see the module docstring.
      params: the params (arrays or ``jax.ShapeDtypeStruct``, boxed or not).
      sparse: one flag per leaf (tree order), from ``sparsify``.

    Raises:
      ValueError: a malformed ``layer_axis``, or an axis out of range for its leaf.
    """
    specs = _spec_leaves(layer_axis, params)
    names = boxes.leaf_axis_names(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out: list[int | None] = []
    for (path, p), spec, leaf_names, is_sparse in zip(flat, specs, names, sparse, strict=True):
        if not is_sparse or spec is None:
            out.append(None)
        elif isinstance(spec, str):
            wanted = LAYER_AXIS_NAMES if spec == AUTO else (spec,)
            axis = _named_axis(leaf_names, wanted)
            out.append(None if axis is None or np.ndim(p) == 0 else axis)
        else:
            out.append(_check_axis(path_name(path), spec, np.ndim(p)))
    explicit_names = {s for s in specs if isinstance(s, str) and s != AUTO}
    if explicit_names and sparse and not any(a is not None for a in out):
        warnings.warn(
            f"layer_axis names {sorted(explicit_names)} match no axis of a sparse leaf's Flax "
            "metadata: every leaf is selected whole.",
            stacklevel=3,
        )
    return out


def slice_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """Shape of one slice: ``shape`` without ``axis`` (``shape`` itself when ``axis`` is None)."""
    return tuple(shape) if axis is None else tuple(shape[:axis]) + tuple(shape[axis + 1 :])


def num_slices(shape: tuple[int, ...], axis: int | None) -> int:
    """``L``: ``shape[axis]``, or 1 for a leaf selected whole."""
    return 1 if axis is None else int(shape[axis])


def slice_size(shape: tuple[int, ...], axis: int | None) -> int:
    """Weights per slice."""
    return math.prod(slice_shape(shape, axis))


def to_rows(x: jax.Array, axis: int | None) -> jax.Array:
    """``[L, n_slice]``: slice ``l`` along ``axis`` flattened row-major into row ``l`` (one row for
    a whole leaf); replicated when ``x`` is explicitly sharded."""
    stack = jnp.expand_dims(x, 0) if axis is None else jnp.moveaxis(x, axis, 0)
    return sharding.flatten_rows(stack)


def from_rows(rows_LxN: jax.Array, like: jax.Array, axis: int | None) -> jax.Array:
    """Inverse of :func:`to_rows`: the leaf-shaped array (with ``like``'s explicit sharding)."""
    if axis is None:
        return sharding.unflatten_like(rows_LxN[0], like)
    stack = rows_LxN.reshape((rows_LxN.shape[0], *slice_shape(like.shape, axis)))
    return sharding.unflatten_like(jnp.moveaxis(stack, 0, axis).ravel(), like)


def slice_mean(x: jax.Array, axis: int | None) -> jax.Array:
    """float32 mean of each slice: a scalar for a whole leaf, else ``[L]`` along ``axis`` with
    size 1 on the other axes (it broadcasts against the leaf)."""
    if axis is None:
        return jnp.mean(x, dtype=jnp.float32)
    others = tuple(d for d in range(x.ndim) if d != axis)
    return jnp.mean(x, axis=others, keepdims=True, dtype=jnp.float32)
