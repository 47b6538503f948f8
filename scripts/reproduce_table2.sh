#!/usr/bin/env bash
# Paper Table 2 (enwik8, 24-layer Transformer-XL, 277M dense): dense and Top-KAST rows.
#
#   bash scripts/reproduce_table2.sh [RUNS_DIR] [extra --config.x=y flags...]
#
# Runs every row (fwd,bwd sparsities) one after the other in RUNS_DIR/<row>, each resumable
# (rerun the script to continue), then prints the markdown table from the summary.json files.
# Paper-scale: meant for an accelerator slice (see the config docstring for hardware and time).
# Set DATA to the dataset path (default data/enwik8); fetch it with scripts/download_data.sh.
set -euo pipefail
runs="${1:-runs/reproduce_table2}"
shift || true
data="${DATA:-data/enwik8}"
rows=(0,0 0.8,0.0 0.8,0.8 0.9,0.6)
dirs=()
for r in "${rows[@]}"; do
  dir="$runs/fwd${r%,*}_bwd${r#*,}"
  dirs+=("$dir")
  python -m experiments.language_model.main \
    --config=configs/enwik8/transformer_xl_24l.py:$r --config.data.path="$data" --workdir="$dir" "$@"
done
python -m experiments.language_model.collect_table bpc "${dirs[@]}"
