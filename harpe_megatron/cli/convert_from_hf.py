"""Hugging Face Llama folder -> megatron distributed checkpoint (initial weights for training).

    python tools/convert_from_hf.py HF_DIR OUT_DIR --tp 2 [--pp 1] [--dtype auto|bf16|fp16|fp32]
        [positional.bases={strategy: paper}] [--positional.scaling.type=linear --positional.scaling.factor=4]
        [--overwrite] [--no-progress]

HF_DIR: config.json + weights (safetensors or .bin, single file or sharded with an index json).
OUT_DIR gets the layout of a training save: iter_0000000/ (megatron dist checkpoint with the
resolved config in its common state), latest, config.yaml. Use it as checkpoint.pretrained.
Default RoPE: one base for every head = the HF rope_theta; per-head bases via positional.*
overrides (key=value, or --key=value / --key value). --tp/--pp are validated against the model
and recorded; the vocabulary is padded for --tp. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys

from harpe_megatron.cli.common import OneLineParser, at_least, quiet_library_warnings
from harpe_megatron.config.loader import ConfigError
from harpe_megatron.hf.import_hf import convert_hf_to_megatron
from harpe_megatron.hf.safetensors_io import HFCheckpointError


def _normalise(argv: list[str]) -> list[str]:
    """``--positional.x=y`` / ``--positional.x y`` / ``--model.x ...`` -> ``positional.x=y``."""
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        if item.startswith(("--positional.", "--model.")):
            item = item[2:]
            if "=" not in item:
                if i + 1 >= len(argv):
                    print(f"error: {argv[i]} needs a value", file=sys.stderr)
                    raise SystemExit(2)
                item = f"{item}={argv[i + 1]}"
                i += 1
        out.append(item)
        i += 1
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="tools/convert_from_hf.py",
        description="Convert a Hugging Face Llama checkpoint into a megatron distributed checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python tools/convert_from_hf.py /models/Llama-2-7b-hf ckpt/llama2_mcore --tp 2 "
               "'positional.bases={strategy: paper}'",
    )
    parser.add_argument("hf_dir", help="HF model folder (config.json + safetensors or .bin weights)")
    parser.add_argument("out_dir", help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides: positional.* and model.{make_vocab_size_divisible_by,"
                             "pretrained_context_length,init_method_std}")
    parser.add_argument("--tp", type=at_least(1), default=1,
                        help="tensor-parallel size to validate and pad the vocabulary for")
    parser.add_argument("--pp", type=at_least(1), default=1, help="pipeline-parallel size to validate")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="stored parameter dtype (auto: that of the HF tensors)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty OUT_DIR (an earlier conversion; never a training run or checkpoint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_intermixed_args(_normalise(list(sys.argv[1:] if argv is None else argv)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library_warnings()

    try:
        summary = convert_hf_to_megatron(
            args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, overrides=args.overrides, dtype=args.dtype,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (HFCheckpointError, ConfigError, ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
