"""Fault injection for the reliability tests: ``HARPE_FAULT_INJECT`` (test-only, off when unset).

The variable holds ``;``-separated faults ``kind@steps[:rank]``; ``steps`` is one step or a
``,``-separated list, ``rank`` limits the fault to one global rank (default: every rank)::

    HARPE_FAULT_INJECT="nan_loss@3,6,7"           # the loss (hence every gradient) is NaN at these steps
    HARPE_FAULT_INJECT="crash_in_save@8:1"        # rank 1 os._exit(137)s mid-save of step 8
    HARPE_FAULT_INJECT="exit@5:1"                 # rank 1 os._exit(1)s 0.5 s into step 5
    HARPE_FAULT_INJECT="hang@5:1"                 # rank 1 freezes (SIGSTOP to itself) as step 5 starts
    HARPE_FAULT_INJECT="disk_full@8:1"            # rank 1's write of step 8's checkpoint fails (ENOSPC)
    HARPE_FAULT_INJECT="slow_save@8"              # the save of step 8 pauses 3 s half-way (tests signal it)

Steps count from 1 like the console line (the step being run or saved). The trainer asks
:func:`faults_from_env` once: :class:`NoFaults` (the plain step function, no hooks) when the
variable is unset, else :class:`Faults`, parsed then (an unknown kind fails at start with the list
of known kinds), which supplies the step function (``nan_loss``), the step-start hook (``exit``,
``hang``) and the save hooks (:class:`SaveFaults`). Nothing else reads the variable.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
from torch.distributed.checkpoint.api import CheckpointException

from harpe_megatron.checkpoint.save_load import SaveHooks
from harpe_megatron.log import get_logger
from harpe_megatron.step.schedule import forward_step

__all__ = ["ENV_VAR", "KINDS", "FaultInjection", "Faults", "NoFaults", "SaveFaults", "faults_from_env", "parse_faults",
           "fault_at"]

_log = get_logger(__name__)

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


def _matches(faults, kind: str, step: int, rank: int) -> bool:
    return any(k == kind and step in steps and (r is None or r == rank) for k, steps, r in faults)


def fault_at(kind: str, step: int, rank: int) -> bool:
    """Whether ``HARPE_FAULT_INJECT`` asks for fault ``kind`` at ``step`` on ``rank``."""
    spec = os.environ.get(ENV_VAR)
    return bool(spec) and _matches(parse_faults(spec), kind, step, rank)


def _nan_forward_step(data_iterator, model):
    """``forward_step`` whose loss is NaN (fault ``nan_loss``): NaN loss and gradients."""
    output, loss_func = forward_step(data_iterator, model)

    def poisoned(output_tensor):
        loss_sum, num_tokens, report = loss_func(output_tensor)
        nan = torch.tensor(float("nan"), device=loss_sum.device)
        return loss_sum * nan, num_tokens, {"lm loss": report["lm loss"] * torch.stack([nan, nan.new_ones(())])}

    return output, poisoned


class FaultInjection(Protocol):
    """What the trainer asks of fault injection: :class:`Faults`, or :class:`NoFaults` (the default)."""

    save_hooks: Optional[SaveHooks]

    def step_func(self, step: int, rank: int) -> Callable: ...

    def at_step_start(self, step: int, rank: int) -> None: ...


class NoFaults:
    """No fault injection: the plain forward step, nothing at a step's start, no save hooks."""

    save_hooks: Optional[SaveHooks] = None

    def step_func(self, step: int, rank: int) -> Callable:
        """The ``forward_step_func`` of ``step`` for megatron's schedule."""
        return forward_step

    def at_step_start(self, step: int, rank: int) -> None:
        """Called as ``step`` starts (after the watchdog has been told)."""


class Faults(NoFaults):
    """The faults of a ``HARPE_FAULT_INJECT`` spec, parsed once (a bad spec fails here, at start)."""

    def __init__(self, spec: str):
        self.faults = parse_faults(spec)
        self.save_hooks = SaveFaults()

    def at(self, kind: str, step: int, rank: int) -> bool:
        return _matches(self.faults, kind, step, rank)

    def step_func(self, step: int, rank: int) -> Callable:
        return _nan_forward_step if self.at("nan_loss", step, rank) else forward_step

    def at_step_start(self, step: int, rank: int) -> None:
        """The ``exit`` and ``hang`` faults."""
        if self.at("exit", step, rank):
            _log.warning(f"fault injection: rank {rank} exits at step {step}")
            time.sleep(0.5)  # a crash during the step's work (the step's start is published by then)
            os._exit(1)
        if self.at("hang", step, rank):
            _log.warning(f"fault injection: rank {rank} freezes at step {step} (SIGSTOP)")
            os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, heartbeat thread included


def faults_from_env() -> FaultInjection:
    """:class:`Faults` of ``HARPE_FAULT_INJECT`` when it is set, else :class:`NoFaults`."""
    spec = os.environ.get(ENV_VAR)
    return Faults(spec) if spec else NoFaults()


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
            _log.warning(f"fault injection: rank {rank} dies in the middle of saving {tmp}")
            os._exit(137)
        if fault_at("slow_save", step, rank):
            _log.warning(f"fault injection: rank {rank} pauses while saving {tmp}")
            time.sleep(SLOW_SAVE_S)
        if fault_at("disk_full", step, rank):
            _log.warning(f"fault injection: rank {rank}'s disk is full while saving {tmp}")
            _disk_full(tmp, rank)
