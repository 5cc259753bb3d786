"""Print the lock's pins for one Python version, minus what a CUDA base image provides.

    python scripts/lib/image_requirements.py requirements/lock.txt [--python 3.12] > requirements.txt

Used by the Dockerfile: an NGC PyTorch image brings its own torch build, CUDA libraries and
Triton (and Transformer Engine / apex, which the lock never lists), so those lines are dropped;
every other package is pinned to the tested version. Markers are evaluated for ``--python``
(default: the running interpreter's major.minor) and removed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

#: Provided by the base image (its CUDA build of torch and everything tied to it).
IMAGE_PROVIDED = re.compile(r"^(torch|triton|setuptools|nvidia-.*|cuda-.*)$")
_MARKER = re.compile(r'^python_version\s*==\s*"(\d+\.\d+)"$')


def pins_for(lock_text: str, python: str, source: str = "lock") -> list[str]:
    out = []
    for number, raw in enumerate(lock_text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, _, marker = (part.strip() for part in line.partition(";"))
        if marker:
            match = _MARKER.match(marker)
            if match is None:
                raise SystemExit(f"{source}:{number}: unsupported marker {marker!r} (expected python_version == \"X.Y\")")
            if match.group(1) != python:
                continue
        name = requirement.split("==", 1)[0].strip().lower()
        if not IMAGE_PROVIDED.match(name):
            out.append(requirement)
    if not out:
        raise SystemExit(f"{source}: no pins for Python {python}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock")
    parser.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    args = parser.parse_args(argv)
    print("\n".join(pins_for(Path(args.lock).read_text(), args.python, args.lock)))


if __name__ == "__main__":
    main()
