"""The optimizer-state types of sparse training and how to find them inside any optax state.

Every sparse method of the library (Top-KAST and the baselines) keeps its masks in a NamedTuple
state with a field ``masks: Masks``.  :func:`find_sparse_state` locates that state wherever it
sits inside ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams`` or any other
wrapper, so :func:`forward_params` and :func:`get_masks` work on the whole optimizer state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from topkast_jax.tree import map_sparse


class Masks(NamedTuple):
    """The two sets of Top-KAST, pytrees like the params.

    Attributes:
      forward: ``A`` — bool array (shape of the leaf) on sparse leaves, ``None`` on dense ones.
        The forward pass and the backward pass use ``α = θ ⊙ A``.
      backward: ``B ⊇ A`` — the weights that receive updates.
    """

    forward: Any
    backward: Any


class MaskStats(NamedTuple):
    """Mask dynamics, updated at each refresh (paper Fig. 3).

    Attributes:
      changed: per sparse leaf, float32 scalar ``|A_new \\ A_old| / |A_old|`` at the last refresh.
      ever_active: per sparse leaf, bool mask of the weights that have ever been in ``A``.
      reservoir: per sparse leaf, bool mask of ``C₀`` — weights in neither ``A`` nor ``B`` at init.
    """

    changed: Any
    ever_active: Any
    reservoir: Any


class TopKastState(NamedTuple):
    """State of :func:`topkast_jax.topkast`.

    Attributes:
      count: int32 number of updates applied.
      masks: the current ``A`` and ``B``.
      densities: per sparse leaf, float32 scalar forward density ``D`` (for the penalty).
      exploration_l2: float32 scalar ``λ``.
      stats: mask dynamics.
      rng: PRNG key (uint32[2]) for the random-``B∖A`` ablation.
      inner_state: the wrapped optimizer's state, zero outside ``B`` on param-shaped leaves.
    """

    count: jax.Array
    masks: Masks
    densities: Any
    exploration_l2: jax.Array
    stats: MaskStats
    rng: jax.Array
    inner_state: optax.OptState


def _is_sparse_state(node: Any) -> bool:
    return isinstance(node, tuple) and isinstance(getattr(node, "masks", None), Masks)


def find_sparse_state(opt_state: optax.OptState) -> Any:
    """The unique sparse-training state (any NamedTuple with ``masks: Masks``) in ``opt_state``.

    Raises:
      ValueError: if ``opt_state`` holds none, or more than one.
    """
    nodes = jax.tree.leaves(opt_state, is_leaf=_is_sparse_state)
    found = [n for n in nodes if _is_sparse_state(n)]
    if len(found) != 1:
        raise ValueError(
            f"opt_state must contain exactly one sparse-training state (e.g. TopKastState), "
            f"found {len(found)}. Pass the state returned by the optimizer's init/update."
        )
    return found[0]


def get_masks(opt_state: optax.OptState) -> Masks:
    """``Masks(forward=A, backward=B)`` from any optimizer state containing a sparse method."""
    return find_sparse_state(opt_state).masks


def forward_params(params: Any, opt_state: optax.OptState) -> Any:
    """``α = θ ⊙ A``: sparse leaves masked by the forward set, dense leaves unchanged.

    Pure and jit-able; take gradients of the loss with respect to ``α``.
    """
    masks = get_masks(opt_state)
    return map_sparse(lambda p, a: jnp.where(a, p, jnp.zeros((), p.dtype)), params, masks.forward)
