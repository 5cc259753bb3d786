#!/usr/bin/env python
"""The docs/performance.md memory table: plan every shipped 7B config (each stage of a
multi-stage one) on 1 and 4 nodes of 8 GPUs, and judge it against 80 GiB and 141 GiB GPUs.

    python scripts/bench/plan_table.py [--nodes 1 4] [--margin-gib 6] [--json out.json]

Each row is one run of the planner (harpe_megatron.planner.plan, fake tensors, CPU only); the
memory plan does not depend on the GPU, so one plan serves both capacities. Where a row does not
fit a capacity, the planner's checked fix for that capacity is planned and printed too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from harpe_megatron.cli.common import quiet_library_warnings  # noqa: E402

CAPACITIES = (80.0, 141.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--margin-gib", type=float, default=6.0)
    p.add_argument("--configs", nargs="*", default=None, help="default: configs/llama2_7b_*.yaml")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    quiet_library_warnings()
    from harpe_megatron.config.loader import load_config, plain_run_configs
    from harpe_megatron.planner.plan_run import plan_run
    import torch

    from scripts.bench.common import device_description

    configs = args.configs or sorted(str(c.relative_to(ROOT)) for c in (ROOT / "configs").glob("llama2_7b_*.yaml"))
    rows, out = [], []
    print(f"machine: {device_description(torch.device('cpu'))} (planner: fake tensors, no GPU)", flush=True)
    for path in configs:
        cfg = load_config(ROOT / path)
        for label, run_cfg in plain_run_configs(cfg):
            for nodes in args.nodes:
                world = 8 * nodes
                plan = plan_run(run_cfg, world, gpu_memory_gib=None, margin_gib=args.margin_gib, suggest=False,
                                name=f"{path} [{label}]")
                verdicts = []
                for cap in CAPACITIES:
                    fits = plan.peak_gib + args.margin_gib <= cap
                    fix = ""
                    if not fits:
                        alt = plan_run(run_cfg, world, gpu_memory_gib=cap, margin_gib=args.margin_gib,
                                       name=f"{path} [{label}]")
                        fix = f" (fits with {alt.suggestion['change']}: {alt.suggestion['peak_gib']:.1f} GiB)" \
                            if alt.suggestion else " (no single checked change fits)"
                    verdicts.append(("yes" if fits else "**no**") + fix)
                lay = plan.layout
                gib = {k: v / 2**30 for k, v in plan.breakdown_bytes.items()}
                logits_max = plan.category_max_bytes["logits_and_loss"] / 2**30
                name = Path(path).stem + ("" if label == "run" else f" / {label.split('(')[1].rstrip(')')}")
                row = (f"| {name} | {plan.seq_length:,} | {lay['tp']}x{lay['cp']}x{lay['dp']} ({world}) | "
                       f"{plan.micro_batch_size} | {plan.recompute} | **{plan.peak_gib:.1f}** | "
                       f"{gib['params_bf16']:.1f} / {gib['main_grads_fp32']:.1f} / {gib['optimizer_shard']:.1f} | "
                       f"{gib['activations']:.1f} / {gib['cp_kv_gathered']:.2f} | {logits_max:.2f} | "
                       f"{plan.flops_per_step / plan.analytic_flops_per_step:.4f} | {verdicts[0]} | {verdicts[1]} | "
                       f"{plan.planning_s:.0f} s |")
                print(row, flush=True)
                rows.append(row)
                out.append(plan.to_json() | {"nodes": nodes})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print("\n| config | seq | TPxCPxDP (GPUs) | mbs | recompute | peak GiB/rank | params / grads / optimizer GiB "
          "| at the peak: activations / CP K/V GiB | logits+loss max GiB | counted/analytic FLOPs | fits 80 GiB | fits 141 GiB | planned in |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
