"""The manifest that marks a complete data build (demo data, reproduction corpus): written last,
with the settings the build was made with, so that a build interrupted midway has none and is
made again, and one made with other settings is not silently reused."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["matches_build"]


def matches_build(manifest: str | os.PathLike, settings: dict, what: str, hint: str) -> bool:
    """Whether the build recorded in ``manifest`` was made with ``settings``: False when there is
    no manifest (nothing built, or a build that stopped midway), True when its settings equal
    ``settings``; otherwise a ``FileExistsError`` naming each differing setting (built, asked),
    ``what`` was built (e.g. "the demo data there") and ``hint`` (what to do about it)."""
    if not os.path.isfile(manifest):
        return False
    previous = json.loads(Path(manifest).read_text(encoding="utf-8")).get("settings")
    if previous == settings:
        return True
    diff = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v} \
        if isinstance(previous, dict) else settings
    raise FileExistsError(f"{manifest}: {what} was built with other settings (setting: (built, asked) {diff}); "
                          f"{hint}")
