"""Typed configuration: one dataclass per YAML section (see run.py), loaded by loader.py."""

from harpe_megatron.config.loader import ConfigError, config_from_dict, config_to_dict, load_config, save_config
from harpe_megatron.config.model import ModelConfig, ParallelConfig, PositionalConfig
from harpe_megatron.config.run import CheckpointConfig, DataConfig, LoggingConfig, RunConfig, TrainingConfig

__all__ = [
    "ConfigError", "load_config", "config_from_dict", "config_to_dict", "save_config",
    "ModelConfig", "PositionalConfig", "ParallelConfig",
    "DataConfig", "TrainingConfig", "CheckpointConfig", "LoggingConfig", "RunConfig",
]
