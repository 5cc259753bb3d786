#!/usr/bin/env bash
# Install (via scripts/setup_venv.sh) and run the CPU test suite; extra args go to pytest.
#
#   bash scripts/run_tests.sh                 # what CI runs: everything but tests marked slow
#   bash scripts/run_tests.sh -m slow         # only the slow ones
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_venv.sh
VENV="${VENV:-$ROOT/.venv}"
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
exec "$VENV/bin/python" -m pytest tests -q --timeout=900 "$@"
