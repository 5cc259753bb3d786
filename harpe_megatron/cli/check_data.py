"""Check a run's data and tokenizer without training (the checks training runs first).

    python tools/check_data.py --config CONFIG [--mode full|quick] [key.path=value ...]

Reads the config like training does (dotted overrides included) and runs
harpe_megatron.data.validation.validate_training_inputs for the run and, for a multi-stage
config, for every stage's sequence length: tokenizer file and vocabulary (= model.vocab_size),
every data.paths prefix (.bin/.idx present, header, sizes, pointers, document boundaries), token
ids < vocabulary (all of them with --mode full, the default of data.validate; a sample with
quick), each split of data.split holding at least one sample, existing index-cache files. Writes
nothing. Exit status 0 when everything passes, 1 with the problem on stderr, 2 for a config error.

example:
  python tools/check_data.py --config configs/llama2_7b_harpe_128k.yaml
  python tools/check_data.py --config configs/tiny_cpu.yaml --mode quick data.seq_length=512
"""

from __future__ import annotations

import argparse
import sys

from harpe_megatron.cli.common import quiet_library_warnings
from harpe_megatron.config.loader import ConfigError, load_config, plain_run_configs
from harpe_megatron.data.validation import DataValidationError
from harpe_megatron.training.input_checks import validate_run_inputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/check_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--mode", choices=["full", "quick"], default=None,
                   help="full: read every token id; quick: a sample of them (default: the config's data.validate, "
                        "or full when that is off)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_length=131072")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_warnings()

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    mode = args.mode or (cfg.data.validate if cfg.data.validate != "off" else "full")
    for label, run_cfg in plain_run_configs(cfg):
        try:
            report = validate_run_inputs(run_cfg, mode=mode)
        except DataValidationError as exc:
            print(f"data check failed ({label}, data.seq_length {run_cfg.data.seq_length}): {exc}", file=sys.stderr)
            return 1
        print(f"{label}: {report.summary()}")
        for p in report.prefixes:
            splits = ", ".join(f"{k} {p.split_documents[k]:,} docs / {p.split_tokens[k]:,} tokens" for k in p.split_documents)
            print(f"  {p.prefix}: {p.dtype}, {p.documents:,} documents, {p.tokens:,} tokens, "
                  f"{p.scanned_tokens:,} ids read (max {p.max_id}); {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
