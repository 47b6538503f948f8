"""An opt-in check that exploration is alive: ``B ∖ A`` must receive gradient.

Top-KAST updates every weight of ``B``, and weights of ``B ∖ A`` enter ``A`` only through the
gradient they receive.  A gradient taken through the mask (``∂L/∂θ`` of ``L(θ ⊙ A)``, or of the
dense model) is exactly zero on ``B ∖ A`` for a layer whose forward pass reads ``θ ⊙ A``; the
training then runs without error but never explores.  :func:`check_exploration` wraps the
transformation and warns when some sparse leaf's ``B ∖ A`` gets exactly zero gradient for
``patience`` consecutive updates.  It costs nothing unless used: the check is a wrapper.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from topkast_jax.state import get_masks
from topkast_jax.tree import sparse_leaves
from topkast_jax.validation import check_int


def zero_exploration(grads: Any, masks: Any) -> tuple[list[str], jax.Array | None]:
    """Per sparse leaf, whether ``B ∖ A`` is non-empty and its gradient exactly zero.

    Returns:
      ``(names, zero)``: the sparse leaves' paths and a bool ``[len(names)]`` array
      (``None`` when no leaf is sparse).
    """
    rows = sparse_leaves(masks.forward, masks.backward, grads)
    if not rows:
        return [], None
    zero = []
    for _, a, b, g in rows:
        explore = b & ~a
        zero.append(jnp.any(explore) & ~jnp.any(explore & (g != 0)))
    return [name for name, *_ in rows], jnp.stack(zero)


def _record(runs: dict[str, int], names: Sequence[str], patience: int, zero: Any) -> None:
    """Host side: count consecutive zero-gradient updates per leaf, warn when a run reaches
    ``patience`` (once per run)."""
    stalled = []
    for name, is_zero in zip(names, np.asarray(zero), strict=True):
        runs[name] = runs.get(name, 0) + 1 if is_zero else 0
        if runs[name] == patience:
            stalled.append(name)
    if stalled:
        warnings.warn(
            f"Top-KAST: B∖A of {', '.join(stalled)} received exactly zero gradient for "
            f"{patience} consecutive updates, so no weight there can enter A: the gradient was "
            "probably taken with respect to θ through the mask (or of the dense model). "
            "Differentiate with respect to α = tk.forward_params(params, opt_state): "
            "tk.value_and_grad(loss_fn)(params, opt_state, ...), or tk.nnx.value_and_grad.",
            stacklevel=2,
        )


def check_exploration(
    tx: optax.GradientTransformation, *, patience: int = 5
) -> optax.GradientTransformationExtraArgs:
    """``tx`` (containing a Top-KAST or baseline state) with a check of its gradients.

    Each ``update`` reads ``A`` and ``B`` from the state it is given (the sets the gradient was
    computed under) and, through ``jax.debug.callback``, counts on the host, per sparse leaf, the
    consecutive updates whose gradient is exactly zero on a non-empty ``B ∖ A``; at ``patience``
    it warns, naming the leaves.  The state and the updates are ``tx``'s, unchanged.  Costs a
    reduction per sparse leaf and a host callback per update: for debugging.

    Args:
      tx: the transformation to check (``tk.topkast(...)``, possibly inside wrappers).
      patience: consecutive zero-gradient updates before the warning (``>= 1``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``tx``'s ``init`` and state (and, for a
      ``tk.topkast``, its :func:`~topkast_jax.refresh_sets`).

    Example::

        tx = tk.check_exploration(tk.topkast(optax.adam(1e-3), forward_sparsity=0.9,
                                             backward_sparsity=0.8), patience=5)
    """
    patience = check_int("patience", patience, 1)
    runs: dict[str, int] = {}

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        names, zero = zero_exploration(updates, get_masks(state, updates))
        if names:
            jax.debug.callback(functools.partial(_record, runs, names, patience), zero)
        return tx.update(updates, state, params, **extra)

    if hasattr(tx.update, "refresh"):  # the state is tx's: tk.refresh_sets(checked) still works
        update_fn.refresh = tx.update.refresh
    return optax.GradientTransformationExtraArgs(tx.init, update_fn)
