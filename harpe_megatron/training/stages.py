"""Multi-stage schedules (e.g. multi-stage ABF) as one launch.

A stage is a name and dotted overrides of the run config (:class:`~harpe_megatron.config.run.StageConfig`),
so any setting can change between stages: sequence length and RoPE base (multi-stage ABF), a
scaling factor, the position-id scheme, learning rate, batch size, ...:

```yaml
stages:
  - {name: abf_1e6_32k, overrides: {data.seq_length: 32768, positional.bases.base: 1.0e6, training.train_tokens: 2.0e9}}
  - {name: abf_2e6_64k, overrides: {data.seq_length: 65536, positional.bases.base: 2.0e6, training.train_tokens: 2.0e9}}
```

Stage ``i`` is the run config with the stage's overrides applied
(:func:`~harpe_megatron.config.loader.stage_config`; every stage is validated when the config
loads), its own run directory ``<run_dir>/<i>_<name>/`` and, as initial weights, the final
checkpoint of stage ``i-1`` (stage 0: the run's ``checkpoint.pretrained``). Each stage resumes on
its own like any run, so a schedule that is stopped mid-stage continues there when launched again;
stages that already reached their last step are skipped.
"""

from __future__ import annotations

from harpe_megatron.checkpoint.layout import checkpoint_step
from harpe_megatron.checkpoint.save_load import find_latest
from harpe_megatron.config.loader import stage_config
from harpe_megatron.config.run import RunConfig
from harpe_megatron.training.trainer import TrainResult, run_training

__all__ = ["run_stages"]


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
        if last is not None and checkpoint_step(last) >= total:
            results.append(None)  # finished in an earlier launch
        else:
            results.append(run_training(scfg))
            if results[-1].preempted:
                break  # the next launch resumes this stage; later stages have not started
        pretrained = scfg.checkpoint.save
    return results
