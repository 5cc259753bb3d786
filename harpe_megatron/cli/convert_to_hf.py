"""megatron checkpoint (any TP/PP/CP) -> Hugging Face folder.

    python tools/convert_to_hf.py CKPT_DIR OUT_DIR [--dtype bf16|fp16|fp32] [--tokenizer-model PATH]
        [--config RUN.yaml] [--max-shard-size 5GB] [--max-position-embeddings N] [--overwrite] [--no-progress]

CKPT_DIR: a training save directory (its `latest` is used), a run directory with checkpoints/,
or one iter_* directory; an incomplete checkpoint (also one that `latest` names) is refused, and
the files are checked against the CRC-32s the checkpoint's manifest recorded. It is loaded into a TP=1 model in this process, mapped to HF Llama names
and written as sharded safetensors + model.safetensors.index.json, config.json,
generation_config.json and tokenizer files (the run config's data.tokenizer_model or
--tokenizer-model). One RoPE base for all heads -> plain LlamaForCausalLM; per-head bases ->
model_type harpe_llama, loaded with AutoModelForCausalLM.from_pretrained(OUT_DIR,
trust_remote_code=True) from the modeling code copied into OUT_DIR. Weights holding NaN/inf are
refused. See docs/conversion.md.

Exit codes: 0 exported; 2 a one-line error (bad or damaged checkpoint, config, output dir) with
nothing written.
"""

from __future__ import annotations

import argparse
import sys

from harpe_megatron.checkpoint.layout import CheckpointDamaged
from harpe_megatron.cli.common import OneLineParser, at_least, quiet_library_warnings
from harpe_megatron.config.loader import ConfigError
from harpe_megatron.hf.export_hf import convert_megatron_to_hf
from harpe_megatron.hf.safetensors_io import parse_size


def _size(text: str) -> str:
    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="tools/convert_to_hf.py",
                           description="Export a megatron checkpoint to a Hugging Face folder.")
    parser.add_argument("ckpt_dir", help="training save dir (uses 'latest'), run dir, or an iter_* directory")
    parser.add_argument("out_dir", help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="dtype of the exported weights (default: the checkpoint's)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="sentencepiece tokenizer.model to ship (default: the run config's data.tokenizer_model)")
    parser.add_argument("--config", default=None, help="RunConfig YAML to use instead of the checkpoint's config_yaml")
    parser.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--max-position-embeddings", type=at_least(1), default=None,
                        help="config.json max_position_embeddings (default: max(data.seq_length, "
                             "model.pretrained_context_length))")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty OUT_DIR (never one holding a checkpoint or a training run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library_warnings()

    try:
        summary = convert_megatron_to_hf(
            args.ckpt_dir, args.out_dir, dtype=args.dtype, tokenizer_model=args.tokenizer_model,
            config_path=args.config, max_shard_size=args.max_shard_size,
            max_position_embeddings=args.max_position_embeddings, overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ConfigError, ValueError, FileExistsError, FileNotFoundError, CheckpointDamaged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
