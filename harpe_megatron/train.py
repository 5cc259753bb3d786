"""Entry point: ``python -m harpe_megatron.train --config CONFIG [key.path=value ...]``.

Run under torchrun (or scripts/pretrain_harpe.sh) for several ranks; a plain ``python`` start is
one rank. Overrides use dotted key paths of the YAML tree, e.g. ``training.lr=3e-5``.
"""

from __future__ import annotations

import argparse
import sys

from harpe_megatron.config.loader import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harpe_megatron.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=3e-5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from harpe_megatron.training.trainer import train

    result = train(cfg)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[harpe] done: {result.last_step} steps; last checkpoint {result.checkpoint}; "
              f"run dir {cfg.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
