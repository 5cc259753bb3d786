"""``python -m harpe_megatron.cli.launch [torchrun options] -m harpe_megatron.train ...``: torchrun
that exits with the job's code (what ``scripts/pretrain_harpe.sh`` runs).

torchrun (``torch.distributed.run``) exits with 1 whenever a rank failed or it was signalled, so
whoever started it (Slurm, a retry wrapper) cannot tell "preempted, start again" (75) from "config
error" (2). This module runs torchrun's own ``main`` in this process -- the same options,
environment variables (``PET_*``) and signal handling -- with ``HARPE_EXIT_CODE_DIR`` set to a fresh
directory in which every rank records its code (training/reliability/exit_record.py), and exits
with the code of this node's ranks taken together (``job_exit_code`` of
training/reliability/exit_codes.py; a rank that ended without recording one, e.g. killed by a
signal, counts as lost).

torchrun's failure report (a traceback and a table per failed rank) and its log lines are replaced
by one line when the code is not 0 or 2 (for 2, rank 0's one line says it all), e.g.
``[pretrain_harpe] exit 75 (preempted: ...); ranks: 0 -> 75, 1 -> 75``. With ``LOGLEVEL`` set
(torchrun's own variable, e.g. ``LOGLEVEL=INFO``) torchrun logs as usual.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Optional

from harpe_megatron.training.reliability.exit_codes import (
    BAD_INPUT_EXIT_CODE,
    describe_exit_code,
    job_exit_code,
)
from harpe_megatron.training.reliability.exit_record import EXIT_CODE_DIR_ENV, read_launch_codes

__all__ = ["main", "node_exit_code"]


def node_exit_code(recorded: dict[int, int], failed: dict[int, int], torchrun_ok: bool) -> tuple[int, dict]:
    """(code, rank -> code or None) from the ranks' records and torchrun's failures.

    ``failed``: exit codes torchrun saw for its failed ranks (negative: killed by that signal);
    ``torchrun_ok``: torchrun returned normally (every rank exited 0).
    """
    if torchrun_ok:
        return 0, {r: 0 for r in recorded}
    ranks: dict[int, Optional[int]] = dict(recorded)
    for rank, code in failed.items():
        ranks.setdefault(rank, code if code >= 0 else None)
    return job_exit_code(ranks.values()), ranks


def _summary(code: int, ranks: dict, error: Optional[BaseException]) -> str:
    per_rank = ", ".join(f"{r} -> {'no code (killed or lost)' if c is None else c}" for r, c in sorted(ranks.items()))
    line = f"[pretrain_harpe] exit {code} ({describe_exit_code(code)}); ranks: {per_rank or 'none recorded'}"
    if error is not None:
        line += f"; torchrun: {type(error).__name__}: {str(error).strip()[:300]}"
    return line


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    if not os.environ.get("LOGLEVEL"):
        logging.disable(logging.ERROR)  # torchrun's own lines; the summary below replaces them
    records = tempfile.mkdtemp(prefix="harpe-exit-codes-")
    os.environ[EXIT_CODE_DIR_ENV] = records
    failed: dict[int, int] = {}
    error: Optional[BaseException] = None
    torchrun_ok = False
    try:
        torchrun_main(argv)
        torchrun_ok = True
    except ChildFailedError as exc:
        failed = {rank: f.exitcode for rank, f in exc.failures.items()}
    except Exception as exc:  # torchrun was signalled (its ranks stopped first), rendezvous failed, ...
        error = exc
    finally:
        recorded = read_launch_codes(records)
        shutil.rmtree(records, ignore_errors=True)
    code, ranks = node_exit_code(recorded, failed, torchrun_ok)
    if type(error).__name__ == "SignalException":  # torchrun was signalled and stopped its ranks, as asked
        error = None
    if code != 0 and (code != BAD_INPUT_EXIT_CODE or error is not None):
        print(_summary(code, ranks, error), file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
