#!/usr/bin/env bash
# The test command: set up .venv if needed, lint (ruff check + format check), then the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh tests/topkast_jax -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ "$#" -eq 0 ]; then set -- tests; fi
exec .venv/bin/python -m pytest -q -n 2 -p no:cacheprovider "$@"
