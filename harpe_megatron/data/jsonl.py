"""Streaming documents out of JSONL files (one JSON object per line, optionally gzip-compressed).

Every non-blank line of every file is one document. The text is read from ``text_key`` (default
``text``); a dotted key (``a.b``) reads a nested field. The document's *source* (the unit inside
which length upsampling keeps token shares, and a row of the report) is, in order of preference:
the ``source_key`` field (default ``source``), SlimPajama's ``meta.redpajama_set_name``, the
file's stem (``books.jsonl.gz`` -> ``books``).

Documents are numbered ``0, 1, 2, ...`` across all files in the order given; that index, not the
order of processing, feeds the upsampling decision.

Errors name the place: invalid JSON, a line that is not an object, a missing or non-string text
field raise ``ValueError("file:line: ...")``; a missing file raises ``FileNotFoundError``; input
without a single document raises ``ValueError``.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["Document", "SLIMPAJAMA_SOURCE_KEY", "expand_inputs", "read_documents", "source_name_of_file"]

SLIMPAJAMA_SOURCE_KEY = "meta.redpajama_set_name"
_MISSING = object()


@dataclass(frozen=True)
class Document:
    """One document: its text, source label and where it came from (``path:line``)."""

    index: int  # position in the stream over all input files (0-based)
    text: str
    source: str
    path: str
    line: int  # 1-based line number in ``path``

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def source_name_of_file(path: str | os.PathLike) -> str:
    """The fallback source label: the file name without ``.jsonl``/``.json``/``.gz`` suffixes."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or Path(path).name


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Input paths in the order given; an entry with ``*?[`` is a glob (matches sorted)."""
    files: list[str] = []
    for item in inputs:
        item = str(item)
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no input file matches {item!r}")
            files.extend(matches)
        else:
            if not os.path.isfile(item):
                raise FileNotFoundError(f"input file not found: {item}")
            files.append(item)
    if not files:
        raise ValueError("no input files given")
    return files


def _get(obj: dict, dotted: str) -> Any:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def read_documents(
    inputs: Sequence[str | os.PathLike],
    text_key: str = "text",
    source_key: str = "source",
) -> Iterator[Document]:
    """Yield the documents of ``inputs`` (files or glob patterns, ``.jsonl`` or ``.jsonl.gz``).

    Blank lines are skipped. Missing inputs raise here, at the call; a bad line raises when it is
    reached, and input without any document raises at the end of the iteration.
    """
    return _iter_documents(expand_inputs(inputs), text_key, source_key)


def _iter_documents(files: list[str], text_key: str, source_key: str) -> Iterator[Document]:
    index = 0
    for path in files:
        fallback_source = source_name_of_file(path)
        lineno = 0
        try:
            with _open_text(path) as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                    if not isinstance(obj, dict):
                        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                    text = _get(obj, text_key)
                    if text is _MISSING:
                        raise ValueError(f"{path}:{lineno}: no text field {text_key!r} (keys: {sorted(obj)[:8]})")
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: field {text_key!r} must be a string, got {type(text).__name__}")
                    source = _get(obj, source_key)
                    if source is _MISSING or source is None:
                        source = _get(obj, SLIMPAJAMA_SOURCE_KEY)
                    if source is _MISSING or source is None:
                        source = fallback_source
                    yield Document(index=index, text=text, source=str(source), path=path, line=lineno)
                    index += 1
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not valid UTF-8 at or after line {lineno + 1} ({exc.reason})") from None
        except (OSError, EOFError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ValueError(f"{path}: cannot read ({exc})") from None
    if index == 0:
        raise ValueError(f"no documents in the input ({', '.join(files[:4])}{' ...' if len(files) > 4 else ''})")
