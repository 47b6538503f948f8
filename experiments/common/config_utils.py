"""Validation and persistence of ml_collections experiment configs."""

from __future__ import annotations

import json
import os
from typing import Any

SHARED_FIELDS = (
    "batch_size",
    "num_train_steps",
    "checkpoint_every_steps",
    "eval_every_steps",
    "log_every_steps",
    "seed",
    "sparsity.method",
    "sparsity.forward",
    "sparsity.backward",
    "sparsity.refresh_every",
    "sparsity.exploration_l2",
    "data.name",
    "data.path",
)


def get_field(config: Any, dotted: str) -> Any:
    """``get_field(cfg, "sparsity.forward")``; raises ValueError naming the missing field."""
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ValueError(f"config is missing required field config.{dotted}") from None
    return node


def require_fields(config: Any, fields: tuple[str, ...] = SHARED_FIELDS) -> None:
    """Raise ValueError naming the first of ``fields`` (dotted names) absent from ``config``."""
    for field in fields:
        get_field(config, field)


def require_positive_int(config: Any, dotted: str, allow_zero: bool = False) -> int:
    value = get_field(config, dotted)
    ok = (
        isinstance(value, int) and not isinstance(value, bool) and value >= (0 if allow_zero else 1)
    )
    if not ok:
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"config.{dotted} must be an integer {bound}, got {value!r}")
    return value


def validate_shared(config: Any) -> None:
    """Check the fields every experiment config shares (see ``SHARED_FIELDS``).

    Raises:
      ValueError: naming the offending field, e.g. ``config.sparsity.backward=0.9 must be <=
        config.sparsity.forward=0.8`` (the backward set contains the forward set).
    """
    require_fields(config)
    for f in ("batch_size", "num_train_steps", "checkpoint_every_steps", "log_every_steps"):
        require_positive_int(config, f)
    require_positive_int(config, "eval_every_steps", allow_zero=True)
    require_positive_int(config, "sparsity.refresh_every")
    fwd, bwd = float(config.sparsity.forward), float(config.sparsity.backward)
    for name, value in (("forward", fwd), ("backward", bwd)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"config.sparsity.{name}={value} must be in [0, 1)")
    if bwd > fwd:
        raise ValueError(
            f"config.sparsity.backward={bwd} must be <= config.sparsity.forward={fwd} "
            "(the backward set B contains the forward set A)"
        )
    if float(config.sparsity.exploration_l2) < 0:
        raise ValueError(
            f"config.sparsity.exploration_l2={config.sparsity.exploration_l2} must be >= 0"
        )


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
