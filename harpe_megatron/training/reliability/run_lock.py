"""One run per run directory: an exclusive lock on ``<run_dir>/.harpe.lock`` for the run's life.

Two launches on one run_dir would resume from each other's live checkpoints, interleave
``metrics.jsonl`` and delete each other's saves (a save replaces an existing ``iter_N(.tmp)``).
Rank 0 takes the lock (``fcntl.flock(LOCK_EX | LOCK_NB)``) after the input checks and before the
run writes anything, writes its holder record into the file (``{"host", "pid", "started",
"command"}``) and keeps the file open until the run ends; the other ranks learn the outcome by a
broadcast, so every rank of a refused launch raises :class:`RunDirInUse` with the same message,
naming the holder.

The kernel releases a flock when its process dies, however it dies (kill -9, OOM killer), so a
lock is never stale in the kernel's view; what can be left behind is the *file* with the record
of a run that did not end cleanly. Such a file is taken over, and the take-over is logged with
the dead holder's record. A clean end empties the record. Shared filesystems: NFS (v4, or v3
with lockd) and Lustre/GPFS mounted with flock support pass flock on to every client; a
filesystem without lock support (``ENOLCK``/``EOPNOTSUPP``) gets a warning and no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

from harpe_megatron.config.loader import ConfigError
from harpe_megatron.log import get_logger
from harpe_megatron.run_dir import LOCK_FILE, RunDir

__all__ = ["RunDirInUse", "acquire_run_dir", "hold_run_dir"]

_log = get_logger(__name__)


class RunDirInUse(RuntimeError):
    """Another live run holds this run directory (the message names it and what to do)."""


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable, *sys.argv])[:500]}


def _describe(text: str) -> str:
    try:
        rec = json.loads(text)
        return f"host {rec['host']}, pid {rec['pid']}, started {rec['started']}: {rec['command']}"
    except (ValueError, KeyError, TypeError):
        return "no readable record"


def acquire_run_dir(run_dir: str | os.PathLike, log: Callable[[str], None] = _log.warning) -> Optional[int]:
    """Take the lock of ``run_dir`` (created if missing); returns the open descriptor that holds
    it (None where the filesystem cannot lock). Raises :class:`RunDirInUse` if a live run holds it."""
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = RunDir(root).lock
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text() if path.is_file() else ""
            os.close(fd)
            raise RunDirInUse(
                f"run_dir {root} is in use by another run ({_describe(holder)}; lock {path}). Two runs on one "
                "run_dir would resume from and delete each other's checkpoints: wait for that run to end, stop "
                "it, or set another run_dir") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log(f"WARNING: cannot lock {path} ({exc.strerror}): this filesystem has no flock support, "
                    "so a second run on this run_dir would not be refused")
                return None
            raise
        try:
            # Locked the file that is at `path` now (not one unlinked meanwhile)?
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
    if previous:
        log(f"{path}: taking over the lock left by a run that did not end cleanly "
            f"({_describe(previous)}); it no longer holds it (its process is gone)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_record()).encode(), 0)
    os.fsync(fd)
    return fd


def _release(fd: Optional[int]) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # a clean end leaves no record to report as stale
    os.close(fd)  # releases the flock


@contextlib.contextmanager
def hold_run_dir(run_dir: str | os.PathLike, is_holder: bool, share: Callable[[Optional[str]], Optional[str]],
                 log: Callable[[str], None] = _log.warning) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body (collective through ``share``).

    ``is_holder``: whether this process takes the lock (rank 0); ``share(error)`` hands the
    holder's error (or None) to every rank and returns it (a broadcast from rank 0). A run_dir
    that is not a directory is a :class:`ConfigError`. A run_dir this call created is removed
    again when the body fails while it holds nothing but the lock file (a failed start leaves
    nothing behind).
    """
    fd, error = None, None
    root = Path(run_dir)
    created = is_holder and not root.exists()
    if is_holder:
        try:
            if root.exists() and not root.is_dir():
                error = ("config", f"run_dir: {run_dir} exists and is not a directory; set run_dir to a directory "
                                   "(it is created if missing)")
            else:
                fd = acquire_run_dir(run_dir, log)
        except RunDirInUse as exc:
            error = ("in use", str(exc))
        except OSError as exc:
            error = ("config", f"run_dir: {run_dir} cannot be created or locked ({exc.strerror}: {exc.filename})")
    error = share(error)
    if error is not None:
        raise (ConfigError if error[0] == "config" else RunDirInUse)(error[1])
    failed = True
    try:
        yield
        failed = False
    finally:
        _release(fd)
        if created and failed and root.is_dir() and [p.name for p in root.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                (root / LOCK_FILE).unlink()
                root.rmdir()
