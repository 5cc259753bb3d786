"""Worker for the training tests: run the real trainer on the current gloo process group."""

from __future__ import annotations

from harpe_megatron.config import load_config
from harpe_megatron.training.trainer import TrainResult, train


def train_with(config_path: str, overrides: list[str]) -> TrainResult:
    return train(load_config(config_path, overrides))


def stages_with(config_path: str, overrides: list[str]) -> list:
    """The multi-stage schedule of the config, as one launch."""
    from harpe_megatron.training.stages import run_stages

    return run_stages(load_config(config_path, overrides))


def stages_by_hand(config_path: str, overrides: list[str], run_dir: str) -> list:
    """Each stage as a separate plain run, initialised from the previous stage's checkpoint."""
    import dataclasses

    cfg = load_config(config_path, overrides)
    results, pretrained = [], cfg.checkpoint.pretrained
    for i, stage in enumerate(cfg.stages):
        data = dataclasses.replace(cfg.data, seq_length=stage.seq_length)
        from harpe_megatron.positional.bases import ConstantBase

        positional = dataclasses.replace(cfg.positional, bases=ConstantBase(base=stage.rope_base))
        training = dataclasses.replace(cfg.training, train_iters=stage.train_iters, lr=stage.lr)
        save = f"{run_dir}/by_hand_{i}"
        checkpoint = dataclasses.replace(cfg.checkpoint, save=save, pretrained=pretrained)
        plain = dataclasses.replace(cfg, data=data, positional=positional, training=training,
                                    checkpoint=checkpoint, run_dir=save, stages=None)
        results.append(train(plain))
        pretrained = save
    return results


def train_methods(config_path: str, base: list[str], methods: dict[str, list[str]], root: str) -> dict:
    """Train each method (a set of overrides) a few steps in this process group; their results."""
    return {name: train(load_config(config_path, base + extra + [f"run_dir={root}/{name}"]))
            for name, extra in methods.items()}
