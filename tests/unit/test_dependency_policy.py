"""The dependency policy holds together: pyproject ranges, requirements/lock.txt, the transformers
floor, megatron-core's version check in code (compat.py) and the Dockerfile's install step (README,
"Dependencies and support matrix")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

from harpe_megatron import compat

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
PYTHONS = ("3.11", "3.12")

sys.path.insert(0, str(ROOT / "scripts" / "lib"))
from image_requirements import pins_for  # noqa: E402

sys.path.pop(0)


def lock_pins(python: str) -> dict[str, Version]:
    pins = {}
    for requirement in pins_for(LOCK.read_text(), python):
        name, version = requirement.split("==")
        pins[name.lower()] = Version(version)
    text = LOCK.read_text()
    for name in ("torch", "triton"):  # image-provided lines, dropped by pins_for
        match = re.search(rf'^{name}==([^;\s]+)(; python_version == "{re.escape(python)}")?$', text, re.M)
        if match:
            pins[name] = Version(match.group(1))
    return pins


def project_requirements(python: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = dict(default_environment(), python_version=python, python_full_version=f"{python}.0")
    extras = project["optional-dependencies"]["test"] + project["optional-dependencies"]["logging"]
    reqs = [Requirement(r) for r in project["dependencies"] + extras]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


@pytest.mark.parametrize("python", PYTHONS)
def test_lock_satisfies_pyproject_ranges(python):
    """Every pinned version lies inside the range pyproject.toml states (so its bounds were tested)."""
    pins = lock_pins(python)
    for req in project_requirements(python):
        name = req.name.lower()
        assert name in pins, f"{name} has no pin for Python {python} in {LOCK}"
        assert req.specifier.contains(pins[name], prereleases=True), (name, str(req.specifier), pins[name])


def test_lock_covers_both_ends_of_megatron_and_torch():
    low, high = lock_pins("3.11"), lock_pins("3.12")
    assert low["megatron-core"] == Version(".".join(map(str, compat.SUPPORTED_MEGATRON[0])))
    assert high["megatron-core"].release[:2] == compat.SUPPORTED_MEGATRON[1]
    torch_req = next(r for r in project_requirements("3.11") if r.name == "torch")
    bounds = {s.operator: Version(s.version) for s in torch_req.specifier}
    assert low["torch"] == bounds[">="]  # the locked leg tests the lowest torch ...
    assert high["torch"].release[:2] == (bounds["<"].release[0], bounds["<"].release[1] - 1)  # ... the newest one


def test_transformers_floor_is_the_lower_bound_and_there_is_no_cap():
    """transformers: pyproject's lower bound is the floor leg's version; no upper bound (exported
    harpe_llama folders meet whatever release their users have, so CI's newest leg installs the
    newest one); the lock pins a version above the floor."""
    req = next(r for r in project_requirements("3.11") if r.name == "transformers")
    floor_pins = (ROOT / "requirements" / "transformers-floor.txt").read_text()
    floor = Version(re.search(r"^transformers==(\S+)", floor_pins, re.M).group(1))
    assert {s.operator: Version(s.version) for s in req.specifier} == {">=": floor}
    for python in PYTHONS:
        assert lock_pins(python)["transformers"] > floor


def test_image_requirements_drop_what_the_image_provides():
    reqs = pins_for(LOCK.read_text(), "3.12")
    names = {r.split("==")[0] for r in reqs}
    assert not names & {"torch", "triton"} and not any(n.startswith(("nvidia-", "cuda-")) for n in names)
    assert any(r.startswith("megatron-core==0.19.") for r in reqs)
    assert all(";" not in r for r in reqs)


@pytest.mark.skipif(sys.version_info[:2] != (3, 12), reason="resolves for the Dockerfile's Python 3.12 (newest leg)")
def test_dockerfile_install_step_resolves_for_python_312(tmp_path):
    """The Dockerfile's `pip install --no-deps -r` of the lock's 3.12 set finds a wheel for every pin."""
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(pins_for(LOCK.read_text(), "3.12")) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--target", str(tmp_path / "target"), "-r", str(reqs)],
        capture_output=True, text=True, env=dict(os.environ, PIP_CONSTRAINT="/dev/null"), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "megatron-core-0.19." in done.stdout
