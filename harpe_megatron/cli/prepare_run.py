"""The demo's data step: build the demo data a run config points to.

``python -m harpe_megatron.cli.prepare_run --config CONFIG [overrides]`` builds the demo corpus,
tokenizer and indexed dataset (:func:`harpe_megatron.data.demo.prepare_demo_data`) where
``data.paths[0]`` / ``data.tokenizer_model`` point, with a tokenizer of ``model.vocab_size``
pieces and ``training.seed``; a complete build with the same settings is left as it is.
``scripts/demo.sh`` runs it before it launches ``configs/tiny_cpu.yaml``; the production
launcher (``scripts/pretrain_harpe.sh``) never builds data. For demo data at settings of your
own, ``tools/prepare_demo_data.py --out DIR`` takes them as options.
"""

from __future__ import annotations

import sys
from pathlib import Path

from harpe_megatron.cli.common import parse_run_config, quiet_library_warnings
from harpe_megatron.data.demo import demo_outputs, prepare_demo_data


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    cfg = parse_run_config("python -m harpe_megatron.cli.prepare_run", __doc__, argv)
    if len(cfg.data.paths) != 1:
        print(f"config error: the demo data is one dataset; data.paths has {len(cfg.data.paths)} entries",
              file=sys.stderr)
        return 2
    out_dir = Path(cfg.data.paths[0]).parent
    expected = demo_outputs(out_dir)
    if expected.prefix != cfg.data.paths[0] or expected.tokenizer != cfg.data.tokenizer_model:
        print(f"config error: the demo data step writes {expected.prefix} and {expected.tokenizer}; set "
              f"data.paths and data.tokenizer_model to those (got {cfg.data.paths[0]} and "
              f"{cfg.data.tokenizer_model})", file=sys.stderr)
        return 2
    try:
        prepare_demo_data(out_dir, vocab_size=cfg.model.vocab_size, seed=cfg.training.seed)
    except FileExistsError as exc:
        # This step has no --overwrite: say what to do from here.
        reason = str(exc).split("; pass overwrite=True")[0]
        print(f"config error: {reason}; delete {out_dir} to have the demo data step rebuild it, or set "
              "data.paths / data.tokenizer_model elsewhere", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
