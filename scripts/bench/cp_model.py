#!/usr/bin/env python
"""Context parallelism at scale, on paper: compute per chunk vs K/V traffic, per layer and per step.

    python scripts/bench/cp_model.py --attn-tflops 400 --gemm-tflops 600      # the docs' table
    python scripts/bench/cp_model.py --layouts 2x4x1@1 2x4x2@2 2x8x1@2 --seq 131072 ...

A layout ``TxCxD@N`` is TP x CP x DP on N nodes (GPUs per node = T*C*D/N); TP and CP groups are
placed inside a node first (megatron's rank order: TP fastest, then CP, then DP), so a CP group
crosses nodes only when T*C exceeds the GPUs of a node.

Per layer and GPU (Llama decoder, b = 1, sequence parallel, bf16, see docs/performance.md):

* GEMM FLOPs, forward: ``2 (S/C) P_layer / T`` with ``P_layer = h(nd + 2gd) + h nd + 3hf``;
* causal attention FLOPs, forward, as computed: ``2 S^2 n d / (C T)`` (zigzag: equal per CP rank);
* backward: 2x forward for GEMMs, 2.5x for attention (5 matmuls against 2, flash-style);
  full recomputation adds one forward;
* CP K/V bytes received per GPU per layer, forward: ``(C-1)/C * S * 2 (g/T) d * 2 B`` — the same
  for the all-gather scheme (our SDPAttention, TE ``all_gather``) and TE's ring (``p2p``); the
  backward moves the same again (reduce-scatter of dK/dV, or dK/dV travelling the ring).
  All-gather: exposed (attention waits for the gather). Ring: each of the C-1 hops overlaps the
  attention of one chunk pair; exposed only where a hop takes longer than that compute.
* TP/SP bytes per GPU per layer, forward: 4 collectives (2 all-gathers, 2 reduce-scatters) of
  ``(T-1)/T * (S/C) h * 2 B``; backward the same; assumed exposed (no TP comm overlap).

Per step: data-parallel gradient reduce-scatter (fp32) + parameter all-gather (bf16) over the
DP x CP group, overlapped with the backward of the last micro-batch except for the final bucket
(counted as exposed: one layer's share). Compute rates are *inputs* (``--attn-tflops``,
``--gemm-tflops``: achieved per-GPU rates; take them from scripts/bench/train_step.py on the
device), as are link bandwidths (achievable per-GPU bus bandwidth, GB/s).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harpe_megatron.config.model import ModelConfig  # noqa: E402
from harpe_megatron.config.presets import get_preset  # noqa: E402
from harpe_megatron.step.metrics import training_flops_per_token  # noqa: E402


@dataclass
class Layout:
    tp: int
    cp: int
    dp: int
    nodes: int

    @classmethod
    def parse(cls, text: str) -> "Layout":
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)@(\d+)", text)
        if not m:
            raise argparse.ArgumentTypeError(f"layout {text!r}: expected TPxCPxDP@NODES, e.g. 2x4x2@2")
        layout = cls(*map(int, m.groups()))
        if layout.gpus % layout.nodes:
            raise argparse.ArgumentTypeError(f"layout {text!r}: {layout.gpus} GPUs do not split over {layout.nodes} nodes")
        return layout

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.dp

    @property
    def per_node(self) -> int:
        return self.gpus // self.nodes

    def __str__(self) -> str:
        return f"TP{self.tp} x CP{self.cp} x DP{self.dp} on {self.nodes} node(s) ({self.gpus} GPUs)"


def layer_costs(m: ModelConfig, seq: int, lay: Layout, args) -> dict[str, float]:
    """Seconds per layer per GPU for one sequence (forward + backward [+ recompute])."""
    h, n, g, d, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_hidden_size
    t, c = lay.tp, lay.cp
    p_layer = h * (n * d + 2 * g * d) + h * n * d + 3 * h * f
    gemm_fwd = 2 * (seq / c) * p_layer / t
    attn_fwd = 2 * seq**2 * n * d / (c * t)
    fwd_passes = 2 if args.recompute else 1
    gemm_s = gemm_fwd * (fwd_passes + 2) / (args.gemm_tflops * 1e12)
    attn_fwd_s = attn_fwd / (args.attn_tflops * 1e12)
    attn_s = attn_fwd_s * (fwd_passes + 2.5)
    cp_inter_node = t * c > lay.per_node
    cp_bw = (args.ib_gbs if cp_inter_node else args.nvlink_gbs) * 1e9
    kv_bytes = (c - 1) / c * seq * 2 * (g / t) * d * 2 if c > 1 else 0.0
    kv_passes = fwd_passes + 1  # forward gather(s) + backward reduce-scatter
    kv_s = kv_bytes * kv_passes / cp_bw
    # ring: per hop, one chunk-pair of attention vs one hop of K/V (fwd) or K/V+dK/dV (bwd)
    hop_fwd = kv_bytes / max(c - 1, 1) / cp_bw
    compute_fwd_per_hop = attn_fwd_s / c
    ring_exposed = 0.0
    if c > 1:
        ring_exposed = (c - 1) * (
            fwd_passes * max(0.0, hop_fwd - compute_fwd_per_hop) + max(0.0, 2 * hop_fwd - 2.5 * compute_fwd_per_hop)
        )
    tp_bytes = 4 * (t - 1) / t * (seq / c) * h * 2 if t > 1 else 0.0
    tp_bw = (args.ib_gbs if t > lay.per_node else args.nvlink_gbs) * 1e9
    tp_s = tp_bytes * (fwd_passes + 1) / tp_bw
    return {"gemm": gemm_s, "attn": attn_s, "kv_bytes": kv_bytes, "kv_allgather": kv_s, "kv_ring_exposed": ring_exposed,
            "tp": tp_s, "cp_inter_node": cp_inter_node, "attn_share": attn_s / (attn_s + gemm_s)}


def step_estimate(m: ModelConfig, seq: int, lay: Layout, args) -> dict[str, float]:
    lc = layer_costs(m, seq, lay, args)
    per_seq = {k: m.num_layers * lc[k] for k in ("gemm", "attn", "kv_allgather", "kv_ring_exposed", "tp")}
    seqs_per_replica = args.global_batch / lay.dp
    compute = (per_seq["gemm"] + per_seq["attn"]) * seqs_per_replica
    dp_group = lay.dp * lay.cp
    params_per_gpu = _params(m) / lay.tp
    dp_bytes = (dp_group - 1) / dp_group * params_per_gpu * (4 + 2) if dp_group > 1 else 0.0
    dp_bw = (args.ib_gbs if lay.dp > 1 and lay.nodes > 1 else args.nvlink_gbs) * 1e9
    dp_exposed = dp_bytes / dp_bw / m.num_layers  # the last bucket's share
    out = {}
    for scheme, kv in (("all_gather", per_seq["kv_allgather"]), ("p2p ring", per_seq["kv_ring_exposed"])):
        step = compute + (kv + per_seq["tp"]) * seqs_per_replica + dp_exposed
        tokens_per_s_gpu = args.global_batch * seq / step / lay.gpus
        model_flops = training_flops_per_token(m, seq) * tokens_per_s_gpu
        out[scheme] = {"step_s": step, "tok_s_gpu": tokens_per_s_gpu,
                       "mfu": model_flops / (args.peak_tflops * 1e12), "kv_s_per_seq": kv}
    return {"layer": lc, "per_seq": per_seq, "compute_s": compute, "dp_exposed_s": dp_exposed, "schemes": out}


def _params(m: ModelConfig) -> float:
    h, n, g, d, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_hidden_size
    return m.num_layers * (h * (n * d + 2 * g * d) + h * n * d + 3 * h * f + 2 * h) + 2 * h * m.vocab_size + h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--layouts", type=Layout.parse, nargs="+",
                   default=[Layout.parse(x) for x in ("2x4x1@1", "1x8x1@1", "2x4x2@2", "2x8x1@2")])
    p.add_argument("--attn-tflops", type=float, required=True, help="achieved causal attention TFLOP/s per GPU")
    p.add_argument("--gemm-tflops", type=float, required=True, help="achieved GEMM TFLOP/s per GPU")
    p.add_argument("--nvlink-gbs", type=float, required=True, help="achievable intra-node bus bandwidth per GPU, GB/s")
    p.add_argument("--ib-gbs", type=float, required=True, help="achievable inter-node bandwidth per GPU, GB/s")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--no-recompute", dest="recompute", action="store_false")
    args = p.parse_args(argv)
    m = get_preset(args.preset)
    print(f"# {args.preset}, S = {args.seq}, {args.global_batch} sequences/step, recompute={args.recompute}; "
          f"inputs: attention {args.attn_tflops} TFLOP/s, GEMM {args.gemm_tflops} TFLOP/s, NVLink {args.nvlink_gbs} "
          f"GB/s, IB {args.ib_gbs} GB/s per GPU")
    for lay in args.layouts:
        e = step_estimate(m, args.seq, lay, args)
        lc = e["layer"]
        print(f"\n{lay}")
        print(f"  per layer per GPU: GEMM {1e3 * lc['gemm']:.1f} ms, attention {1e3 * lc['attn']:.1f} ms "
              f"({100 * lc['attn_share']:.0f}% of compute), TP/SP comm {1e3 * lc['tp']:.2f} ms, "
              f"K/V {lc['kv_bytes'] / 2**20:.0f} MiB per pass over {'IB' if lc['cp_inter_node'] else 'NVLink'}: "
              f"all-gather {1e3 * lc['kv_allgather']:.2f} ms exposed, ring {1e3 * lc['kv_ring_exposed']:.2f} ms exposed")
        for scheme, r in e["schemes"].items():
            print(f"  {scheme:<10}: step {r['step_s']:.1f} s, {r['tok_s_gpu']:.0f} tokens/s/GPU, MFU {100 * r['mfu']:.1f}%, "
                  f"K/V exposed {r['kv_s_per_seq']:.2f} s per sequence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
