#!/usr/bin/env bash
# Paper Table 3 (WikiText-103, 18-layer Transformer-XL, 285M dense): forward/backward sparsities.
#
#   bash scripts/reproduce_table3.sh [RUNS_DIR] [extra --config.x=y flags...]
#
# Runs every row (fwd,bwd sparsities) one after the other in RUNS_DIR/<row>, each resumable
# (rerun the script to continue), then prints the markdown table from the summary.json files.
# Paper-scale: meant for an accelerator slice (see the config docstring for hardware and time).
# Works from any directory and with only `python3` (see scripts/common.sh); relative RUNS_DIR
# and DATA are taken from the directory you run it in. ROWS="fwd,bwd ..." runs a subset.
# Set DATA to the dataset path (default: data/wikitext-103 in the repository); fetch it with
# scripts/download_data.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
runs="$(from_caller "${1:-$REPO_DIR/runs/reproduce_table3}")"
shift $(( $# >= 1 ? 1 : 0 ))
data="$(from_caller "${DATA:-$REPO_DIR/data/wikitext-103}")"
read -r -a rows <<< "${ROWS:-0,0 0.8,0.0 0.8,0.6 0.9,0.8 0.95,0.9}"
LM_DIRS=()
run_lm_rows configs/wikitext103/transformer_xl_18l.py "$runs" "$data" "${rows[@]}" -- "$@"
"$PYTHON" -m experiments.language_model.collect_table perplexity "${LM_DIRS[@]}"
