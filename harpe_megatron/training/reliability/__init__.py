"""What keeps a run safe when a rank, a node or the scheduler acts (docs/reliability.md).

``watchdog`` (a dead or hung rank ends the others, naming it), ``preemption`` (SIGTERM/SIGUSR1:
every rank finishes the step and saves), ``run_lock`` (one run per run_dir), ``exit_codes`` (the
codes a job ends with), ``exit_record`` (where each rank records its code, so that a launcher and
the run_dir tell the job's) and ``faults`` (test-only fault injection). Each optional part comes with
a no-op stand-in (``NullWatchdog``, ``NoPreemption``, ``NoFaults``) that the trainer uses when it is
off, so the loop holds no ``if`` for it.
"""
