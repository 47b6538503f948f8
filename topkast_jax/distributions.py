"""Per-leaf densities: how a global density is spread over the sparse leaves.

* ``"uniform"``: every sparse leaf gets the same density ``d``.
* ``"erk"`` (Erdős–Rényi-Kernel, Evci et al. 2020, "Rigging the Lottery"): leaf ``l`` with shape
  ``(s_1, ..., s_r)`` and ``n_l = Π s_i`` weights gets ``d_l = min(1, ε · Σ s_i / Π s_i)``, with
  ``ε`` chosen so that ``Σ_l d_l n_l = d · Σ_l n_l``.  Leaves whose density would exceed one are
  made dense and ``ε`` is solved again over the rest.

Also the integer counts every selection uses: ``k = max(1, floor(d · n + 0.5))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DISTRIBUTIONS = ("uniform", "erk")


def keep_count(density: float, size: int) -> int:
    """Number of weights kept at ``density`` in a leaf of ``size``: ``max(1, ⌊d·n + ½⌋)``."""
    return max(1, math.floor(density * size + 0.5))


def mask_counts(forward_density: float, backward_density: float, size: int) -> tuple[int, int]:
    """``(k_A, k_B)`` with ``k_B = max(k_A, ⌊(D+M)·n + ½⌋)``."""
    k_forward = keep_count(forward_density, size)
    return k_forward, min(size, max(k_forward, keep_count(backward_density, size)))


def erk_densities(shapes: Sequence[tuple[int, ...]], density: float) -> list[float]:
    """ERK densities of leaves with the given shapes, averaging ``density`` over their weights."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) if math.prod(s) else 0.0 for s in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        scaled = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        eps = budget / scaled if scaled > 0 else 0.0
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def check_distribution(distribution: str) -> str:
    """``distribution`` if it is one of :data:`DISTRIBUTIONS`, else a ValueError naming it."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    return distribution


def leaf_densities(
    shapes: Sequence[tuple[int, ...]], density: float, distribution: str = "uniform"
) -> list[float]:
    """Per-leaf densities for the sparse leaves ``shapes`` (same order)."""
    check_distribution(distribution)
    if density >= 1.0 or not shapes:
        return [1.0] * len(shapes)
    if distribution == "uniform":
        return [float(density)] * len(shapes)
    return erk_densities(shapes, density)
