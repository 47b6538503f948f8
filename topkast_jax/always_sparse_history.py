r"""Mask statistics of always-sparse execution, kept on the host (paper Fig. 3).

The masked transform's statistics (:mod:`topkast_jax.stats`), computed at each refresh from the
old and new ``B``-layouts (:class:`~topkast_jax.always_sparse_host.Layout`) on the host, so the
device holds nothing per weight:

* mask change of a sparse leaf at the last refresh: ``|A_t ∖ A_{t−1}| / |A_{t−1}|`` (0 when
  ``A_{t−1}`` is empty, 0 before the first refresh), float32 as the masked transform computes it;
* with ``track_reservoir``, per sparse leaf two bit-packed host vectors of ``⌈n/8⌉`` bytes
  (``np.packbits`` of the flat row-major mask): ``ever_active = ⋃_t A_t`` (``A₀`` at
  initialisation) and the reservoir ``C₀ = ¬B₀`` (the weights in neither ``A`` nor ``B`` at
  initialisation).  The reservoir statistic is

      ``reservoir_activated = Σ_ℓ |ever_active_ℓ ∩ C₀_ℓ| / max(Σ_ℓ |C₀_ℓ|, 1)``

  — of the weights that started in the reservoir, the fraction that has ever been in ``A``.

``B ← A`` when exploration stops changes no statistic (``A`` is unchanged), as in the masked
transform.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from topkast_jax import always_sparse_host as host


class History(NamedTuple):
    """Host-side mask statistics of an always-sparse run (one entry per sparse leaf, plan order).

    Attributes:
      changed: float32 ``[L]``, each sparse leaf's mask change at the last refresh.
      ever_active: ``L`` uint8 ``[⌈n_ℓ/8⌉]`` packed bits of ``⋃_t A_t``, or ``None`` (not tracked).
      reservoir: ``L`` uint8 ``[⌈n_ℓ/8⌉]`` packed bits of ``C₀ = ¬B₀``, or ``None``.
    """

    changed: np.ndarray
    ever_active: tuple[np.ndarray, ...] | None
    reservoir: tuple[np.ndarray, ...] | None


def _packed(mask_N: np.ndarray) -> np.ndarray:
    return np.packbits(mask_N)


def _ones(packed: np.ndarray) -> int:
    """Number of set bits of a packed vector (its padding bits are zero)."""
    return int(np.bitwise_count(packed).sum(dtype=np.int64))


def init_history(layouts: list[host.Layout], sizes: list[int], track_reservoir: bool) -> History:
    """Statistics at initialisation: nothing changed, ``ever_active = A₀``, ``C₀ = ¬B₀``.

    Args:
      layouts: the initial ``B`` of each sparse leaf.
      sizes: each sparse leaf's number of weights ``n_ℓ``.
      track_reservoir: keep the two packed bit vectors per leaf.
    """
    changed = np.zeros(len(layouts), np.float32)
    if not track_reservoir:
        return History(changed, None, None)
    pairs = [host.flat_masks(lay, n) for lay, n in zip(layouts, sizes, strict=True)]
    return History(
        changed,
        tuple(_packed(a) for a, _ in pairs),
        tuple(_packed(~b) for _, b in pairs),
    )


def _forward_indices(layout: host.Layout) -> np.ndarray:
    """Flat indices of ``A`` (ascending)."""
    return layout.indices[layout.in_a]


def fraction_changed(old: host.Layout, new: host.Layout) -> np.float32:
    """``|A_new ∖ A_old| / |A_old|`` (0 when ``A_old`` is empty), float32."""
    a_old, a_new = _forward_indices(old), _forward_indices(new)
    stayed = np.intersect1d(a_old, a_new, assume_unique=True).shape[0]
    entered = a_new.shape[0] - stayed
    return np.float32(entered) / np.float32(max(a_old.shape[0], 1))


def refresh_history(
    history: History, old: list[host.Layout], new: list[host.Layout], sizes: list[int]
) -> History:
    """:class:`History` after a refresh from the ``old`` to the ``new`` layouts."""
    changed = np.array(
        [fraction_changed(o, n) for o, n in zip(old, new, strict=True)], np.float32
    ).reshape(len(new))
    if history.ever_active is None:
        return History(changed, None, None)
    ever = tuple(
        e | _packed(host.flat_masks(lay, n)[0])
        for e, lay, n in zip(history.ever_active, new, sizes, strict=True)
    )
    return History(changed, ever, history.reservoir)


def reservoir_fraction(history: History) -> np.float32 | None:
    """Of the reservoir ``C₀`` over all sparse leaves, the fraction ever in ``A`` (float32);
    ``None`` when the history is not tracked."""
    if history.ever_active is None or history.reservoir is None:
        return None
    reservoir = sum((_ones(r) for r in history.reservoir), 0)
    activated = sum(
        (_ones(e & r) for e, r in zip(history.ever_active, history.reservoir, strict=True)), 0
    )
    return np.float32(activated) / np.float32(max(reservoir, 1))
