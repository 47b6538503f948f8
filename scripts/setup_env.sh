#!/usr/bin/env bash
# Creates (once) the virtual environment .venv with the library, the experiments and the test tools.
# Needs only python3 >= 3.11. Idempotent: a second call re-uses the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import topkast_jax, flax, orbax.checkpoint, grain, hypothesis, ruff, build, twine" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[experiments,test]"
fi
