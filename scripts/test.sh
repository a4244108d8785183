#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export BTCLI_TOKEN_SYMBOLS_CACHE="${TMPDIR:-/tmp}/resbm-btcli-cache.json"
# Two workers, one test file each at a time (module fixtures stay in one process); most
# end-to-end tests wait on processes and sockets, so 2 workers fit 2 cores. Files are handed out
# costliest first (tests/conftest.py orders them; --no-loadscope-reorder keeps that order instead of
# xdist's most-tests-first), so no long end-to-end file starts last. RESBM_TEST_WORKERS=0 runs serially.
workers="${RESBM_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
