# Sourced by the reproduce scripts (not run on its own): resolves the caller's paths, moves to the
# repository root and picks the Python interpreter, so a script works from any directory and on
# machines that have only `python3`.
#
#   source "$(dirname "$0")/common.sh"      # sets CALLER_DIR, REPO_DIR, PYTHON; cwd = REPO_DIR
#   dir="$(from_caller "$1")"                # a path the user typed, made absolute
#
# PYTHON: $PYTHON if set, else the repository's .venv/bin/python (scripts/setup_env.sh makes it),
# else python3.

CALLER_DIR="$PWD"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi

from_caller() {  # PATH -> absolute path, a relative one taken from the caller's directory
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$CALLER_DIR/$1" ;;
  esac
}

run_lm_rows() {  # CONFIG RUNS DATA ROW... -- [extra flags]: one resumable run per "fwd,bwd" row
  local config="$1" runs="$2" data="$3"
  shift 3
  local rows=()
  while [[ $# -gt 0 && "$1" != -- ]]; do rows+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  local r dir
  for r in "${rows[@]}"; do
    dir="$runs/fwd${r%,*}_bwd${r#*,}"
    LM_DIRS+=("$dir")
    "$PYTHON" -m experiments.language_model.main \
      --config="$config:$r" --config.data.path="$data" --workdir="$dir" "$@"
  done
}
