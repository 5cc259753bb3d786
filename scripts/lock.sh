#!/usr/bin/env bash
# Regenerate requirements/lock.txt: the exact package set the README commands, CI and the
# Dockerfile install (pip constraints; one section per supported Python, selected by markers).
#
#   bash scripts/lock.sh            # then run both test legs: CI=true bash scripts/run_tests.sh
#
# For each Python (3.11 and 3.12) it builds a throw-away venv with scripts/setup_venv.sh in
# "newest" mode (everything at the newest release pyproject.toml's ranges allow, ignoring any
# site-wide pip constraints file) and records `pip freeze`. Python 3.11 keeps torch at the lowest
# supported release (TORCH_3_11, the lower bound the locked CI leg tests, with megatron-core 0.16.1);
# Python 3.12 takes the newest torch (the upper bounds, with megatron-core 0.19.x). Local version labels
# (torch 2.13.0+cpu) are dropped so that the same line pins the CPU and the CUDA build. A line
# shared by both Pythons is written once without a marker.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/python.sh
source "$ROOT/scripts/lib/python.sh"
OUT="$ROOT/requirements/lock.txt"
TORCH_3_11="${TORCH_3_11:-2.13.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for version in 3.11 3.12; do
  py="$(find_python "$version")" || { echo "lock.sh: Python $version not found (pyenv install $version?)" >&2; exit 1; }
  echo "[lock] Python $version: $py"
  torch_version=""
  if [ "$version" = 3.11 ]; then torch_version="$TORCH_3_11"; fi
  VENV="$work/venv$version" PYTHON="$py" HARPE_DEPS=newest HARPE_EXTRAS=test,logging TORCH_VERSION="$torch_version" bash "$ROOT/scripts/setup_venv.sh" >&2
  "$work/venv$version/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f > "$work/freeze$version.txt"
done

python3 "$ROOT/scripts/lib/merge_lock.py" "$work/freeze3.11.txt" "$work/freeze3.12.txt" > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "[lock] wrote $OUT ($(grep -vc '^#' "$OUT") pins)"
