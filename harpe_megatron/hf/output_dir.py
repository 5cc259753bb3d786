"""Atomic output directories for conversions (:func:`atomic_output_dir`).

Everything is written into a hidden temporary directory next to the destination, which is renamed
into place only when the body finished without an exception; a failure removes it. A non-empty
destination is refused unless ``overwrite``; then the old content is replaced only at the very end
(moved aside, the new directory renamed in, the old one deleted). An output that equals or
contains a protected input is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["atomic_output_dir"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                      protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out_dir`` if the body succeeds.

    ``protect``: inputs that must survive; an ``out_dir`` equal to one of them or containing one
    is refused (``--overwrite`` would delete the input).
    """
    out = Path(os.path.abspath(out_dir))
    for p in protect:
        p = Path(os.path.abspath(p))
        if p == out or out in p.parents:
            raise ValueError(f"output directory {out} would contain (and overwrite) the input {p}")
    _check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _check_destination(out, overwrite)  # something may have appeared meanwhile
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)  # put the previous content back
            raise
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
