#!/usr/bin/env bash
# Create (or refresh) a virtualenv and install harpe-megatron into it.
#
#   bash scripts/setup_venv.sh                      # -> .venv, the tested set (requirements/lock.txt)
#   VENV=.venv-newest PYTHON=python3.12 HARPE_DEPS=newest bash scripts/setup_venv.sh
#
# Environment (defaults in brackets):
#   VENV           the virtualenv to create or refresh                      [.venv]
#   PYTHON         the interpreter it is made from (>= 3.11)                [python3]
#   HARPE_DEPS     locked: exact versions from requirements/lock.txt for this Python (what the
#                  README commands and CI's locked leg use); newest: the newest releases that
#                  pyproject.toml's ranges allow, ignoring any site-wide pip constraints file,
#                  transformers upgraded to its newest release on every run (CI's newest leg,
#                  scripts/lock.sh)                                         [locked]
#   TORCH_VERSION  torch version to install first                           [the lock's; newest: any]
#   HARPE_EXTRAS   pyproject extras to install (comma list)                 [test]
#   HARPE_CONSTRAINTS_OVERRIDE  a constraints file whose packages replace the lock's pins
#                  (locked mode; e.g. requirements/transformers-floor.txt)  []
#
# torch comes first, chosen for the machine: a wheel pip finds without an index (a local
# wheelhouse in PIP_FIND_LINKS), else on machines without an NVIDIA GPU the CPU build from
# PyTorch's CPU index (no multi-GB CUDA download) when that index is reachable, else PyPI's
# default (CUDA) build. Then the package with its test extras. Re-running is cheap.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
HARPE_DEPS="${HARPE_DEPS:-locked}"
LOCK="$ROOT/requirements/lock.txt"

"$PYTHON" - <<'PY' || { echo "harpe-megatron needs Python >= 3.11" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
PYVER="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

CONSTRAINTS=()
case "$HARPE_DEPS" in
  locked)
    if grep -qE "^torch==[^;]*(; python_version == \"$PYVER\")?$" "$LOCK"; then
      CONSTRAINTS=(-c "$LOCK")
      if [ -n "${HARPE_CONSTRAINTS_OVERRIDE:-}" ]; then
        # The lock without the overridden packages, plus the override's pins.
        merged="$VENV/constraints.txt"
        names="$(sed -E 's/[#;].*//; s/[<>=!~ ].*//' "$HARPE_CONSTRAINTS_OVERRIDE" | grep -v '^$' | paste -sd'|')"
        { grep -viE "^($names)==" "$LOCK"; grep -vE '^\s*(#|$)' "$HARPE_CONSTRAINTS_OVERRIDE"; } > "$merged"
        CONSTRAINTS=(-c "$merged")
        echo "[setup] requirements/lock.txt with $(basename "$HARPE_CONSTRAINTS_OVERRIDE") replacing: ${names//|/, }"
      fi
      lock_torch="$(grep -E "^torch==[^;]*(; python_version == \"$PYVER\")?$" "$LOCK" | head -1 | sed -E 's/^torch==([^;]+).*/\1/')"
      TORCH_VERSION="${TORCH_VERSION:-$lock_torch}"
    else
      echo "[setup] WARNING: requirements/lock.txt has no tested set for Python $PYVER (tested: 3.11, 3.12);" \
           "installing the newest versions pyproject.toml allows" >&2
    fi
    ;;
  newest)
    # A site-wide constraints file (pip config 'constraint') must not hold the newest leg back.
    export PIP_CONSTRAINT=/dev/null
    ;;
  *)
    echo "HARPE_DEPS must be 'locked' or 'newest', got '$HARPE_DEPS'" >&2; exit 2 ;;
esac
TORCH_SPEC="torch${TORCH_VERSION:+==$TORCH_VERSION}"

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  probe="$(mktemp -d)"
  has_gpu=0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then has_gpu=1; fi
  if [ -n "${TORCH_VERSION:-}" ] && "${PIP[@]}" download --no-index --no-deps "$TORCH_SPEC" -d "$probe" >/dev/null 2>&1; then
    echo "[setup] $TORCH_SPEC from the local wheelhouse"
    "${PIP[@]}" install "$TORCH_SPEC" "${CONSTRAINTS[@]}"
  elif [ "$has_gpu" = 0 ] && "${PIP[@]}" install --timeout 20 --retries 1 "$TORCH_SPEC" "${CONSTRAINTS[@]}" \
         --index-url https://download.pytorch.org/whl/cpu >/dev/null 2>&1; then
    echo "[setup] no NVIDIA GPU: installed the CPU build of $TORCH_SPEC"
  else
    echo "[setup] installing $TORCH_SPEC from the package index (the CUDA build: a large download)"
    "${PIP[@]}" install "$TORCH_SPEC" "${CONSTRAINTS[@]}"
  fi
  rm -rf "$probe"
fi

HARPE_EXTRAS="${HARPE_EXTRAS:-test}"
echo "[setup] installing harpe-megatron (editable) with extras [$HARPE_EXTRAS] ($HARPE_DEPS versions)"
"${PIP[@]}" install "${CONSTRAINTS[@]}" -e "$ROOT[$HARPE_EXTRAS]"
if [ "$HARPE_DEPS" = newest ]; then
  # The newest transformers release, also in a venv made before it came out: exported harpe_llama
  # folders meet whatever release their users have (pyproject.toml sets no upper bound).
  "${PIP[@]}" install --upgrade transformers
fi
"$VENV/bin/python" -W ignore -c "import torch, transformers, megatron.core, harpe_megatron; print(f'[setup] ready: Python $PYVER, torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}, python at $VENV/bin/python')"
