#!/usr/bin/env python
"""Document masking: the attention FLOPs it saves on a corpus, and its kernel against causal attention.

    # the saving on a corpus (CPU, reads the index only): rows of 131072 tokens, CP 8 balance
    python scripts/bench/doc_attention.py --data data/demo/demo_text_document --seq-length 131072 --cp 8
    # kernels (CUDA, bf16): causal flash SDPA vs document-masked flash varlen, forward + backward,
    # on rows packed from the corpus' documents (or --doc-lengths), one GPU, and per CP rank
    python scripts/bench/doc_attention.py --time --data PREFIX --seq-length 131072 --heads 32 --kv-heads 32 --cp 8
    python scripts/bench/doc_attention.py --tiny --json out.json   # CPU smoke run (block-mask kernel)

Saving (``fraction``): the corpus' documents are shuffled, concatenated and cut into rows of
``--seq-length`` tokens as the GPT dataset does (data/documents.py, :func:`packed_rows`); the
attended (query, key) pairs under document masking (``sum s_i (s_i + 1) / 2`` over each row's
document pieces) are divided by causal attention's (``S (S + 1) / 2`` per row). Attention FLOPs
scale with that fraction; the rest of the model does not change. CP balance: the attended pairs
per CP rank (data/documents.py, :func:`cp_rank_pairs`) of the zigzag layout and of the layout
balanced by attention work that document-masked training uses (parallel/cp_layout.py), the
busiest rank over the mean, per row.

Kernels (``--time``), each timed in this process on the same q/k/v ``[1, h, S, d]``:

* ``causal``: ``scaled_dot_product_attention(is_causal=True)`` over the whole row (what runs
  without document masking);
* ``document``: :func:`harpe_megatron.model.document_attention.document_attention` with the row's
  document ids (the kernel the rule picks: flash varlen on CUDA in bf16/fp16, the block mask on
  CPU; the ``kernel`` column says);
* with ``--cp N``: ``document cp rank r``: rank r's query runs in the balanced layout against
  their key prefixes, as the model's CP attention runs them (K/V gathered beforehand, not timed).

TFLOP/s count 4 n d FLOPs per attended pair forward and 2x that backward (the MFU convention of
step/metrics.py), each variant with its own pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_description, pick_device, time_call  # noqa: E402

from harpe_megatron.cli.common import quiet_library_warnings  # noqa: E402
from harpe_megatron.data.documents import (  # noqa: E402
    attended_pairs,
    cp_rank_pairs,
    dataset_document_lengths,
    packed_attention_fraction,
    packed_rows,
)
from harpe_megatron.model.document_attention import document_attention, document_kernel  # noqa: E402
from harpe_megatron.parallel.cp_layout import balanced_layout, runs  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def saving(lengths: np.ndarray, seq_length: int, cp: int, seed: int, max_rows: int) -> dict:
    """The attention fraction of the corpus at ``seq_length`` and the zigzag CP balance."""
    fraction, rows = packed_attention_fraction(lengths, seq_length, seed, max_rows)
    pieces = packed_rows(lengths, seq_length, seed, max_rows)
    out = {"seq_length": seq_length, "rows": rows, "documents": int(lengths.size),
           "tokens": int(lengths.sum()), "mean_doc_len": float(lengths.mean()),
           "median_doc_len": float(np.median(lengths)), "fraction": fraction,
           "attention_flops_saved": 1 - fraction,
           "pieces_per_row_mean": float(np.mean([len(p) for p in pieces]))}
    if cp > 1 and seq_length % (2 * cp) == 0:
        out["cp"] = cp
        for layout in ("zigzag", "balanced"):
            imbalance = [float(r.max() / r.mean()) for r in (cp_rank_pairs(p, cp, layout) for p in pieces)]
            out[f"cp_{layout}_max_over_mean"] = {"median": float(np.median(imbalance)),
                                                 "mean": float(np.mean(imbalance)), "worst": max(imbalance)}
    return out


def _row_ids(pieces: np.ndarray, device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(pieces)), torch.from_numpy(pieces)).to(device)[None]


def time_kernels(pieces: np.ndarray, heads: int, kv_heads: int, dim: int, dtype, device, cp: int,
                 warmup: int, iters: int) -> list[dict]:
    seq = int(pieces.sum())
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, seq, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(1, kv_heads, seq, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(1, kv_heads, seq, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    grad = torch.randn_like(q)
    ids = _row_ids(pieces, device)
    scale = dim ** -0.5
    gqa = heads != kv_heads
    rows = []

    def add(name, kernel, fn, pairs, extra=None):
        seconds = time_call(fn, device, warmup, iters)
        flops = 3 * 4 * heads * dim * pairs
        rows.append({"variant": name, "kernel": kernel, "seq": seq, "heads": heads, "kv_heads": kv_heads,
                     "dim": dim, "dtype": str(dtype).replace("torch.", ""), "ms": seconds * 1e3,
                     "pairs": pairs, "tflops": flops / seconds / 1e12, **(extra or {})})

    def causal():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        torch.autograd.grad(out, (q, k, v), grad)

    def masked(qb, kb, vb, docs, g):
        def run():
            out = document_attention(qb, kb, vb, docs, scale, 0.0, fake_causal=None, max_dense=1 << 62)
            torch.autograd.grad(out, (q, k, v), g, allow_unused=True)
        return run

    kernel = document_kernel(q, 0.0)
    add("causal", "sdpa is_causal", causal, attended_pairs([seq]))
    add("document", kernel, masked(q, k, v, ids, grad), attended_pairs(pieces))
    if cp > 1:
        keys = np.concatenate([np.arange(1, p + 1) for p in pieces]).astype(np.float64)
        index = balanced_layout(keys, cp)
        for r in range(cp):
            fns, pairs = [], 0.0
            for start, length, _ in runs(index[r]):
                end = start + length
                fns.append(masked(q[:, :, start:end], k[:, :, :end], v[:, :, :end], ids[:, :end],
                                  grad[:, :, start:end]))
                pairs += float(keys[start:end].sum())
            add(f"document cp rank {r}", kernel, lambda fns=fns: [f() for f in fns], pairs, {"cp": cp, "cp_rank": r})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=None, help="indexed-dataset prefixes (document lengths)")
    p.add_argument("--doc-lengths", type=int, nargs="+", default=None,
                   help="synthetic documents instead of --data (these lengths, repeated)")
    p.add_argument("--seq-length", type=int, default=131072)
    p.add_argument("--cp", type=int, default=1, help="CP size for the balance figures and per-rank timing")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-rows", type=int, default=4096)
    p.add_argument("--time", action="store_true", help="time the kernels on the first packed row")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke run (implies --time)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    quiet_library_warnings()
    device = pick_device(args.device)
    if args.tiny:
        args.time, args.seq_length, args.cp = True, 256, 2
        args.heads, args.kv_heads, args.head_dim, args.warmup, args.iters = 4, 2, 16, 1, 2
        args.doc_lengths = args.doc_lengths or [37, 5, 90, 1, 60]
        if device.type == "cpu":
            args.dtype = "fp32"
    if (args.data is None) == (args.doc_lengths is None):
        p.error("give exactly one of --data and --doc-lengths")
    if args.data is not None:
        lengths = np.concatenate([dataset_document_lengths(prefix) for prefix in args.data])
        source = " + ".join(args.data)
    else:
        reps = -(-2 * args.seq_length // max(sum(args.doc_lengths), 1))
        lengths = np.array(args.doc_lengths * reps, dtype=np.int64)
        source = f"synthetic {args.doc_lengths}"
    result = {"device": device_description(device), "source": source,
              "saving": saving(lengths, args.seq_length, args.cp, args.seed, args.max_rows), "rows": []}
    s = result["saving"]
    print(f"{source}: {s['documents']:,} documents, {s['tokens']:,} tokens (mean {s['mean_doc_len']:.0f}, median "
          f"{s['median_doc_len']:.0f}); {s['rows']} rows of {args.seq_length:,}, {s['pieces_per_row_mean']:.1f} "
          f"document pieces per row")
    print(f"attended pairs with document masking / causal = {s['fraction']:.4f}: attention FLOPs saved "
          f"{100 * s['attention_flops_saved']:.1f}%")
    for layout in ("zigzag", "balanced"):
        if f"cp_{layout}_max_over_mean" in s:
            b = s[f"cp_{layout}_max_over_mean"]
            print(f"CP {s['cp']}, {layout} layout: attended pairs of the busiest rank / mean, per row: median "
                  f"{b['median']:.3f}, mean {b['mean']:.3f}, worst {b['worst']:.3f}")
    if args.time:
        pieces = packed_rows(lengths, args.seq_length, args.seed, 1)[0]
        rows = time_kernels(pieces, args.heads, args.kv_heads or args.heads, args.head_dim, _DTYPES[args.dtype],
                            device, args.cp, args.warmup, args.iters)
        result["rows"] = rows
        print(result["device"])
        print(f"{'variant':<22} {'kernel':<15} {'ms':>10} {'pairs':>14} {'TFLOP/s':>9}")
        for r in rows:
            print(f"{r['variant']:<22} {r['kernel']:<15} {r['ms']:>10.3f} {r['pairs']:>14,.0f} {r['tflops']:>9.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
