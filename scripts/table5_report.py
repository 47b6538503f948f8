"""Read the result lines of scripts/table5_sweep.py and print issue 15's tables: test BPC per
setting and row, mean and spread over seeds, relative to the dense run of the same setting as in
the paper's Table 5, and whether Table 5's order holds; optionally draw the figures.

  python scripts/table5_report.py RESULTS.jsonl [--plots DIR] [--title TEXT]

A *setting* is (text, optimizer, learning rate, steps, refresh_every); a *row* is (method,
forward/backward sparsity, λ). For the runs ``b_s`` of a row (seed ``s``) and the mean dense BPC
``d`` of its setting, the row shows ``mean_s(b_s) / d`` ± the sample standard deviation of
``b_s / d`` (0 for one seed). A result name seen twice keeps its first line. Figures (with
``--plots``): ``table5_relative.png``, Table 5's rows relative to dense per λ, one panel per
setting (Adam, refresh every step) that has a dense run and all six pairs, the paper's figures
as black marks; ``table5_dynamics.png``, for 90/0 and 90/80 at each λ (seed 0, the pystdlib
setting among those, else the first): the mean per-layer forward-mask change per window, the
exploration penalty's share of the training loss, and the reservoir activated (Fig. 3 of the
paper).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

ORDER = ((0.8, 0.0), (0.8, 0.6), (0.9, 0.0), (0.9, 0.8), (0.95, 0.0), (0.95, 0.9))
PAPER = {
    (0.8, 0.0): 1.03,
    (0.8, 0.6): 1.05,
    (0.9, 0.0): 1.08,
    (0.9, 0.8): 1.10,
    (0.95, 0.0): 1.14,
    (0.95, 0.9): 1.17,
}  # fmt: skip  (Table 5, Top-KAST BPC / dense)
PAPER_PRUNING = {0.8: 1.02, 0.9: 1.06, 0.95: 1.13}  # Table 5, pruning BPC / dense


def load(path: str) -> list[dict]:
    """The finished runs (``rc`` 0) of a results file, first line per name."""
    runs: dict[str, dict] = {}
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("rc") == 0:
                runs.setdefault(r["name"], r)
    return list(runs.values())


def setting(r: dict) -> tuple:
    """(text, optimizer, lr, steps, refresh_every); a text is named by its file's base name."""
    text = os.path.basename(r["text"]) if r.get("text") else "pystdlib"
    return (text, r["optimizer"], r["lr"], r["steps"], r["refresh_every"])


def row(r: dict) -> tuple:
    """(method, forward, backward, λ); λ is None for dense and pruning."""
    return (r["method"], r["forward"], r["backward"], r["l2"] if r["method"] == "topkast" else None)


