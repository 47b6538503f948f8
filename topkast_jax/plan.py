"""The static per-leaf plan: which leaves are sparse, their densities and exact mask sizes.

Everything here depends only on shapes, dtypes and hyperparameters, so it is computed in Python at
trace time (it works on ``jax.ShapeDtypeStruct`` leaves, e.g. under ``jax.eval_shape``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from topkast_jax import distributions
from topkast_jax import layers as layers_lib
from topkast_jax import sparsify as sparsify_lib
from topkast_jax.tree import path_name


@dataclasses.dataclass(frozen=True)
class LeafDensity:
    """One params leaf in the plan.

    Attributes:
      path: ``"Dense_0/kernel"``-style name.
      shape: leaf shape.
      size: number of weights ``n``.
      sparse: whether the leaf is trained sparsely.
      forward: forward density ``D`` of each slice (1.0 on dense leaves).
      backward: backward density ``D + M`` of each slice (1.0 on dense leaves).
      k_forward: ``|A|`` of the whole leaf, ``layers`` × :attr:`slice_k_forward` (``n`` on dense
        leaves).
      k_backward: ``|B|`` of the whole leaf (``n`` on dense leaves).
      layer_axis: the stacked-layer axis of a sparse leaf (see :mod:`topkast_jax.layers`), or
        ``None`` when the leaf is selected whole.
      layers: ``L``, the number of slices (``shape[layer_axis]``; 1 without a layer axis).
    """

    path: str
    shape: tuple[int, ...]
    size: int
    sparse: bool
    forward: float
    backward: float
    k_forward: int
    k_backward: int
    layer_axis: int | None = None
    layers: int = 1

    @property
    def slice_size(self) -> int:
        """Weights per slice, ``n / L``."""
        return self.size // self.layers

    @property
    def slice_k_forward(self) -> int:
        """``|A|`` of each slice."""
        return self.k_forward // self.layers

    @property
    def slice_k_backward(self) -> int:
        """``|B|`` of each slice."""
        return self.k_backward // self.layers


def check_sparsity(name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1)``, else a ValueError naming ``name``."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a static Python number; with optax.inject_hyperparams list it in "
            f"static_args."
        )
    if isinstance(value, bool | str) or not isinstance(value, int | float | np.number | jax.Array):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}.")
    return value


def check_sparsities(forward_sparsity: Any, backward_sparsity: Any) -> tuple[float, float]:
    """Both sparsities as floats in ``[0, 1)`` with ``backward <= forward``, else a ValueError."""
    forward_sparsity = check_sparsity("forward_sparsity", forward_sparsity)
    backward_sparsity = check_sparsity("backward_sparsity", backward_sparsity)
    if backward_sparsity > forward_sparsity:
        raise ValueError(
            f"backward_sparsity ({backward_sparsity}) must be <= forward_sparsity "
            f"({forward_sparsity}): the backward set B contains the forward set A."
        )
    return forward_sparsity, backward_sparsity


def layer_densities(
    params: Any,
    *,
    sparsify: Any,
    forward_sparsity: float,
    backward_sparsity: float = 0.0,
    distribution: str = "uniform",
    layer_axis: Any = layers_lib.AUTO,
) -> list[LeafDensity]:
    """The plan for ``params``: one :class:`LeafDensity` per leaf, in tree order.

    A sparse leaf with a layer axis is ``L`` slices, each treated as a leaf of its own: the
    densities (ERK over all slices of all sparse leaves) and the counts are per slice.

    Args:
      params: params pytree (arrays or ``jax.ShapeDtypeStruct``).
      sparsify: bool pytree or callable ``params -> bool pytree`` (``optax.masked`` convention).
      forward_sparsity: fraction of zeros in the forward pass, ``1 - D``.
      backward_sparsity: fraction of weights never updated, ``1 - (D + M)``; ``<= forward``.
      distribution: ``"uniform"`` or ``"erk"`` — how densities spread over the sparse leaves.
      layer_axis: stacked-layer axes (:mod:`topkast_jax.layers`); default: the axis named
        ``"layers"`` in Flax partitioning metadata, where a leaf has one.

    Raises:
      ValueError: on sparsities outside ``[0, 1)``, ``backward_sparsity > forward_sparsity``, a
        bad ``sparsify`` or ``layer_axis``.
    """
    forward_sparsity, backward_sparsity = check_sparsities(forward_sparsity, backward_sparsity)
    flags = sparsify_lib.resolve(sparsify, params)
    axes = layers_lib.resolve(layer_axis, params, flags)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    fwd = _slice_densities(flat, flags, axes, 1.0 - forward_sparsity, distribution)
    bwd = _slice_densities(flat, flags, axes, 1.0 - backward_sparsity, distribution)
    plan = []
    for (path, p), sparse, axis, d_fwd, d_bwd in zip(flat, flags, axes, fwd, bwd, strict=True):
        shape, size = tuple(p.shape), math.prod(p.shape)
        slices = layers_lib.num_slices(shape, axis)
        d_bwd = max(d_fwd, d_bwd)
        if sparse:
            k_fwd, k_bwd = distributions.mask_counts(d_fwd, d_bwd, size // slices)
            k_fwd, k_bwd = k_fwd * slices, k_bwd * slices
        else:
            k_fwd, k_bwd = size, size
        plan.append(
            LeafDensity(
                path_name(path), shape, size, sparse, d_fwd, d_bwd, k_fwd, k_bwd, axis, slices
            )
        )
    return plan


def _slice_densities(
    flat: list[tuple[Any, Any]],
    flags: list[bool],
    axes: list[int | None],
    density: float,
    distribution: str,
) -> list[float]:
    """Per leaf, the density of each of its slices (1.0 on dense leaves): the distribution over
    every slice of every sparse leaf, ``L`` equal entries for a leaf of ``L`` slices."""
    shapes, owners = [], []
    for i, ((_, p), sparse, axis) in enumerate(zip(flat, flags, axes, strict=True)):
        if sparse:
            shape = tuple(p.shape)
            slices = layers_lib.num_slices(shape, axis)
            shapes += [layers_lib.slice_shape(shape, axis)] * slices
            owners += [i] * slices
    out = [1.0] * len(flat)
    for i, d in zip(
        owners, distributions.leaf_densities(shapes, density, distribution), strict=True
    ):
        out[i] = d
    return out


def slice_plan(sparse_plan: list[LeafDensity]) -> list[LeafDensity]:
    """One entry per slice of the sparse leaves (leaf order, then slice order), each a whole leaf
    of the slice's shape, size, densities and counts; a leaf without a layer axis is itself."""
    out = []
    for leaf in sparse_plan:
        if leaf.layer_axis is None:
            out.append(leaf)
            continue
        shape = layers_lib.slice_shape(leaf.shape, leaf.layer_axis)
        for i in range(leaf.layers):
            out.append(
                dataclasses.replace(
                    leaf,
                    path=f"{leaf.path}/{i}",
                    shape=shape,
                    size=leaf.slice_size,
                    k_forward=leaf.slice_k_forward,
                    k_backward=leaf.slice_k_backward,
                    layer_axis=None,
                    layers=1,
                )
            )
    return out


def unflatten_sparse(params: Any, plan: list[LeafDensity], values: list[Any]) -> Any:
    """A params-shaped pytree with ``values`` (one per sparse leaf, in order) and ``None`` else."""
    it = iter(values)
    leaves = [next(it) if leaf.sparse else None for leaf in plan]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)
