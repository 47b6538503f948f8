"""Argument checks shared by Top-KAST and the baselines: each raises a ValueError naming the
argument."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from topkast_jax.distributions import check_distribution
from topkast_jax.stats import layer_axis_of
from topkast_jax.tree import path_name

__all__ = [
    "check_choice",
    "check_distribution",
    "check_fraction",
    "check_inner",
    "check_int",
    "check_layer_axes",
    "check_real",
    "check_same_shapes",
    "check_static",
    "check_update_inputs",
]


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1]``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}.")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    return value


def check_real(name: str, value: Any, minimum: float | None = None) -> Any:
    """``value`` if it is a finite real number ``>= minimum`` (a traced value, e.g. under
    ``optax.inject_hyperparams``, passes unchecked), else a ValueError naming ``name``."""
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, bool | str) or not isinstance(value, int | float | np.number | jax.Array):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}.")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {number}.")
    return value


def check_static(factory: str, **values: Any) -> None:
    """Hyperparameters that fix the compiled program (mask sizes, refresh schedule) must be
    Python values.  ``optax.inject_hyperparams`` passes every numeric argument not named in its
    ``static_args`` as a JAX array: such arrays raise a ValueError naming them and giving the
    ``static_args`` tuple to pass.

    Args:
      factory: the factory's name as the user calls it (e.g. ``"tk.topkast"``).
      **values: the hyperparameters to check, by argument name.
    """
    arrays = tuple(name for name, v in values.items() if isinstance(v, jax.Array))
    if arrays:
        raise ValueError(
            f"{', '.join(arrays)} must be Python numbers, got JAX arrays: they fix the masks' "
            "sizes and the compiled step, so they cannot be injected hyperparameters. Name "
            f"them static: optax.inject_hyperparams({factory}, static_args={arrays!r})(...) "
            "(exploration_l2 and the inner optimizer's hyperparameters can stay injected)."
        )


def check_inner(inner: Any) -> Any:
    """``inner`` if it is an optax transformation (``init`` and ``update`` callables), else a
    ValueError naming the argument."""
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise ValueError(
            "inner must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got "
            f"{type(inner).__name__} {inner!r}."
        )
    return inner


def check_same_shapes(name: str, tree: Any, params: Any) -> None:
    """``tree`` (e.g. the gradients) has the structure of ``params`` and each leaf its shape, else
    a ValueError naming the first differing leaf (nothing is broadcast)."""
    if jax.tree.structure(tree) != jax.tree.structure(params):
        raise ValueError(
            f"{name} must have the structure of params.\n  params: "
            f"{jax.tree.structure(params)}\n  {name}: {jax.tree.structure(tree)}"
        )
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), x in zip(flat, jax.tree.leaves(tree), strict=True):
        if np.shape(x) != np.shape(p):
            raise ValueError(
                f"{name} leaf {path_name(path)!r} has shape {np.shape(x)}, but the params leaf has "
                f"{np.shape(p)}."
            )


def _state_leaves(sets: Any) -> list[Any]:
    """Per params leaf: the object with the leaf's ``shape`` (sparse) or None (dense)."""
    return jax.tree.leaves(sets, is_leaf=lambda x: x is None or hasattr(x, "shape"))


_REWRITTEN_SETS = (
    "the optimizer state's sets for params leaf {!r} are a {}, not the PackedSets that init "
    "made: the state's pytree types were rewritten, as a plain nnx.Optimizer does when it stores "
    "an update. With Flax NNX use tk.nnx.Optimizer(model, tx) and "
    "tk.nnx.value_and_grad(loss_fn)(model, optimizer, ...): a plain nnx.Optimizer also runs the "
    "model on the dense θ, not θ ⊙ A."
)


def check_update_inputs(grads: Any, state: Any, params: Any, state_type: type) -> None:
    """The arguments of a sparse transformation's ``update``, checked against each other.

    * ``state`` is a ``state_type`` (not another optimizer's state);
    * ``params`` have the leaves and shapes the state was initialised with (its ``sets``: one
      entry per params leaf, with the leaf's ``shape`` on sparse leaves, None on dense ones);
    * ``grads`` have the structure and shapes of ``params``.

    Raises:
      ValueError: naming the argument and, for shapes, the leaf.
    """
    if not isinstance(state, state_type):
        raise ValueError(
            f"state must be the {state_type.__name__} returned by this transformation's init, "
            f"got {type(state).__name__}: pass this optimizer's own state."
        )
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    entries = _state_leaves(state.sets)
    if len(entries) != len(flat):
        raise ValueError(
            f"params have {len(flat)} leaves, but the optimizer state was initialised for "
            f"{len(entries)}: pass the params the state was initialised with."
        )
    for (path, p), entry in zip(flat, entries, strict=True):
        if entry is not None and not hasattr(entry, "codes"):
            raise ValueError(_REWRITTEN_SETS.format(path_name(path), type(entry).__name__))
        if entry is not None and tuple(entry.shape) != tuple(np.shape(p)):
            raise ValueError(
                f"params leaf {path_name(path)!r} has shape {tuple(np.shape(p))}, but the "
                f"optimizer state was initialised for {tuple(entry.shape)}."
            )
    check_same_shapes("grads", grads, params)


def check_layer_axes(plan: Any, densities: Any) -> None:
    """The layer axes the params of an update give (``plan``) are those the state was initialised
    with (the shapes of its stored per-leaf ``densities``, :func:`topkast_jax.stats.layer_axis_of`).

    The axis comes from the params' Flax metadata (``layer_axis="auto"``), which is lost when
    ``update`` gets bare arrays — ``nn.unbox`` after init, or ``nnx.Optimizer``, which strips
    ``nnx.Variable`` boxes — and a stack would then be selected as one tensor.

    Raises:
      ValueError: naming the first leaf whose layer axis differs.
    """
    sparse = [leaf for leaf in plan if leaf.sparse]
    stored = jax.tree.leaves(densities)
    if len(stored) != len(sparse):
        return  # another mismatch, reported by check_update_inputs or the update itself
    for leaf, density in zip(sparse, stored, strict=True):
        now = leaf.layer_axis if leaf.layers > 1 else None
        then = layer_axis_of(density)
        if now != then:
            raise ValueError(
                f"params leaf {leaf.path!r} has layer axis {now} in this update but the "
                f"optimizer state was initialised with layer axis {then} (selected per slice "
                "along it, or whole for None): the params lost (or gained) the Flax metadata "
                "init read it from. Pass params with the same boxes as at init — with Flax NNX "
                "use tk.nnx.Optimizer(model, tx), which keeps them; nnx.Optimizer strips them — "
                "or pass layer_axis explicitly."
            )
