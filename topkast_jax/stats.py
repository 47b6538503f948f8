"""Mask statistics, cheap enough to log every step (paper Fig. 3).

* forward / backward density: ``|A| / n`` and ``|B| / n``, per sparse leaf and over all of them.
* mask change: ``|A_t ∖ A_{t−1}| / |A_{t−1}|`` at the last refresh, per leaf; its mean over leaves.
* reservoir activation: of ``C₀`` (weights in neither ``A`` nor ``B`` at initialisation), the
  fraction that has ever entered ``A``.  It needs per-weight history: the baselines keep it as
  bool masks (:class:`MaskStats`); Top-KAST keeps it only with ``track_reservoir=True``, packed at
  two bits per weight (:class:`SetStats`), and otherwise omits the key.
* per slice, for a leaf with a layer axis (scan-stacked layers): ``|A_l| / n_slice`` and
  ``|B_l| / n_slice`` of every slice ``l``.

Several sparse states over disjoint leaves (e.g. one Top-KAST per ``optax.multi_transform``
group) are reported as one: the totals count the sparse leaves of all of them.

Per-leaf scalars (the mask change) are stored without the params' Flax boxes
(:func:`topkast_jax.boxes.strip`), so a partitioning setup replicates them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from topkast_jax import boxes
from topkast_jax import codes as codes_lib
from topkast_jax.state import (
    Masks,
    MaskStats,
    PackedSets,
    SetStats,
    is_set_leaf,
    sparse_states_or_dense,
)
from topkast_jax.tree import path_name, sparse_leaves


def init_stats(masks: Masks) -> MaskStats:
    """Statistics at initialisation: nothing changed, ``ever_active = A₀``, ``C₀ = ¬B₀``."""
    changed = boxes.strip(jax.tree.map(lambda a: jnp.zeros((), jnp.float32), masks.forward))
    reservoir = jax.tree.map(jnp.logical_not, masks.backward)
    return MaskStats(changed=changed, ever_active=masks.forward, reservoir=reservoir)


def fraction_changed(old: jax.Array, new: jax.Array) -> jax.Array:
    """``|new ∖ old| / |old|`` (0 when ``old`` is empty), float32."""
    entered = jnp.sum(new & ~old, dtype=jnp.float32)
    return entered / jnp.maximum(jnp.sum(old, dtype=jnp.float32), 1.0)


def refresh_stats(stats: MaskStats, old: Masks, new: Masks) -> MaskStats:
    """Statistics after a refresh from ``old`` to ``new`` masks."""
    changed = boxes.strip(jax.tree.map(fraction_changed, old.forward, new.forward))
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


def packed_fraction_changed(old: PackedSets, new: PackedSets) -> jax.Array:
    """``|A_new ∖ A_old| / |A_old|`` (0 when ``A_old`` is empty) on the packed bits, float32."""
    entered, old_size = codes_lib.count_both(new.bits & ~old.bits, old.bits, codes_lib.IN_A)
    return entered.astype(jnp.float32) / jnp.maximum(old_size, 1).astype(jnp.float32)


def _mark_ever_active(history: PackedSets, new: PackedSets) -> PackedSets:
    """History bit ``IN_A`` (ever in ``A``) |= ``A_new``; the reservoir bit is kept."""
    return PackedSets(
        history.bits | codes_lib.plane(new.bits, codes_lib.IN_A), history.shape, history.axis
    )


def _map_sets(fn, *trees: Any) -> Any:
    """``fn`` on the :class:`PackedSets` of sparse leaves, ``None`` kept on dense ones."""
    return jax.tree.map(
        lambda s, *rest: None if s is None else fn(s, *rest), *trees, is_leaf=is_set_leaf
    )


def sets_changed(old: Any, new: Any) -> Any:
    """Per sparse leaf, ``|A_new ∖ A_old| / |A_old|`` of the ``old`` and ``new`` packed sets,
    computed on the packed bytes (a quarter of a byte per weight is read, nothing is unpacked);
    ``None`` on dense leaves."""
    return boxes.strip(_map_sets(packed_fraction_changed, old, new))


def refreshed_stats(stats: SetStats, changed: Any, new: Any) -> SetStats:
    """:class:`SetStats` after a refresh to the ``new`` packed sets, ``changed`` from
    :func:`sets_changed`."""
    if stats.history is None:
        return SetStats(changed=changed, history=None)
    history = _map_sets(_mark_ever_active, stats.history, new)
    return SetStats(changed=changed, history=history)


def _history_counts(history: Any) -> tuple[jax.Array, jax.Array]:
    """``(|C₀|, |C₀ ∩ ever in A|)`` over all sparse leaves: the reservoir (history bit ``IN_B``)
    and those of it ever in ``A`` (bit ``IN_A``), on the packed bytes."""
    leaves = [h for h in jax.tree.leaves(history, is_leaf=is_set_leaf) if h is not None]
    reservoir = sum(codes_lib.count(h.bits, codes_lib.IN_B) for h in leaves)
    activated = sum(
        codes_lib.count((h.bits >> 1) & h.bits, codes_lib.IN_B) for h in leaves
    )  # ever-active bit moved onto the reservoir bit of the same weight
    return reservoir, activated


def _reservoir_counts(state: Any) -> tuple[Any, Any] | None:
    """``(|C₀|, |C₀ ∩ ever in A|)`` of one sparse state, ``None`` when it keeps no history."""
    if isinstance(state.stats, MaskStats):
        pairs = sparse_leaves(state.stats.ever_active, state.stats.reservoir)
        return sum(_count(r) for _, _, r in pairs), sum(_count(e & r) for _, e, r in pairs)
    if state.stats.history is None:
        return None
    return _history_counts(state.stats.history)


def _count(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask, dtype=jnp.float32)


def _packed_leaves(sets: Any) -> list[tuple[str, PackedSets]]:
    """``(path name, PackedSets)`` of every sparse leaf, in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(sets, is_leaf=is_set_leaf)
    return [(path_name(path), s) for path, s in flat if s is not None]


