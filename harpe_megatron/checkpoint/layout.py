"""The on-disk layout of a save directory: iteration directories, ``latest``, the manifest.

::

    <save>/latest              text file naming the newest *complete* checkpoint ("iter_0000200")
    <save>/iter_0000200/       a megatron distributed checkpoint, plus
        rng/rank_00000.pt      per-rank RNG states (tensors only; loaded with weights_only=True)
        harpe_manifest.json    every other file of the checkpoint with its size and CRC-32, written last
    <save>/iter_0000300.tmp/   a save in progress (or interrupted): never pointed to

Complete = ``metadata.json`` present and, where there is a manifest (every checkpoint training
saves), every listed file present with its listed size. Sizes are checked when choosing what to
resume from (cheap: one ``stat`` per file); contents, against the manifest's CRC-32 of every file,
when a checkpoint is loaded (:func:`verify_checksums`, ~1 s per GB per reader). Checkpoints without a
manifest (runs saved, and ``tools/convert_from_hf.py`` outputs made, before manifests existed)
count as complete when ``metadata.json`` is present; there is nothing to verify them against.
Checkpoint directories are written by checkpoint/directory.py.

Manifest format (JSON)::

    {"files": {"<relative path>": <size in bytes>, ...},
     "crc32": {"<relative path>": "<8 hex digits>", ...}}     # absent in manifests before checksums

Everything here reads files only (no collectives); checkpoint/directory.py writes checkpoint
directories (for checkpoint/save_load.py's training saves and the HF import).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from harpe_megatron.run_dir import RunDir

__all__ = [
    "resolve_checkpoint_dir",
    "LATEST_FILE",
    "MANIFEST_FILE",
    "CheckpointDamaged",
    "CheckpointScan",
    "checkpoint_files",
    "checkpoint_name",
    "checkpoint_step",
    "file_crc32",
    "incomplete_reason",
    "list_checkpoints",
    "read_manifest",
    "resolve_checkpoint",
    "scan_checkpoints",
    "verify_checksums",
    "write_atomic",
    "write_manifest",
    "ITER_DIR",
    "TMP_DIR",
]

LATEST_FILE = "latest"
MANIFEST_FILE = "harpe_manifest.json"
ITER_DIR = re.compile(r"^iter_(\d{7})$")
TMP_DIR = re.compile(r"^iter_(\d{7})\.tmp$")
_CHUNK = 4 << 20


class CheckpointDamaged(RuntimeError):
    """A checkpoint file whose contents differ from what its manifest recorded (message names it)."""


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of checkpoint directory ``path`` (``.../iter_0000200`` -> 200); ValueError if its
    name is not a checkpoint name."""
    match = ITER_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint directory name (iter_ and 7 digits)")
    return int(match.group(1))


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoint directories (``iter_N``, complete or not) under ``save_dir``, oldest first."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = ITER_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (read in 4 MiB chunks)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def read_manifest(path: Path) -> Optional[dict]:
    """The manifest of checkpoint ``path`` (None if it has none); ValueError if it is unreadable."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
        if not isinstance(data.get("files"), dict):
            raise KeyError("files")
    except (ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"{manifest}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    return data


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a fsync'ed temporary file and a rename (then fsync the directory)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_files(directory: Path) -> list[str]:
    """Relative paths of every file under ``directory`` except the manifest, sorted."""
    names = []
    for dirpath, _, files in os.walk(directory):
        for n in files:
            rel = str((Path(dirpath) / n).relative_to(directory))
            if rel != MANIFEST_FILE:
                names.append(rel)
    return sorted(names)


def write_manifest(directory: Path, crc32: dict[str, str]) -> None:
    """List every file under ``directory`` with its size and the given CRC-32s (written last, so its
    presence means the checkpoint is done). ``crc32`` must cover every file."""
    names = checkpoint_files(directory)
    missing = sorted(set(names) - set(crc32))
    if missing:
        raise ValueError(f"{directory}: no checksum for {', '.join(missing)}")
    sizes = {n: (directory / n).stat().st_size for n in names}
    write_atomic(directory / MANIFEST_FILE,
                 json.dumps({"files": sizes, "crc32": {n: crc32[n] for n in names}}, indent=0, sort_keys=True))


def incomplete_reason(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint (None if it is; see the module docstring)."""
    if not path.is_dir():
        return "does not exist"
    if not (path / "metadata.json").is_file():
        return "has no metadata.json (megatron never finished writing it)"
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        return f"has an unreadable {MANIFEST_FILE} ({exc})"
    if manifest is None:
        return None  # saved without a manifest (older runs and converter outputs): metadata.json is all we know
    for name, size in sorted(manifest["files"].items()):
        f = path / name
        if not f.is_file():
            return f"is missing {name} (listed in {MANIFEST_FILE})"
        actual = f.stat().st_size
        if actual != size:
            return f"has a truncated or damaged file {name}: {actual} bytes, {MANIFEST_FILE} says {size}"
    return None


