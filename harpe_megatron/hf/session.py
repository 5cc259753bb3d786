"""megatron-core on CPU in one process, and the full-size (TP=1) model layout both conversions use.

Conversion always runs on CPU (also on GPU machines) at TP=PP=CP=1: a TP=1 model built on the
``meta`` device (no memory) gives the checkpoint layout (checkpoint/sharded_layout.py) that the
import writes and the export reads; megatron's dist checkpointing reshards it on load, and the
export reads checkpoints saved at any layout through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from harpe_megatron.checkpoint.sharded_layout import ModelLayout, model_layout
from harpe_megatron.config.model import ModelConfig, ParallelConfig, PositionalConfig
from harpe_megatron.distributed.bringup import free_port, init_process_group, megatron_parallel
from harpe_megatron.model.builder import build_model, transformer_config

__all__ = ["megatron_cpu_session", "build_full_model", "checkpoint_layout"]


@contextlib.contextmanager
def megatron_cpu_session() -> Iterator[None]:
    """megatron parallel state for TP=PP=CP=1 in this process, on CPU (also on GPU machines).

    Reuses a 1-rank process group if one exists (else creates a gloo one and destroys it after).
    Must not be entered while a megatron parallel state is already initialised.
    """
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("checkpoint conversion must run outside an initialised megatron parallel state")
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError(f"checkpoint conversion runs in one process; this process group has "
                           f"{dist.get_world_size()} ranks")
    created = init_process_group("cpu", rank=0, world_size=1, port=None if dist.is_initialized() else free_port())
    try:
        with megatron_parallel(device="cpu"):
            yield
    finally:
        if created:
            dist.destroy_process_group()


def build_full_model(m: ModelConfig, positional: PositionalConfig, dtype: torch.dtype, vocab_rows: int):
    """A TP=1 HarpeGPTModel on CPU with ``vocab_rows`` embedding rows (the padded vocabulary a
    checkpoint is for, ``config.model.padded_vocab_size``); parameters left uninitialised."""
    if vocab_rows < m.vocab_size:
        raise ValueError(f"padded vocabulary {vocab_rows} is smaller than model.vocab_size {m.vocab_size}")
    # padded_vocab_size(v, 1, rows) == rows for any v <= rows: this gives the model exactly that many rows.
    sized = dataclasses.replace(m, make_vocab_size_divisible_by=vocab_rows)
    cfg = transformer_config(sized, ParallelConfig(), params_dtype=dtype, use_cpu_initialization=True,
                             positional=positional, perform_initialization=False)
    model = build_model(sized, positional, cfg, max_sequence_length=m.pretrained_context_length,
                        use_transformer_engine=False)
    return model.eval()


def checkpoint_layout(m: ModelConfig, positional: PositionalConfig, dtype: torch.dtype, vocab_rows: int) -> ModelLayout:
    """What a TP=1 checkpoint of this model holds (built on the ``meta`` device: shapes only).
    Needs :func:`megatron_cpu_session`."""
    with torch.device("meta"):
        model = build_full_model(m, positional, dtype, vocab_rows)
    return model_layout(model)
