"""Process-group and megatron parallel-state set-up for a training run.

Reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a run
started as a plain ``python`` process is a world of one. Backend: NCCL on CUDA, gloo on CPU, where
the CPU harness (harpe_megatron.testing.cpu) is entered for the whole run. If a process group
already exists (tests), it is reused.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from harpe_megatron.config.loader import ConfigError
from harpe_megatron.config.run import RunConfig
from harpe_megatron.testing.cpu import cpu_megatron

__all__ = ["distributed_run"]


def _init_process_group(timeout_s: float) -> None:
    if dist.is_initialized():
        return
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            from harpe_megatron.testing.distributed import free_port

            os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def _seed(seed: int) -> None:
    # The same seed on every rank: data order comes from the sampler, and weights are either
    # loaded or initialised on CPU from the full tensor (use_cpu_initialization), so model
    # parallel ranks need no seed offsets for correctness.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def distributed_run(cfg: RunConfig) -> Iterator[None]:
    """Initialise (or reuse) the process group and megatron's parallel state for ``cfg``.

    A world size the layout or batch size cannot divide raises ``ConfigError`` (on every rank).
    Collectives time out after ``training.distributed_timeout_s`` (a process group that already
    exists keeps its own timeout; megatron's sub-groups take it in whole minutes, at least one).
    """
    timeout_s = cfg.training.distributed_timeout_s
    _init_process_group(timeout_s)
    try:
        cfg.validate_for_world(dist.get_world_size())
    except ValueError as exc:  # the same on every rank: one line and exit 2 from the CLI
        raise ConfigError(str(exc)) from None
    on_cpu = not torch.cuda.is_available()
    with cpu_megatron() if on_cpu else contextlib.nullcontext():
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
            context_parallel_size=cfg.parallel.context_parallel_size,
            distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
        )
        _seed(cfg.training.seed)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
