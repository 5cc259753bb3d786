"""Worker for the training tests: run the real trainer on the current gloo process group."""

from __future__ import annotations

from harpe_megatron.config import load_config
from harpe_megatron.training.trainer import TrainResult, train


def train_with(config_path: str, overrides: list[str]) -> TrainResult:
    return train(load_config(config_path, overrides))
