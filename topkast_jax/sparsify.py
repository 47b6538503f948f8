"""Which leaves are sparse: the ``sparsify`` argument and helpers for common choices.

``sparsify`` follows ``optax.masked``'s convention: a pytree of Python/NumPy bools with the
structure of the params (one bool per leaf), or a callable ``params -> that pytree``.

The default (:func:`default`) follows Flax's naming: the leaves named ``kernel`` (dense and
convolution kernels) or ``embedding`` (embedding tables), whatever their rank, and never a
``bias`` or a ``scale`` — so scan-stacked biases and norm scales (rank 2 and more) stay dense.  A
tree with no leaf of those names (not Flax-named, e.g. ``{"w": ..., "b": ...}``) gets every
floating leaf with ``ndim >= 2`` except those named ``bias`` or ``scale``.  The name of a leaf is
the last component of its path (a Flax box's ``value`` attribute left out).  Every helper here
carries its rule as text (:func:`describe`), for reports such as the experiments' dry-run table.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from topkast_jax.tree import path_name

Sparsify = Any  # bool pytree or Callable[[params], bool pytree]

#: Leaf names the default rule makes sparse: Flax's kernels and embedding tables.
FLAX_SPARSE_NAMES = ("kernel", "embedding")
#: Leaf names the default rule never makes sparse, whatever the leaf's rank.
NEVER_SPARSE_NAMES = ("bias", "scale")


def leaf_name(path: tuple) -> str:
    """The last component of a leaf's path name (``"Dense_0/kernel"`` → ``"kernel"``)."""
    return path_name(path).rsplit("/", 1)[-1]


def _with_rule(select: Callable[[Any], Any], rule: str) -> Callable[[Any], Any]:
    """``select`` with its rule as text (read by :func:`describe`)."""
    select.rule = rule  # type: ignore[attr-defined]
    return select


def describe(sparsify: Sparsify) -> str:
    """One line saying which leaves ``sparsify`` makes sparse: the rule of this module's helpers
    (``None`` is the default's), else what kind of argument it is."""
    if sparsify is None:
        sparsify = default()
    rule = getattr(sparsify, "rule", None)
    if rule is not None:
        return rule
    if callable(sparsify):
        return f"the callable {getattr(sparsify, '__name__', type(sparsify).__name__)}"
    return "an explicit bool per leaf"


def default() -> Callable[[Any], Any]:
    """The default ``sparsify``: Flax naming (see the module docstring).

    Returns:
      A callable ``params -> bool pytree``: in a tree with a leaf named ``kernel`` or
      ``embedding``, exactly those non-empty floating leaves; in a tree with none, every non-empty
      floating leaf with ``ndim >= 2``; never a leaf named ``bias`` or ``scale``.
    """

    def select(params: Any) -> Any:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        flax_named = any(leaf_name(path) in FLAX_SPARSE_NAMES for path, _ in flat)

        def keep(path, p):
            name = leaf_name(path)
            if flax_named:
                return name in FLAX_SPARSE_NAMES and is_kernel(p, min_ndim=0)
            return name not in NEVER_SPARSE_NAMES and is_kernel(p)

        return jax.tree_util.tree_map_with_path(keep, params)

    return _with_rule(
        select,
        "leaves named kernel or embedding (Flax naming), whatever their rank; without such "
        "names, floating leaves with ndim >= 2; never bias or scale",
    )


def is_kernel(p: Any, min_ndim: int = 2) -> bool:
    """A non-empty floating leaf (float32/64, bfloat16, float16, ...) with ``ndim >= min_ndim``."""
    return bool(np.ndim(p) >= min_ndim and np.size(p) > 0 and is_floating(p))


def is_floating(p: Any) -> bool:
    """Whether the leaf's dtype is floating; ``jnp.issubdtype`` also knows bfloat16 (NumPy's
    ``np.issubdtype(bfloat16, np.floating)`` is False)."""
    return bool(jnp.issubdtype(p.dtype, jnp.floating))


def kernels(min_ndim: int = 2) -> Callable[[Any], Any]:
    """Every non-empty floating leaf with ``ndim >= min_ndim`` (dense and conv kernels,
    embeddings), in any floating dtype (bfloat16 and float16 included)."""

    def select(params: Any) -> Any:
        return jax.tree.map(lambda p: is_kernel(p, min_ndim), params)

    return _with_rule(select, f"floating leaves with ndim >= {min_ndim}")


def kernels_except(names: Sequence[str], min_ndim: int = 2) -> Callable[[Any], Any]:
    """Like :func:`kernels`, except leaves whose path contains one of ``names`` as a component.

    ``kernels_except(("Conv_0", "Dense_0"))`` is the ImageNet setting: first convolution and last
    dense layer stay dense.  A name that is no component of any leaf path of the params (a typo:
    every leaf it meant stays sparse) gives a warning.
    """
    if isinstance(names, str):
        raise ValueError(f"names must be a sequence of names, got the string {names!r}.")
    excluded = set(names)

    def select(params: Any) -> Any:
        seen: set[str] = set()

        def keep(path, p):
            components = set(path_name(path).split("/"))
            seen.update(components)
            return is_kernel(p, min_ndim) and not components & excluded

        out = jax.tree_util.tree_map_with_path(keep, params)
        if unmatched := sorted(excluded - seen):
            flat = jax.tree_util.tree_flatten_with_path(params)[0]
            example = f" (paths look like {path_name(flat[0][0])!r})" if flat else ""
            warnings.warn(
                f"kernels_except: {', '.join(map(repr, unmatched))} is no component of any "
                f"leaf path of params{example}: nothing is excluded by it.",
                stacklevel=2,
            )
        return out

    rule = f"floating leaves with ndim >= {min_ndim}, except under {', '.join(sorted(excluded))}"
    return _with_rule(select, rule)


def resolve(sparsify: Sparsify, params: Any) -> list[bool]:
    """One bool per params leaf (tree order), validated.

    Raises:
      ValueError: if the structure does not match ``params``, a value is not a bool, or an
        integer/boolean or empty (size-0) leaf is marked sparse.
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
        if flag and not is_floating(p):
            raise ValueError(
                f"leaf {path_name(path)!r} has dtype {p.dtype} and cannot be sparse; "
                "only floating leaves can be marked in `sparsify`."
            )
        if flag and np.size(p) == 0:
            raise ValueError(
                f"leaf {path_name(path)!r} has no weights (shape {tuple(np.shape(p))}) and cannot "
                "be sparse; mark it dense in `sparsify`."
            )
        flags.append(bool(flag))
    if flags and not any(flags):
        warnings.warn("`sparsify` selects no leaf: training will be dense.", stacklevel=3)
    return flags
