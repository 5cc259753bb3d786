"""The one bring-up of torch.distributed and megatron's parallel state.

Training (``training/initialize.py``), checkpoint conversion (``hf/session.py``), the tests and the
benchmarks all enter :func:`megatron_parallel`; it differs between them only by its arguments.

* Device: ``device="auto"`` is ``cuda`` when CUDA is available, else ``cpu``; ``cpu`` enters the
  CUDA->CPU redirection (:mod:`harpe_megatron.distributed.cpu`) for the whole body and is the
  only way it is entered. ``cuda`` without a GPU is an error, not a silent fallback.
* Process group: :func:`init_process_group` reads the torchrun environment (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain ``python`` process is a world of one on a free
  loopback port. NCCL on ``cuda``, gloo on ``cpu``. An existing process group is reused. An
  address it chooses itself (a given ``port``, or a world of one without MASTER_ADDR/MASTER_PORT)
  goes to torch as a ``tcp://`` init method: the process environment is never changed, so child
  processes do not inherit a rendezvous that was only this process's.
* Seeding: the same seed on every rank for Python's, numpy's and torch's generators, plus
  megatron's CUDA RNG tracker on ``cuda`` (weights are initialised on CPU from the full tensor or
  loaded, so model-parallel ranks need no seed offsets for correctness).
* Teardown: megatron's ``destroy_model_parallel`` only drops its references to the sub-groups it
  made; each gloo group keeps ~3 threads polling its sockets until the process ends. A clean exit
  from :func:`megatron_parallel` therefore waits for every rank (a barrier on the default group) and
  destroys the groups made inside it, so a long-lived process (a notebook, the test suite) that
  brings megatron up many times does not accumulate thousands of threads (docs/cpu_harness.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
from datetime import timedelta
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from harpe_megatron.distributed.cpu import cpu_megatron
from harpe_megatron.log import get_logger

__all__ = ["DEVICES", "current_device", "describe_device", "free_port", "init_process_group", "megatron_parallel",
           "resolve_device", "seed_all"]

DEVICES = ("auto", "cuda", "cpu")
_log = get_logger(__name__)


def resolve_device(setting: str = "auto") -> str:
    """``auto`` / ``cuda`` / ``cpu`` -> ``cuda`` or ``cpu``; ``cuda`` without a GPU raises ValueError."""
    if setting not in DEVICES:
        raise ValueError(f"device: expected one of {list(DEVICES)}, got {setting!r}")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but torch sees no CUDA device (set device: cpu or auto)")
    return setting


def current_device() -> int | str:
    """Where this process puts new tensors: the current CUDA device when CUDA is available, else ``"cpu"``."""
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def describe_device(device: str) -> str:
    """The one line announcing the backend of a run."""
    if device == "cpu":
        return "device: cpu (gloo; megatron's CUDA calls redirected to CPU, docs/cpu_harness.md)"
    return f"device: cuda ({torch.cuda.get_device_name()}, nccl)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: str = "auto", *, rank: Optional[int] = None, world_size: Optional[int] = None,
                       port: Optional[int] = None, timeout_s: float = 600.0) -> bool:
    """Initialise the default process group unless one exists; returns whether it was created here.

    ``rank`` / ``world_size`` / ``port`` default to the torchrun environment; a given ``port``
    means a loopback rendezvous on 127.0.0.1 (the tests' spawned ranks).
    """
    if dist.is_initialized():
        return False
    device = resolve_device(device)
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    init_method = "env://"  # MASTER_ADDR / MASTER_PORT, as torchrun sets them
    if port is not None:
        init_method = f"tcp://127.0.0.1:{port}"
    elif world_size == 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        init_method = (f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:"
                       f"{os.environ.get('MASTER_PORT') or free_port()}")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return True


def _live_groups() -> set:
    """The process groups torch holds now besides the default one (``_world.pg_map``: a torch
    internal present in every supported torch; without it nothing is destroyed)."""
    world = getattr(dist.distributed_c10d, "_world", None)
    groups = getattr(world, "pg_map", None)
    if not dist.is_initialized() or groups is None:
        return set()
    return set(groups) - {dist.group.WORLD}


def _destroy_groups_made_since(before: set) -> None:
    """Destroy the sub-groups created after ``before`` was taken, once every rank got here."""
    made = _live_groups() - before
    if not made:
        return
    if dist.get_world_size() > 1:
        dist.barrier()  # no rank still has a collective in flight on a group about to go
    for group in made:
        dist.destroy_process_group(group)


def seed_all(seed: int, device: str) -> None:
    """The same seed for Python, numpy and torch on every rank (and megatron's CUDA tracker on cuda)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def megatron_parallel(tp: int = 1, pp: int = 1, cp: int = 1, *, seed: Optional[int] = 1234, device: str = "auto",
                      timeout_s: Optional[float] = None, gloo_groups: bool = True, announce: bool = False
                      ) -> Iterator[str]:
    """megatron ``parallel_state`` for (tp, pp, cp) on the current process group, torn down after.

    Yields the resolved device. ``seed=None`` leaves every generator as it is (the memory
    planner). ``timeout_s`` sets megatron's sub-group timeout (whole minutes, at least one).
    ``gloo_groups=False`` skips megatron's gloo twins of its groups (they serve only
    checkpointing; torch's fake backend cannot host them). ``announce`` logs the device line.
    """
    from megatron.core import parallel_state

    device = resolve_device(device)
    if announce:
        _log.info(describe_device(device))
    kwargs = {} if timeout_s is None else {"distributed_timeout_minutes": max(1, math.ceil(timeout_s / 60))}
    if not gloo_groups:
        kwargs["create_gloo_process_groups"] = False
    with cpu_megatron() if device == "cpu" else contextlib.nullcontext():
        parallel_state.destroy_model_parallel()
        groups_before = _live_groups()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp, **kwargs)
        if seed is not None:
            seed_all(seed, device)
        clean_exit = False
        try:
            yield device
            clean_exit = True
        finally:
            parallel_state.destroy_model_parallel()
            # after a raise with peers, the barrier could wait for a dead one: the groups go with the process
            if clean_exit or (dist.is_initialized() and dist.get_world_size() == 1):
                _destroy_groups_made_since(groups_before)
