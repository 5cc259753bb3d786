#!/usr/bin/env bash
# The small-scale reproduction of HARPE against its baselines, in one command (docs/reproduction.md):
#
#   bash scripts/reproduce.sh --tier smoke|cpu|gpu [--arms a,b,...|all] [--seed N] [--dry-run]
#
# smoke: minutes (CI); cpu: the published small-scale result (about 45 min per seed on 2 cores);
# gpu: the same protocol at ~170M parameters, 2k -> 16k, on one H100/H200 (hours). Every step is
# a public command (printed before it runs) and is skipped when its output exists, so running the
# command again continues a stopped run. `--help` lists the options.
# Environment: PYTHON, an interpreter with harpe_megatron installed [.venv/bin/python, set up on
# first use by scripts/setup_venv.sh].
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ ! -x "$ROOT/.venv/bin/python" ] || ! "$ROOT/.venv/bin/python" -c "import harpe_megatron, megatron.core" >/dev/null 2>&1; then
    bash "$ROOT/scripts/setup_venv.sh" >&2
  fi
  PYTHON="$ROOT/.venv/bin/python"
fi
export PYTHON
exec "$PYTHON" -m harpe_megatron.cli.reproduce "$@"
