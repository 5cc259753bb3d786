"""Fault injection for the reliability tests: ``HARPE_FAULT_INJECT`` (test-only, off when unset).

The variable holds ``;``-separated faults ``kind@steps[:rank]``; ``steps`` is one step or a
``,``-separated list, ``rank`` limits the fault to one global rank (default: every rank)::

    HARPE_FAULT_INJECT="nan_loss@3,6,7"           # the loss (hence every gradient) is NaN at these steps
    HARPE_FAULT_INJECT="crash_in_save@8:1"        # rank 1 os._exit(137)s mid-save of step 8
    HARPE_FAULT_INJECT="exit@5:1"                 # rank 1 os._exit(1)s 0.5 s into step 5
    HARPE_FAULT_INJECT="hang@5:1"                 # rank 1 freezes (SIGSTOP to itself) as step 5 starts
    HARPE_FAULT_INJECT="disk_full@8:1"            # rank 1's write of step 8's checkpoint fails (ENOSPC)
    HARPE_FAULT_INJECT="slow_save@8"              # the save of step 8 pauses 3 s half-way (tests signal it)

Steps count from 1 like the console line (the step being run or saved). Nothing reads the
variable except :func:`fault_at`; an unknown kind fails at start with the list of known kinds.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Optional

from torch.distributed.checkpoint.api import CheckpointException

from harpe_megatron.checkpoint.save_load import SaveHooks

__all__ = ["ENV_VAR", "KINDS", "SaveFaults", "parse_faults", "fault_at", "maybe_die"]

ENV_VAR = "HARPE_FAULT_INJECT"
KINDS = ("nan_loss", "crash_in_save", "exit", "hang", "disk_full", "slow_save")
SLOW_SAVE_S = 3.0  # how long ``slow_save`` pauses a save (tests signal the launcher meanwhile)


def parse_faults(spec: str) -> list[tuple[str, set[int], Optional[int]]]:
    """``"kind@s1,s2[:rank];..."`` -> ``[(kind, {steps}, rank or None), ...]``."""
    faults = []
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        try:
            kind, rest = item.split("@", 1)
            steps, _, rank = rest.partition(":")
            parsed = (kind.strip(), {int(s) for s in steps.split(",")}, int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"{ENV_VAR}: cannot parse {item!r}; expected kind@step[,step...][:rank]") from None
        if parsed[0] not in KINDS:
            raise ValueError(f"{ENV_VAR}: unknown fault kind {parsed[0]!r}; known: {', '.join(KINDS)}")
        faults.append(parsed)
    return faults


def fault_at(kind: str, step: int, rank: int) -> bool:
    """Whether ``HARPE_FAULT_INJECT`` asks for fault ``kind`` at ``step`` on ``rank``."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return False
    return any(k == kind and step in steps and (r is None or r == rank) for k, steps, r in parse_faults(spec))


def maybe_die(step: int, rank: int) -> None:
    """The ``exit`` and ``hang`` faults, called as a step starts."""
    if fault_at("exit", step, rank):
        print(f"[harpe] fault injection: rank {rank} exits at step {step}", flush=True)
        time.sleep(0.5)  # a crash during the step's work (the step's start is published by then)
        os._exit(1)
    if fault_at("hang", step, rank):
        print(f"[harpe] fault injection: rank {rank} freezes at step {step} (SIGSTOP)", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, heartbeat thread included


def _disk_full(tmp: Path, rank: int) -> None:
    """The ``disk_full`` fault: a partial file, then the exception torch raises when a write fails."""
    partial = tmp / f"__{rank}_full.distcp"
    partial.write_bytes(b"\0" * 4096)
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))
    try:
        raise RuntimeError(f"Worker failure: {err}") from err
    except RuntimeError as wrapped:
        raise CheckpointException("write", {rank: (wrapped, None)}) from None


class SaveFaults(SaveHooks):
    """The checkpoint faults (``crash_in_save``, ``slow_save``, ``disk_full``) as save hooks."""

    def after_shards_written(self, tmp: Path, step: int, rank: int) -> None:
        if fault_at("crash_in_save", step, rank):
            print(f"[harpe] fault injection: rank {rank} dies in the middle of saving {tmp}", flush=True)
            os._exit(137)
        if fault_at("slow_save", step, rank):
            print(f"[harpe] fault injection: rank {rank} pauses while saving {tmp}", flush=True)
            time.sleep(SLOW_SAVE_S)
        if fault_at("disk_full", step, rank):
            print(f"[harpe] fault injection: rank {rank}'s disk is full while saving {tmp}", flush=True)
            _disk_full(tmp, rank)
