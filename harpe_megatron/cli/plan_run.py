"""``python tools/plan_run.py`` (``harpe-plan-run``): plan a config at full scale without a GPU.

    python tools/plan_run.py --config CONFIG [key.path=value ...] [--gpu-memory-gib 80] [--nodes N]
                             [--gpus-per-node 8] [--margin-gib 6] [--json OUT] [--no-suggest]

For each plain run the config launches (one, or one per stage) it plans one rank of the
configured layout on ``nodes x gpus_per_node`` ranks (:mod:`harpe_megatron.planner.plan`: real
model, optimizer and one forward + backward on fake tensors) and prints the predicted per-rank
peak with its breakdown, counted FLOPs beside the MFU formula's, and whether it fits; when it
does not, the first of (full recompute, half the micro-batch, TP x 2, CP x 2) that fits, planned
too. Exit status 0 when every run fits, 1 when one does not, 2 for a config error or a
meaningless argument (zero nodes or GPUs, no memory, a --json that cannot be written: all checked
before the planning).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from harpe_megatron.cli.common import OneLineParser, at_least, check_output_path, quiet_library_warnings
from harpe_megatron.config.loader import ConfigError, load_config, plain_run_configs
from harpe_megatron.planner.plan import GIB, RunPlan
from harpe_megatron.planner.plan_run import plan_run

__all__ = ["main"]


def _report(plan: RunPlan) -> str:
    lines = [plan.summary()]
    lines.append("  breakdown at the peak (GiB): " + ", ".join(
        f"{k} {v / GIB:.2f}" for k, v in plan.breakdown_bytes.items()))
    lines.append("  each category's own maximum (GiB): " + ", ".join(
        f"{k} {v / GIB:.2f}" for k, v in plan.category_max_bytes.items() if k not in ("params_bf16", "main_grads_fp32")))
    lines.append(f"  FLOPs per step (all ranks): counted {plan.flops_per_step:.4e} (+ recompute: "
                 f"{plan.executed_flops_per_step:.4e} executed), analytic (MFU formula) "
                 f"{plan.analytic_flops_per_step:.4e}, ratio {plan.flops_per_step / plan.analytic_flops_per_step:.4f}")
    if plan.suggestion:
        lines.append(f"  would fit with {plan.suggestion['change']}: {plan.suggestion['peak_gib']:.2f} GiB (planned)")
    elif plan.fits is False:
        lines.append("  no single checked change fits")
    lines.append(f"  planned in {plan.planning_s:.1f} s")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = OneLineParser(prog="tools/plan_run.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--gpu-memory-gib", type=at_least(0.0, float, "a number", strict=True), default=80.0,
                   help="memory of one GPU (default 80)")
    p.add_argument("--margin-gib", type=at_least(0.0, float, "a number"), default=6.0,
                   help="kept free for CUDA context, NCCL buffers, fragmentation (default 6)")
    p.add_argument("--nodes", type=at_least(1), default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=at_least(1), default=8)
    p.add_argument("--json", default=None, help="write the plan(s) as JSON here")
    p.add_argument("--no-suggest", action="store_true", help="do not search for a change that fits")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.micro_batch_size=2")
    args = p.parse_args(argv)
    if args.margin_gib >= args.gpu_memory_gib:
        p.error(f"--margin-gib {args.margin_gib:g} leaves nothing of --gpu-memory-gib {args.gpu_memory_gib:g} "
                "for the run")
    quiet_library_warnings()

    try:
        if args.json:
            check_output_path(args.json, "--json")  # before the planning, which takes minutes at full scale
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        world = args.nodes * args.gpus_per_node
        runs = plain_run_configs(cfg)
        for _, run_cfg in runs:
            run_cfg.validate_for_world(world)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    plans = []
    for label, run_cfg in runs:
        plan = plan_run(run_cfg, world, args.gpu_memory_gib, args.margin_gib, name=f"{args.config} [{label}]",
                        suggest=not args.no_suggest)
        print(_report(plan), flush=True)
        plans.append(plan)
    if args.json:
        data = [pl.to_json() for pl in plans]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data[0] if len(data) == 1 else data, f, indent=2)
            f.write("\n")
    return 0 if all(pl.fits is not False for pl in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
