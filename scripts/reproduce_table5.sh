#!/usr/bin/env bash
# Paper Table 5 (enwik8, 69M Transformer-XL): Top-KAST rows and the magnitude-pruning column
# (Zhu & Gupta schedule, tk.baselines.magnitude_pruning) at the same forward sparsities.
#
#   bash scripts/reproduce_table5.sh [RUNS_DIR] [extra --config.x=y flags...]
#
# Runs every row (fwd,bwd sparsities) one after the other in RUNS_DIR/<row>, each resumable
# (rerun the script to continue), then prints the markdown table from the summary.json files.
# Paper-scale: meant for an accelerator slice (see the config docstring for hardware and time).
# Set DATA to the dataset path (default data/enwik8); fetch it with scripts/download_data.sh.
set -euo pipefail
runs="${1:-runs/reproduce_table5}"
shift || true
data="${DATA:-data/enwik8}"
rows=(0,0 0.8,0.0 0.8,0.6 0.9,0.0 0.9,0.8 0.95,0.0 0.95,0.9)
dirs=()
for r in "${rows[@]}"; do
  dir="$runs/fwd${r%,*}_bwd${r#*,}"
  dirs+=("$dir")
  python -m experiments.language_model.main \
    --config=configs/enwik8/transformer_xl_small.py:$r --config.data.path="$data" --workdir="$dir" "$@"
done
for f in 0.8 0.9 0.95; do
  dir="$runs/pruning_fwd$f"
  dirs+=("$dir")
  python -m experiments.language_model.main \
    --config=configs/enwik8/transformer_xl_small.py:$f,$f --config.sparsity.method=pruning \
    --config.data.path="$data" --workdir="$dir" "$@"
done
python -m experiments.language_model.collect_table bpc "${dirs[@]}"
