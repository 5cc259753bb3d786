#!/usr/bin/env python
"""Benchmark per-head RoPE: forward + backward of q and k, fused kernel vs the alternatives.

    python scripts/bench/rope.py                       # CUDA: s in 4k/32k/128k, h 32, d 128, bf16
    python scripts/bench/rope.py --seq-lens 4096 --heads 32 --kv-heads 8 --json out.json
    python scripts/bench/rope.py --tiny                # CPU smoke run (torch implementation)

Rows, each timed in this process on the same tensors (q ``[s, b, h, d]``, k ``[s, b, hk, d]``):

* ``per-head``: :func:`harpe_megatron.positional.rope_apply.apply_per_head_rope` with one base
  per head (the Triton kernel on CUDA; the torch expression elsewhere — the ``impl`` column says);
* ``single-base``: the same kernel with one base for every head (cos/sin once per token, not per
  head): the price of per-head bases is the ratio of the two;
* ``megatron unfused``: megatron-core's ``apply_rotary_pos_emb`` (apply_rope_fusion=False) on our
  per-head angle table — what HARPE costs without the kernel; the table (built once per forward
  and shared by all layers) is built outside the timed region;
* ``torch expression``: our torch implementation (the CPU path) on the same device;
* ``TE fused (single base)``: Transformer Engine's fused RoPE via megatron, when TE is installed
  (it cannot take per-head tables);
* ``copy``: ``clone`` of q, k and their gradients — the same bytes, the practical ceiling.

Also per variant: the bytes autograd keeps for the backward between forward and backward
("saved MiB", distinct storages counted once) — per layer in a model, and the reason the fused
path exists at 128k.

Bytes counted per call: read x + write y forward, read dy + write dx backward, for q and k
(``4 * (|q| + |k|) * itemsize``); tables, positions and frequencies are not counted. GB/s = those
bytes / median time; "% peak" is against the device's vendor DRAM bandwidth (``--peak-gbs``
overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_description, peak_bandwidth_gbs, pick_device, time_call  # noqa: E402

from harpe_megatron.cli.common import quiet_library_warnings  # noqa: E402
from harpe_megatron.positional.rope_apply import apply_per_head_rope, default_impl  # noqa: E402
from harpe_megatron.positional.rotary import PerHeadRotaryEmbedding  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# HARPE's Table 2 range: 32 bases between 1e6 and ~1.7e7 (a log-uniform stand-in; the values do
# not change the work done).
_BASE_RANGE = (1e6, 1.7e7)


class _NoContextParallel:
    """A one-rank CP group stand-in (megatron only reads it for packed sequences)."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


def _megatron_unfused(config):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    return lambda x, table: apply_rotary_pos_emb(x, table, config=config, cp_group=_NoContextParallel())


def _te_fused():
    try:
        from megatron.core.extensions.transformer_engine import fused_apply_rotary_pos_emb
    except Exception:
        return None
    return fused_apply_rotary_pos_emb if fused_apply_rotary_pos_emb is not None else None


def _saved_bytes(forward) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``forward()``."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = forward()
    del outputs
    return sum(storages.values())


