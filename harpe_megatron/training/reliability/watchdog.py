"""Dead/hung-rank watchdog: every rank publishes a heartbeat; no progress for too long -> exit.

Each rank runs a daemon thread that every ``interval`` seconds writes its record to the
process group's key-value store (the c10d TCPStore of ``init_process_group``, through a second
client connection of its own), under ``harpe_watchdog/<rank>``::

    {"rank", "host", "pid", "step", "phase", "beat": wall time of this beat,
     "progress": wall time of the main thread's last progress mark}

The main thread marks progress with :meth:`Watchdog.progress` (``step``, ``phase``) at every
step, evaluation iteration, checkpoint save/load; a new step or phase is published at once (the
thread is woken), the rest every ``interval``. If a rank's main thread has not progressed for
the phase's allowance (``hang_timeout_s``; ``slow_phase_timeout_s`` in the phases that are long
by nature: start-up, checkpoint load/save, the first step), the thread reads every rank's record,
names the suspects (no record, heartbeat older than ``3 * interval + 1`` s, process gone on this
host, or behind in step/phase), logs the report as errors (stderr, every rank) and ends the process with
``os._exit(PEER_FAILURE_EXIT_CODE)`` (the main thread is stuck in a collective and cannot be
unwound). A rank that is itself hung is stopped the same way by its own thread.

Communication errors raised in the main thread (gloo raises at once when a peer's socket
closes; NCCL times out; see :func:`is_communication_error`) go through
:meth:`Watchdog.explain_failure`, which waits for the heartbeats to tell which rank went away and
raises :class:`PeerFailure` naming it.

Heartbeat ages compare wall clocks of different hosts (assumed NTP-synchronised to well under
``interval``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Optional, Protocol

import torch.distributed as dist

from harpe_megatron.log import get_logger
from harpe_megatron.training.reliability.exit_record import record_exit_code

__all__ = ["SLOW_PHASES", "NullWatchdog", "PeerFailure", "StepWatchdog", "Watchdog", "is_communication_error",
           "make_watchdog", "watchdog_store"]

_log = get_logger(__name__)

SLOW_PHASES = frozenset({"startup", "load", "save", "first_step"})
_PREFIX = "harpe_watchdog"
# Order of the phases within a step, to tell which rank is behind another at the same step.
_ORDER = {"startup": 0, "load": 1, "first_step": 2, "train": 2, "eval": 3, "save": 4, "done": 5}


def _position(step: int, phase: str) -> tuple[int, int]:
    """Where a rank is, comparable between ranks: (step, order of the phase within it)."""
    return step, _ORDER.get(phase, 0)


# Phrases of gloo/NCCL/store errors caused by a peer that went away or never answered.
_COMM_MARKERS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "nccl", "gloo")


def is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) is a failed collective/store call.

    ``torch.distributed.DistError`` subclasses (NCCL, store, network errors) count; gloo raises
    plain ``RuntimeError``, recognised by its message.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, dist.DistError) or any(m in str(exc).lower() for m in _COMM_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class PeerFailure(RuntimeError):
    """Another rank died or hung; the message names it (mapped to PEER_FAILURE_EXIT_CODE)."""


class StepWatchdog(Protocol):
    """What the trainer asks of a watchdog: :class:`Watchdog`, or :class:`NullWatchdog` where there is none.

    A context manager for the run's life; ``progress`` marks the main thread's progress,
    ``explain_failure`` turns a failed collective into :class:`PeerFailure` when a peer went away.
    """

    def progress(self, step: int, phase: str) -> None: ...

    def explain_failure(self, exc: BaseException) -> None: ...

    def __enter__(self) -> "StepWatchdog": ...

    def __exit__(self, *exc) -> None: ...


def watchdog_store(timeout_s: float = 10.0) -> dist.Store:
    """A client of the default process group's store for the watchdog thread alone.

    torch exposes the store only through ``distributed_c10d._get_default_store`` (private; this is
    the one place it is used). A TCPStore gets a second connection so the thread never shares a
    socket with the main thread; other store types are used as they are.
    """
    store = dist.distributed_c10d._get_default_store()
    base = store
    while hasattr(base, "underlying_store"):
        base = base.underlying_store
    if isinstance(base, dist.TCPStore):
        base = dist.TCPStore(base.host, base.port, is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    return dist.PrefixStore(_PREFIX, base)


def _process_gone(pid: int) -> bool:
    """Whether process ``pid`` on this host has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class Watchdog:
    """Heartbeat thread + progress deadline for one rank (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, hang_timeout_s: float,
                 slow_phase_timeout_s: float, exit_code: int):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.hang_timeout_s, self.slow_phase_timeout_s = hang_timeout_s, slow_phase_timeout_s
        self.exit_code = exit_code
        self.interval = min(5.0, max(0.5, hang_timeout_s / 10))
        self.stale_after = 3 * self.interval + 1.0
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._step, self._phase = 0, "startup"
        self._progress_mono, self._progress_wall = time.monotonic(), time.time()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by progress() on a new step/phase, and to stop
        self._thread: Optional[threading.Thread] = None
        self._store_error: Optional[str] = None

    # main thread -------------------------------------------------------------------------------
    def progress(self, step: int, phase: str) -> None:
        """Mark progress of the main thread (cheap: no I/O). A new step or phase wakes the thread,
        which publishes it at once, so the record a peer reads after this rank dies names the
        step it died in, not one up to ``interval`` seconds old."""
        changed = (step, phase) != (self._step, self._phase)
        self._step, self._phase = step, phase
        self._progress_mono, self._progress_wall = time.monotonic(), time.time()
        if changed:
            self._wake.set()

    def __enter__(self) -> "Watchdog":
        self._beat()
        self._thread = threading.Thread(target=self._run, name="harpe-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 5)
        self.progress(self._step, "done")
        self._beat()

    def explain_failure(self, exc: BaseException) -> None:
        """After a communication error: raise :class:`PeerFailure` naming the rank(s) that went away.

        Waits up to ``stale_after`` seconds for a peer's heartbeat to stop (or its process to be
        seen gone); returns without raising if every peer still looks alive (the error is then
        not a lost peer, and the caller re-raises it).
        """
        deadline = time.monotonic() + self.stale_after + self.interval
        while True:
            records = self._read_records()
            suspects = self._suspects(records, include_behind=False)
            if suspects or time.monotonic() > deadline:
                break
            time.sleep(self.interval / 2)
        if suspects:
            raise PeerFailure(f"rank {self.rank} at step {self._step} ({self._phase}): a collective failed "
                              f"({str(exc).splitlines()[0][:200]}) because " + "; ".join(suspects)) from exc

    # watchdog thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._beat()
            allowed = self.slow_phase_timeout_s if self._phase in SLOW_PHASES else self.hang_timeout_s
            idle = time.monotonic() - self._progress_mono
            if idle > allowed:
                self._fire(idle, allowed)

    def _beat(self) -> None:
        record = {"rank": self.rank, "host": self._host, "pid": self._pid, "step": self._step,
                  "phase": self._phase, "beat": time.time(), "progress": self._progress_wall}
        try:
            self.store.set(str(self.rank), json.dumps(record))
            self._store_error = None
        except Exception as exc:  # the store lives in rank 0 (or the launcher): it may be gone
            self._store_error = f"{type(exc).__name__}: {exc}"

    def _read_records(self) -> dict[int, Optional[dict]]:
        records: dict[int, Optional[dict]] = {}
        for r in range(self.world_size):
            try:
                records[r] = json.loads(self.store.get(str(r))) if self.store.check([str(r)]) else None
            except Exception as exc:
                self._store_error = f"{type(exc).__name__}: {exc}"
                return {}
        return records

    def _suspects(self, records: dict[int, Optional[dict]], include_behind: bool = True) -> list[str]:
        """One line per rank that looks dead, hung or behind this one."""
        if not records:
            return [f"the rendezvous store cannot be reached ({self._store_error}); it lives in rank 0's "
                    "process or in the launcher (torchrun), so rank 0 or the launcher probably died"]
        now, lines = time.time(), []
        for r, rec in sorted(records.items()):
            if r == self.rank:
                continue
            if rec is None:
                lines.append(f"rank {r} never reported a heartbeat")
                continue
            where = f"rank {r} (host {rec['host']}, pid {rec['pid']}, last at step {rec['step']} in {rec['phase']})"
            if rec["host"] == self._host and _process_gone(rec["pid"]):
                lines.append(f"{where} has exited")
            elif now - rec["beat"] > self.stale_after:
                lines.append(f"{where} sent no heartbeat for {now - rec['beat']:.0f} s (dead, frozen or unreachable)")
            elif include_behind and _position(rec["step"], rec["phase"]) < _position(self._step, self._phase):
                lines.append(f"{where} is behind: no progress for {now - rec['progress']:.0f} s")
        return lines

    def _fire(self, idle: float, allowed: float) -> None:
        records = self._read_records()
        suspects = self._suspects(records)
        report = [f"watchdog: rank {self.rank} (host {self._host}, pid {self._pid}) made no progress for "
                  f"{idle:.0f} s at step {self._step} in {self._phase} (limit {allowed:.0f} s: "
                  f"training.{'slow_phase_timeout_s' if self._phase in SLOW_PHASES else 'hang_timeout_s'})."]
        if suspects:
            report += ["watchdog: suspect " + s for s in suspects]
        else:
            report.append("watchdog: no other rank is dead or behind (" + ", ".join(
                f"rank {r}: step {rec['step']} {rec['phase']}" for r, rec in sorted(records.items()) if rec)
                + "); this rank or the collective itself (network, NCCL) is stuck")
        report.append(f"watchdog: exiting with code {self.exit_code}; the newest checkpoint named by "
                      "'latest' is intact, start again to resume")
        for line in report:
            _log.error(line)
        record_exit_code(self.exit_code)  # os._exit skips the CLI, which records it otherwise
        os._exit(self.exit_code)


class NullWatchdog:
    """No watchdog (one rank, or ``training.hang_timeout_s: 0``): progress marks cost nothing and a
    communication error is left to the caller."""

    def progress(self, step: int, phase: str) -> None:
        return None

    def explain_failure(self, exc: BaseException) -> None:
        return None

    def __enter__(self) -> "NullWatchdog":
        return self

    def __exit__(self, *exc) -> None:
        return None


def make_watchdog(hang_timeout_s: float, slow_phase_timeout_s: float, exit_code: int) -> StepWatchdog:
    """A :class:`Watchdog` for this rank when the world has more than one rank and ``hang_timeout_s > 0``,
    else a :class:`NullWatchdog` (needs the default process group)."""
    if dist.get_world_size() <= 1 or hang_timeout_s <= 0:
        return NullWatchdog()
    return Watchdog(watchdog_store(), dist.get_rank(), dist.get_world_size(), hang_timeout_s, slow_phase_timeout_s,
                    exit_code)
