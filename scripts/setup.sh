#!/usr/bin/env bash
# Set up .venv with lightning-stability and its dev tools, on a fresh machine or an existing one.
# Where the venv has no torch yet, the CPU wheel torch==2.13.0 (on this machine's local wheel
# folder) goes in first, so that the package's bare `torch` requirement never pulls the
# multi-GB CUDA build. Users installing the package themselves get no torch pin. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
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
pip_quiet install -q -e ".[dev]"
"$VPY" -c "import torch, lightning, lightning_stability as ls; print(f'setup: torch {torch.__version__}, lightning {lightning.__version__}, lightning-stability {ls.__version__}')"
