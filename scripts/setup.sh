#!/usr/bin/env bash
# Set up .venv with lightning-stability, its dev tools, the optional example dependencies and the
# documentation build (mkdocs), on a fresh machine or an existing one. Idempotent.
#
# Every install is constrained by requirements/constraints.txt: the exact versions CI passed on, so a
# registry that serves newer releases cannot change what the tests run against (refresh them with
# scripts/refresh_pins.sh). Where the venv has no torch yet, the CPU wheel torch==2.13.0 (on this
# machine's local wheel folder) goes in first, so that the package's bare `torch` requirement never
# pulls the multi-GB CUDA build. Users installing the package themselves get ranges, no pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PINS=requirements/constraints.txt
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python

pip_quiet() {  # pip, minus the local mirror's "Location ... is ignored" chatter
  "$VPY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch in .venv; installing the CPU wheel torch==2.13.0"
  pip_quiet install -q "torch==2.13.0"
fi
pip_quiet install -q -c "$PINS" -e ".[dev,examples,docs]"
# litgpt declares upper bounds (jsonargparse, huggingface_hub) that conflict with transformers; its
# model and config modules need none of them at import: install it alone, as litgpt's docs allow.
pip_quiet install -q -c "$PINS" --no-deps litgpt
"$VPY" -c "import torch, lightning, transformers, lightning_stability as ls; print(f'setup: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, lightning-stability {ls.__version__}')"
