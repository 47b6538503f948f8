#!/usr/bin/env bash
# The main job: set up .venv if needed, then train a small Transformer-XL with Top-KAST (80% forward,
# 50% backward sparsity) on the bytes of Python's standard library — no download — and print the
# summary. Extra arguments go to the launcher (e.g. --config.num_train_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m experiments.language_model.main --config=configs/demo.py \
  --workdir="${WORKDIR:-workdirs/demo}" "$@"
