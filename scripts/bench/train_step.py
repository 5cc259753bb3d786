#!/usr/bin/env python
"""Benchmark one training step of a Llama-2-7B-width slice on one device: HARPE vs single base.

    python scripts/bench/train_step.py                      # CUDA: 8k/32k/64k, 128k with recompute
    python scripts/bench/train_step.py --layers 4 --seq-lens 32768 --json out.json
    python scripts/bench/train_step.py --tiny               # CPU smoke run (tiny shapes, fp32)

The step is the trainer's own (harpe_megatron.step: build, schedule): megatron DDP, distributed
optimizer (Adam, fp32 master weights, grad clipping), the forward/backward schedule with
per-token loss, bf16 via Float16Module — on one rank, one micro-batch of one sequence of random
tokens. Variants, built and timed one after another in this process on the same shapes:

* ``harpe``: per-head bases (HARPE's Table 2), RoPE applied by the fused per-head kernel;
* ``single-base``: one base (500000) for all heads through the same fused path — the baseline
  the HARPE overhead is measured against;
* ``harpe-table`` (``--with-table``): per-head bases through megatron's unfused table path.

Reported: median step time over ``--steps`` after ``--warmup``, tokens/s, model TFLOP/s and MFU
(FLOPs per token from :func:`harpe_megatron.step.metrics.training_flops_per_token`: causal
attention counted as computed, s/2 keys per query on average; recomputation not counted; the
output layer over the padded vocabulary included), peak allocated memory. Sequence lengths at or
above ``--recompute-from`` run with full activation recomputation (uniform, 1 layer per block).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_description, pick_device, synchronize  # noqa: E402

from harpe_megatron.cli.common import quiet_library_warnings  # noqa: E402
from harpe_megatron.config.loader import config_from_dict  # noqa: E402
from harpe_megatron.step.build import build_optimizer, build_training_model  # noqa: E402
from harpe_megatron.step.metrics import peak_tflops, training_flops_per_token  # noqa: E402
from harpe_megatron.step.schedule import run_schedule  # noqa: E402
from harpe_megatron.training.initialize import distributed_run  # noqa: E402

VARIANTS = {
    "harpe": {"bases": {"strategy": "paper"}, "per_head_rope": "fused"},
    "single-base": {"bases": {"strategy": "constant", "base": 500000.0}, "per_head_rope": "fused"},
    "harpe-table": {"bases": {"strategy": "paper"}, "per_head_rope": "table"},
}


def run_config(variant: str, seq: int, layers: int, precision: str, recompute: bool, tiny: bool):
    model = {"preset": "llama2-7b", "num_layers": layers}
    positional = dict(VARIANTS[variant])
    if tiny:
        model = {"preset": "tiny", "num_layers": layers, "hidden_size": 256, "num_attention_heads": 4,
                 "num_query_groups": 4, "ffn_hidden_size": 688, "vocab_size": 1024}
        if positional["bases"]["strategy"] == "paper":  # Table 2 has 32 heads: use 4 spread bases
            positional["bases"] = {"strategy": "uniform", "b_min": 1e6, "b_max": 1.7e7}
    training = {"micro_batch_size": 1, "global_batch_size": 1, "train_iters": 1000, "precision": precision,
                "lr": 1e-5, "use_distributed_optimizer": True}
    if recompute:
        training.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return config_from_dict({
        "model": model, "positional": positional, "data": {"seq_length": seq},
        "training": training, "logging": {"tensorboard": False}, "run_dir": "/tmp/harpe_bench_unused",
    })


def _batches(cfg, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    seq = cfg.data.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq),
             "position_ids": torch.arange(seq)[None]}
    batch = {k: v.to(device) for k, v in batch.items()}
    while True:
        yield batch


def measure(cfg, device, warmup: int, steps: int) -> dict:
    """Build model + optimizer for ``cfg`` and time ``steps`` training steps after ``warmup``."""
    with distributed_run(cfg):
        model_chunks, _ = build_training_model(cfg)
        optimizer, scheduler = build_optimizer(cfg, model_chunks, cfg.training.train_iters)
        data = _batches(cfg, device)
        times, losses = [], []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup + steps):
            synchronize(device)
            t0 = time.perf_counter()
            for m in model_chunks:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            total = run_schedule(cfg, model_chunks, data, 1, forward_only=False)
            optimizer.step()
            scheduler.step(increment=1)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            losses.append((total[0] / total[1]).item())
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        del model_chunks, optimizer, scheduler
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_s = statistics.median(times)
    seq = cfg.data.seq_length
    tokens_per_s = seq / step_s
    tflops = training_flops_per_token(cfg.model, seq) * tokens_per_s / 1e12
    peak = peak_tflops(cfg.training.precision)
    return {"step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s, "tflops": tflops,
            "mfu": tflops / peak if peak else None, "peak_mem_gib": peak_gib,
            "first_loss": losses[0], "last_loss": losses[-1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default: 8192 32768 65536 131072")
    p.add_argument("--recompute-from", type=int, default=131072,
                   help="full activation recomputation at and above this length")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 (CUDA)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["harpe", "single-base"])
    p.add_argument("--with-table", action="store_true", help="also the megatron table path (harpe-table)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny model and sequences (CPU smoke run)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    quiet_library_warnings()
    device = pick_device(args.device)
    if device.type == "cpu" and torch.cuda.is_available():
        p.error("--device cpu on a CUDA machine is not supported (the trainer places the model on CUDA)")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    seq_lens = args.seq_lens or ([256, 512] if args.tiny else [8192, 32768, 65536, 131072])
    variants = list(args.variants) + (["harpe-table"] if args.with_table and "harpe-table" not in args.variants else [])
    variants.sort(key=lambda v: v != "single-base")  # the baseline first, so ratios print as we go
    if args.tiny:
        args.layers = min(args.layers, 2)
    print(f"# {device_description(device)}")
    print(f"# {'tiny' if args.tiny else 'Llama-2-7B width (hidden 4096, 32 heads, FFN 11008, vocab 32000)'}, "
          f"{args.layers} layer(s), {precision}, 1 x seq tokens per step, median of {args.steps} after {args.warmup}")
    print(f"{'seq':>7} {'variant':<12} {'recomp':>6} {'step ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>8} {'vs single':>9}")
    rows = []
    for seq in seq_lens:
        recompute = seq >= args.recompute_from
        results = {}
        for variant in variants:
            cfg = run_config(variant, seq, args.layers, precision, recompute, args.tiny)
            try:
                r = measure(cfg, device, args.warmup, args.steps)
            except torch.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                print(f"{seq:>7} {variant:<12} {str(recompute):>6}  out of memory")
                rows.append({"seq": seq, "variant": variant, "recompute": recompute, "oom": True})
                continue
            results[variant] = r
            base = results.get("single-base")
            ratio = f"{r['step_ms'] / base['step_ms']:.3f}" if base else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            print(f"{seq:>7} {variant:<12} {str(recompute):>6} {r['step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} "
                  f"{r['tflops']:>8.3g} {mfu:>6} {mem:>8} {ratio:>9}", flush=True)
            rows.append({"seq": seq, "variant": variant, "recompute": recompute, "layers": args.layers,
                         "precision": precision, **r})
        if "harpe" in results and "single-base" in results:
            overhead = results["harpe"]["step_ms"] / results["single-base"]["step_ms"] - 1
            print(f"{seq:>7} HARPE overhead vs single base: {100 * overhead:+.2f}%")
    if args.json:
        args.json.write_text(json.dumps({"device": device_description(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
