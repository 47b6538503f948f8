"""Which leaves are sparse: the ``sparsify`` argument and helpers for common choices.

``sparsify`` follows ``optax.masked``'s convention: a pytree of Python/NumPy bools with the
structure of the params (one bool per leaf), or a callable ``params -> that pytree``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from topkast_jax.tree import path_name

Sparsify = Any  # bool pytree or Callable[[params], bool pytree]


def kernels(min_ndim: int = 2) -> Callable[[Any], Any]:
    """Every floating leaf with ``ndim >= min_ndim`` (dense and conv kernels, embeddings)."""

    def select(params: Any) -> Any:
        return jax.tree.map(
            lambda p: bool(np.ndim(p) >= min_ndim and np.issubdtype(p.dtype, np.floating)), params
        )

    return select


def kernels_except(names: Sequence[str], min_ndim: int = 2) -> Callable[[Any], Any]:
    """Like :func:`kernels`, except leaves whose path contains one of ``names`` as a component.

    ``kernels_except(("Conv_0", "Dense_0"))`` is the ImageNet setting: first convolution and last
    dense layer stay dense.
    """
    if isinstance(names, str):
        raise ValueError(f"names must be a sequence of names, got the string {names!r}.")
    excluded = set(names)

    def select(params: Any) -> Any:
        def keep(path, p):
            components = set(path_name(path).split("/"))
            is_kernel = np.ndim(p) >= min_ndim and np.issubdtype(p.dtype, np.floating)
            return bool(is_kernel and not components & excluded)

        return jax.tree_util.tree_map_with_path(keep, params)

    return select


def resolve(sparsify: Sparsify, params: Any) -> list[bool]:
    """One bool per params leaf (tree order), validated.

    Raises:
      ValueError: if the structure does not match ``params``, a value is not a bool, or an
        integer/boolean leaf is marked sparse.
    """
    mask = sparsify(params) if callable(sparsify) else sparsify
    source = "the result of the `sparsify` callable" if callable(sparsify) else "`sparsify`"
    params_def = jax.tree.structure(params)
    mask_def = jax.tree.structure(mask)
    if mask_def != params_def:
        raise ValueError(
            f"{source} must have the structure of params.\n  params: {params_def}\n"
            f"  sparsify: {mask_def}"
        )
    flags = []
    for (path, p), flag in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(mask), strict=True
    ):
        if not isinstance(flag, bool | np.bool_):
            raise ValueError(
                f"{source} must hold one Python bool per leaf; leaf {path_name(path)!r} has "
                f"{type(flag).__name__} {flag!r}."
            )
        if flag and not np.issubdtype(p.dtype, np.floating):
            raise ValueError(
                f"leaf {path_name(path)!r} has dtype {p.dtype} and cannot be sparse; "
                "only floating leaves can be marked in `sparsify`."
            )
        flags.append(bool(flag))
    if flags and not any(flags):
        warnings.warn("`sparsify` selects no leaf: training will be dense.", stacklevel=3)
    return flags
