"""The trainer: one run, from its bring-up to its last checkpoint.

``trainer`` (:class:`~harpe_megatron.training.trainer.Trainer`, every component declared in
``__init__``, and :func:`~harpe_megatron.training.trainer.run_training`, which wraps it in the
bring-up, watchdog, preemption handlers, input checks and run_dir lock), ``stages`` (multi-stage
schedules as one launch), ``data`` (the run's datasets and per-rank micro-batch iterators),
``initialize`` (process group and parallel state from the run config), ``input_checks`` (what a run
reads, checked before it writes) and ``reliability/`` (watchdog, preemption, lock, exit codes,
fault injection).
"""
