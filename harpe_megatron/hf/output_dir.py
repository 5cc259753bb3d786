"""Atomic output directories for conversions (:func:`atomic_output_dir`).

Everything is written into a hidden temporary directory next to the destination, which is renamed
into place only when the body finished without an exception; a failure removes it (and the
folders it created above it). A non-empty destination is refused unless ``overwrite``; then the
old content is replaced only at the very end (moved aside, the new directory renamed in, the old
one deleted). Refused whatever ``overwrite`` says: an output that equals, contains or lies inside
a protected input, and replacing a directory that holds a training run (``.harpe.lock`` or
``metrics.jsonl``), a training checkpoint (``iter_N``, N > 0, or a megatron checkpoint directory)
or -- unless the caller writes that kind itself (``converted_ok``, the HF import) -- a converted
checkpoint (``iter_0000000``). Errors name the output as the caller gave it, never the
temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional

from harpe_megatron.checkpoint.layout import ITER_DIR, TMP_DIR
from harpe_megatron.run_dir import LOCK_FILE, METRICS_FILE

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


_RUN_FILES = (LOCK_FILE, METRICS_FILE)  # written only into training run directories
_MAX_ENTRIES = 10_000  # an export or import holds a few dozen files


def _iteration(name: str) -> Optional[int]:
    """The step of a checkpoint directory name (``iter_N`` or an interrupted ``iter_N.tmp``)."""
    match = ITER_DIR.match(name) or TMP_DIR.match(name)
    return int(match.group(1)) if match else None


def _kept_content(out: Path, converted_ok: bool) -> Optional[str]:
    """Why ``--overwrite`` must not replace ``out`` (None: it may)."""
    seen = 0
    for root, dirs, files in os.walk(out):
        here = Path(root)
        seen += len(dirs) + len(files)
        if seen > _MAX_ENTRIES:
            return f"it holds more than {_MAX_ENTRIES:,} files and folders, which no conversion writes"
        run = [f for f in _RUN_FILES if f in files]
        if run:
            return f"{here} is a training run directory (it has {run[0]})"
        if "metadata.json" in files and ".metadata" in files and not (converted_ok and _iteration(here.name) == 0):
            return f"{here} is a megatron checkpoint"
        for d in dirs:
            step = _iteration(d)
            if step is not None and step > 0:
                return f"{here / d} is a training checkpoint"
            if step is not None and not converted_ok:
                return f"{here / d} is a megatron checkpoint"
    return None


def _check_destination(out: Path, given: str, overwrite: bool, converted_ok: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {given} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {given} is not empty; pass --overwrite to replace it")
        reason = _kept_content(out, converted_ok)
        if reason:
            raise FileExistsError(f"output directory {given}: --overwrite never replaces a directory holding a "
                                  f"checkpoint or a run ({reason}); choose another output directory")


def _make_parents(out: Path, given: str) -> list[Path]:
    """Create the missing folders above ``out``; returns them (outermost first)."""
    missing = [p for p in reversed(out.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output directory {given} cannot be created: {exc.strerror}: {exc.filename}") from None
    return missing


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                      protect: Iterable[str | os.PathLike] = (), converted_ok: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out_dir`` if the body succeeds.

    ``protect``: inputs that must survive; an ``out_dir`` equal to one of them, containing one or
    inside one is refused. ``converted_ok``: ``overwrite`` may replace a converted checkpoint
    (what the caller itself writes); never a training run or checkpoint (see the module docstring).
    """
    given = str(out_dir)
    out = Path(os.path.abspath(out_dir))
    for p in protect:
        p = Path(os.path.abspath(p))
        if p == out or out in p.parents:
            raise ValueError(f"output directory {given} would contain (and overwrite) the input {p}")
        if p in out.parents:
            raise ValueError(f"output directory {given} is inside the input {p}: writing there would change the input")
    _check_destination(out, given, overwrite, converted_ok)
    created = _make_parents(out, given)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            tmp.mkdir()
        except OSError as exc:
            raise ValueError(f"output directory {given} cannot be created in {out.parent}: {exc.strerror}") from None
        yield tmp
        _check_destination(out, given, overwrite, converted_ok)  # something may have appeared meanwhile
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
        for folder in reversed(created):  # innermost first; only the empty ones this call made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
