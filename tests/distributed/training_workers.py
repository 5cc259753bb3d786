"""Worker for the training tests: run the real trainer on the current gloo process group."""

from __future__ import annotations

from harpe_megatron.config import load_config
from harpe_megatron.training.trainer import TrainResult, run_training


def train_with(config_path: str, overrides: list[str]) -> TrainResult:
    return run_training(load_config(config_path, overrides))


def stages_with(config_path: str, overrides: list[str]) -> list:
    """The multi-stage schedule of the config, as one launch."""
    from harpe_megatron.training.stages import run_stages

    return run_stages(load_config(config_path, overrides))


def stages_by_hand(config_path: str, common: list[str], per_stage: list[list[str]], root: str) -> list:
    """Each stage as a separate plain run (the run's overrides plus the stage's), initialised from
    the previous stage's checkpoint."""
    results, pretrained = [], None
    for i, overrides in enumerate(per_stage):
        run_dir = f"{root}/by_hand_{i}"
        extra = [f"run_dir={run_dir}"] + ([f"checkpoint.pretrained={pretrained}"] if pretrained else [])
        results.append(run_training(load_config(config_path, common + overrides + extra)))
        pretrained = f"{run_dir}/checkpoints"
    return results


def train_methods(config_path: str, base: list[str], methods: dict[str, list[str]], root: str) -> dict:
    """Train each method (a set of overrides) a few steps in this process group; their results."""
    return {name: run_training(load_config(config_path, base + extra + [f"run_dir={root}/{name}"]))
            for name, extra in methods.items()}
