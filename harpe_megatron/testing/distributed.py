"""Multi-process gloo runner: run one function on N CPU ranks with megatron's parallel state.

``run_distributed(fn, world_size, tp=2, cp=1, ...)`` spawns ``world_size`` fresh processes (spawn
start method: no inherited state), initialises a gloo process group over loopback, megatron's
``parallel_state`` for the requested layout and the CPU harness, calls ``fn(*args)`` on every
rank and returns the per-rank results (which must be picklable). A rank that raises makes the
whole call raise with that rank's traceback; a run that exceeds ``timeout`` is killed.

``megatron_parallel(tp, pp, cp)`` is the in-process part, usable on its own in one process
(world size 1) or to switch layouts inside a worker.
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_lib
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harpe_megatron.testing.cpu import cpu_megatron

__all__ = ["free_port", "init_gloo", "megatron_parallel", "run_distributed"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float = 120.0) -> None:
    """Initialise the default gloo process group on loopback (no-op if already initialised)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


@contextlib.contextmanager
def megatron_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234) -> Iterator[None]:
    """megatron ``parallel_state`` for (tp, pp, cp) on the current process group, torn down after.

    On a machine without CUDA the CPU harness is active inside; with CUDA, megatron's own CUDA
    RNG tracker is seeded instead and nothing is redirected.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_gpu = torch.cuda.is_available()
    with contextlib.nullcontext() if on_gpu else cpu_megatron(seed=seed):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
        )
        if on_gpu:
            torch.manual_seed(seed)
            model_parallel_cuda_manual_seed(seed)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()


def _worker(rank: int, world_size: int, port: int, layout: dict, fn: Callable, args: tuple, out: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_gloo(rank, world_size, port)
        with megatron_parallel(**layout):
            result = fn(*args)
        out.put((rank, True, result))
    except BaseException:  # report everything, including assertion errors, to the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable,
    world_size: int,
    *args: Any,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    timeout: float = 300.0,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; returns the results ordered by rank.

    ``fn`` must be importable by module path (spawned processes import it).
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    layout = dict(tp=tp, pp=pp, cp=cp, seed=seed)
    procs = [
        # not daemonic: ranks start processes of their own (dist_checkpointing writers)
        ctx.Process(target=_worker, args=(r, world_size, port, layout, fn, args, out), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(failures) < world_size:
            try:
                rank, ok, payload = out.get(timeout=1.0)
            except queue_lib.Empty:
                pending = sorted(set(range(world_size)) - set(results))
                dead = [r for r in pending if not procs[r].is_alive()]
                if dead:
                    raise RuntimeError(
                        f"run_distributed: rank(s) {dead} exited (codes "
                        f"{[procs[r].exitcode for r in dead]}) without a result"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"run_distributed: ranks {pending} gave no result within {timeout:.0f}s"
                    ) from None
                continue
            if ok:
                results[rank] = payload
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break  # the other ranks are probably stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
            if p.is_alive():
                p.kill()
    if failures:
        raise RuntimeError("run_distributed: a rank failed\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]
