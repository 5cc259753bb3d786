"""The package's shape, read from the source with ``ast`` (docs/design.md, "Packages and layers").

* The imports between units (packages, sub-packages, top-level modules) are exactly the declared
  graph :data:`DEPENDENCIES`, which has no cycle: an import the declaration lacks fails, and so does
  a declared arrow no import uses (the declaration is the real graph, not a wish). Every import
  form counts (scripts/lib/package_graph.py: ``from harpe_megatron import x``, relative imports,
  imports in functions, ``importlib.import_module("...")``).
* docs/design.md's package picture is the one the code gives (regenerate it with
  ``python scripts/lib/package_graph.py --write``); every package says what it owns in a docstring.
* No module imports the tests or pytest; function-local imports of the package's own modules
  only where an optional dependency needs them (``ALLOWED_LOCAL_IMPORTS``).
* No module is longer than ``MAX_LINES``.
* Every ``[project.scripts]`` entry and every ``tools/*.py`` shim names a ``main`` in ``cli/``.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "harpe_megatron"

sys.path.insert(0, str(ROOT / "scripts" / "lib"))
import package_graph as pg  # noqa: E402

sys.path.pop(0)

# Unit -> the units it imports. Read bottom up: a unit appears after everything it imports.
DEPENDENCIES: dict[str, set[str]] = {
    "compat": set(),
    "log": set(),
    "run_dir": set(),
    "parallel": set(),
    "hf.harpe_llama": set(),  # the shipped HF code: self-contained, it imports nothing of ours
    "positional": {"compat", "parallel"},
    "distributed": {"log"},
    "config": {"positional", "run_dir"},
    "data": {"compat", "log", "parallel", "positional"},
    "model": {"compat", "log", "parallel", "positional", "config"},
    "checkpoint": {"compat", "run_dir", "distributed"},
    "step": {"run_dir", "distributed", "config", "model"},
    "planner": {"distributed", "config", "data", "step"},  # data: the document lengths (document masking)
    "training.reliability": {"log", "run_dir", "distributed", "config", "checkpoint", "step"},
    "training": {"log", "run_dir", "positional", "distributed", "checkpoint", "config", "data", "step", "planner",
                 "training.reliability"},
    "hf": {"hf.harpe_llama", "run_dir", "distributed", "positional", "checkpoint", "config", "model"},
    "eval": {"hf.harpe_llama"},
    "repro": {"run_dir", "positional", "config", "checkpoint", "data"},  # the reproduction's protocol and pipeline
    "cli": {"log", "checkpoint", "config", "data", "eval", "hf", "hf.harpe_llama", "planner", "training",
            "training.reliability", "repro"},
    "train": {"cli"},  # the ``python -m harpe_megatron.train`` command
}
# (importing module, imported module): function-local because the dependency is optional
ALLOWED_LOCAL_IMPORTS = {
    ("harpe_megatron.positional.rope_apply", "harpe_megatron.positional.rope_kernel"),  # Triton
}
MAX_LINES = 450


@functools.cache
def _all_imports() -> list[tuple[str, Path, pg.Import]]:
    mods = pg.modules()
    return [(name, path, imp) for name, path in mods.items() for imp in pg.imports(name, path, mods)]


def test_the_declared_graph_has_no_cycle_and_names_every_unit():
    pg.layers(DEPENDENCIES)  # raises on a cycle
    undeclared = sorted(set(DEPENDENCIES).union(*DEPENDENCIES.values()) - set(DEPENDENCIES))
    assert not undeclared, f"arrows to units DEPENDENCIES does not declare: {undeclared}"
    actual, declared = set(pg.units()), set(DEPENDENCIES)
    assert not actual - declared, f"units without a place in DEPENDENCIES: {sorted(actual - declared)}"
    assert not declared - actual, f"declared units that do not exist: {sorted(declared - actual)}"


@functools.cache
def _graph() -> dict[tuple[str, str], list[str]]:
    return pg.graph()


def test_imports_follow_the_declared_graph():
    edges = _graph()
    problems = [f"{where[0]}: {a} imports {b} ({len(where)} place(s)), which DEPENDENCIES does not allow"
                for (a, b), where in sorted(edges.items()) if b not in DEPENDENCIES.get(a, set())]
    assert not problems, "imports against the declared graph of docs/design.md:\n" + "\n".join(problems)


def test_every_declared_arrow_is_an_import():
    edges = _graph()
    unused = [f"{a} -> {b}" for a, deps in sorted(DEPENDENCIES.items()) for b in sorted(deps) if (a, b) not in edges]
    assert not unused, "declared in DEPENDENCIES but imported nowhere (drop them):\n" + "\n".join(unused)


def test_nothing_imports_the_root_package_itself():
    problems = [f"{path.relative_to(ROOT)}:{imp.line}: imports {imp.target!r}; import the module it uses"
                for _, path, imp in _all_imports() if imp.target == "harpe_megatron"]
    assert not problems, "\n".join(problems)


def test_design_md_draws_the_package_graph_of_the_code():
    current = pg.in_design((ROOT / "docs" / "design.md").read_text())
    assert current is not None, "docs/design.md lost its generated package graph (see scripts/lib/package_graph.py)"
    assert current == pg.block(), \
        "docs/design.md's package graph is stale: run python scripts/lib/package_graph.py --write"


def test_every_package_says_what_it_owns():
    missing = [unit for unit in pg.units() if not pg.summary(unit)]
    assert not missing, f"packages or modules without a docstring: {missing}"


def test_the_import_reader_sees_every_form(tmp_path):
    """The checker itself: each import form of Python resolves to the module it names."""
    pkg = tmp_path / "harpe_megatron"
    for folder in ("", "config", "training", "training/reliability"):
        (pkg / folder).mkdir(parents=True, exist_ok=True)
        (pkg / folder / "__init__.py").write_text('"""x."""\n')
    for module in ("compat.py", "config/run.py", "training/trainer.py", "training/reliability/watchdog.py"):
        (pkg / module).write_text("")
    source = pkg / "training" / "reliability" / "faults.py"
    source.write_text("\n".join([
        "import os",  # 1: not ours
        "import harpe_megatron.config.run",  # 2
        "import harpe_megatron.config.run as run",  # 3
        "from harpe_megatron import compat",  # 4: a module through its package
        "from harpe_megatron.config import run",  # 5
        "from harpe_megatron.config.run import RunConfig",  # 6: a name of a module
        "from . import watchdog",  # 7: relative, a module
        "from .. import trainer",  # 8
        "from ..trainer import Trainer",  # 9
        "from ... import compat",  # 10
        "import importlib",  # 11
        "x = importlib.import_module('harpe_megatron.training.trainer')",  # 12
        "y = __import__('harpe_megatron.config')",  # 13
        "def f():",  # 14
        "    from harpe_megatron.training import trainer",  # 15: local
        "from typing import TYPE_CHECKING",  # 16
        "if TYPE_CHECKING:",  # 17
        "    from harpe_megatron.config import run",  # 18
    ]) + "\n")
    mods = pg.modules(tmp_path)
    found = {(imp.target, imp.local, imp.line) for imp in pg.imports("harpe_megatron.training.reliability.faults",
                                                                     source, mods)}
    assert found == {
        ("os", False, 1), ("harpe_megatron.config.run", False, 2), ("harpe_megatron.config.run", False, 3),
        ("harpe_megatron.compat", False, 4), ("harpe_megatron.config.run", False, 5),
        ("harpe_megatron.config.run", False, 6), ("harpe_megatron.training.reliability.watchdog", False, 7),
        ("harpe_megatron.training.trainer", False, 8), ("harpe_megatron.training.trainer", False, 9),
        ("harpe_megatron.compat", False, 10), ("importlib", False, 11),
        ("harpe_megatron.training.trainer", False, 12), ("harpe_megatron.config", False, 13),
        ("harpe_megatron.training.trainer", True, 15), ("typing", False, 16), ("harpe_megatron.config.run", False, 18),
    }
    pkgs = pg.packages(tmp_path)
    assert pg.unit_of("harpe_megatron.training.reliability.watchdog", pkgs) == "training.reliability"
    assert pg.unit_of("harpe_megatron.training.trainer", pkgs) == "training"
    assert pg.unit_of("harpe_megatron.compat", pkgs) == "compat"
    edges = pg.graph(tmp_path)
    assert set(edges) == {("training.reliability", "config"), ("training.reliability", "compat"),
                          ("training.reliability", "training")}
    with pytest.raises(ValueError, match="import cycle: training -> training.reliability -> training"):
        pg.layers({"training": {"training.reliability"}, "training.reliability": {"training"}})


def test_the_package_imports_no_test_code():
    problems = [f"{path.relative_to(ROOT)}:{imp.line}: imports {imp.target}" for _, path, imp in _all_imports()
                if imp.target.split(".")[0] in ("tests", "pytest") or imp.target.startswith("harpe_megatron.testing")]
    assert not problems, "\n".join(problems)


def test_function_local_imports_of_our_modules_only_for_optional_dependencies():
    problems = [f"{path.relative_to(ROOT)}:{imp.line}: function-local import of {imp.target}"
                for name, path, imp in _all_imports()
                if imp.local and imp.target.startswith("harpe_megatron")
                and (name, imp.target) not in ALLOWED_LOCAL_IMPORTS]
    assert not problems, "\n".join(problems)


def test_modules_stay_small():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path in pg.modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)


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


def test_docs_cite_only_files_that_exist():
    """README.md and docs/ name only files of the repository: relative links, and paths from the
    repository root, from harpe_megatron/ (``training/trainer.py``) or from the page's folder; a bare
    ``NAME.md`` in capitals (notes kept elsewhere) must be a file here too."""
    tops = {p.name for p in ROOT.iterdir()} | {p.name for p in PACKAGE.iterdir()}
    path = re.compile(r"(?<![\w/.<$-])((?:[\w.-]+/)+[\w.-]*\w\.(?:py|md|sh|yaml|json|txt|sbatch|png|toml))\b")
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    capitals = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]+\.md)\b")
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = doc.read_text()
        for target in link.findall(text):
            if "://" not in target and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)}: link to {target}")
        for cited in path.findall(text):
            if cited.split("/")[0] in tops and not any((base / cited).exists() for base in (ROOT, PACKAGE, doc.parent)):
                missing.append(f"{doc.relative_to(ROOT)}: {cited}")
        for name in capitals.findall(text):
            if not (ROOT / name).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {name} (not in the repository)")
    assert not missing, "docs cite files that are not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize("command", [["tools/convert_to_hf.py", "--help"], ["-m", "harpe_megatron.train", "--help"]])
def test_documented_commands_still_start(command):
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:"), proc.stdout[:200]
