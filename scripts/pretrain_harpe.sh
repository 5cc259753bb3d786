#!/usr/bin/env bash
# Launch harpe-megatron pretraining. Three ways, all equivalent:
#
#   bash scripts/pretrain_harpe.sh [key.path=value ...]
#       Starts torchrun itself (GPUS_PER_NODE ranks on this node, NNODES nodes in all) and exits
#       with the job's code: 0 done, 2 config/data error or run_dir in use, 75 preempted (checkpoint
#       saved: start again to resume), 76 a rank was lost, 77 non-finite abort, 1 anything else.
#       Several nodes: run it on each with NNODES=N NODE_RANK=i MASTER_ADDR=<node 0's address>.
#   torchrun --nproc-per-node 8 ... scripts/pretrain_harpe.sh [key.path=value ...]
#       torchrun runs this file with Python, once per rank: the Python part at the end runs.
#       torchrun exits 1 for any failure; the job's code is in <run_dir>/exit_code (rank 0 writes it).
#   torchrun --nproc-per-node 8 ... --no-python scripts/pretrain_harpe.sh [key.path=value ...]
#       Already a rank under torchrun (RANK/LOCAL_RANK set): runs that one rank.
#
# This file is both a bash script and a Python program: bash runs the line below as the no-op
# command ':' and then the shell code, which always ends in exec or exit (the Python part is a
# here-document to bash, so `bash -n` checks the file); Python reads the shell code as a string
# literal and runs the code after it.
#
# Environment (defaults in brackets):
#   CONFIG         YAML run config                     [configs/tiny_cpu.yaml: tiny HARPE on CPU]
#   NNODES         number of nodes                     [1]
#   NODE_RANK      this node's index                   [0]
#   GPUS_PER_NODE  ranks per node                      [#GPUs, or 2 on a CPU-only machine]
#   MASTER_ADDR    rendezvous host                     [127.0.0.1]
#   MASTER_PORT    rendezvous port                     [29500]
#   SHUTDOWN_TIMEOUT  seconds torchrun gives the ranks to save after SIGTERM/SIGUSR1 [600]
#   PYTHON         interpreter with harpe_megatron     [python3 if it imports harpe_megatron,
#                                                       else .venv/bin/python, set up on first use]
# Extra arguments are config overrides, e.g. training.lr=3e-5 parallel.context_parallel_size=8.
#
# The launcher builds no data: the config's data.paths and data.tokenizer_model must exist (the
# ranks check them before training). The default config's demo data (data/demo) is built by
# scripts/demo.sh, or once by `python -m harpe_megatron.cli.prepare_run --config configs/tiny_cpu.yaml`.
""":"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-$ROOT/configs/tiny_cpu.yaml}"

if [ -z "${PYTHON:-}" ]; then
  if python3 -c "import harpe_megatron, megatron.core" >/dev/null 2>&1; then
    PYTHON=python3
  else
    if [ ! -x "$ROOT/.venv/bin/python" ] || ! "$ROOT/.venv/bin/python" -c "import harpe_megatron, megatron.core" >/dev/null 2>&1; then
      if [ -n "${LOCAL_RANK:-}" ]; then
        echo "pretrain_harpe.sh: no Python environment with harpe_megatron; run 'bash scripts/setup_venv.sh' first or set PYTHON" >&2
        exit 1
      fi
      bash "$ROOT/scripts/setup_venv.sh" >&2
    fi
    PYTHON="$ROOT/.venv/bin/python"
  fi
fi
export PYTHONUNBUFFERED=1

if [ -n "${LOCAL_RANK:-}" ] && [ -n "${RANK:-}" ]; then
  # One rank of a torchrun job (torchrun --no-python scripts/pretrain_harpe.sh ...).
  exec "$PYTHON" -m harpe_megatron.train --config "$CONFIG" "$@"
fi

if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

echo "[pretrain_harpe] config $CONFIG | nodes $NNODES (this: $NODE_RANK) x $GPUS_PER_NODE ranks | master $MASTER_ADDR:$MASTER_PORT"
# Preemption (docs/reliability.md): the ranks save and exit with 75 on SIGTERM/SIGUSR1. torchrun
# forwards the signals it handles to the ranks and SIGKILLs them after a shutdown timeout (default
# 30 s, too short for a 7B save): make it handle SIGUSR1 too and wait SHUTDOWN_TIMEOUT seconds
# (PET_* are torchrun's own option variables; releases without these options ignore them).
# SIGUSR1 is ignored before exec so that a torchrun that does not handle it survives it (under
# Slurm the ranks receive the signal directly).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCHELASTIC_SIGNALS_TO_HANDLE="$PET_SIGNALS_TO_HANDLE"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-600}"
trap '' USR1
# torchrun through harpe_megatron/cli/launch.py: the same torchrun, but this script exits with the
# job's code (0 done, 2 bad input / run_dir in use, 75 preempted, 76 lost rank, 77 non-finite, 1
# else; docs/reliability.md) where torchrun alone would exit 1 for every failure.
exec "$PYTHON" -m harpe_megatron.cli.launch \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m harpe_megatron.train --config "$CONFIG" "$@"
exit 1  # not reached: every path above ends in exec
: <<'pass'
":"""

# --- Python: one rank of `torchrun ... scripts/pretrain_harpe.sh [overrides]` --------------------
import os
import sys
from pathlib import Path


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    config = os.environ.get("CONFIG", str(root / "configs" / "tiny_cpu.yaml"))
    try:
        import harpe_megatron  # noqa: F401
    except ImportError:
        # torchrun's interpreter lacks the package: re-run this rank with the project's venv.
        venv_python = root / ".venv" / "bin" / "python"
        if venv_python.is_file() and Path(sys.executable).resolve() != venv_python.resolve():
            os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
        sys.exit(f"pretrain_harpe.sh: {sys.executable} cannot import harpe_megatron; "
                 f"run 'bash scripts/setup_venv.sh' first, or use the torchrun of that venv")
    from harpe_megatron.cli import train

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return train.main(["--config", config, *sys.argv[1:]])


# The guard matters: multiprocessing children (megatron's checkpoint writer) re-import this file.
if __name__ == "__main__":
    sys.exit(main())
pass
