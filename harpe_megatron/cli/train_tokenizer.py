"""Train a small Llama-style sentencepiece tokenizer (for the demo and tests; real runs use the
Llama-2 tokenizer.model).

BPE with byte fallback (any text is encodable), digits split, whitespace and text kept as is,
unk=0 bos=1 eos=2 and no pad, as in Llama-2. Inputs are JSONL files (.jsonl, .jsonl.gz, .json:
the --text-key field of every line) or plain-text files (anything else); every non-empty line is
one training sentence, at most --input-sentence-size of them (a seeded sample). Deterministic for
given inputs and settings. Writes PREFIX.model and PREFIX.vocab (temporary names, then renamed).

example:
  python tools/train_tokenizer.py --input data/demo/corpus.jsonl --output-prefix data/demo/tokenizer --vocab-size 512
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from harpe_megatron.cli.common import quiet_library_warnings
from harpe_megatron.data.jsonl import read_documents
from harpe_megatron.data.tokenizer import train_sentencepiece

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/train_tokenizer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSONL files (.jsonl/.jsonl.gz/.json) or plain-text files")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=512,
                   help="pieces, including 3 special and 256 byte pieces (default: 512)")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--input-sentence-size", type=int, default=200_000, metavar="N",
                   help="at most N training lines, a seeded sample when there are more (default: 200000)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest fall back to bytes (default: 0.9995)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (default: 1234)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_warnings()

    model_path = args.output_prefix + ".model"
    if os.path.exists(model_path) and not args.overwrite:
        print(f"train_tokenizer: error: {model_path} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 1
    jsonl = [f for f in args.input if f.endswith(_JSONL_SUFFIXES)]
    plain = [f for f in args.input if not f.endswith(_JSONL_SUFFIXES)]
    start = time.perf_counter()
    try:
        texts = (d.text for d in read_documents(jsonl, text_key=args.text_key)) if jsonl else None
        tok = train_sentencepiece(
            texts, args.output_prefix, args.vocab_size, files=plain,
            input_sentence_size=args.input_sentence_size, character_coverage=args.character_coverage,
            seed=args.seed,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"train_tokenizer: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {tok.model_path} and {args.output_prefix}.vocab: {tok.vocab_size} pieces, "
          f"unk={tok.unk} bos={tok.bos} eos={tok.eos} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
