"""The optimizer state shared by every baseline (static, magnitude pruning, SET, RigL)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from topkast_jax.state import Masks, MaskStats


class BaselineState(NamedTuple):
    """State of the baselines in :mod:`topkast_jax.baselines`.

    It has a ``masks: Masks`` field, so :func:`topkast_jax.forward_params`,
    :func:`topkast_jax.get_masks` and :func:`topkast_jax.mask_stats` find it inside any optax
    chain or wrapper.  The baselines train exactly the weights they use: ``masks.forward ==
    masks.backward == M``.

    Attributes:
      count: int32 number of updates applied.
      masks: ``Masks(forward=M, backward=M)``; bool arrays on sparse leaves, ``None`` on dense.
      densities: per sparse leaf, float32 ``|M| / n`` of the current mask: a scalar, or per
        slice for a leaf with a layer axis (size 1 on the other axes); stored unboxed.
      exploration_l2: float32 scalar, always 0 — the baselines have no exploration penalty, and
        :func:`topkast_jax.exploration_penalty` reads this field (so it returns 0 for them).
      stats: mask dynamics (:class:`topkast_jax.MaskStats`), refreshed at every mask update.
      rng: PRNG key (uint32[2]) for random masks (static init, SET regrowth).
      inner_state: the wrapped optimizer's state, zero outside ``M`` on param-shaped leaves.
    """

    count: jax.Array
    masks: Masks
    densities: Any
    exploration_l2: jax.Array
    stats: MaskStats
    rng: jax.Array
    inner_state: optax.OptState
