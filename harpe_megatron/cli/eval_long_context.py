"""Long-context evaluation of an exported Hugging Face folder, and reports comparing runs.

    python tools/eval_long_context.py run HF_DIR --out results/harpe.json
        [--tasks passkey,needle,niah_single,...|all] [--lengths 1024,2048,4096] [--depths 0,0.25,0.5,0.75,1]
        [--samples N] [--seed S] [--name LABEL] [--device cpu|cuda] [--dtype bf16|fp16|fp32]
        [--heatmap-dir DIR] [--ppl-file TEXT --ppl-lengths 1024,4096 --ppl-stride N | --ppl-stride-fraction 0.5
         --ppl-max-tokens N] [--self-extend GROUP,WINDOW] [--tokenizer PATH_OR_DIR] [--no-progress]
    python tools/eval_long_context.py report results/harpe.json results/abf.json --out report.md [--heatmap report.png]
    python tools/eval_long_context.py report results/seed*/*.json --summary --out summary.md [--ppl-plot ppl.png]
        [--avg-lengths 1024,2048] [--reference paper.json]

Lengths beyond the model's max_position_embeddings are run and flagged ('*' in reports).
--self-extend GROUP,WINDOW evaluates with Self-Extend (Jin et al. 2024; training-free): keys within
WINDOW tokens of the query keep their positions, farther ones use positions floor-divided by GROUP
(the paper's Llama-2-7B setting at 128k: --self-extend 32,1024). Plain Llama and harpe_llama folders.
report --summary: one table of methods x lengths (perplexity, then each task), files of the same
name (e.g. seeds) averaged with their spread, averages over --avg-lengths with the ranks they give,
and the columns of --reference (JSON: {name: {column: text}}); --ppl-plot draws perplexity vs length.
--tokenizer PATH_OR_DIR takes the tokenizer from a folder with tokenizer files, a SentencePiece .model
file or a Hub id instead of HF_DIR (which then needs none); a folder without a tokenizer and no
--tokenizer is a one-line error (exit 2).

Exit codes: 0 done; 2 a one-line error, before the model is loaded, for input that would give
meaningless numbers (depths outside 0-100 %, lengths or samples < 1, an empty or non-text
--ppl-file, GROUP >= WINDOW, an --out that cannot be written; docs/reliability.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional

from harpe_megatron.cli.common import OneLineParser, at_least, check_output_path, quiet_library_warnings
from harpe_megatron.eval.report import make_report
from harpe_megatron.eval.runner import EvalInputError, evaluate, model_source, tokenizer_source
from harpe_megatron.eval.summary import write_summary
from harpe_megatron.eval.synthetic import ALL_TASKS
from harpe_megatron.hf.harpe_llama.self_extend_harpe_llama import self_extend_settings
from harpe_megatron.hf.tokenizer_export import export_tokenizer


def _ints(low: int):
    """A comma list of integers >= ``low`` (argparse type)."""
    def parse(s: str) -> list[int]:
        try:
            vals = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {s!r}") from None
        bad = [v for v in vals if v < low]
        if not vals or bad:
            raise argparse.ArgumentTypeError(f"expected integers >= {low}, got {s!r}")
        return vals
    return parse


def _self_extend(s: str) -> tuple[int, int]:
    """GROUP,WINDOW, checked as the model checks its config key (self_extend_settings)."""
    try:
        group, window = (int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GROUP,WINDOW (two integers, e.g. 32,1024), got {s!r}") from None
    try:
        return self_extend_settings((group, window))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{s!r}: {exc}") from None


def _floats(s: str) -> list[float]:
    """Depths as fractions (0-1) or percents (0-100; any value above 1 is read as a percent)."""
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {s!r}") from None
    if not vals or any(not 0 <= v <= 100 for v in vals):
        raise argparse.ArgumentTypeError(f"depths are fractions 0-1 or percents 0-100, got {s!r}")
    return [v / 100 if v > 1 else v for v in vals]   # accept 0,50,100 as percentages


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {s!r}")
    return v


def check_text_file(path: str, arg: str) -> None:
    """ValueError naming ``arg`` unless ``path`` is a non-empty UTF-8 text file."""
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise ValueError(f"{arg} {path}: cannot be read ({exc.strerror})") from None
    if not data.strip():
        raise ValueError(f"{arg} {path}: the file is empty; a perplexity needs text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{arg} {path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    if "\0" in text:
        raise ValueError(f"{arg} {path}: not a text file (it holds NUL bytes)")


def check_run_args(args) -> None:
    """What ``run`` needs before it loads a model: ValueError naming the argument."""
    if not args.tasks and not args.ppl_file:
        raise ValueError("--tasks is empty and no --ppl-file is given: nothing to evaluate")
    check_output_path(args.out, "--out")
    if args.heatmap_dir:
        check_output_path(args.heatmap_dir, "--heatmap-dir", directory=True)
    if args.ppl_file:
        check_text_file(args.ppl_file, "--ppl-file")
    elif any(v is not None for v in (args.ppl_lengths, args.ppl_stride, args.ppl_stride_fraction, args.ppl_max_tokens)):
        raise ValueError("--ppl-lengths/--ppl-stride/--ppl-stride-fraction/--ppl-max-tokens need --ppl-file")
    if args.ppl_stride is not None and args.ppl_stride_fraction is not None:
        raise ValueError("give one of --ppl-stride and --ppl-stride-fraction")


def parse_args(argv=None):
    p = OneLineParser(prog="tools/eval_long_context.py",
                      description="Long-context evaluation (passkey, needle grid, RULER-style, perplexity).")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="evaluate an HF folder, write a JSON result file")
    r.add_argument("model_dir")
    r.add_argument("--out", required=True, help="JSON result file")
    r.add_argument("--tasks", default="passkey,needle", help=f"comma list or 'all' ({','.join(ALL_TASKS)}) or '' for none")
    r.add_argument("--lengths", type=_ints(1), default=[1024, 2048, 4096])
    r.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="fractions or percents")
    r.add_argument("--samples", type=at_least(1), default=1, help="samples per cell")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--name", default=None, help="label in reports (default: folder name)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    r.add_argument("--heatmap-dir", default=None, help="write <name>_<task>.png heatmaps here")
    r.add_argument("--ppl-file", default=None, help="text file for sliding-window perplexity")
    r.add_argument("--ppl-lengths", type=_ints(2), default=None, help="default: --lengths")
    r.add_argument("--ppl-stride", type=at_least(1), default=None)
    r.add_argument("--ppl-stride-fraction", type=_fraction, default=None)
    r.add_argument("--ppl-max-tokens", type=at_least(2), default=None)
    r.add_argument("--self-extend", type=_self_extend, default=None, metavar="GROUP,WINDOW",
                   help="Self-Extend: group size and neighbour window (e.g. 32,1024)")
    r.add_argument("--tokenizer", default=None, metavar="PATH_OR_DIR",
                   help="tokenizer folder, SentencePiece .model file or Hub id (default: the model folder's)")
    r.add_argument("--no-progress", action="store_true")
    rep = sub.add_parser("report", help="Markdown table comparing result files per length")
    rep.add_argument("results", nargs="+")
    rep.add_argument("--out", default=None, help="Markdown file (default: stdout)")
    rep.add_argument("--heatmap", default=None, help="PNG prefix for side-by-side heatmaps")
    rep.add_argument("--summary", action="store_true",
                     help="one methods x lengths table; same-name files (seeds) averaged with their spread")
    rep.add_argument("--ppl-plot", default=None, help="with --summary: PNG of perplexity vs length, one line per name")
    rep.add_argument("--avg-lengths", type=_ints(1), default=None,
                     help="with --summary: lengths the average and rank columns use (default: all)")
    rep.add_argument("--reference", default=None,
                     help="with --summary: JSON {name: {column: text}} of extra columns (e.g. a paper's numbers)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        args.tasks = ALL_TASKS if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
        unknown = [t for t in args.tasks if t not in ALL_TASKS]
        if unknown:
            p.error(f"unknown tasks {unknown}; known: {','.join(ALL_TASKS)}")
    return args


def _tokenizer_folder(tokenizer: Optional[str], scratch: Path) -> Optional[str]:
    """``tokenizer``, or for a SentencePiece ``.model`` file the folder of tokenizer files an export
    would ship for it (``hf/tokenizer_export.py``), written into ``scratch``."""
    if tokenizer is None or not tokenizer.endswith(".model") or not Path(tokenizer).is_file():
        return tokenizer
    try:
        export_tokenizer(Path(tokenizer), scratch, int(1e30), notes=[])
    except Exception as exc:  # sentencepiece's own message says what is wrong with the file
        raise ValueError(f"--tokenizer {tokenizer}: not a SentencePiece model ({exc})") from None
    return str(scratch)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cmd == "report":
        try:
            if args.out:
                check_output_path(args.out, "--out")
            if args.summary:
                text = write_summary(args.results, args.out, args.ppl_plot, args.avg_lengths, args.reference)
            else:
                text = make_report(args.results, args.out, args.heatmap)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not args.out:
            print(text)
        return 0
    quiet_library_warnings()
    try:
        check_run_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="eval_tokenizer_") as scratch:
        try:  # a folder with config.json or a Hub id, and a tokenizer; one-line errors otherwise
            tokenizer = _tokenizer_folder(args.tokenizer, Path(scratch))
            tokenizer_source(model_source(args.model_dir)[0], tokenizer)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            res = evaluate(args.model_dir, args.out, args.tasks, args.lengths, args.depths, args.samples, args.seed,
                           args.name, args.device, args.dtype, args.ppl_file, args.ppl_lengths, args.ppl_stride,
                           args.ppl_stride_fraction, args.ppl_max_tokens, args.heatmap_dir, not args.no_progress,
                           args.self_extend, tokenizer, args.tokenizer)
        except EvalInputError as exc:  # found once the tokenizer is loaded, before any task ran
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for task, d in res["per_length"].items():
        print(f"{task:20s} " + "  ".join(f"{L}:{v:.1f}" for L, v in d.items()))
    for row in res.get("perplexity", []):
        print(f"ppl @ {row['length']}{'*' if row['beyond_trained_window'] else ''}: {row['ppl']:.3f}")
    if res.get("beyond_trained_window"):
        print(f"* lengths beyond the trained window ({res['trained_window']}): {res['beyond_trained_window']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