def _set_counts(state: Any) -> tuple[list[str], jax.Array, jax.Array, jax.Array]:
    """Names, sizes, ``|A|`` and ``|B|`` (float32 vectors) of the sparse leaves; packed states
    are counted on their bits."""
    if isinstance(state.stats, SetStats):
        rows = _packed_leaves(state.sets)
        names = [name for name, _ in rows]
        sizes = [math.prod(s.shape) for _, s in rows]
        fwd = [codes_lib.count(s.bits, codes_lib.IN_A) for _, s in rows]
        bwd = [codes_lib.count(s.bits, codes_lib.IN_B) for _, s in rows]
    else:
        rows = sparse_leaves(state.masks.forward, state.masks.backward)
        names = [name for name, *_ in rows]
        sizes = [a.size for _, a, _ in rows]
        fwd = [_count(a) for _, a, _ in rows]
        bwd = [_count(b) for _, _, b in rows]
    if not names:
        empty = jnp.zeros((0,), jnp.float32)
        return [], empty, empty, empty

    def vector(values):
        return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])

    return names, jnp.array(sizes, jnp.float32), vector(fwd), vector(bwd)


def mask_stats(opt_state: optax.OptState, *, per_leaf: bool = True) -> dict[str, jax.Array]:
    """Flat dict of float32 scalars describing the masks; jit-able.

    Keys: ``forward_density``, ``backward_density`` (over all sparse leaves), ``mask_change``
    (mean over sparse leaves of the change at the last refresh), ``mask_change_min``,
    ``mask_change_max``, ``reservoir_activated`` (baselines, and Top-KAST with
    ``track_reservoir=True``); with ``per_leaf`` also ``forward_density/<path>``,
    ``backward_density/<path>`` and ``mask_change/<path>``, and for a leaf with a layer axis
    ``forward_density/<path>/<l>`` and ``backward_density/<path>/<l>`` for each slice ``l``.  Empty
    dict when no leaf is sparse.

    Several sparse states over disjoint leaves are combined: the totals and the mask change run
    over the sparse leaves of all of them; ``reservoir_activated`` is given when every state
    keeps the history.  No sparse state (Top-KAST switched off): empty, with a one-time
    warning.
    """
    states = sparse_states_or_dense(opt_state, "tk.mask_stats")
    counts = [_set_counts(state) for state in states]
    names = [name for state_names, *_ in counts for name in state_names]
    if not names:
        return {}
    sizes, fwd, bwd = (jnp.concatenate([c[i] for c in counts]) for i in (1, 2, 3))
    changed = jnp.stack([c for state in states for c in jax.tree.leaves(state.stats.changed)])
    out: dict[str, jax.Array] = {}
    out["forward_density"] = fwd.sum() / sizes.sum()
    out["backward_density"] = bwd.sum() / sizes.sum()
    out["mask_change"] = changed.mean()
    out["mask_change_min"] = changed.min()
    out["mask_change_max"] = changed.max()
    reservoirs = [_reservoir_counts(state) for state in states]
    if all(r is not None for r in reservoirs):
        reservoir = sum(r for r, _ in reservoirs)
        activated = sum(a for _, a in reservoirs)
        out["reservoir_activated"] = jnp.asarray(activated, jnp.float32) / jnp.maximum(
            jnp.asarray(reservoir, jnp.float32), 1.0
        )
    if per_leaf:
        for i, name in enumerate(names):
            out[f"forward_density/{name}"] = fwd[i] / sizes[i]
            out[f"backward_density/{name}"] = bwd[i] / sizes[i]
            out[f"mask_change/{name}"] = changed[i]
        for state, (state_names, *_) in zip(states, counts, strict=True):
            out.update(_slice_stats(state, state_names))
    return out


