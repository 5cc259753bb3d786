"""Entry point: ``python -m harpe_megatron.train --config CONFIG [key.path=value ...]``.

Run under torchrun (or scripts/pretrain_harpe.sh) for several ranks; a plain ``python`` start is
one rank. Overrides use dotted key paths of the YAML tree, e.g. ``training.lr=3e-5``.

Exit codes (harpe_megatron/training/reliability/exit_codes.py, docs/reliability.md): 0 done, 1 error,
2 config error (also: the run_dir is in use by another run), 75 preempted (SIGTERM/SIGUSR1;
checkpoint saved, start again to resume),
76 another rank died or hung, 77 too many non-finite steps in a row.
"""

from __future__ import annotations

import signal
import sys

import torch.distributed as dist

from harpe_megatron.checkpoint.save_load import CheckpointError
from harpe_megatron.cli.common import parse_run_config, quiet_library_warnings
from harpe_megatron.config.loader import ConfigError
from harpe_megatron.log import setup_logging
from harpe_megatron.training.reliability.exit_codes import (
    NONFINITE_EXIT_CODE,
    PEER_FAILURE_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    NonFiniteAbort,
)
from harpe_megatron.training.reliability.run_lock import RunDirInUse
from harpe_megatron.training.reliability.watchdog import PeerFailure
from harpe_megatron.training.stages import run_stages
from harpe_megatron.training.trainer import run_training


def _close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    setup_logging()  # [harpe] on rank 0 (INFO and up), [harpe rank N] elsewhere (warnings and errors)
    cfg = parse_run_config("python -m harpe_megatron.train", __doc__, argv)
    try:
        results = run_stages(cfg) if cfg.stages else [run_training(cfg)]
    except NonFiniteAbort as exc:  # raised on every rank at the same step
        print(f"[harpe] error: {exc}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        return NONFINITE_EXIT_CODE
    except (ConfigError, RunDirInUse) as exc:  # found before anything was written; the same on every rank
        print(f"{'config error' if isinstance(exc, ConfigError) else '[harpe] error'}: {exc}", file=sys.stderr,
              flush=True)
        _close_process_group()
        return 2
    except CheckpointError as exc:  # a failed save or load, the same on every rank
        print(f"[harpe] error: {exc}", file=sys.stderr, flush=True)
        _close_process_group()
        return 1
    except PeerFailure as exc:
        print(f"[harpe] error: {exc}", file=sys.stderr, flush=True)
        return PEER_FAILURE_EXIT_CODE  # no destroy_process_group: it would wait for the lost rank
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
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
