"""The one writer of checkpoint directories, for training saves and HF imports alike.

A checkpoint directory is made in three steps (the protocol of checkpoint/layout.py):

1. :func:`begin_checkpoint`: a fresh ``<save>/iter_N.tmp`` (a leftover of an interrupted save of
   the same step is removed: the caller holds the save directory);
2. the caller writes the checkpoint's files into it (training: megatron's
   ``dist_checkpointing.save`` from every rank plus the RNG files, checkpoint/save_load.py; HF
   import: the streaming torch_dist writer, checkpoint/dist_stream_write.py) and collects the
   CRC-32 of every file;
3. :func:`publish_checkpoint`: the manifest (every file with its size and CRC-32, written last),
   the rename ``iter_N.tmp -> iter_N``, ``latest`` replaced atomically (write, fsync, rename),
   then all but the newest ``keep_last`` complete checkpoints and older interrupted ``.tmp``
   saves pruned.

Until step 3 finishes, ``latest`` names the previous complete checkpoint (or nothing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from harpe_megatron.checkpoint.layout import (
    LATEST_FILE,
    TMP_DIR,
    checkpoint_name,
    incomplete_reason,
    list_checkpoints,
    write_atomic,
    write_manifest,
)

__all__ = ["begin_checkpoint", "publish_checkpoint", "in_progress_dir", "prune_checkpoints"]


def in_progress_dir(save_dir: str | os.PathLike, step: int) -> Path:
    """``<save_dir>/iter_N.tmp``: where the checkpoint of ``step`` is written before it is published."""
    return Path(save_dir) / (checkpoint_name(step) + ".tmp")


def begin_checkpoint(save_dir: str | os.PathLike, step: int) -> Path:
    """Create the save directory if needed and an empty ``iter_N.tmp`` in it; returns that path."""
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = in_progress_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted save of the same step
    tmp.mkdir()
    return tmp


def prune_checkpoints(save_dir: str | os.PathLike, keep_last: int, newest: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (0: all); drop partial saves older than ``newest``."""
    root = Path(save_dir)
    if keep_last > 0:
        complete = [p for _, p in list_checkpoints(root) if incomplete_reason(p) is None]
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for child in root.iterdir():
        match = TMP_DIR.match(child.name)
        if match and int(match.group(1)) < newest:
            shutil.rmtree(child, ignore_errors=True)


def publish_checkpoint(save_dir: str | os.PathLike, step: int, checksums: dict[str, str], keep_last: int = 0) -> Path:
    """Manifest, rename, ``latest``, prune (see module docstring); returns ``<save_dir>/iter_N``.

    ``checksums`` maps every file under ``iter_N.tmp`` (relative path) to its CRC-32 (8 hex digits)."""
    root = Path(save_dir)
    tmp = in_progress_dir(root, step)
    final = root / checkpoint_name(step)
    write_manifest(tmp, checksums)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(root / LATEST_FILE, final.name + "\n")
    prune_checkpoints(root, keep_last, step)
    return final
