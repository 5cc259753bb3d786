"""Plan a config at full scale: a fake world of the run's size, every stage, and fixes that fit.

    python tools/plan_run.py --config CONFIG [key.path=value ...] [--gpu-memory-gib 80] [--nodes N]
                             [--gpus-per-node 8] [--margin-gib 6] [--json OUT] [--no-suggest]

For each plain run the config launches (one, or one per stage) it plans one rank of the
configured layout on ``nodes x gpus_per_node`` ranks (:mod:`harpe_megatron.training.plan`: real
model, optimizer and one forward + backward on fake tensors) and prints the predicted per-rank
peak with its breakdown, counted FLOPs beside the MFU formula's, and whether it fits; when it
does not, the first of (full recompute, half the micro-batch, TP x 2, CP x 2) that fits, planned
too. Exit status 0 when every run fits, 1 when one does not, 2 for a config error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable, Optional

from harpe_megatron.config.run import RunConfig
from harpe_megatron.training.plan import GIB, Builders, RunPlan, fake_world, megatron_layout, plan_layout
from harpe_megatron.training.stages import stage_config
from harpe_megatron.training.trainer import build_optimizer, build_training_model

__all__ = ["plan_run", "plan_configs", "main"]

# the fake process groups have no gloo twins (megatron's gloo groups serve only checkpointing)
_BUILDERS = Builders(model=build_training_model,
                     optimizer=lambda cfg, chunks, iters: build_optimizer(cfg, chunks, iters, use_gloo_process_groups=False))


def _with(cfg: RunConfig, **sections) -> RunConfig:
    """``cfg`` with fields of some sections replaced (``parallel={...}``, ``training={...}``)."""
    changes = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    return dataclasses.replace(cfg, **changes)


def _candidate_fixes(cfg: RunConfig, world_size: int) -> list[tuple[str, RunConfig]]:
    """Changes that lower the per-rank peak, cheapest first; each one valid for ``world_size``."""
    t, p, m = cfg.training, cfg.parallel, cfg.model
    out = []
    if t.recompute_granularity != "full" or (t.recompute_num_layers or 1) != 1:
        out.append(("training.recompute_granularity=full (uniform, 1 layer)",
                    dict(training=dict(recompute_granularity="full", recompute_method="uniform",
                                       recompute_num_layers=1))))
    if t.micro_batch_size > 1:
        out.append((f"training.micro_batch_size={t.micro_batch_size // 2}",
                    dict(training=dict(micro_batch_size=t.micro_batch_size // 2))))
    tp2 = p.tensor_model_parallel_size * 2
    if tp2 <= 8 and m.num_attention_heads % tp2 == 0 and m.num_query_groups % tp2 == 0:
        out.append((f"parallel.tensor_model_parallel_size={tp2} (sequence_parallel)",
                    dict(parallel=dict(tensor_model_parallel_size=tp2, sequence_parallel=True))))
    cp2 = p.context_parallel_size * 2
    out.append((f"parallel.context_parallel_size={cp2}", dict(parallel=dict(context_parallel_size=cp2))))
    valid = []
    for label, change in out:
        try:
            new = _with(cfg, **change)
            new.validate()
            new.validate_for_world(world_size)
        except ValueError:
            continue
        valid.append((label, new))
    return valid


def plan_run(cfg: RunConfig, world_size: int, gpu_memory_gib: Optional[float] = 80.0, margin_gib: float = 6.0,
             name: str = "run", suggest: bool = True, log: Callable[[str], None] = lambda msg: None) -> RunPlan:
    """Plan ``cfg`` on a fake world of ``world_size`` ranks (in a process without a process group).

    When it does not fit ``gpu_memory_gib`` (minus ``margin_gib``) and ``suggest``: plan the
    candidate changes (full recompute, half the micro-batch, TP x 2, CP x 2) one by one and
    record the first that fits in ``plan.suggestion``.
    """
    cfg.validate_for_world(world_size)
    with fake_world(world_size):
        with megatron_layout(cfg):
            plan = plan_layout(cfg, world_size, _BUILDERS, name=name)
        plan.gpu_memory_gib, plan.margin_gib = gpu_memory_gib, margin_gib
        log(plan.summary())
        if plan.fits is False and suggest:
            for label, candidate in _candidate_fixes(cfg, world_size):
                with megatron_layout(candidate):
                    alt = plan_layout(candidate, world_size, _BUILDERS, name=f"{name} + {label}")
                alt.gpu_memory_gib, alt.margin_gib = gpu_memory_gib, margin_gib
                log(f"  checked: {alt.summary()}")
                if alt.fits:
                    plan.suggestion = {"change": label, "peak_gib": round(alt.peak_gib, 3),
                                       "layout": alt.layout}
                    break
    return plan


def plan_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """(label, config) of every plain run ``cfg`` launches: itself, or one per stage."""
    if not cfg.stages:
        return [("run", cfg)]
    return [(f"stage {i} ({s.name})", stage_config(cfg, i, s, cfg.checkpoint.pretrained))
            for i, s in enumerate(cfg.stages)]


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
    from harpe_megatron.cli import quiet_library_warnings

    p = argparse.ArgumentParser(prog="tools/plan_run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--margin-gib", type=float, default=6.0,
                   help="kept free for CUDA context, NCCL buffers, fragmentation (default 6)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--json", default=None, help="write the plan(s) as JSON here")
    p.add_argument("--no-suggest", action="store_true", help="do not search for a change that fits")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.micro_batch_size=2")
    args = p.parse_args(argv)
    quiet_library_warnings()
    from harpe_megatron.config.loader import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        world = args.nodes * args.gpus_per_node
        runs = plan_configs(cfg)
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
        with open(args.json, "w") as f:
            json.dump(data[0] if len(data) == 1 else data, f, indent=2)
            f.write("\n")
    return 0 if all(pl.fits is not False for pl in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
