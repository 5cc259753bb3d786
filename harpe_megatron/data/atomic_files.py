"""Whole-file writes that either land complete or not at all: the content goes to a temporary
file beside the target (``<name>.tmp-<pid>``), which is renamed over it; on any error the
temporary file is removed and the target is left as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

__all__ = ["write_bytes_atomic", "write_json_atomic", "write_jsonl_atomic", "write_text_atomic"]


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    target = Path(path)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """``obj`` as indented JSON and a final newline."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[object]) -> None:
    """One JSON record per line (UTF-8 kept as it is)."""
    write_text_atomic(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
