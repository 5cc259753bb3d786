"""Small helpers shared by the command-line entry points (tools/, ``python -m harpe_megatron.*``)."""

from __future__ import annotations

import argparse
import warnings
from typing import Optional

from harpe_megatron.config.loader import ConfigError, load_config
from harpe_megatron.config.run import RunConfig

__all__ = ["quiet_library_warnings", "parse_run_config"]


def quiet_library_warnings() -> None:
    """Hide megatron-core's notices about absent optional kernels (TE, apex) and CUDA tuning, and
    torch's deprecation notices: they say nothing about what a tool does."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", message=".*(full scope is deprecated|CUDA_DEVICE_MAX_CONNECTIONS).*")
    # raised when the CPU harness forwards megatron's reads of `.grad` on non-leaf views
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")


def parse_run_config(prog: str, description: str, argv: Optional[list[str]] = None) -> RunConfig:
    """``--config CONFIG [key.path=value ...]`` -> RunConfig.

    Like argparse's own errors, a config error ends the process: ``config error: <message>`` on
    stderr and ``SystemExit(2)``.
    """

    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=3e-5")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")
