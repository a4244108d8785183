#!/usr/bin/env bash
# Create ./.venv (once) and install the project with its test tools. Idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat setup.py scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "[bootstrap] installing dependencies (torch CPU build, bittensor, fastapi, ...)"
  .venv/bin/python -m pip install -q --upgrade pip
  # CI pins the torch build that installs from local disk; users may have any torch>=2.9.
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.9"
  .venv/bin/python -m pip install -q -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
