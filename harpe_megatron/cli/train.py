"""Entry point: ``python -m harpe_megatron.train --config CONFIG [key.path=value ...]``.

Run under torchrun (or scripts/pretrain_harpe.sh) for several ranks; a plain ``python`` start is
one rank. Overrides use dotted key paths of the YAML tree, e.g. ``training.lr=3e-5``.

Exit codes (harpe_megatron/training/reliability/exit_codes.py, docs/reliability.md): 0 done,
1 error, 2 an error found before training (config, data, tokenizer, initial weights, world size,
or the run_dir in use by another run: one line from rank 0, no traceback), 75 preempted
(SIGTERM/SIGUSR1; checkpoint saved, start again to resume), 76 another rank died or hung, 77 too
many non-finite steps in a row. Every rank records its code on the way out
(harpe_megatron/training/reliability/exit_record.py).
"""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed as dist

from harpe_megatron.checkpoint.save_load import CheckpointError
from harpe_megatron.cli.common import parse_run_config, quiet_library_warnings
from harpe_megatron.config.loader import ConfigError
from harpe_megatron.data.validation import DataValidationError
from harpe_megatron.log import setup_logging
from harpe_megatron.planner.plan import PreflightError
from harpe_megatron.training.reliability.exit_codes import (
    BAD_INPUT_EXIT_CODE,
    NONFINITE_EXIT_CODE,
    PEER_FAILURE_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    NonFiniteAbort,
)
from harpe_megatron.training.reliability.exit_record import begin_exit_record, record_exit_code
from harpe_megatron.training.reliability.run_lock import RunDirInUse
from harpe_megatron.training.reliability.watchdog import PeerFailure
from harpe_megatron.training.stages import run_stages
from harpe_megatron.training.trainer import run_training


def _close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _say(line: str, rank0_only: bool = False) -> None:
    if not rank0_only or int(os.environ.get("RANK", "0") or 0) == 0:
        print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        code, in_run_dir = _main(argv)
    except SystemExit as exc:  # argparse and config errors: 2; --help: 0
        code = exc.code if isinstance(exc.code, int) else 1
        record_exit_code(code)
        raise
    except BaseException:  # unforeseen: Python prints the traceback and exits 1
        record_exit_code(1)
        raise
    record_exit_code(code, in_run_dir)
    return code


def _main(argv: list[str] | None) -> tuple[int, bool]:
    """The run; returns (exit code, whether to record it in the run_dir)."""
    quiet_library_warnings()
    setup_logging()  # [harpe] on rank 0 (INFO and up), [harpe rank N] elsewhere (warnings and errors)
    cfg = parse_run_config("python -m harpe_megatron.train", __doc__, argv)
    begin_exit_record(cfg.run_dir)
    try:
        results = run_stages(cfg) if cfg.stages else [run_training(cfg)]
    except NonFiniteAbort as exc:  # raised on every rank at the same step
        _say(f"[harpe] error: {exc}", rank0_only=True)
        dist.destroy_process_group()
        return NONFINITE_EXIT_CODE, True
    except (ConfigError, DataValidationError, PreflightError, RunDirInUse) as exc:
        # found before training, the same on every rank (the ranks exchange what they find): one
        # line; each rank plans its own memory (devices may differ), so each says when it does not fit
        prefix = "config error" if isinstance(exc, ConfigError) else "[harpe] error"
        _say(f"{prefix}: {exc}", rank0_only=not isinstance(exc, PreflightError))
        _close_process_group()
        return BAD_INPUT_EXIT_CODE, not isinstance(exc, RunDirInUse)  # that run_dir is another run's
    except CheckpointError as exc:  # a failed save or load, the same on every rank
        _say(f"[harpe] error: {exc}")
        _close_process_group()
        return 1, True
    except PeerFailure as exc:
        _say(f"[harpe] error: {exc}")
        return PEER_FAILURE_EXIT_CODE, True  # no destroy_process_group: it would wait for the lost rank
    preempted = any(r is not None and r.preempted for r in results)
    if preempted:
        # The checkpoint is complete; a launcher's SIGTERM during tear-down must not turn 75 into -15.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if dist.get_rank() == 0:
        for r in results:
            if r is not None:
                state = "preempted" if r.preempted else "done"
                print(f"[harpe] {state}: step {r.last_step}; last checkpoint {r.checkpoint}", flush=True)
        print(f"[harpe] run dir {cfg.run_dir}", flush=True)
    dist.destroy_process_group()
    if preempted:
        print(f"[harpe] exiting with code {PREEMPTED_EXIT_CODE} (preempted; start again to resume)", flush=True)
        return PREEMPTED_EXIT_CODE, True
    return 0, True


if __name__ == "__main__":
    sys.exit(main())
