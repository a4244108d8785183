#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export BTCLI_TOKEN_SYMBOLS_CACHE="${TMPDIR:-/tmp}/resbm-btcli-cache.json"
exec .venv/bin/python -m pytest -q "$@"
