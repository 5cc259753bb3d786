"""Launcher step: build a run's demo data when its config asks for it.

``python -m harpe_megatron.cli.prepare_run --config CONFIG [overrides]`` -- if
``data.build_demo_corpus`` is true and the config's data files are missing, build the demo
corpus, tokenizer and indexed dataset where ``data.paths[0]`` / ``data.tokenizer_model`` point
(a tokenizer of ``model.vocab_size`` pieces). Otherwise it checks nothing and does nothing, so it
is safe to run before every launch. Every rank of a ``torchrun scripts/pretrain_harpe.sh`` job
runs it: an exclusive lock on ``<data dir>/.prepare.lock`` makes the first build and the others
wait, then find the build complete.
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

from harpe_megatron.cli.common import parse_run_config, quiet_library_warnings
from harpe_megatron.data.demo import demo_outputs, prepare_demo_data


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    cfg = parse_run_config("python -m harpe_megatron.cli.prepare_run", __doc__, argv)
    if isinstance(cfg, int):
        return cfg
    if not cfg.data.build_demo_corpus:
        return 0

    if len(cfg.data.paths) != 1:
        raise SystemExit("data.build_demo_corpus needs exactly one entry in data.paths")
    out_dir = Path(cfg.data.paths[0]).parent
    expected = demo_outputs(out_dir)
    if expected.prefix != cfg.data.paths[0] or expected.tokenizer != cfg.data.tokenizer_model:
        raise SystemExit(
            f"data.build_demo_corpus writes {expected.prefix} and {expected.tokenizer}; set data.paths "
            f"and data.tokenizer_model to those (got {cfg.data.paths[0]} and {cfg.data.tokenizer_model})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        try:
            prepare_demo_data(out_dir, vocab_size=cfg.model.vocab_size, seed=cfg.training.seed)
        except FileExistsError as exc:
            # The launcher has no --overwrite to pass on: say what to do from here.
            reason = str(exc).split("; pass overwrite=True")[0]
            print(f"config error: {reason}; delete {out_dir} to have the launcher rebuild it, or set "
                  "data.paths / data.tokenizer_model elsewhere", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
