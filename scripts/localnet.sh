#!/usr/bin/env bash
# The README's first command: set up .venv if needed, then run a whole local subnet.
# Extra flags go to scripts/localnet.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export BTCLI_TOKEN_SYMBOLS_CACHE="${TMPDIR:-/tmp}/resbm-btcli-cache.json"
exec .venv/bin/python scripts/localnet.py "$@"