def bench_one(seq: int, batch: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
              device: torch.device, warmup: int, iters: int, peak_gbs) -> list[dict]:
    from megatron.core.transformer.transformer_config import TransformerConfig

    per_group = heads // kv_heads
    group_bases = torch.logspace(*[torch.log10(torch.tensor(b)).item() for b in _BASE_RANGE], kv_heads).tolist()
    bases = [b for b in group_bases for _ in range(per_group)]
    rope = PerHeadRotaryEmbedding(bases, dim, num_query_groups=kv_heads)
    positions = rope.rope_positions(seq, device=device)
    inv_q, inv_k = rope.qk_inverse_frequencies(device)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(seq, batch, heads, dim, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(seq, batch, kv_heads, dim, device=device, dtype=dtype, generator=g).requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    nbytes = 4 * (q.numel() + k.numel()) * q.element_size()

    def fwd_bwd(fq, fk):
        def run():
            yq, yk = fq(q), fk(k)
            torch.autograd.grad((yq, yk), (q, k), (gq, gk))
        run.forward = lambda: (fq(q), fk(k))
        return run

    rows = []

    def add(name, impl, fn):
        seconds = time_call(fn, device, warmup, iters)
        gbs = nbytes / seconds / 1e9
        saved = _saved_bytes(fn.forward) if hasattr(fn, "forward") else None
        rows.append({"seq": seq, "batch": batch, "heads": heads, "kv_heads": kv_heads, "dim": dim,
                     "dtype": str(dtype).replace("torch.", ""), "variant": name, "impl": impl,
                     "ms": seconds * 1e3, "gb_s": gbs, "pct_peak": 100 * gbs / peak_gbs if peak_gbs else None,
                     "saved_mib": saved / 2**20 if saved is not None else None})

    impl = default_impl(q)
    add("per-head", impl, fwd_bwd(lambda x: apply_per_head_rope(x, positions, inv_q),
                                  lambda x: apply_per_head_rope(x, positions, inv_k)))
    add("single-base", impl, fwd_bwd(lambda x: apply_per_head_rope(x, positions, inv_q[0]),
                                     lambda x: apply_per_head_rope(x, positions, inv_q[0])))
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=kv_heads, apply_rope_fusion=False)
    unfused = _megatron_unfused(config)
    table_q, table_k = rope.split(rope(seq, device=device))
    add("megatron unfused", "torch (table)", fwd_bwd(lambda x: unfused(x, table_q), lambda x: unfused(x, table_k)))
    add("torch expression", "torch", fwd_bwd(lambda x: apply_per_head_rope(x, positions, inv_q, impl="torch"),
                                             lambda x: apply_per_head_rope(x, positions, inv_k, impl="torch")))
    te = _te_fused() if device.type == "cuda" else None
    if te is not None:
        freqs = table_q[:, :, :1].contiguous()  # [s, 1, 1, d]: one base
        add("TE fused (single base)", "TE", fwd_bwd(lambda x: te(x, freqs), lambda x: te(x, freqs)))
    add("copy", "clone", lambda: (q.detach().clone(), k.detach().clone(), gq.clone(), gk.clone()))
    table_s = time_call(lambda: rope(seq, device=device), device, warmup, iters)
    rows.append({"seq": seq, "variant": "table build (once per forward)", "ms": table_s * 1e3,
                 "table_gib": rope(seq, device=device).numel() * 4 / 2**30})
    return rows


def _print(rows: list[dict]) -> None:
    by = {}
    for r in rows:
        by.setdefault(r["seq"], {})[r["variant"]] = r
    print(f"{'seq':>7} {'variant':<32} {'impl':<14} {'ms':>9} {'GB/s':>8} {'% peak':>7} {'vs per-head':>11} "
          f"{'saved MiB':>9}")
    for seq, variants in by.items():
        base = variants["per-head"]["ms"]
        for name, r in variants.items():
            if "gb_s" not in r:
                print(f"{seq:>7} {name:<32} {'':<14} {r['ms']:>9.3f}   table {r['table_gib']:.2f} GiB fp32")
                continue
            pct = f"{r['pct_peak']:.1f}" if r["pct_peak"] is not None else "-"
            saved = f"{r['saved_mib']:.3f}" if r["saved_mib"] is not None else "-"
            print(f"{seq:>7} {name:<32} {r['impl']:<14} {r['ms']:>9.3f} {r['gb_s']:>8.1f} {pct:>7} "
                  f"{r['ms'] / base:>10.2f}x {saved:>9}")
        single = variants["single-base"]["ms"]
        unfused = variants["megatron unfused"]["ms"]
        print(f"{seq:>7} per-head / single-base = {base / single:.3f}; megatron unfused / per-head = "
              f"{unfused / base:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default: 4096 32768 131072 (CUDA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA, Llama-2-7B)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-gbs", type=float, default=None, help="device DRAM bandwidth in GB/s")
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke run")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    quiet_library_warnings()
    device = pick_device(args.device)
    if args.tiny:
        args.seq_lens = args.seq_lens or [256, 1024]
        args.heads, args.head_dim, args.warmup, args.iters = 8, 64, 1, 3
        if args.dtype == "bf16" and device.type == "cpu":
            args.dtype = "fp32"
    seq_lens = args.seq_lens or [4096, 32768, 131072]
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {kv_heads}")
    peak = peak_bandwidth_gbs(device, args.peak_gbs)
    print(f"# {device_description(device)}")
    print(f"# HARPE_ROPE_IMPL={os.environ.get('HARPE_ROPE_IMPL', '')!s} batch {args.batch}, heads {args.heads}, "
          f"kv heads {kv_heads}, head dim {args.head_dim}, {args.dtype}, fwd+bwd of q and k, "
          f"median of {args.iters}; peak DRAM {peak or '-'} GB/s")
    rows = []
    for seq in seq_lens:
        rows += bench_one(seq, args.batch, args.heads, kv_heads, args.head_dim, _DTYPES[args.dtype], device,
                          args.warmup, args.iters, peak)
    _print(rows)
    if args.json:
        args.json.write_text(json.dumps({"device": device_description(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
