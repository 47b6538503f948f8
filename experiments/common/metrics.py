"""Metrics to JSON lines and TensorBoard event files (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def to_scalar(value: Any) -> float:
    """Convert a 0-d array / number to a Python float (raises ValueError otherwise)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric value must be a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


class MetricsWriter:
    """Append ``{"step": s, name: value, ...}`` lines to ``<workdir>/metrics.jsonl`` and write
    the same scalars as TensorBoard events under ``<workdir>/tensorboard``.

    Only the primary process writes; on other processes every call is a no-op (pass
    ``enabled=experiments.common.mesh.is_primary()``).
    """

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        """Write scalar ``metrics`` at ``step``; names get ``prefix`` (e.g. ``"train/"``)."""
        if not self.enabled:
            return
        scalars = {prefix + k: to_scalar(v) for k, v in metrics.items()}
        record = {"step": int(step)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl`` in order (empty list if absent)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
