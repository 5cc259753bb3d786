#!/usr/bin/env bash
# Regenerate tests/assets/golden_losses_tiny.json (the numerics guard of
# tests/distributed/test_golden_losses.py): 5 steps of the tiny model, TP 2 on 2 gloo ranks, CPU.
# Run it after a deliberate change of the numerics (or of torch / megatron-core) and commit the file.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python}" -m tests.golden_losses --write "$@"
