"""Process exit codes of ``python -m harpe_megatron.train`` and of the job (one list, used by code,
scripts and docs).

=====  ===========================  ==========================================================
code   name                         meaning
=====  ===========================  ==========================================================
0      -                            finished (``training.train_iters`` / ``exit_interval``)
1      -                            any other error (traceback on stderr; a failed checkpoint
                                    save or load: one line ``[harpe] error: ...``)
2      BAD_INPUT_EXIT_CODE          an error found before training, one line naming the key or
                                    file: config, data, tokenizer, initial weights, world size,
                                    or the run_dir is in use by another run
75     PREEMPTED_EXIT_CODE          SIGTERM/SIGUSR1 received: every rank finished its step,
                                    a checkpoint was saved; start again to resume (requeue)
76     PEER_FAILURE_EXIT_CODE       a rank died or hung: the watchdog saw no progress for
                                    ``training.hang_timeout_s`` and named the stale rank(s)
77     NONFINITE_EXIT_CODE          ``training.max_consecutive_nonfinite_steps`` steps in a row
                                    had a non-finite loss or gradient
=====  ===========================  ==========================================================

75 is ``EX_TEMPFAIL`` of sysexits.h ("try again later"); 76 and 77 follow it and stay clear of
128 + signal numbers (a rank killed by a signal exits with 128 + N).

The job's code (what ``bash scripts/pretrain_harpe.sh`` and the Slurm template exit with) comes
from its ranks' codes by :func:`job_exit_code`.
"""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["BAD_INPUT_EXIT_CODE", "PREEMPTED_EXIT_CODE", "PEER_FAILURE_EXIT_CODE", "NONFINITE_EXIT_CODE",
           "NonFiniteAbort", "job_exit_code", "describe_exit_code"]

BAD_INPUT_EXIT_CODE = 2
PREEMPTED_EXIT_CODE = 75
PEER_FAILURE_EXIT_CODE = 76
NONFINITE_EXIT_CODE = 77

_MEANING = {
    0: "done",
    1: "error (see the ranks' output)",
    BAD_INPUT_EXIT_CODE: "config or input error, or run_dir in use; found before training, nothing written",
    PREEMPTED_EXIT_CODE: "preempted: every rank saved the same step; start again to resume",
    PEER_FAILURE_EXIT_CODE: "a rank died or hung (the message names it); start again to resume from 'latest'",
    NONFINITE_EXIT_CODE: "too many non-finite steps in a row; the last checkpoint is intact",
}


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient (raised on every rank)."""


def describe_exit_code(code: int) -> str:
    """One phrase for an agreed code (anything else is "error")."""
    return _MEANING.get(code, _MEANING[1])


def job_exit_code(rank_codes: Iterable[Optional[int]]) -> int:
    """The job's code from its ranks' codes (None: the rank ended without a code of its own, e.g.
    killed by a signal; codes outside the table count as 1).

    The ranks agree on 0, 2, 75 and 77 (one collective decides them); when they differ, the most
    telling code wins: 2 (an input error one rank found; the others may have been stopped), then
    77, then 76 (a rank was lost: the survivors say so, the lost one has no code). 0 and 75 need
    every rank: a job is done, or preempted with its checkpoint saved, only if all ranks say so.
    Anything else, or no rank at all, is 1.
    """
    codes = {c if c in _MEANING else 1 for c in (1 if c is None else c for c in rank_codes)}
    for code in (BAD_INPUT_EXIT_CODE, NONFINITE_EXIT_CODE, PEER_FAILURE_EXIT_CODE):
        if code in codes:
            return code
    if codes in ({0}, {PREEMPTED_EXIT_CODE}):
        return codes.pop()
    return 1
