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
      forward: forward density ``D`` (1.0 on dense leaves).
      backward: backward density ``D + M`` (1.0 on dense leaves).
      k_forward: ``|A|`` (``n`` on dense leaves).
      k_backward: ``|B|`` (``n`` on dense leaves).
    """

    path: str
    shape: tuple[int, ...]
    size: int
    sparse: bool
    forward: float
    backward: float
    k_forward: int
    k_backward: int


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
) -> list[LeafDensity]:
    """The plan for ``params``: one :class:`LeafDensity` per leaf, in tree order.

    Args:
      params: params pytree (arrays or ``jax.ShapeDtypeStruct``).
      sparsify: bool pytree or callable ``params -> bool pytree`` (``optax.masked`` convention).
      forward_sparsity: fraction of zeros in the forward pass, ``1 - D``.
      backward_sparsity: fraction of weights never updated, ``1 - (D + M)``; ``<= forward``.
      distribution: ``"uniform"`` or ``"erk"`` — how densities spread over the sparse leaves.

    Raises:
      ValueError: on sparsities outside ``[0, 1)``, ``backward_sparsity > forward_sparsity``, or a
        bad ``sparsify``.
    """
    forward_sparsity, backward_sparsity = check_sparsities(forward_sparsity, backward_sparsity)
    flags = sparsify_lib.resolve(sparsify, params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    sparse_shapes = [tuple(p.shape) for (_, p), f in zip(flat, flags, strict=True) if f]
    fwd = iter(distributions.leaf_densities(sparse_shapes, 1.0 - forward_sparsity, distribution))
    bwd = iter(distributions.leaf_densities(sparse_shapes, 1.0 - backward_sparsity, distribution))
    plan = []
    for (path, p), sparse in zip(flat, flags, strict=True):
        shape, size = tuple(p.shape), math.prod(p.shape)
        d_fwd, d_bwd = (next(fwd), next(bwd)) if sparse else (1.0, 1.0)
        d_bwd = max(d_fwd, d_bwd)
        k_fwd, k_bwd = distributions.mask_counts(d_fwd, d_bwd, size) if sparse else (size, size)
        plan.append(LeafDensity(path_name(path), shape, size, sparse, d_fwd, d_bwd, k_fwd, k_bwd))
    return plan


def unflatten_sparse(params: Any, plan: list[LeafDensity], values: list[Any]) -> Any:
    """A params-shaped pytree with ``values`` (one per sparse leaf, in order) and ``None`` else."""
    it = iter(values)
    leaves = [next(it) if leaf.sparse else None for leaf in plan]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)
