"""Draw the paper's Figure 3 (mask dynamics) from the metrics Top-KAST runs logged, one or
several runs overlaid (the paper compares sparsities).

  python scripts/plot_mask_dynamics.py WORKDIR [WORKDIR ...] [--names N1 N2 ...] [--out FILE.png]

Reads each ``WORKDIR/metrics.jsonl`` (both trainers, ``experiments.language_model`` and
``experiments.imagenet``, log these keys) and writes ``--out`` (default
``WORKDIR/mask_dynamics.png`` of the first run) with two panels:

(a) the fraction of each layer's forward mask that changed over a window of ``w`` steps,
    :math:`\\sum (m^t - m^{t-w})^2 / |\\theta_\\ell|`, in %: the mean over the sparse layers as a
    line and the min–max range as a band — from ``masks/window_change/<layer>`` (or, if only
    summaries were logged, ``masks/window_change_{min,mean,max}``); ``w`` is read from
    ``masks/window_steps`` and shown in the title (per run in the legend when runs differ);
(b) the fraction of the initial reservoir C₀ (weights in neither A nor B at initialisation) that
    has ever entered A, in % — from ``masks/reservoir_activated``.

Each run has one colour in both panels; its name (``--names``, default the workdir's name) is in
the legend. Exits with a message naming the run and the missing keys when a run logged neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WINDOW_PREFIX = "masks/window_change/"
WINDOW_STEPS_KEY = "masks/window_steps"
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


def window_steps(records: list[dict]) -> int | None:
    """The logged window length ``w`` (the last one logged), or None if the run did not say."""
    values = [int(r[WINDOW_STEPS_KEY]) for r in records if WINDOW_STEPS_KEY in r]
    return values[-1] if values else None


def load_run(workdir: str, name: str) -> dict[str, Any]:
    """One run's series.

    Raises:
      FileNotFoundError: no metrics.jsonl.
      ValueError: neither window changes nor reservoir activation were logged.
    """
    records = read_records(workdir)
    run = {
        "name": name,
        "change": window_change_series(records),
        "reservoir": reservoir_series(records),
        "window": window_steps(records),
    }
    if not run["change"]["step"] and not run["reservoir"]["step"]:
        raise ValueError(
            f"run {name!r}: {workdir}/metrics.jsonl has no '{WINDOW_PREFIX}<layer>' nor "
            f"'{RESERVOIR_KEY}' records: was it a sparse run with mask statistics logging enabled?"
        )
    return run


def build_figure(runs: list[dict[str, Any]]) -> plt.Figure:
    """The two-panel figure of ``runs`` (from :func:`load_run`), one colour per run."""
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    windows = {run["window"] for run in runs if run["window"] is not None}
    same_window = len(windows) == 1
    for i, run in enumerate(runs):
        color = f"C{i}"
        change, reservoir = run["change"], run["reservoir"]
        label = run["name"]
        if not same_window and run["window"] is not None:
            label += f" (window {run['window']:,} steps)"
        if change["step"]:
            ax_a.plot(change["step"], change["mean"], "o-", color=color, markersize=3, label=label)
            ax_a.fill_between(change["step"], change["min"], change["max"], color=color, alpha=0.2)
        if reservoir["step"]:
            ax_b.plot(reservoir["step"], reservoir["value"], "-", color=color, label=label)
    window_text = f"{windows.pop():,}-step windows" if same_window else "windows of each run"
    ax_a.set_title(
        f"(a) forward-mask change over {window_text}\nline: mean, band: min–max over layers"
    )
    ax_a.set_xlabel("training step")
    ax_a.set_ylabel("mask changed over the window (%)")
    ax_b.set_title("(b) reservoir activation")
    ax_b.set_xlabel("training step")
    ax_b.set_ylabel("initial reservoir C₀ that entered A (%)")
    for ax in (ax_a, ax_b):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(workdirs: list[str], names: list[str] | None = None, out: str | None = None) -> str:
    """Write the figure of ``workdirs`` (named ``names``) and return the PNG's path.

    Raises:
      FileNotFoundError / ValueError: see :func:`load_run`; ValueError if ``names`` and
        ``workdirs`` differ in length.
    """
    if names is None:
        names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(names) != len(workdirs):
        raise ValueError(f"--names has {len(names)} names for {len(workdirs)} workdirs")
    fig = build_figure([load_run(w, n) for w, n in zip(workdirs, names, strict=True)])
    out = out or os.path.join(workdirs[0], "mask_dynamics.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="workdirs of training runs (metrics.jsonl)")
    parser.add_argument("--names", nargs="+", default=None, help="run names for the legend")
    parser.add_argument("--out", default=None, help="PNG path (default: in the first workdir)")
    args = parser.parse_args(argv)
    try:
        path = plot(args.workdirs, args.names, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
