#!/usr/bin/env bash
# Create (or refresh) the project virtualenv and install harpe-megatron into it.
#
#   bash scripts/setup_venv.sh            # -> .venv (override with VENV=path)
#
# torch comes first, chosen for the machine: a locally provided wheel when pip can find one
# without an index (e.g. a wheelhouse in PIP_FIND_LINKS), else the CPU build from PyTorch's CPU
# index on machines without an NVIDIA GPU (avoids a multi-GB CUDA download), else PyPI's default
# (CUDA) build. Then the package with its test extras. Re-running is cheap: pip skips what is there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

"$PYTHON" - <<'PY' || { echo "harpe-megatron needs Python >= 3.11" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  probe="$(mktemp -d)"
  if "${PIP[@]}" download --no-index --no-deps "torch==$TORCH_VERSION" -d "$probe" >/dev/null 2>&1; then
    # A wheel pip finds without an index (a local wheelhouse): take it, dependencies from the index.
    echo "[setup] torch $TORCH_VERSION from the local wheelhouse"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  elif ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    echo "[setup] no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  else
    echo "[setup] NVIDIA GPU found: installing torch $TORCH_VERSION from PyPI"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  fi
  rm -rf "$probe"
fi

echo "[setup] installing harpe-megatron (editable) with test extras"
"${PIP[@]}" install -e "$ROOT[test]"
"$VENV/bin/python" -W ignore -c "import torch, megatron.core, harpe_megatron; print(f'[setup] ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}, python at $VENV/bin/python')"
