"""JSONL -> length-upsampled megatron indexed dataset (<prefix>.bin / <prefix>.idx).

Every JSON line is one document: its text (--text-key) is tokenized with a sentencepiece model
(the Llama-2 tokenizer.model for the real runs), EOS is appended (BOS only with --add-bos) and
the document is stored as one sequence of megatron's IndexedDataset. Length upsampling (Fu et
al. 2024) keeps documents shorter than --short-threshold tokens with probability
--short-keep-prob and every longer one, inside every source (--source-key, else SlimPajama's
meta.redpajama_set_name, else the file name). The decision for document i depends only on
(--seed, i). A report (per source: documents, tokens, token shares, share in long documents,
length histogram, before/after) is printed and written to <prefix>.report.json.

Outputs are written under temporary names and renamed at the end; existing outputs are refused
without --overwrite. Exit codes: 0 written; 2 bad input or options (one line; nothing written, no
folder left behind); 130 interrupted.

example:
  python tools/preprocess_data.py --input slimpajama/*.jsonl.gz \\
      --tokenizer-model /models/Llama-2-7b-hf/tokenizer.model \\
      --output-prefix /data/slimpajama_128k_upsampled/slimpajama --workers 32
"""

from __future__ import annotations

import argparse
import sys
import time

from harpe_megatron.cli.common import quiet_library_warnings
from harpe_megatron.data.indexed import write_indexed_dataset
from harpe_megatron.data.jsonl import read_documents
from harpe_megatron.data.tokenizer import SentencePieceTokenizer
from harpe_megatron.data.upsample import LengthUpsampler, render_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/preprocess_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="JSONL files (.jsonl or .jsonl.gz); quoted glob patterns are expanded, sorted")
    io.add_argument("--output-prefix", required=True, metavar="PREFIX",
                    help="writes PREFIX.bin, PREFIX.idx and PREFIX.report.json")
    io.add_argument("--tokenizer-model", required=True, metavar="PATH", help="sentencepiece .model file")
    io.add_argument("--text-key", default="text", help="field holding the text; a.b reads a nested field (default: text)")
    io.add_argument("--source-key", default="source",
                    help="field naming the source (default: source; falls back to meta.redpajama_set_name, "
                         "then to the file name)")
    io.add_argument("--add-bos", action="store_true", help="prepend BOS to every document (default: EOS only)")
    io.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    up = p.add_argument_group("length upsampling")
    up.add_argument("--short-threshold", type=int, default=4096, metavar="TOKENS",
                    help="documents with fewer tokens (EOS included) are 'short' (default: 4096)")
    up.add_argument("--short-keep-prob", type=float, default=0.1, metavar="P",
                    help="probability of keeping a short document (default: 0.1)")
    up.add_argument("--no-upsample", action="store_true",
                    help="keep every document (the report still uses --short-threshold)")
    up.add_argument("--seed", type=int, default=1234, help="seed of the keep/drop decisions (default: 1234)")
    run = p.add_argument_group("execution")
    run.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (default: 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_warnings()

    start = time.perf_counter()
    try:
        tokenizer = SentencePieceTokenizer(args.tokenizer_model)
        if args.no_upsample:
            upsampler = LengthUpsampler.keep_all(args.short_threshold, seed=args.seed)
        else:
            upsampler = LengthUpsampler(args.short_threshold, args.short_keep_prob, seed=args.seed)
        documents = read_documents(args.input, text_key=args.text_key, source_key=args.source_key)
        result = write_indexed_dataset(
            documents, tokenizer, args.output_prefix, upsampler=upsampler, add_bos=args.add_bos,
            workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:  # bad input: nothing is left behind
        print(f"preprocess_data: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preprocess_data: interrupted; no output written (temporary files removed)", file=sys.stderr)
        return 130
    print(render_report(result.report))
    print()
    print(f"wrote {result.documents:,} documents, {result.tokens:,} tokens ({result.dtype}) "
          f"in {time.perf_counter() - start:.1f}s")
    print(f"  data    {result.bin_path}")
    print(f"  index   {result.idx_path}")
    print(f"  report  {result.report_path}")
    print(f"  use as  data.paths: [{result.prefix}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
