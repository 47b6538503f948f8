"""Argument checks shared by Top-KAST and the baselines: each raises a ValueError naming the
argument."""

from __future__ import annotations

from typing import Any

import numpy as np

from topkast_jax.distributions import check_distribution

__all__ = ["check_choice", "check_distribution", "check_fraction", "check_int"]


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
