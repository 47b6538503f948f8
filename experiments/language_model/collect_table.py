"""Collect LM runs' summary.json files into a markdown table (scripts/reproduce_table*.sh).

  python -m experiments.language_model.collect_table METRIC RUN_DIR [RUN_DIR ...]

METRIC is ``bpc`` or ``perplexity``; each RUN_DIR is a workdir with ``summary.json``. Runs that
have not finished are listed with "-".
"""

import json
import os
import sys


def row(run_dir: str, metric: str) -> str:
    path = os.path.join(run_dir, "summary.json")
    name = os.path.basename(os.path.normpath(run_dir))
    if not os.path.exists(path):
        return f"| {name} | - | - | - | - |"
    with open(path) as f:
        s = json.load(f)
    nonzero = s["forward_nonzero"] / 1e6
    return (
        f"| {name} | {s['forward_sparsity']:.0%} | {s['backward_sparsity']:.0%} | "
        f"{nonzero:.1f}M | {s[f'test_{metric}']:.3f} |"
    )


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] not in ("bpc", "perplexity"):
        raise SystemExit(__doc__)
    metric = argv[1]
    print(f"| run | fwd | bwd | params (nonzero) | test {metric} |")
    print("|---|---|---|---|---|")
    for run_dir in argv[2:]:
        print(row(run_dir, metric))


if __name__ == "__main__":
    main(sys.argv)
