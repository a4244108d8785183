#!/usr/bin/env bash
# Create ./.venv (once) and install the project with its test tools. Idempotent; says what it is
# doing (the first install downloads torch and bittensor: a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
start=$SECONDS
say() { echo "[bootstrap $((SECONDS - start))s] $*"; }
# pip with one line per package it fetches or installs, instead of minutes of silence
pip_step() {
  .venv/bin/python -m pip install --progress-bar off "$@" 2>&1 \
    | { grep --line-buffered -E '^(Collecting|Downloading|Installing collected|Successfully installed|ERROR)' || true; } \
    | sed -u -e 's/^/    /' -e 's/\(.\{160\}\).*/\1 .../'
}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat setup.py scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  say "step 1/3: upgrading pip"
  pip_step --upgrade pip
  # CI pins the torch build that installs from local disk; users may have any torch>=2.9.
  say "step 2/3: installing torch (CPU build; the largest download)"
  pip_step "torch==2.13.0" || pip_step "torch>=2.9"
  say "step 3/3: installing the project and its dependencies (bittensor, fastapi, boto3, ...) with test tools"
  pip_step -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
  say "installed"
fi
