"""Preemption signals and helper processes that must survive them.

torchrun and ``scancel --signal`` signal each rank's whole process group, so every helper process
a rank starts (megatron's checkpoint-writer forks, multiprocessing's resource tracker) gets the
signal too. :func:`helpers_ignore_preemption` starts such helpers with the signals blocked, so they
cannot die of it in the middle of the save that the signal asks for.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["PREEMPTION_SIGNALS", "helpers_ignore_preemption"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def helpers_ignore_preemption(signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS + (signal.SIGINT,)
                              ) -> Iterator[None]:
    """Block ``signals`` in the calling thread while the body runs.

    A process forked or spawned by this thread inherits the blocked mask (it survives exec), so a
    helper started inside stays alive through the launcher's SIGTERM/SIGUSR1/SIGINT and finishes
    its work; Python never unblocks them (multiprocessing's resource tracker unblocks SIGINT and
    SIGTERM after setting them to SIG_IGN). This process still sees the signals: the kernel hands a
    process-directed signal to a thread that does not block it (the watchdog's, gloo's) and
    CPython runs the handler in the main thread; with no such thread it stays pending and is
    handled when the block ends. Nothing happens outside the main thread or without
    ``pthread_sigmask``.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
