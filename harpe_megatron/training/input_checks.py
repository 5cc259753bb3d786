"""Everything a run reads, checked before it writes anything: data, tokenizer, initial weights.

:func:`validate_run_inputs` is the data checks of :mod:`harpe_megatron.data.validation` plus the
check of ``checkpoint.pretrained`` (it exists and none of its pickled parts can run code when
megatron loads it), which needs the checkpoint package the data package may not import.
"""

from __future__ import annotations

from typing import Optional

from harpe_megatron.checkpoint.layout import resolve_checkpoint_dir
from harpe_megatron.checkpoint.safety import UnsafeCheckpointError, check_megatron_checkpoint
from harpe_megatron.config.run import RunConfig
from harpe_megatron.data.validation import ValidationReport, validate_training_inputs

__all__ = ["check_pretrained", "validate_run_inputs"]


def check_pretrained(cfg: RunConfig) -> None:
    """``checkpoint.pretrained`` (when set) is a complete, safe checkpoint; ValueError naming the key if not."""
    if not cfg.checkpoint.pretrained:
        return
    try:
        check_megatron_checkpoint(resolve_checkpoint_dir(cfg.checkpoint.pretrained))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # UnsafeCheckpointError is a ValueError
        kind = "unsafe" if isinstance(exc, UnsafeCheckpointError) else "unusable"
        raise ValueError(f"checkpoint.pretrained: {kind} checkpoint: {exc}") from None


def validate_run_inputs(cfg: RunConfig, mode: Optional[str] = None, announce: bool = False) -> ValidationReport:
    """:func:`~harpe_megatron.data.validation.validate_training_inputs` with the initial-weights check."""
    return validate_training_inputs(cfg, mode=mode, announce=announce, checks=(check_pretrained,))
