#!/usr/bin/env bash
# The README's main command: on a fresh CPU machine, set up, then train a tiny HARPE model with
# 2 gloo ranks (tensor parallel) on a corpus built from text on this machine, then export it to a
# Hugging Face folder. Extra arguments are config overrides (e.g. training.train_iters=50).
# Steps: venv, demo data (corpus + tokenizer + index where the config's data.paths point; kept when
# already built), training (scripts/pretrain_harpe.sh, which builds no data), HF export.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_venv.sh
PY="$ROOT/.venv/bin/python"
export CONFIG="${CONFIG:-configs/tiny_cpu.yaml}"
RUN_DIR=$("$PY" -c "import sys; from harpe_megatron.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).run_dir)" "$CONFIG" "$@")

start=$(date +%s)
"$PY" -m harpe_megatron.cli.prepare_run --config "$CONFIG" "$@"
PYTHON="$PY" bash scripts/pretrain_harpe.sh "$@"
"$PY" tools/convert_to_hf.py "$RUN_DIR/checkpoints" "$RUN_DIR/hf" --overwrite
echo
echo "== demo finished in $(( $(date +%s) - start ))s =="
echo "  resolved config      $RUN_DIR/config.yaml"
echo "  metrics (per step)   $RUN_DIR/metrics.jsonl   (TensorBoard: .venv/bin/tensorboard --logdir $RUN_DIR/tensorboard)"
echo "  checkpoints          $RUN_DIR/checkpoints (latest: $(cat "$RUN_DIR/checkpoints/latest"))"
echo "  Hugging Face export  $RUN_DIR/hf"
echo "  demo data            data/demo (corpus.jsonl, tokenizer.model, demo_text_document.bin/.idx)"
