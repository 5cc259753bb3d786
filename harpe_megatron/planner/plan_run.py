"""Plan a config at full scale: a fake world of the run's size, every stage, and fixes that fit.

For each plain run the config launches (one, or one per stage), :func:`plan_run` plans one rank of
the configured layout on ``world_size`` ranks (:mod:`harpe_megatron.planner.plan`: real model,
optimizer and one forward + backward on fake tensors): the predicted per-rank peak with its
breakdown, counted FLOPs beside the MFU formula's, and whether it fits; when it does not, the first
of (full recompute, half the micro-batch, TP x 2, CP x 2) that fits, planned too. The command is
:mod:`harpe_megatron.cli.plan_run`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from harpe_megatron.config.run import RunConfig
from harpe_megatron.planner.plan import Builders, RunPlan, fake_world, megatron_layout, plan_layout
from harpe_megatron.step.build import build_optimizer, build_training_model

__all__ = ["plan_run"]

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
