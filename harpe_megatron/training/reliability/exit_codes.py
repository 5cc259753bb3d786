"""Process exit codes of ``python -m harpe_megatron.train`` (one list, used by code, scripts and docs).

=====  ===========================  ==========================================================
code   name                         meaning
=====  ===========================  ==========================================================
0      -                            finished (``training.train_iters`` / ``exit_interval``)
1      -                            any other error (traceback on stderr; a failed checkpoint
                                    save or load: one line ``[harpe] error: ...``)
2      -                            config error (message names the key), found before anything
                                    is written; also: the run_dir is in use by another run
75     PREEMPTED_EXIT_CODE          SIGTERM/SIGUSR1 received: every rank finished its step,
                                    a checkpoint was saved; start again to resume (requeue)
76     PEER_FAILURE_EXIT_CODE       a rank died or hung: the watchdog saw no progress for
                                    ``training.hang_timeout_s`` and named the stale rank(s)
77     NONFINITE_EXIT_CODE          ``training.max_consecutive_nonfinite_steps`` steps in a row
                                    had a non-finite loss or gradient
=====  ===========================  ==========================================================

75 is ``EX_TEMPFAIL`` of sysexits.h ("try again later"); 76 and 77 follow it and stay clear of
128 + signal numbers (a rank killed by a signal exits with 128 + N).
"""

from __future__ import annotations

__all__ = ["PREEMPTED_EXIT_CODE", "PEER_FAILURE_EXIT_CODE", "NONFINITE_EXIT_CODE", "NonFiniteAbort"]

PREEMPTED_EXIT_CODE = 75
PEER_FAILURE_EXIT_CODE = 76
NONFINITE_EXIT_CODE = 77


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient (raised on every rank)."""
