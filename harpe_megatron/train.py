"""Entry point: ``python -m harpe_megatron.train --config CONFIG [key.path=value ...]``.

Run under torchrun (or scripts/pretrain_harpe.sh) for several ranks; a plain ``python`` start is
one rank. Overrides use dotted key paths of the YAML tree, e.g. ``training.lr=3e-5``.
"""

from __future__ import annotations

import sys

from harpe_megatron.cli import parse_run_config, quiet_library_warnings


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    cfg = parse_run_config("python -m harpe_megatron.train", __doc__, argv)
    if isinstance(cfg, int):
        return cfg
    import torch.distributed as dist

    from harpe_megatron.training.stages import run_stages
    from harpe_megatron.training.trainer import train

    results = run_stages(cfg) if cfg.stages else [train(cfg)]
    if dist.get_rank() == 0:
        for r in results:
            if r is not None:
                print(f"[harpe] done: step {r.last_step}; last checkpoint {r.checkpoint}", flush=True)
        print(f"[harpe] run dir {cfg.run_dir}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
