#!/usr/bin/env bash
# Paper Table 5 (enwik8, 69M Transformer-XL): Top-KAST rows and the magnitude-pruning column
# (Zhu & Gupta schedule, tk.baselines.magnitude_pruning) at the same forward sparsities.
#
#   bash scripts/reproduce_table5.sh [RUNS_DIR] [extra --config.x=y flags...]
#
# Runs every row (fwd,bwd sparsities) one after the other in RUNS_DIR/<row>, each resumable
# (rerun the script to continue), then prints the markdown table from the summary.json files.
# Paper-scale: meant for an accelerator slice (see the config docstring for hardware and time).
# Works from any directory and with only `python3` (see scripts/common.sh); relative RUNS_DIR
# and DATA are taken from the directory you run it in. ROWS="fwd,bwd ..." and PRUNING="fwd ..."
# (empty: none) run a subset.
# Set DATA to the dataset path (default: data/enwik8 in the repository); fetch it with
# scripts/download_data.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
runs="$(from_caller "${1:-$REPO_DIR/runs/reproduce_table5}")"
shift $(( $# >= 1 ? 1 : 0 ))
data="$(from_caller "${DATA:-$REPO_DIR/data/enwik8}")"
read -r -a rows <<< "${ROWS:-0,0 0.8,0.0 0.8,0.6 0.9,0.0 0.9,0.8 0.95,0.0 0.95,0.9}"
LM_DIRS=()
run_lm_rows configs/enwik8/transformer_xl_small.py "$runs" "$data" "${rows[@]}" -- "$@"
read -r -a pruning <<< "${PRUNING-0.8 0.9 0.95}"
for f in "${pruning[@]}"; do
  dir="$runs/pruning_fwd$f"
  LM_DIRS+=("$dir")
  "$PYTHON" -m experiments.language_model.main \
    --config=configs/enwik8/transformer_xl_small.py:$f,$f --config.sparsity.method=pruning \
    --config.data.path="$data" --workdir="$dir" "$@"
done
"$PYTHON" -m experiments.language_model.collect_table bpc "${LM_DIRS[@]}"
