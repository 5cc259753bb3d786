"""Build the demo data from text already on this machine: corpus, tokenizer, indexed dataset.

Sources: the Python standard library's modules (source files), the docstrings of other modules,
and the license texts under /usr/share/common-licenses and /usr/share/doc/*/copyright (absent
ones are skipped); about 4 MB of text, shuffled with a fixed seed. Steps:

  1. DIR/corpus.jsonl                     one {"text", "source", "origin"} per document
  2. DIR/tokenizer.model (.vocab)         Llama-style BPE sentencepiece, --vocab-size pieces
  3. DIR/demo_text_document.{bin,idx}     megatron indexed dataset, EOS after every document,
                                          length upsampling scaled to the demo: documents under
                                          512 tokens kept with probability 0.1, longer ones all
     DIR/demo_text_document.report.json   the upsampling report (also printed)
  4. DIR/demo_manifest.json               the settings (marks a complete build)

Deterministic. If DIR already holds a complete build with the same settings, nothing is done;
other settings need --overwrite. Takes a few seconds on 2 CPU cores.

example:
  python tools/prepare_demo_data.py --out data/demo
  # then: data.paths=[data/demo/demo_text_document] data.tokenizer_model=data/demo/tokenizer.model
"""

from __future__ import annotations

import argparse
import sys

from harpe_megatron.cli.common import quiet_library_warnings
from harpe_megatron.data.demo import prepare_demo_data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/prepare_demo_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo", metavar="DIR", help="output directory (default: data/demo)")
    p.add_argument("--vocab-size", type=int, default=512, help="tokenizer pieces (default: 512)")
    p.add_argument("--max-docs", type=int, default=None, metavar="N",
                   help="at most N documents, split evenly over the sources (default: all, ~4 MB)")
    p.add_argument("--seed", type=int, default=1234, help="seed of file choice, shuffling, tokenizer and upsampling")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if DIR holds a build")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        print("prepare_demo_data: error: --max-docs must be >= 1", file=sys.stderr)
        return 2
    quiet_library_warnings()

    try:
        prepare_demo_data(args.out, vocab_size=args.vocab_size, max_docs=args.max_docs, seed=args.seed,
                          overwrite=args.overwrite, progress=not args.no_progress)
    except (FileExistsError, ValueError, RuntimeError) as exc:
        print(f"prepare_demo_data: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
