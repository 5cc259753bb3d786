"""Multi-stage schedules (e.g. multi-stage ABF) as one launch.

Stage ``i`` is the run config with the stage's fields replaced (sequence length, one RoPE base,
length, learning rate, batch size), its own run directory ``<run_dir>/<i>_<name>/`` and, as
initial weights, the final checkpoint of stage ``i-1`` (stage 0: the run's
``checkpoint.pretrained``). Each stage resumes on its own like any run, so a schedule that is
stopped mid-stage continues there when launched again; stages that already reached their last
step are skipped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harpe_megatron.checkpoint.save_load import find_latest
from harpe_megatron.config.run import RunConfig, StageConfig
from harpe_megatron.positional.bases import ConstantBase
from harpe_megatron.training.trainer import TrainResult, train

__all__ = ["stage_config", "run_stages"]


def stage_config(cfg: RunConfig, index: int, stage: StageConfig, pretrained: str | None) -> RunConfig:
    """The plain run config of one stage."""
    data = dataclasses.replace(cfg.data, seq_length=stage.seq_length or cfg.data.seq_length)
    positional = cfg.positional
    if stage.rope_base is not None:
        positional = dataclasses.replace(positional, bases=ConstantBase(base=stage.rope_base))
    training = dataclasses.replace(
        cfg.training, train_iters=stage.train_iters, train_tokens=stage.train_tokens,
        lr=stage.lr if stage.lr is not None else cfg.training.lr,
        min_lr=stage.min_lr if stage.min_lr is not None else min(cfg.training.min_lr, stage.lr or cfg.training.lr),
        global_batch_size=stage.global_batch_size or cfg.training.global_batch_size,
    )
    run_dir = Path(cfg.run_dir) / f"{index}_{stage.name}"
    checkpoint = dataclasses.replace(cfg.checkpoint, save=str(run_dir / "checkpoints"), load=None,
                                     pretrained=pretrained)
    return dataclasses.replace(cfg, data=data, positional=positional, training=training,
                               checkpoint=checkpoint, run_dir=str(run_dir), stages=None)


def run_stages(cfg: RunConfig) -> list[TrainResult | None]:
    """Run every stage in order (collective); returns each stage's result (None if skipped).

    A preempted stage ends the list (its result has ``preempted=True``).
    """
    if not cfg.stages:
        raise ValueError("run_stages needs a config with stages")
    results: list[TrainResult | None] = []
    pretrained = cfg.checkpoint.pretrained
    for i, stage in enumerate(cfg.stages):
        scfg = stage_config(cfg, i, stage, pretrained)
        last = find_latest(scfg.checkpoint.save)
        total = scfg.training.resolved_train_iters(scfg.data.seq_length)
        if last is not None and int(last.name.split("_")[1]) >= total:
            results.append(None)  # finished in an earlier launch
        else:
            results.append(train(scfg))
            if results[-1].preempted:
                break  # the next launch resumes this stage; later stages have not started
        pretrained = scfg.checkpoint.save
    return results
