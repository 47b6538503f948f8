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

    ``start_step``: the step training (re)starts from. Records of later steps (written after the
    checkpoint being resumed) are dropped from ``metrics.jsonl`` and TensorBoard
    (``purge_step``), and a value already logged for a ``(step, name)`` is never written twice,
    so a resumed run's files equal an uninterrupted run's.
    """

    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        tensorboard: bool = True,
        start_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._logged: set[tuple[int, str]] = set()
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if start_step is not None:
            kept = truncate_metrics(workdir, start_step)
            self._logged = {(r["step"], k) for r in kept for k in r if k != "step"}
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if start_step is None else start_step + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        """Write scalar ``metrics`` at ``step``; names get ``prefix`` (e.g. ``"train/"``)."""
        if not self.enabled:
            return
        scalars = {prefix + k: to_scalar(v) for k, v in metrics.items()}
        scalars = {k: v for k, v in scalars.items() if (int(step), k) not in self._logged}
        if not scalars:
            return
        self._logged.update((int(step), k) for k in scalars)
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


def truncate_metrics(workdir: str, last_step: int) -> list[dict[str, Any]]:
    """Rewrite ``<workdir>/metrics.jsonl`` keeping only records with ``step <= last_step``
    (atomically: a temporary file replaces it); return the kept records."""
    kept = [r for r in read_metrics(workdir) if r["step"] <= last_step]
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
    return kept
