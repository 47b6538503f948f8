"""Shared checks for the experiment tests: the one metric-naming scheme and summary schema
(``experiments/common/summary.py``) that every trainer follows."""

from __future__ import annotations

import json
import os

import pytest

from experiments.common import summary as summary_lib
from experiments.common.metrics import read_metrics

PREFIXES = ("train/", "eval/", "masks/", "final/")
TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "exploration_penalty", "steps_per_second")


#: Names every run logs, unless it declares them ``absent``.
REQUIRED = (
    *(f"train/{key}" for key in TRAIN_KEYS),
    "masks/forward_density",
    "masks/backward_density",
    "masks/reservoir_activated",
    "masks/window_change_mean",
    "masks/window_steps",
)


def assert_metric_schema(
    workdir: str,
    summary: dict,
    unit: str,
    scores: tuple[str, ...] | None,
    absent: tuple[str, ...] = (),
) -> None:
    """Every metric name follows the scheme; summary.json has the shared schema; provenance.

    Args:
      unit: the throughput unit, ``"tokens"`` or ``"examples"``.
      scores: the periodic evaluation's scores besides ``loss`` (``("bpc",)``,
        ``("top1", "top5")``); None: the run has no periodic evaluation, so no ``eval/`` names.
      absent: names of :data:`REQUIRED` the trainer does not log (checked to be absent), e.g.
        the always-sparse LM's ``train/grad_norm``.
    """
    records = read_metrics(workdir)
    names = {k for r in records for k in r if k != "step"}
    assert names and all(n.startswith(PREFIXES) for n in names), sorted(names)
    assert set(absent) <= set(REQUIRED) and not set(absent) & names, sorted(absent)
    for name in (*REQUIRED, f"train/{unit}_per_second"):
        assert name in names or name in absent, name
    if scores is None:
        assert not any(n.startswith("eval/") for n in names)
    else:
        for key in ("loss", *scores):
            assert f"eval/{key}" in names, key
    assert not {n for n in names if n.endswith(("/lr", "/count"))}
    assert set(summary_lib.SUMMARY_KEYS) <= set(summary)
    assert summary["final_metrics"] and all(k in summary for k in summary["final_metrics"])
    final = {k: v for r in records for k, v in r.items() if k.startswith("final/")}
    assert final == {f"final/{k}": summary[k] for k in summary["final_metrics"]}
    assert summary[f"{unit}_per_second"] > 0 and summary["steps_per_second"] > 0
    assert 0 < summary["train_flops_vs_dense"] <= 1
    with open(os.path.join(workdir, "provenance.json")) as f:
        provenance = json.load(f)
    assert provenance["packages"]["jax"] and provenance["device_count"] >= 1


@pytest.fixture
def metric_schema():
    """:func:`assert_metric_schema`."""
    return assert_metric_schema