def verify_checksums(path: Path, names: Optional[Iterable[str]] = None,
                     crc_of: Optional[Callable[[Path, int], str]] = None) -> int:
    """Check the files of checkpoint ``path`` (``names``, default all) against its manifest's CRC-32s.

    Raises :class:`CheckpointDamaged` naming the first file that is missing, of another size or
    of other contents. Returns the number of files checked (0 for a checkpoint without
    checksums: no manifest, or one written before checksums existed). ``crc_of(file, size)``
    gives a file's CRC-32 (default: read it; checkpoint/crc.py completes pieces already read).
    """
    manifest = read_manifest(path)
    if manifest is None or "crc32" not in manifest:
        return 0
    sums = manifest["crc32"]
    todo = sorted(sums) if names is None else list(names)
    for name in todo:
        f = path / name
        if not f.is_file():
            raise CheckpointDamaged(f"{f}: missing (listed in {path / MANIFEST_FILE})")
        size = f.stat().st_size
        if size != manifest["files"].get(name, size):
            raise CheckpointDamaged(f"{f}: {size} bytes, {MANIFEST_FILE} says {manifest['files'][name]} "
                                    "(truncated or damaged)")
        actual = file_crc32(f) if crc_of is None else crc_of(f, size)
        if actual != sums[name]:
            raise CheckpointDamaged(f"{f}: damaged: its CRC-32 is {actual}, {MANIFEST_FILE} recorded {sums[name]} "
                                    "when it was saved")
    return len(todo)


@dataclass
class CheckpointScan:
    """What a save directory holds: complete checkpoints (oldest first) and partial directories."""

    complete: list[tuple[int, Path]] = field(default_factory=list)
    partial: list[tuple[Path, str]] = field(default_factory=list)  # (directory, why)


def scan_checkpoints(save_dir: str | os.PathLike) -> CheckpointScan:
    """Sort every ``iter_N`` / ``iter_N.tmp`` directory under ``save_dir`` into complete and partial."""
    scan = CheckpointScan()
    root = Path(save_dir)
    if not root.is_dir():
        return scan
    for child in sorted(root.iterdir()):
        if TMP_DIR.match(child.name):
            scan.partial.append((child, "is an interrupted save (.tmp)"))
    for step, path in list_checkpoints(root):
        reason = incomplete_reason(path)
        if reason is None:
            scan.complete.append((step, path))
        else:
            scan.partial.append((path, reason))
    return scan


def resolve_checkpoint(load_dir: str | os.PathLike) -> tuple[Optional[Path], list[str]]:
    """``(checkpoint to resume from or None, warnings)`` for ``load_dir`` (no collective).

    Policy: ``latest`` if it names a complete checkpoint; else the newest complete one, with a
    warning (starting with ``WARNING``); None if the directory has neither ``latest`` nor any
    complete checkpoint. A ``latest`` with no complete checkpoint at all to fall back on raises
    (starting over from scratch would silently throw the run away).
    """
    root = Path(load_dir)
    scan = scan_checkpoints(root)
    warnings_ = [f"ignoring partial checkpoint {p}: it {why}" for p, why in scan.partial]
    marker = root / LATEST_FILE
    if marker.is_file():
        name = marker.read_text().strip()
        named = root / name
        reason = "is not a checkpoint name" if not ITER_DIR.match(name) else incomplete_reason(named)
        if reason is None:
            return named, warnings_
        if not scan.complete:
            raise RuntimeError(f"{marker} names {name!r}, which {reason}, and {root} holds no other complete "
                               "checkpoint to fall back on")
        fallback = scan.complete[-1][1]
        warnings_.append(f"WARNING: {marker} names {name!r}, which {reason}; resuming from the newest complete "
                         f"checkpoint {fallback.name} instead")
        return fallback, warnings_
    if scan.complete:
        fallback = scan.complete[-1][1]
        warnings_.append(f"WARNING: {root} has no '{LATEST_FILE}' file; resuming from the newest complete "
                         f"checkpoint {fallback.name}")
        return fallback, warnings_
    return None, warnings_


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The ``iter_*`` directory for a save dir (its ``latest``), a run dir or an ``iter_*`` dir.

    Refuses (``ValueError``, naming the reason) an incomplete checkpoint, including a ``latest``
    that names one: exporting an older iteration in its place would pass silently for the newest.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory {p} does not exist")
    for root in (p, RunDir(p).checkpoints):
        if (root / LATEST_FILE).is_file():
            try:
                chosen, messages = resolve_checkpoint(root)
            except RuntimeError as exc:
                raise ValueError(str(exc)) from None
            named = (root / LATEST_FILE).read_text().strip()
            if chosen is None or chosen.name != named:
                reason = incomplete_reason(root / named) if named else "is empty"
                alternative = f"; pass {chosen} to export that older checkpoint" if chosen is not None else ""
                raise ValueError(f"{root / LATEST_FILE} names {named!r}, which {reason}: refusing to export "
                                 f"another iteration in its place{alternative}")
            return chosen
    if (p / "metadata.json").is_file() or p.name.startswith("iter_"):
        reason = incomplete_reason(p)
        if reason is not None:
            raise ValueError(f"checkpoint {p} {reason}")
        return p
    found = list_checkpoints(p)
    if found:
        raise ValueError(f"{p} has no '{LATEST_FILE}' marker; pass one of its checkpoint directories "
                         f"({', '.join(d.name for _, d in found[-3:])})")
    raise ValueError(f"{p} is neither a training save directory (with '{LATEST_FILE}') nor a megatron "
                     "distributed checkpoint (with metadata.json)")
