"""Golden losses: a short deterministic run of the tiny model whose per-step losses are kept in
``tests/assets/golden_losses_tiny.json`` (the numerics guard of tests/distributed/test_golden_losses.py).

The run: configs/tiny_cpu.yaml (TP 2, fp32, seed 1234) on 2 gloo ranks, 64-token sequences, 8 per
step, ``STEPS`` steps, on a synthetic corpus written here from a seeded generator, so the file does
not depend on the text of the machine (the demo corpus does). The token ids are written directly;
the sentencepiece model only supplies the vocabulary size and the end-of-document id.

Regenerate (after a deliberate change of the numerics, or of torch / megatron-core)::

    bash scripts/regen_golden_losses.sh        # = python -m tests.golden_losses --write
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from harpe_megatron.data.tokenizer import train_sentencepiece
from tests.distributed.training_workers import train_with
from tests.helpers import TINY_CPU_CONFIG
from tests.spawn import run_distributed

__all__ = ["GOLDEN_FILE", "STEPS", "golden_overrides", "run_golden", "write_golden_data"]

GOLDEN_FILE = Path(__file__).resolve().parent / "assets" / "golden_losses_tiny.json"
STEPS = 5
WORLD = 2
VOCAB = 512
_DOCS, _DOC_TOKENS = 200, (40, 400)


def write_golden_data(out_dir: Path) -> dict[str, str]:
    """The synthetic corpus (``corpus.{bin,idx}``) and a 512-piece tokenizer under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(3000)]
    text = [" ".join(rng.choice(words, size=40)) for _ in range(2000)]
    train_sentencepiece(text, out_dir / "tokenizer", vocab_size=VOCAB, num_threads=1)
    # Documents of a first-order chain over the ids 3..VOCAB-1 (0-2 are unk/bos/eos): learnable,
    # so the losses move in 5 steps.
    successors = rng.integers(3, VOCAB, size=(VOCAB, 4))
    builder = IndexedDatasetBuilder(str(out_dir / "corpus.bin"), dtype=np.uint16)
    for _ in range(_DOCS):
        n = int(rng.integers(*_DOC_TOKENS))
        tokens = np.empty(n, dtype=np.int64)
        tokens[0] = rng.integers(3, VOCAB)
        picks = rng.integers(0, 4, size=n)
        for i in range(1, n):
            tokens[i] = successors[tokens[i - 1], picks[i]]
        tokens[-1] = 2  # end of document
        builder.add_item(torch.from_numpy(tokens.astype(np.uint16)))
        builder.end_document()
    builder.finalize(str(out_dir / "corpus.idx"))
    return {"prefix": str(out_dir / "corpus"), "tokenizer": str(out_dir / "tokenizer.model")}


def golden_overrides(data: dict[str, str], run_dir: Path) -> list[str]:
    return [
        f"data.paths=[{data['prefix']}]", f"data.tokenizer_model={data['tokenizer']}", "data.seq_length=64",
        f"model.vocab_size={VOCAB}", "training.micro_batch_size=2",
        "training.global_batch_size=8", f"training.train_iters={STEPS}", "training.lr_warmup_iters=2",
        "training.eval_interval=0", "training.precision=fp32", "training.seed=1234",
        "logging.tensorboard=false", "checkpoint.save_interval=0", f"run_dir={run_dir}",
    ]


def run_golden(work_dir: Path) -> list[float]:
    """Per-step global losses of the golden run (every rank reports the same; rank 0's are kept)."""
    data = write_golden_data(work_dir / "data")
    results = run_distributed(train_with, WORLD, TINY_CPU_CONFIG, golden_overrides(data, work_dir / "run"))
    assert all(r.losses == results[0].losses for r in results), "ranks disagree on the global loss"
    return [results[0].losses[s] for s in range(1, STEPS + 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN_FILE.name} (default: print only)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        losses = run_golden(Path(tmp))
    record = {"config": "configs/tiny_cpu.yaml", "overrides": "tests/golden_losses.py:golden_overrides",
              "world_size": WORLD, "steps": STEPS, "torch": torch.__version__, "losses": losses}
    text = json.dumps(record, indent=2) + "\n"
    if args.write:
        GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_FILE.write_text(text)
        print(f"wrote {GOLDEN_FILE}")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
