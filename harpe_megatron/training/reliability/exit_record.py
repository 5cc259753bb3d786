"""Where a rank records its exit code, so that launchers and people can read the job's code.

torchrun exits with 1 whenever a rank fails or it was signalled, so a scheduler cannot tell
"preempted, resume me" (75) from "config error, don't" (2) by torchrun's code. Each rank therefore
records its own code (:mod:`~harpe_megatron.training.reliability.exit_codes`) on its way out:

* ``$HARPE_EXIT_CODE_DIR/rank_<r>`` (every rank, when the variable is set):
  ``scripts/pretrain_harpe.sh`` (through :mod:`harpe_megatron.cli.launch`) points it at a fresh
  directory per launch and exits with ``job_exit_code`` (exit_codes.py) of what it finds there.
* ``<run_dir>/exit_code`` (rank 0; the path is :class:`~harpe_megatron.run_dir.RunDir`'s): one
  line ``<code> <meaning>``, for launches whose exit code
  torchrun owns (``torchrun ... scripts/pretrain_harpe.sh``). Rank 0 removes it when the launch
  starts and writes it when it exits, so the file is the code of the last launch on this run_dir
  that has ended: missing after a launch means rank 0 never got to exit (killed, node lost) or
  the launch is still running. A launch refused because another run holds the run_dir leaves it
  alone; nothing creates the run_dir for it.

Writes are atomic (temporary file + rename) and best effort: a failed write is reported on stderr
and changes no exit code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from harpe_megatron.run_dir import RunDir
from harpe_megatron.training.reliability.exit_codes import describe_exit_code

__all__ = ["EXIT_CODE_DIR_ENV", "begin_exit_record", "record_exit_code", "read_launch_codes"]

EXIT_CODE_DIR_ENV = "HARPE_EXIT_CODE_DIR"

_run_dir_record: Optional[Path] = None  # this process's <run_dir>/exit_code (rank 0 only), once known


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"[harpe] warning: cannot record the exit code in {path}: {exc}", file=sys.stderr, flush=True)
        tmp.unlink(missing_ok=True)


def begin_exit_record(run_dir: str | os.PathLike) -> None:
    """The launch starts on ``run_dir``: rank 0 removes the previous launch's record there."""
    global _run_dir_record
    if _rank() != 0:
        return
    _run_dir_record = RunDir(run_dir).exit_code
    try:
        _run_dir_record.unlink(missing_ok=True)
    except OSError:
        pass


def record_exit_code(code: int, in_run_dir: bool = True) -> None:
    """Record this rank's exit code (call it right before the process exits)."""
    launch_dir = os.environ.get(EXIT_CODE_DIR_ENV)
    if launch_dir:
        _write(Path(launch_dir) / f"rank_{_rank()}", f"{code}\n")
    if in_run_dir and _run_dir_record is not None and _run_dir_record.parent.is_dir():
        _write(_run_dir_record, f"{code} {describe_exit_code(code)}\n")


def read_launch_codes(directory: str | os.PathLike) -> dict[int, int]:
    """rank -> exit code of the records in a ``$HARPE_EXIT_CODE_DIR`` directory."""
    codes = {}
    for path in Path(directory).glob("rank_*"):
        try:
            codes[int(path.name[len("rank_"):])] = int(path.read_text().split()[0])
        except (ValueError, IndexError, OSError):
            continue
    return codes
