"""Dot plot of test BPC per method and sparsity (scripts/compare_methods.sh, docs/).

  python scripts/plot_method_comparison.py ROOT [--out FILE.png] [--title TEXT]
  python scripts/plot_method_comparison.py --markdown docs/method_comparison.md \\
      --out docs/method_comparison.png

Reads the runs from ``ROOT/*/summary.json`` (+ ``config.json`` for the seed), or from the
results table a previous comparison wrote (``--markdown``: the ``| method | 80% sparse | ...``
table with each seed's value in brackets). Every seed is a dot and the mean a bar-shaped marker,
so no bar starts from an arbitrary baseline; dense is a dashed line (its seeds' range shaded).
Each method has one fixed colour in every plot and its usual name (SET, RigL, Top-KAST); Top-KAST's
backward sparsities are in its legend entry.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: method -> (display name, colour); the same in every plot.
METHODS = {
    "dense": ("dense", "black"),
    "static": ("static (random mask)", "#7f7f7f"),
    "pruning": ("magnitude pruning", "#8c564b"),
    "set": ("SET", "#1f77b4"),
    "rigl": ("RigL", "#2ca02c"),
    "topkast": ("Top-KAST", "#d62728"),
}

Run = dict[str, Any]  # method, sparsity (forward), backward, seed, test_bpc


def runs_from_workdirs(root: str) -> list[Run]:
    """One record per ``ROOT/<run>/summary.json`` (seed from the run's ``config.json``)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "*", "summary.json"))):
        with open(path) as f:
            s = json.load(f)
        with open(os.path.join(os.path.dirname(path), "config.json")) as f:
            seed = json.load(f)["seed"]
        runs.append(
            {
                "method": s["method"],
                "sparsity": round(float(s["forward_sparsity"]), 3),
                "backward": round(float(s["backward_sparsity"]), 3),
                "seed": seed,
                "test_bpc": float(s["test_bpc"]),
            }
        )
    return runs


_CELL = re.compile(
    r"(?P<mean>[\d.]+)(?: \((?P<seeds>[\d., ]+)\))?; density [\d.]+(?:, bwd (?P<bwd>\d+)%)?"
)


def runs_from_markdown(path: str) -> list[Run]:
    """The runs of a comparison's results table (``| method | 80% sparse | 90% sparse |``).

    Raises:
      ValueError: the file has no such table.
    """
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip().startswith("|")]
    header = next((line for line in lines if line.startswith("| method |")), None)
    if header is None:
        raise ValueError(f"{path}: no '| method | ... sparse |' results table")
    sparsities = [float(c.split("%")[0]) / 100 for c in header.strip("|").split("|")[1:]]
    runs = []
    for line in lines[lines.index(header) + 2 :]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] not in METHODS:
            break
        for sparsity, cell in zip(sparsities, cells[1:], strict=True):
            m = _CELL.fullmatch(cell)
            if m is None:
                continue  # a method not run at this sparsity ("—")
            values = [float(v) for v in (m["seeds"] or m["mean"]).split(",")]
            is_dense = cells[0] == "dense"
            for seed, value in enumerate(values):
                runs.append(
                    {
                        "method": cells[0],
                        "sparsity": 0.0 if is_dense else sparsity,
                        "backward": float(m["bwd"]) / 100 if m["bwd"] else None,
                        "seed": seed,
                        "test_bpc": value,
                    }
                )
            if is_dense:
                break  # dense repeats the same runs in every column
    return runs


def build_figure(runs: list[Run], title: str = "") -> plt.Figure:
    """Dots per seed, a marker at the mean, one column group per forward sparsity."""
    sparsities = sorted({r["sparsity"] for r in runs if r["method"] != "dense"})
    methods = [m for m in METHODS if m != "dense" and any(r["method"] == m for r in runs)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        name, color = METHODS[method]
        backward = []
        for j, sparsity in enumerate(sparsities):
            values = [
                r["test_bpc"] for r in runs if r["method"] == method and r["sparsity"] == sparsity
            ]
            if not values:
                continue
            x = j + (i - (len(methods) - 1) / 2) * width
            ax.plot([x] * len(values), values, "o", color=color, alpha=0.6, markersize=4)
            ax.plot([x], [statistics.mean(values)], "_", color=color, markersize=18, mew=2.5)
            backward += [
                (sparsity, r["backward"])
                for r in runs
                if r["method"] == method and r["sparsity"] == sparsity and r["backward"]
            ][:1]
        if method == "topkast" and backward:
            name += " (backward " + ", ".join(f"{b:.0%} at {s:.0%}" for s, b in backward) + ")"
        ax.plot([], [], "o", color=color, label=name)
    dense = [r["test_bpc"] for r in runs if r["method"] == "dense"]
    if dense:
        name, color = METHODS["dense"]
        ax.axhline(statistics.mean(dense), color=color, linestyle="--", linewidth=1, label=name)
        ax.axhspan(min(dense), max(dense), color=color, alpha=0.08)
    ax.set_xticks(range(len(sparsities)))
    ax.set_xticklabels([f"{s:.0%} forward sparsity" for s in sparsities])
    ax.set_xlim(-0.6, len(sparsities) - 0.4)
    ax.set_ylabel("test bits per byte (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    seeds = sorted({r["seed"] for r in runs})
    ax.set_title(title or f"dots: seeds {seeds}; bar: mean", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", help="comparison ROOT holding <run>/summary.json")
    parser.add_argument("--markdown", help="a results table written by compare_methods.sh")
    parser.add_argument("--out", help="PNG path (default ROOT/test_bpc.png)")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    if (args.root is None) == (args.markdown is None):
        parser.error("give ROOT or --markdown FILE")
    runs = runs_from_workdirs(args.root) if args.root else runs_from_markdown(args.markdown)
    if not runs:
        print(f"error: no runs found in {args.root or args.markdown}", file=sys.stderr)
        return 1
    out = args.out or os.path.join(args.root, "test_bpc.png")
    fig = build_figure(runs, args.title)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
