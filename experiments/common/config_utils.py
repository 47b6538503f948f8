"""Validation and persistence of ml_collections experiment configs."""

from __future__ import annotations

import json
import os
from typing import Any


def validate_shared(config: Any) -> None:
    """Check the fields every experiment config shares (``config_rules.SHARED_RULES``).

    Raises:
      ValueError: naming the offending field, its value and the allowed range, e.g.
        ``config.sparsity.backward=0.9, config.sparsity.forward=0.8 is not allowed: it must
        satisfy config.sparsity.backward <= config.sparsity.forward``.
    """
    from experiments.common.config_rules import SHARED_RULES, check_rules

    check_rules(config, SHARED_RULES)


def save_config(config: Any, workdir: str, name: str = "config.json") -> str:
    """Write the resolved config as JSON (and its repr as ``config.txt``); return the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        json.dump(config.to_dict(), f, indent=1, sort_keys=True, default=str)
    with open(os.path.join(workdir, "config.txt"), "w") as f:
        f.write(str(config))
    return path


def parse_sparsity_arg(arg: str | None, default: tuple[float, float]) -> tuple[float, float]:
    """Parse a config argument ``"fwd,bwd"`` (e.g. ``"0.8,0.5"``) into two floats."""
    if not arg:
        return default
    parts = arg.split(",")
    if len(parts) != 2:
        raise ValueError(f"config argument must be 'fwd,bwd' (e.g. 0.8,0.5), got {arg!r}")
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"config argument must be two floats 'fwd,bwd', got {arg!r}") from None
