"""Process group and megatron parallel state for a training run (the package's one bring-up).

Everything here is :mod:`harpe_megatron.distributed.bringup` with the run config's settings:
``training.device`` (auto / cuda / cpu; announced in one log line), the parallel layout,
``training.seed`` and ``training.distributed_timeout_s``. If a process group already exists
(tests), it is reused.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist

from harpe_megatron.config.loader import ConfigError
from harpe_megatron.config.run import RunConfig
from harpe_megatron.distributed.bringup import init_process_group, megatron_parallel, resolve_device

__all__ = ["distributed_run"]


@contextlib.contextmanager
def distributed_run(cfg: RunConfig) -> Iterator[None]:
    """Initialise (or reuse) the process group and megatron's parallel state for ``cfg``.

    A world size the layout or batch size cannot divide raises ``ConfigError`` (on every rank), as
    does ``training.device: cuda`` on a machine without CUDA. Collectives time out after
    ``training.distributed_timeout_s`` (a process group that already exists keeps its own timeout;
    megatron's sub-groups take it in whole minutes, at least one).
    """
    try:
        device = resolve_device(cfg.training.device)
    except ValueError as exc:
        raise ConfigError(f"training.{exc}") from None
    timeout_s = cfg.training.distributed_timeout_s
    init_process_group(device, timeout_s=timeout_s)
    try:
        cfg.validate_for_world(dist.get_world_size())
    except ValueError as exc:  # the same on every rank: one line and exit 2 from the CLI
        raise ConfigError(str(exc)) from None
    p = cfg.parallel
    with megatron_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                           seed=cfg.training.seed, device=device, timeout_s=timeout_s,
                           announce=dist.get_rank() == 0):
        yield
