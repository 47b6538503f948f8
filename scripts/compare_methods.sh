#!/usr/bin/env bash
# Dense vs static vs magnitude pruning vs SET vs RigL vs Top-KAST on the demo model and text, at
# matched steps, and the table + plot of test BPC (issue 5; results in docs/method_comparison.md).
#
#   scripts/compare_methods.sh [ROOT] [extra flags for experiments.language_model.main ...]
#
# Model, data and optimizer: configs/demo.py (3-layer Transformer-XL, 676k params, Python's
# standard library as text, no download). Each method trains the same STEPS steps with the same
# schedule and seed; sparsities SPARSITIES (default 80% and 90%) on the same layers. Top-KAST uses
# the sparse-backward pairs of the paper's Table 5 (forward 80% / backward 60%, 90% / 80%); the
# baselines train the weights they use (backward = forward). Dense runs once per seed.
#
# Environment (defaults): PYTHON (.venv/bin/python if present, else python3), STEPS (400),
# SPARSITIES ("0.8 0.9"), UPDATE_EVERY (STEPS/16: SET/RigL ΔT and the pruning frequency, scaled
# down from the papers' 100-of-32k so short runs still update the masks), EVAL_WINDOWS (50 test
# windows of 16x128 bytes at the end; 0 = the whole test split), METHODS (all), SEEDS ("0"; the
# table shows the mean over seeds and each seed's value).
# SET/RigL stop updating masks and pruning ends at 75% of STEPS; pruning begins at 25%.
# Each run writes ROOT/<method>_<sparsity>_s<seed> (default ROOT: workdirs/compare); rerunning
# resumes and skips finished runs. The table goes to stdout and ROOT/results.md, the plot to
# ROOT/test_bpc.png.
#
# Time (measured, docs/method_comparison.md): on the shared 2-core CPU VM a 400-step run took
# 0.5-4 minutes (mean 76 s) including compilation and evaluation; 11 runs per seed.
set -euo pipefail
source "$(dirname "$0")/common.sh"  # cwd: the repository; PYTHON: .venv/bin/python or python3