def layer_axis_of(density: Any) -> int | None:
    """The layer axis a stored per-leaf density marks (``D`` per slice along it, size 1 on the
    other axes; see :class:`~topkast_jax.TopKastState`), ``None`` for a scalar or a single slice."""
    shape = np.shape(density)
    return int(np.argmax(shape)) if shape and max(shape) > 1 else None


def _slice_ones(sets: PackedSets, bit: int, axis: int) -> jax.Array:
    """Membership of one set, on which a sum over every axis but the layer ``axis`` counts each
    slice: per-byte counts of the packed bits when they are packed along another axis (the layer
    axis is then intact), else the unpacked bit."""
    if sets.axis != axis:
        return lax.population_count(codes_lib.plane(sets.bits, bit))
    return (sets.codes() & bit) != 0


def _slice_stats(state: Any, names: list[str]) -> dict[str, jax.Array]:
    """``forward_density/<path>/<l>`` and ``backward_density/<path>/<l>`` per slice of every leaf
    with a layer axis."""
    densities = jax.tree.leaves(state.densities)
    if isinstance(state.stats, SetStats):
        sets = [(s, s) for _, s in _packed_leaves(state.sets)]
        bits = (codes_lib.IN_A, codes_lib.IN_B)
    else:
        sets = [(a, b) for _, a, b in sparse_leaves(state.masks.forward, state.masks.backward)]
        bits = (None, None)
    out: dict[str, jax.Array] = {}
    for name, density, pair in zip(names, densities, sets, strict=True):
        axis = layer_axis_of(density)
        if axis is None:
            continue
        for key, s, bit in zip(("forward_density", "backward_density"), pair, bits, strict=True):
            ones = s if bit is None else _slice_ones(s, bit, axis)
            others = tuple(d for d in range(ones.ndim) if d != axis)
            per_slice = jnp.sum(ones, axis=others, dtype=jnp.float32)
            slice_size = math.prod(s.shape) / np.shape(density)[axis]
            for i in range(per_slice.shape[0]):
                out[f"{key}/{name}/{i}"] = per_slice[i] / slice_size
    return out