def summarize(runs: list[dict]) -> dict[tuple, dict[tuple, dict]]:
    """``{setting: {row: {n, mean, rel, rel_sd, seeds}}}``; rel and rel_sd are None where the
    setting has no dense run."""
    grouped: dict[tuple, dict[tuple, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        grouped[setting(r)][row(r)][r["seed"]] = r["test_bpc"]
    out: dict[tuple, dict[tuple, dict]] = {}
    for s, rows in grouped.items():
        dense = [v for k, v in rows.items() if k[0] == "dense"]
        d = statistics.mean(dense[0].values()) if dense else None
        out[s] = {}
        for k, by_seed in rows.items():
            values = [by_seed[seed] for seed in sorted(by_seed)]
            ratios = [v / d for v in values] if d else []
            out[s][k] = {
                "n": len(values),
                "mean": statistics.mean(values),
                "rel": statistics.mean(ratios) if d else None,
                "rel_sd": (statistics.stdev(ratios) if len(ratios) > 1 else 0.0) if d else None,
                "seeds": sorted(by_seed),
            }
    return out


def order_check(rows: dict[tuple, dict], l2: float) -> str:
    """Whether dense < 80/0 < 80/60 < 90/0 < 90/80 < 95/0 < 95/90 holds on the means at λ."""
    chain = [("dense", 0.0, 0.0, None)] + [("topkast", f, b, l2) for f, b in ORDER]
    present = [k for k in chain if k in rows]
    if len(present) < len(chain):
        return f"incomplete ({len(present)} of {len(chain)} rows)"
    bad = [
        f"{label(a)} ≥ {label(b)}"
        for a, b in zip(present, present[1:], strict=False)
        if rows[a]["mean"] >= rows[b]["mean"]
    ]
    return "holds" if not bad else "broken: " + ", ".join(bad)


def label(k: tuple) -> str:
    """A row as the paper writes it: ``dense``, ``90/80 λ=1e-05``, ``pruning 90``."""
    method, f, b, l2 = k
    if method == "dense":
        return "dense"
    if method == "pruning":
        return f"pruning {round(100 * f)}"
    return f"{round(100 * f)}/{round(100 * b)} λ={l2:g}"


def markdown(summary: dict[tuple, dict[tuple, dict]]) -> str:
    """One table per setting, rows in Table 5's order, then the order check per λ."""
    lines = []
    for s in sorted(summary, key=str):
        rows = summary[s]
        text, opt, lr, steps, every = s
        lines += [f"### {text}, {opt} lr {lr:g}, {steps} steps, refresh every {every}", ""]
        lines += [
            "| row | seeds | test BPC (mean) | / dense (± sd) | paper |",
            "|---|---|---|---|---|",
        ]
        for k in sorted(rows, key=sort_key):
            v = rows[k]
            rel = f"{v['rel']:.3f} ± {v['rel_sd']:.3f}" if v["rel"] is not None else "–"
            seeds = ",".join(map(str, v["seeds"]))
            lines.append(f"| {label(k)} | {seeds} | {v['mean']:.3f} | {rel} | {paper(k)} |")
        lambdas = sorted({k[3] for k in rows if k[0] == "topkast"})
        checks = [(l2, order_check(rows, l2)) for l2 in lambdas]
        lines += [""] + [
            f"Table 5's order at λ={l2:g}: {c}"
            for l2, c in checks
            if not c.startswith("incomplete")
        ]
        lines.append("")
    return "\n".join(lines)


def sort_key(k: tuple) -> tuple:
    """Dense first, then by forward, backward, method and λ (larger λ first)."""
    method, f, b, l2 = k
    return (method != "dense", f, b, method, -(l2 or 0.0))


def paper(k: tuple) -> str:
    """The paper's Table 5 ratio for a row, or ``–``."""
    method, f, b, _ = k
    if method == "dense":
        return "1.00"
    if method == "pruning":
        return f"{PAPER_PRUNING[f]:.2f}" if f in PAPER_PRUNING else "–"
    return f"{PAPER[(f, b)]:.2f}" if (f, b) in PAPER else "–"


def table5_settings(summary: dict) -> list[tuple]:
    """The settings with a dense run and all six Top-KAST pairs at some λ (Adam, refresh every
    step), sorted: those :func:`plot_relative` draws."""

    def complete(rows: dict) -> bool:
        lambdas = {k[3] for k in rows if k[0] == "topkast"}
        full = any(all(("topkast", f, b, l2) in rows for f, b in ORDER) for l2 in lambdas)
        return full and ("dense", 0.0, 0.0, None) in rows

    return sorted(
        s for s, rows in summary.items() if s[1] == "adam" and s[4] == 1 and complete(rows)
    )


def plot_relative(summary: dict, main: list[tuple], out: str) -> None:
    """Table 5's rows relative to dense per λ, one panel per setting of ``main``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(main), figsize=(6 * len(main), 4), squeeze=False)
    for ax, s in zip(axes[0], main, strict=True):
        rows = summary[s]
        xs = range(len(ORDER))
        for l2 in sorted({k[3] for k in rows if k[0] == "topkast"}, reverse=True):
            ks = [("topkast", f, b, l2) for f, b in ORDER]
            if all(k in rows for k in ks):
                ax.errorbar(xs, [rows[k]["rel"] for k in ks], yerr=[rows[k]["rel_sd"] for k in ks],
                            marker="o", capsize=3, label=f"Top-KAST λ={l2:g}")  # fmt: skip
        ax.plot(xs, [PAPER[p] for p in ORDER], "k_", markersize=14, label="paper (Top-KAST)")
        prune = [(i, rows[("pruning", f, f, None)]["rel"]) for i, (f, b) in enumerate(ORDER)
                 if b == 0.0 and ("pruning", f, f, None) in rows]  # fmt: skip
        if prune:
            ax.plot(*zip(*prune, strict=True), "s", color="grey", label="magnitude pruning")
        ax.set_xticks(list(xs), [f"{round(100 * f)}/{round(100 * b)}" for f, b in ORDER])
        ax.set_xlabel("forward / backward sparsity (%)")
        ax.set_ylabel("test BPC / dense")
        ax.set_title(f"{s[0]}: Adam lr {s[2]:g}, {s[3]} steps")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def dynamics(r: dict) -> dict[str, list]:
    """From a run's trace: steps and values of the window change (mean over layers), the
    penalty's share of the loss and the reservoir activated."""
    series: dict[str, list] = {"change": [], "share": [], "reservoir": []}
    for t in r["trace"]:
        if "masks/window_change_mean" in t:
            series["change"].append((t["step"], 100 * t["masks/window_change_mean"]))
        if "train/exploration_penalty" in t and t.get("train/loss"):
            share = 100 * t["train/exploration_penalty"] / t["train/loss"]
            series["share"].append((t["step"], share))
        if "masks/reservoir_activated" in t and r["backward"] > 0:
            series["reservoir"].append((t["step"], 100 * t["masks/reservoir_activated"]))
    return series


def plot_dynamics(runs: list[dict], chosen_setting: tuple, out: str) -> None:
    """Fig. 3's quantities for 90/0 and 90/80 per λ, seed 0, in ``chosen_setting``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in runs if setting(r) == chosen_setting
              and r["method"] == "topkast" and r["seed"] == 0 and r["forward"] == 0.9]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    titles = ("forward-mask change per window (%)", "penalty / training loss (%)",
              "reservoir activated (%)")  # fmt: skip
    for r in sorted(chosen, key=lambda r: (r["backward"], -r["l2"])):
        name = f"90/{round(100 * r['backward'])} λ={r['l2']:g}"
        style = "-" if r["backward"] == 0.0 else "--"
        for ax, key in zip(axes, ("change", "share", "reservoir"), strict=True):
            points = dynamics(r)[key]
            if points:
                ax.plot(*zip(*points, strict=True), style, marker=".", label=name)
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--plots", default="")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.results):
        sys.exit(f"no results file {args.results!r}: run scripts/table5_sweep.py first")
    runs = load(args.results)
    if not runs:
        sys.exit(f"{args.results}: no finished run")
    summary = summarize(runs)
    print(markdown(summary))
    main_settings = table5_settings(summary)
    if args.plots and not main_settings:
        print("no figures: no setting has a dense run and all six Top-KAST pairs")
    elif args.plots:
        os.makedirs(args.plots, exist_ok=True)
        plot_relative(summary, main_settings, os.path.join(args.plots, "table5_relative.png"))
        dynamics_setting = max(main_settings, key=lambda s: s[0] == "pystdlib")
        plot_dynamics(runs, dynamics_setting, os.path.join(args.plots, "table5_dynamics.png"))
        print(f"figures in {args.plots}")


if __name__ == "__main__":
    main(sys.argv[1:])