ROOT="$(from_caller "${1:-$REPO_DIR/workdirs/compare}")"
shift $(( $# >= 1 ? 1 : 0 ))
STEPS="${STEPS:-400}"
SPARSITIES="${SPARSITIES:-0.8 0.9}"
UPDATE_EVERY="${UPDATE_EVERY:-$(( STEPS / 16 > 0 ? STEPS / 16 : 1 ))}"
EVAL_WINDOWS="${EVAL_WINDOWS:-50}"
METHODS="${METHODS:-dense static pruning set rigl topkast}"
SEEDS="${SEEDS:-0}"
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"

# The demo config plus the baselines' fields, with the method and sparsity as its argument.
cat > "$ROOT/compare_config.py" <<'PY'
"""Written by scripts/compare_methods.sh: configs/demo.py with a method and a sparsity.

``--config=compare_config.py:METHOD,SPARSITY``; the baselines' fields come from
experiments/common/baselines_config.py so that ``--config.sparsity.<field>=`` works.
"""

from configs import demo
from experiments.common.baselines_config import add_baseline_fields

TOPKAST_BACKWARD = {0.8: 0.6, 0.9: 0.8}  # paper Table 5, sparse-backward rows


def get_config(arg):
    method, sparsity = arg.split(",")
    sparsity = float(sparsity)
    c = demo.get_config()
    add_baseline_fields(c.sparsity)
    c.sparsity.method = method
    c.sparsity.forward = 0.0 if method == "dense" else sparsity
    if method == "topkast":
        c.sparsity.backward = TOPKAST_BACKWARD.get(sparsity, sparsity)
    else:
        c.sparsity.backward = c.sparsity.forward
    return c
PY

run() {  # METHOD SPARSITY SEED [extra flags]
  local method="$1" sparsity="$2" seed="$3"
  shift 3
  local workdir="$ROOT/${method}_${sparsity}_s${seed}"
  if [[ -f "$workdir/summary.json" ]]; then
    echo "== $method $sparsity seed $seed: done, skipping ($workdir/summary.json)" >&2
    return
  fi
  echo "== $method $sparsity seed $seed -> $workdir" >&2
  "$PYTHON" -m experiments.language_model.main \
    --config="$ROOT/compare_config.py:${method},${sparsity}" \
    --workdir="$workdir" \
    --config.seed="$seed" \
    --config.num_train_steps="$STEPS" \
    --config.final_eval_max_windows="$EVAL_WINDOWS" \
    --config.sparsity.update_every="$UPDATE_EVERY" \
    --config.sparsity.pruning_frequency="$UPDATE_EVERY" \
    --config.sparsity.begin_step="$(( STEPS / 4 ))" \
    --config.sparsity.end_step="$(( 3 * STEPS / 4 ))" \
    "$@"
}

for SEED in $SEEDS; do
  for METHOD in $METHODS; do
    if [[ "$METHOD" == dense ]]; then
      run dense 0 "$SEED" "$@"
      continue
    fi
    for SPARSITY in $SPARSITIES; do
      run "$METHOD" "$SPARSITY" "$SEED" "$@"
    done
  done
done

"$PYTHON" - "$ROOT" <<'PY' | tee "$ROOT/results.md"
"""Collects ROOT/*/summary.json into a markdown table of test BPC."""

import glob
import json
import os
import statistics
import sys

root = sys.argv[1]
order = ["dense", "static", "pruning", "set", "rigl", "topkast"]
runs = {}  # (method, sparsity) -> {seed: summary}
for path in sorted(glob.glob(os.path.join(root, "*", "summary.json"))):
    with open(path) as f:
        s = json.load(f)
    with open(os.path.join(os.path.dirname(path), "config.json")) as f:
        seed = json.load(f)["seed"]
    key = (s["method"], round(float(s["forward_sparsity"]), 3))
    runs.setdefault(key, {})[seed] = s
sparsities = sorted({sp for m, sp in runs if m != "dense"})
methods = [m for m in order if any(k[0] == m for k in runs)]
dense = next((v for (m, _), v in runs.items() if m == "dense"), None)


def mean_bpc(by_seed):
    return statistics.mean(s["test_bpc"] for s in by_seed.values())


def cell(by_seed, topkast=False):
    seeds = sorted(by_seed)
    text = f"{mean_bpc(by_seed):.3f}"
    if len(seeds) > 1:
        text += " (" + ", ".join(f"{by_seed[k]['test_bpc']:.3f}" for k in seeds) + ")"
    first = by_seed[seeds[0]]
    text += f"; density {first['forward_density']:.3f}"
    if topkast:
        text += f", bwd {first['backward_sparsity']:.0%}"
    return text


seeds = sorted({seed for v in runs.values() for seed in v})
print(f"Test BPC, mean over seeds {seeds} (each seed in brackets when more than one); density:")
print("fraction of all parameters nonzero in the forward pass (dense leaves included).\n")
print("| method | " + " | ".join(f"{sp:.0%} sparse" for sp in sparsities) + " |")
print("|" + "---|" * (len(sparsities) + 1))
for m in methods:
    if m == "dense":
        cells = [cell(dense)] * len(sparsities)
    else:
        cells = [
            cell(runs[(m, sp)], m == "topkast") if (m, sp) in runs else "—" for sp in sparsities
        ]
    print(f"| {m} | " + " | ".join(cells) + " |")
steps = ", ".join(str(n) for n in sorted({s["steps"] for v in runs.values() for s in v.values()}))
print(f"\nsteps per run: {steps}")

PY
"$PYTHON" scripts/plot_method_comparison.py "$ROOT" --out "$ROOT/test_bpc.png" \
  --title "pystdlib, demo Transformer-XL, $STEPS steps; dots: seeds $SEEDS, bar: mean"
