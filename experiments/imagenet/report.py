"""Markdown table of a grid's results next to the paper's (used by scripts/reproduce_imagenet.sh).

python -m experiments.imagenet.report TABLE ROOT     # reads ROOT/TABLE/<run>/summary.json
"""

from __future__ import annotations

import json
import os
import sys

from configs.imagenet import grid


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(table: str, root: str) -> str:
    """One row per run of ``grid.RUNS[table]``; missing runs show "not run".

    Raises:
      ValueError: unknown ``table``.
    """
    if table not in grid.RUNS:
        raise ValueError(f"table must be one of {sorted(grid.RUNS)}, got {table!r}")
    lines = [
        "| run | fwd | bwd | options | paper top-1 | top-1 | top-5 | train FLOPs vs dense "
        "| steps | hours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in grid.RUNS[table].items():
        options = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in run.overrides) or "–"
        path = os.path.join(root, table, name, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                s = json.load(f)
            ours = (
                f"{s['valid_top1']:.2f} | {s['valid_top5']:.2f} | "
                f"{s['train_flops_vs_dense']:.3f} | {s['steps']} | {s['wall_seconds'] / 3600:.2f}"
            )
        else:
            ours = "not run | – | – | – | –"
        lines.append(
            f"| {name} | {run.forward:g} | {run.backward:g} | {options} | "
            f"{_fmt(run.paper_top1, '.2f')} | {ours} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} TABLE ROOT  (TABLE in {sorted(grid.RUNS)})", file=sys.stderr)
        return 2
    print(markdown_table(argv[1], argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
