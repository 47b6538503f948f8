#!/usr/bin/env bash
# Reproduce one of the paper's ImageNet grids and collect a markdown table.
#
#   scripts/reproduce_imagenet.sh TABLE [ROOT] [extra flags for experiments.imagenet.main ...]
#
# TABLE: table1 (B∖A selection and stopped exploration), table6 (mask refresh every 1 / 100
# steps) or figure2 (forward 80% × backward 0–80% × 1/2/5× length; forward 90–99%).
# ROOT (default ./imagenet_runs, relative to where you run it): each run writes ROOT/TABLE/RUN (rerunning resumes; finished runs
# are skipped). The table goes to stdout and ROOT/TABLE/results.md.
#
# Needs imagenet2012 prepared as array_record (the trainer prints the `tfds build` command if not)
# and, per run, the accelerator and time given in configs/imagenet/resnet50.py (8×A100/H100,
# an estimated 2–3 h per 32,000 steps). A quick look on synthetic data, 10 steps per run:
#   scripts/reproduce_imagenet.sh table6 /tmp/t6 --config.data.name=synthetic \
#       --config.num_train_steps=10 --config.batch_size=64
set -euo pipefail

TABLE="${1:?usage: $0 TABLE [ROOT] [extra flags]  (TABLE: table1, table6, figure2)}"
source "$(dirname "$0")/common.sh"  # cwd: the repository; PYTHON: .venv/bin/python or python3
ROOT="$(from_caller "${2:-./imagenet_runs}")"
shift $(( $# >= 2 ? 2 : 1 ))

RUNS=$("$PYTHON" -c "import sys; from configs.imagenet import grid; print(' '.join(grid.RUNS[sys.argv[1]]))" "$TABLE")
for RUN in $RUNS; do
  WORKDIR="$ROOT/$TABLE/$RUN"
  if [[ -f "$WORKDIR/summary.json" ]]; then
    echo "== $TABLE/$RUN: done, skipping ($WORKDIR/summary.json)" >&2
    continue
  fi
  echo "== $TABLE/$RUN -> $WORKDIR" >&2
  "$PYTHON" -m experiments.imagenet.main --config "configs/imagenet/grid.py:$TABLE/$RUN" \
    --workdir "$WORKDIR" "$@"
done

mkdir -p "$ROOT/$TABLE"
"$PYTHON" -m experiments.imagenet.report "$TABLE" "$ROOT" | tee "$ROOT/$TABLE/results.md"
