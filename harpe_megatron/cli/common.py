"""Small helpers shared by the command-line entry points (tools/, ``python -m harpe_megatron.*``)."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

from harpe_megatron.config.loader import ConfigError, load_config
from harpe_megatron.config.run import RunConfig

__all__ = ["quiet_library_warnings", "parse_run_config", "OneLineParser", "at_least", "check_output_path"]


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
    stderr (from rank 0 only: every rank of a launch finds the same) and ``SystemExit(2)``.
    """

    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=3e-5")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        rank0 = int(os.environ.get("RANK", "0") or 0) == 0  # the same on every rank of a launch: one line
        parser.exit(2, f"config error: {exc}\n" if rank0 else None)


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line, ``PROG: error: ... (see --help)``, with exit 2
    (``--help`` still prints the usage). Sub-commands get the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(low: float, kind: Callable = int, what: str = "an integer",
             strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` accepting ``kind`` values >= ``low`` (> ``low`` if ``strict``); one-line error otherwise."""
    bound = f"{'>' if strict else '>='} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def check_output_path(path: str, arg: str, directory: bool = False) -> None:
    """Before any work: ``ValueError`` naming ``arg`` unless ``path`` can be written as a file
    (``directory``: as a directory) -- it is not of the other kind, and its nearest existing
    folder is a writable directory (missing folders below it are created when writing)."""
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        raise ValueError(f"{arg} {path}: is {'not ' if directory else ''}a directory")
    if p.exists():
        if not os.access(p, os.W_OK | (os.X_OK if directory else 0)):
            raise ValueError(f"{arg} {path}: not writable")
        return
    parent = Path(os.path.abspath(p)).parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{arg} {path}: cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{arg} {path}: cannot be created: {parent} is not writable")
