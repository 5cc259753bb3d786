"""Build the reproduction corpus of a tier (docs/reproduction.md): training text, held-out text,
synthetic passkey documents, tokenizer and indexed datasets.

    python tools/prepare_repro_data.py --tier cpu [--out data/repro/cpu] [--input corpus.jsonl ...]
        [--overwrite] [--progress]

The windows (L, 8 L) and the vocabulary size come from configs/repro/<tier>/{base,harpe}.yaml,
the rest of the settings from the tier (harpe_megatron/repro/protocol.py). Text: this Python's
standard-library modules, or the JSONL documents given with --input (one per line, field
"text"). Retrieval documents: the passkey task of tools/eval_long_context.py with its answer,
padded to exactly L tokens, seeds far from the evaluation's. Deterministic; a complete build with the same settings is kept
as it is (exit 0), one with other settings needs --overwrite (else exit 2). Outputs: see
harpe_megatron/data/repro.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harpe_megatron.cli.common import quiet_library_warnings
from harpe_megatron.data.repro import ReproDataSettings, prepare_repro_data
from harpe_megatron.eval.synthetic import training_document
from harpe_megatron.repro.protocol import TIERS, plan_tier

__all__ = ["main", "passkey_document"]

CONFIGS_ROOT = Path(__file__).resolve().parents[2] / "configs" / "repro"


def passkey_document(tokenize, length: int, seed: int, depth: float) -> str:
    """The retrieval document of the reproduction: a passkey sample followed by its answer."""
    return training_document("passkey", tokenize, length, seed, depth)


def settings_for(tier_name: str, configs_root: Path, inputs: list[str]) -> ReproDataSettings:
    plan = plan_tier(tier_name, configs_root)
    t = plan.tier
    return ReproDataSettings(length=plan.length, target=plan.target, vocab_size=plan.vocab_size,
                             text_chars=t.text_chars, heldout_chars=t.heldout_chars,
                             heldout_min_chars=t.heldout_min_chars, retrieval_docs=t.retrieval_docs,
                             retrieval_min_length=t.retrieval_min_length, inputs=list(inputs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/prepare_repro_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", required=True, choices=sorted(TIERS))
    p.add_argument("--out", default=None, help="output directory (default: data/repro/<tier>)")
    p.add_argument("--input", action="append", default=[], metavar="JSONL",
                   help="text documents instead of the standard library (repeatable; globs allowed)")
    p.add_argument("--configs", default=str(CONFIGS_ROOT), help="root of the tier configs (default: configs/repro)")
    p.add_argument("--overwrite", action="store_true", help="rebuild a build made with other settings")
    p.add_argument("--progress", action="store_true", help="progress bars while tokenizing")
    args = p.parse_args(argv)
    quiet_library_warnings()
    try:
        settings = settings_for(args.tier, Path(args.configs), args.input)
        prepare_repro_data(args.out or f"data/repro/{args.tier}", settings, passkey_document,
                           overwrite=args.overwrite, progress=args.progress)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"prepare_repro_data: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
