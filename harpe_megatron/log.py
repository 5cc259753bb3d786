"""One logging channel for the package: stdlib ``logging`` under the ``harpe`` logger.

Every module logs through ``get_logger(__name__)``. :func:`setup_logging` (called once by the entry
points) sends INFO records to stdout and warnings/errors to stderr with a prefix, ``[harpe]`` on rank 0 and ``[harpe rank N]``
elsewhere; ranks other than 0 print warnings and errors only, unless ``all_ranks`` is set (what a
dummy logger on non-zero ranks does in nanochat, without ``if rank == 0`` at the call sites).
Library users who configure logging themselves can skip :func:`setup_logging`.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["ROOT_LOGGER", "get_logger", "setup_logging"]

ROOT_LOGGER = "harpe"
_HANDLER_TAG = "_harpe_handler"


def get_logger(name: str) -> logging.Logger:
    """The package logger for module ``name`` (``harpe_megatron.x.y`` -> ``harpe.x.y``)."""
    suffix = name.split(".", 1)[1] if name.startswith("harpe_megatron.") else name
    return logging.getLogger(f"{ROOT_LOGGER}.{suffix}")


def setup_logging(rank: int | None = None, all_ranks: bool | None = None) -> None:
    """Install (or re-install) the console handler; ``rank`` defaults to ``$RANK`` (0 if unset).

    ``all_ranks`` defaults to ``$HARPE_LOG_ALL_RANKS`` (``1`` to let every rank print INFO).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if all_ranks is None:
        all_ranks = os.environ.get("HARPE_LOG_ALL_RANKS", "") == "1"
    root = logging.getLogger(ROOT_LOGGER)
    for h in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(h)
    prefix = "[harpe]" if rank == 0 else f"[harpe rank {rank}]"
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        setattr(handler, _HANDLER_TAG, True)
        handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    root.propagate = False
