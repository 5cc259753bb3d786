"""The package's shape, read from the source with ``ast`` (docs/design.md, "Packages and layers").

* A module imports only packages of a lower layer than its own (or its own package); ``training``
  and ``hf`` share a layer and do not import each other.
* No module imports the tests or pytest; function-local imports of the package's own modules
  only where an optional dependency needs them (``ALLOWED_LOCAL_IMPORTS``).
* No module is longer than ``MAX_LINES``.
* Every ``[project.scripts]`` entry and every ``tools/*.py`` shim names a ``main`` in ``cli/``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "harpe_megatron"

# bottom first; a package may import packages of earlier layers only
LAYERS: list[set[str]] = [
    {"compat", "log"},
    {"parallel"},
    {"positional"},
    {"config"},
    {"model"},
    {"data"},
    {"distributed"},
    {"checkpoint"},
    {"training", "hf"},
    {"eval"},
    {"repro"},
    {"cli"},
]
# top-level modules that belong to a package's layer: the ``python -m harpe_megatron.train`` alias
ALIASES = {"train": "cli"}
# (importing module, imported module): function-local because the dependency is optional
ALLOWED_LOCAL_IMPORTS = {
    ("harpe_megatron.positional.rope_apply", "harpe_megatron.positional.rope_kernel"),  # Triton
}
MAX_LINES = 450


def _layer(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(f"harpe_megatron.{package} is in no layer of LAYERS (tests/unit/test_architecture.py)")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


def _imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import in the module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, in_function, child.lineno))
            visit(child, local)

    visit(tree, False)
    return found


def _package_of(module: str) -> str:
    package = module.split(".")[1]
    return ALIASES.get(package, package)


def test_packages_import_only_lower_layers():
    problems = []
    for name, path in _modules():
        if name == "harpe_megatron":
            continue
        own = _package_of(name)
        for target, _, line in _imports(name, path):
            if not target.startswith("harpe_megatron.") or _package_of(target) == own:
                continue
            other = _package_of(target)
            if _layer(other) >= _layer(own):
                problems.append(f"{path.relative_to(ROOT)}:{line}: {own} (layer {_layer(own)}) imports "
                                f"{target} (layer {_layer(other)})")
    assert not problems, "imports against the layering of docs/design.md:\n" + "\n".join(problems)


def test_the_package_imports_no_test_code():
    problems = [f"{path.relative_to(ROOT)}:{line}: imports {target}"
                for name, path in _modules() for target, _, line in _imports(name, path)
                if target.split(".")[0] in ("tests", "pytest") or target.startswith("harpe_megatron.testing")]
    assert not problems, "\n".join(problems)


def test_function_local_imports_of_our_modules_only_for_optional_dependencies():
    problems = [f"{path.relative_to(ROOT)}:{line}: function-local import of {target}"
                for name, path in _modules() for target, local, line in _imports(name, path)
                if local and target.startswith("harpe_megatron") and (name, target) not in ALLOWED_LOCAL_IMPORTS]
    assert not problems, "\n".join(problems)


def test_modules_stay_small():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for _, path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)


def test_the_layering_test_sees_a_violation(tmp_path):
    """The checker itself: an upward import in a module is reported with its line."""
    module = tmp_path / "harpe_megatron" / "config" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("import os\n\n\ndef f():\n    from harpe_megatron.training.trainer import train\n")
    imports = _imports("harpe_megatron.config.bad", module)
    assert ("harpe_megatron.training.trainer", True, 5) in imports
    assert _layer("training") > _layer("config")


def test_entry_points_and_tool_shims_name_cli_mains():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    targets = set()
    for command, target in scripts.items():
        module, _, func = target.partition(":")
        assert module.startswith("harpe_megatron.cli.") and func == "main", (command, target)
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assert "\ndef main(" in source, f"{command}: {module} has no main()"
        targets.add(module)
    for tool in sorted((ROOT / "tools").glob("*.py")):
        module = f"harpe_megatron.cli.{tool.stem}"
        assert module in targets, f"tools/{tool.name} has no [project.scripts] entry for {module}"
        assert f"from {module} import main" in tool.read_text(), f"tools/{tool.name} is not a shim of {module}"


@pytest.mark.parametrize("command", [["tools/convert_to_hf.py", "--help"], ["-m", "harpe_megatron.train", "--help"]])
def test_documented_commands_still_start(command):
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:"), proc.stdout[:200]
