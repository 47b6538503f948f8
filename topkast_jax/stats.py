"""Mask statistics, cheap enough to log every step (paper Fig. 3).

* forward / backward density: ``|A| / n`` and ``|B| / n``, per sparse leaf and over all of them.
* mask change: ``|A_t ∖ A_{t−1}| / |A_{t−1}|`` at the last refresh, per leaf; its mean over leaves.
* reservoir activation: of ``C₀`` (weights in neither ``A`` nor ``B`` at initialisation), the
  fraction that has ever entered ``A``.  It needs per-weight history: the baselines keep it as
  bool masks (:class:`MaskStats`); Top-KAST keeps it only with ``track_reservoir=True``, packed at
  two bits per weight (:class:`SetStats`), and otherwise omits the key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from topkast_jax import codes as codes_lib
from topkast_jax.state import Masks, MaskStats, PackedSets, SetStats, find_sparse_state, unpack_tree
from topkast_jax.tree import sparse_leaves


def init_stats(masks: Masks) -> MaskStats:
    """Statistics at initialisation: nothing changed, ``ever_active = A₀``, ``C₀ = ¬B₀``."""
    changed = jax.tree.map(lambda a: jnp.zeros((), jnp.float32), masks.forward)
    reservoir = jax.tree.map(jnp.logical_not, masks.backward)
    return MaskStats(changed=changed, ever_active=masks.forward, reservoir=reservoir)


def fraction_changed(old: jax.Array, new: jax.Array) -> jax.Array:
    """``|new ∖ old| / |old|`` (0 when ``old`` is empty), float32."""
    entered = jnp.sum(new & ~old, dtype=jnp.float32)
    return entered / jnp.maximum(jnp.sum(old, dtype=jnp.float32), 1.0)


def refresh_stats(stats: MaskStats, old: Masks, new: Masks) -> MaskStats:
    """Statistics after a refresh from ``old`` to ``new`` masks."""
    changed = jax.tree.map(fraction_changed, old.forward, new.forward)
    ever = jax.tree.map(jnp.logical_or, stats.ever_active, new.forward)
    return MaskStats(changed=changed, ever_active=ever, reservoir=stats.reservoir)


def _pack_history(ever_active: Any, reservoir: Any) -> Any:
    return jax.tree.map(
        lambda e, r: PackedSets.from_codes(codes_lib.encode(e, r)), ever_active, reservoir
    )


def init_set_stats(masks: Masks, track_reservoir: bool) -> SetStats:
    """:class:`SetStats` at initialisation (history only with ``track_reservoir``)."""
    full = init_stats(masks)
    history = _pack_history(full.ever_active, full.reservoir) if track_reservoir else None
    return SetStats(changed=full.changed, history=history)


def refresh_set_stats(stats: SetStats, old: Masks, new: Masks) -> SetStats:
    """:class:`SetStats` after a refresh from ``old`` to ``new`` masks."""
    changed = jax.tree.map(fraction_changed, old.forward, new.forward)
    if stats.history is None:
        return SetStats(changed=changed, history=None)
    ever, reservoir = _history_masks(stats)
    ever = jax.tree.map(jnp.logical_or, ever, new.forward)
    return SetStats(changed=changed, history=_pack_history(ever, reservoir))


def _history_masks(stats: SetStats) -> tuple[Any, Any]:
    return unpack_tree(stats.history, codes_lib.IN_A), unpack_tree(stats.history, codes_lib.IN_B)


def _reservoir_trees(stats: Any) -> tuple[Any, Any] | None:
    """``(ever_active, reservoir)`` bool pytrees, or ``None`` when the state keeps no history."""
    if isinstance(stats, MaskStats):
        return stats.ever_active, stats.reservoir
    if stats.history is None:
        return None
    return _history_masks(stats)


def _count(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask, dtype=jnp.float32)


def mask_stats(opt_state: optax.OptState, *, per_leaf: bool = True) -> dict[str, jax.Array]:
    """Flat dict of float32 scalars describing the masks; jit-able.

    Keys: ``forward_density``, ``backward_density`` (over all sparse leaves), ``mask_change``
    (mean over sparse leaves of the change at the last refresh), ``mask_change_min``,
    ``mask_change_max``, ``reservoir_activated`` (baselines, and Top-KAST with
    ``track_reservoir=True``); with ``per_leaf`` also ``forward_density/<path>``,
    ``backward_density/<path>`` and ``mask_change/<path>``.  Empty dict when no leaf is sparse.
    """
    state = find_sparse_state(opt_state)
    masks, stats = state.masks, state.stats
    rows = sparse_leaves(masks.forward, masks.backward, stats.changed)
    if not rows:
        return {}
    out: dict[str, jax.Array] = {}
    sizes = jnp.array([a.size for _, a, *_ in rows], jnp.float32)
    fwd = jnp.stack([_count(a) for _, a, *_ in rows])
    bwd = jnp.stack([_count(b) for _, _, b, *_ in rows])
    changed = jnp.stack([c for *_, c in rows])
    out["forward_density"] = fwd.sum() / sizes.sum()
    out["backward_density"] = bwd.sum() / sizes.sum()
    out["mask_change"] = changed.mean()
    out["mask_change_min"] = changed.min()
    out["mask_change_max"] = changed.max()
    history = _reservoir_trees(stats)
    if history is not None:
        pairs = sparse_leaves(*history)
        reservoir = sum(_count(r) for _, _, r in pairs)
        activated = sum(_count(e & r) for _, e, r in pairs)
        out["reservoir_activated"] = activated / jnp.maximum(reservoir, 1.0)
    if per_leaf:
        for i, (name, *_) in enumerate(rows):
            out[f"forward_density/{name}"] = fwd[i] / sizes[i]
            out[f"backward_density/{name}"] = bwd[i] / sizes[i]
            out[f"mask_change/{name}"] = changed[i]
    return out
