"""Test helper: run one function on N spawned gloo ranks with megatron's parallel state.

``run_distributed(fn, world_size, tp=2, cp=1, ...)`` spawns ``world_size`` fresh processes (spawn
start method: no inherited state), brings up a gloo process group over loopback and megatron's
parallel state through the package's one bring-up
(:func:`harpe_megatron.distributed.bringup.megatron_parallel`), calls ``fn(*args)`` on every rank
and returns the per-rank results (which must be picklable). A rank that raises makes the whole
call raise with that rank's traceback; a run that exceeds ``timeout`` is killed.
"""

from __future__ import annotations

import pickle
import queue as queue_lib
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harpe_megatron.distributed.bringup import free_port, init_process_group, megatron_parallel

__all__ = ["run_distributed"]


def _worker(rank: int, world_size: int, port: int, layout: dict, fn: Callable, args: tuple, out: Any) -> None:
    try:
        torch.set_num_threads(1)
        init_process_group("cpu", rank=rank, world_size=world_size, port=port, timeout_s=120.0)
        with megatron_parallel(**layout, device="cpu"):
            result = fn(*args)
        # by value: torch's queue would share tensors through a file descriptor served by this
        # process, which may have exited by the time the parent unpickles them
        out.put((rank, True, pickle.dumps(result)))
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
                results[rank] = pickle.loads(payload)
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
