"""Draw the paper's Figure 3 (mask dynamics) from the metrics a Top-KAST run logged.

  python scripts/plot_mask_dynamics.py WORKDIR [--out FILE.png]

Reads ``WORKDIR/metrics.jsonl`` (written by ``experiments.imagenet.train``, and by any run that logs
the same keys) and writes ``WORKDIR/mask_dynamics.png`` (or ``--out``) with two panels:

(a) the fraction of each layer's forward mask that changed over a window (5000 steps for the
    paper's ResNet-50 runs), :math:`\\sum (m^t - m^{t-w})^2 / |\\theta_\\ell|`, in %: min, mean and
    max over the sparse layers — from ``masks/window_change/<layer>`` (or, if only summaries were
    logged, ``masks/window_change_{min,mean,max}``);
(b) the fraction of the initial reservoir C₀ (weights in neither A nor B at initialisation) that
    has ever entered A, in % — from ``masks/reservoir_activated``.

Exits with a message naming the missing keys when the run logged neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WINDOW_PREFIX = "masks/window_change/"
RESERVOIR_KEY = "masks/reservoir_activated"


def read_records(workdir: str) -> list[dict]:
    """All records of ``workdir/metrics.jsonl``; FileNotFoundError naming the file if absent."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass the workdir of a training run")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def window_change_series(records: list[dict]) -> dict[str, list[float]]:
    """``{"step", "min", "mean", "max"}`` of the per-layer window mask change, in %."""
    out: dict[str, list[float]] = {"step": [], "min": [], "mean": [], "max": []}
    for record in records:
        layers = [v for k, v in record.items() if k.startswith(WINDOW_PREFIX)]
        if layers:
            values = [float(v) for v in layers]
            lo, mean, hi = min(values), sum(values) / len(values), max(values)
        elif "masks/window_change_mean" in record:
            lo, mean, hi = (
                float(record[f"masks/window_change_{s}"]) for s in ("min", "mean", "max")
            )
        else:
            continue
        out["step"].append(record["step"])
        out["min"].append(100 * lo)
        out["mean"].append(100 * mean)
        out["max"].append(100 * hi)
    return out


def reservoir_series(records: list[dict]) -> dict[str, list[float]]:
    """``{"step", "value"}``: % of the initial reservoir that has entered A."""
    rows = [(r["step"], 100 * float(r[RESERVOIR_KEY])) for r in records if RESERVOIR_KEY in r]
    return {"step": [s for s, _ in rows], "value": [v for _, v in rows]}


def plot(workdir: str, out: str | None = None) -> str:
    """Write the two-panel PNG and return its path.

    Raises:
      FileNotFoundError: no metrics.jsonl.
      ValueError: neither window changes nor reservoir activation were logged.
    """
    records = read_records(workdir)
    change = window_change_series(records)
    reservoir = reservoir_series(records)
    if not change["step"] and not reservoir["step"]:
        raise ValueError(
            f"{workdir}/metrics.jsonl has no '{WINDOW_PREFIX}<layer>' nor '{RESERVOIR_KEY}' "
            "records: was it a sparse run with mask statistics logging enabled?"
        )
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_a.plot(change["step"], change["mean"], "o-", color="C0", label="mean over layers")
    ax_a.fill_between(
        change["step"],
        change["min"],
        change["max"],
        color="C0",
        alpha=0.25,
        label="min–max over layers",
    )
    ax_a.set_xlabel("training step")
    ax_a.set_ylabel("mask changed over the window (%)")
    ax_a.set_title("(a) forward-mask change")
    ax_a.legend()
    ax_b.plot(reservoir["step"], reservoir["value"], "-", color="C1")
    ax_b.set_xlabel("training step")
    ax_b.set_ylabel("initial reservoir C₀ that entered A (%)")
    ax_b.set_title("(b) reservoir activation")
    for ax in (ax_a, ax_b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out or os.path.join(workdir, "mask_dynamics.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="workdir of a training run (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default WORKDIR/mask_dynamics.png)")
    args = parser.parse_args(argv)
    try:
        path = plot(args.workdir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
