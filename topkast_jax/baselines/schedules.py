"""When the baselines change their masks and by how much: exact integer schedules.

Every count is computed in Python (float64) when the optimizer is traced and stored in an
:class:`EventTable`; the jitted update only looks rows up, so the sparsity reached at each step is
exactly the one these functions give (no float32 rounding at run time).

* Gradual magnitude pruning (Zhu & Gupta 2018): at the pruning steps
  ``t ∈ {t₀, t₀ + Δt, ..., t₀ + nΔt}`` the target sparsity is

      s_t = s_f + (s_i − s_f) · (1 − (t − t₀) / (nΔt))³,

  dense before ``t₀`` and ``s_f`` after ``t₀ + nΔt``.  Here ``t₀ = begin_step``,
  ``t₀ + nΔt = end_step`` and ``Δt = frequency``; when ``end_step − begin_step`` is not a multiple
  of ``frequency`` the grid ``t₀ + jΔt < end_step`` is kept and ``end_step`` is added as the last
  pruning step, so ``s_f`` is always reached at ``end_step``.
* Drop fraction of SET / RigL (Evci et al. 2020, Eq. 1), as google-research/rigl's
  ``sparse_optimizers_base.py`` computes it: at the mask-update steps
  ``t = 0, ΔT, 2ΔT, ... ≤ T_end`` (RigL's ``is_mask_update_iter`` with ``begin_step = 0``, its
  ImageNet default) the fraction
  ``f_t`` of each leaf's active weights is dropped and as many are regrown; ``"constant"``:
  ``f_t = α``; ``"cosine"``: ``f_t = α/2 · (1 + cos(πt/T_end))`` (TF ``cosine_decay`` over
  ``T_end`` steps, so ``f_{T_end} = 0``).  The count is RigL's ``n_prune = int(n_ones · f_t)``:
  ``⌊f_t · k⌋`` (truncation) for a leaf with ``k`` active weights.  RigL evaluates it in float32,
  here in float64: the two can differ by one only when ``f_t · k`` lies within float32 rounding of
  an integer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from topkast_jax import distributions

DROP_SCHEDULES = ("constant", "cosine")


def pruning_steps(begin_step: int, end_step: int, frequency: int) -> list[int]:
    """The pruning steps ``t₀, t₀ + Δt, ... < end_step`` and ``end_step`` itself."""
    return list(range(begin_step, end_step, frequency)) + [end_step]


def pruning_sparsity(
    step: int, *, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int
) -> float:
    """Target sparsity ``s_t`` of the cubic schedule at a step of the pruning range.

    Args:
      step: ``t`` with ``begin_step <= t <= end_step`` (clamped to that range).
      initial_sparsity: ``s_i``.
      final_sparsity: ``s_f``.
      begin_step: ``t₀``.
      end_step: ``t₀ + nΔt``; when equal to ``begin_step`` the schedule is one-shot (``s_f``).
    """
    if end_step == begin_step:
        return final_sparsity
    progress = min(max((step - begin_step) / (end_step - begin_step), 0.0), 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


def leaf_keep_counts(
    shapes: Sequence[tuple[int, ...]], sparsity: float, distribution: str
) -> list[int]:
    """Active weights per sparse leaf at global ``sparsity`` (the core's densities and rounding)."""
    densities = distributions.leaf_densities(shapes, 1.0 - sparsity, distribution)
    return [
        distributions.keep_count(d, math.prod(s)) for d, s in zip(densities, shapes, strict=True)
    ]


def drop_fraction_at(step: int, drop_fraction: float, end_step: int, schedule: str) -> float:
    """``f_t`` for ``0 <= t <= T_end``: ``α`` (constant) or ``α/2 · (1 + cos(πt/T_end))`` (cosine,
    0 at ``t = T_end``, also when ``T_end = 0``); 0 after ``end_step``."""
    if step > end_step:
        return 0.0
    if schedule == "constant":
        return drop_fraction
    progress = step / end_step if end_step > 0 else 1.0
    return 0.5 * drop_fraction * (1.0 + math.cos(math.pi * progress))


def drop_count(fraction: float, active: int) -> int:
    """Weights dropped (and regrown) in a leaf with ``active`` weights: ``⌊f · k⌋``, RigL's
    ``int(n_ones · drop_fraction)``."""
    return min(active, math.floor(fraction * active))


def update_steps(update_every: int, end_step: int) -> list[int]:
    """The mask-update steps of SET / RigL: ``0, ΔT, 2ΔT, ... ≤ end_step`` (RigL's, step 0
    included)."""
    return list(range(0, end_step + 1, update_every))


@dataclasses.dataclass(frozen=True)
class EventTable:
    """Steps at which masks change and, for each, one integer per sparse leaf.

    Attributes:
      steps: int, shape ``[E]``, increasing: values of ``count`` (updates applied) after which the
        mask is recomputed.
      counts: int, shape ``[E, L]``: the rule's count (keep or drop) for each sparse leaf.
    """

    steps: np.ndarray
    counts: np.ndarray

    def due(self, step: jax.Array) -> jax.Array:
        """bool scalar: whether ``step`` is one of the table's steps."""
        if self.steps.size == 0:
            return jnp.zeros((), bool)
        return jnp.any(jnp.asarray(self.steps, jnp.int32) == step)

    def row(self, step: jax.Array) -> jax.Array:
        """int32 ``[L]``: the counts of the event at ``step`` (meaningful only when ``due``)."""
        if self.steps.size == 0:
            return jnp.zeros(self.counts.shape[1:], jnp.int32)
        index = jnp.argmax(jnp.asarray(self.steps, jnp.int32) == step)
        return jnp.asarray(self.counts, jnp.int32)[index]


def make_table(
    steps: Sequence[int], counts: Sequence[Sequence[int]], num_leaves: int
) -> EventTable:
    """An :class:`EventTable` from Python lists (``counts[e][l]``)."""
    counts_ExL = np.asarray(counts, np.int32).reshape(len(steps), num_leaves)
    return EventTable(np.asarray(steps, np.int32), counts_ExL)
