#!/usr/bin/env bash
# Refresh requirements/constraints.txt: build a throw-away venv with the NEWEST releases the registry
# serves (no constraints), run the test suite in it, and only when it passes write its exact versions
# as the new pins. Review the diff, then commit it with the code changes it needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/lightning-stability-refresh}
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==2.13.0"  # the CPU wheel; a bare torch pulls CUDA
"$VENV/bin/python" -m pip install -q -U -e ".[dev,examples,docs]"
"$VENV/bin/python" -m pip install -q -U --no-deps litgpt
"$VENV/bin/ruff" check . && "$VENV/bin/mypy" && "$VENV/bin/python" -m pytest -q
{
  sed -n '1,2p' requirements/constraints.txt
  "$VENV/bin/python" -m pip freeze | grep -v -E "^(-e|#)|^lightning-stability" \
    | sed -E 's/^torch==([0-9.]+)\+cpu/torch==\1/'
} > requirements/constraints.txt.new
mv requirements/constraints.txt.new requirements/constraints.txt
git --no-pager diff --stat requirements/constraints.txt
