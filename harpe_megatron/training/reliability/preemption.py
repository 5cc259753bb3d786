"""Graceful preemption: SIGTERM / SIGUSR1 -> finish the step, save, exit with PREEMPTED_EXIT_CODE.

The handler only records the signal; the training loop all-reduces (MAX) :attr:`Preemption.flag`
over the world once per step (with the non-finite flag, one collective), so a signal that reached only some ranks
(Slurm signals every process of a step, but not always at the same instant; a user may ``kill``
one rank) stops every rank after the *same* step, and all of them save that step together.

Handlers are installed only in the main thread (Python allows no other) and the previous ones are
put back when the context exits, so the trainer can run inside tests or a larger program.

torchrun and ``scancel --signal`` signal each rank's whole process group, so every helper process
a rank starts gets the signal too. :func:`~harpe_megatron.distributed.signals.helpers_ignore_preemption` starts helpers (megatron's
checkpoint-writer forks, multiprocessing's resource tracker) with the signals blocked, so they
cannot die of it in the middle of the save that the signal asks for.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional, Protocol

import torch.distributed as dist

from harpe_megatron.distributed.signals import PREEMPTION_SIGNALS
from harpe_megatron.log import get_logger

__all__ = ["PREEMPTION_SIGNALS", "NoPreemption", "Preemption", "PreemptionSignal"]

_log = get_logger(__name__)


class PreemptionSignal(Protocol):
    """What the trainer asks of preemption handling: :class:`Preemption`, or :class:`NoPreemption`.

    ``flag`` is 1.0 once this rank was signalled (the trainer all-reduces it once per step).
    """

    received: Optional[str]

    @property
    def flag(self) -> float: ...


class NoPreemption:
    """Stands in for :class:`Preemption` where no handler is installed: never preempted."""

    received: Optional[str] = None
    flag = 0.0

    def __enter__(self) -> "NoPreemption":
        return self

    def __exit__(self, *exc) -> None:
        return None


class Preemption:
    """Context manager: installs the handlers on enter, restores the previous ones on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
        self.received: Optional[str] = None  # name of the first signal seen on this rank
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals cannot be handled here; a signal then acts as it did before
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            # a warning: every rank that receives the signal says so (not only rank 0)
            _log.warning(f"rank {dist.get_rank() if dist.is_initialized() else 0}: received {self.received}; "
                         "will save a checkpoint after the current step and exit")

    @property
    def flag(self) -> float:
        """1.0 once this rank has received a preemption signal, else 0.0."""
        return 1.0 if self.received else 0.0
