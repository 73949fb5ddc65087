"""The package's import floors: every `dsv3_jax` import (module-level or inside a function) points to the
importer's own floor or one below it, as the map in docs/design.md ("Layout") says."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR_LINE = re.compile(r"^floor (\d+) [\w ]+:\s+(.+)$")


def documented_floors() -> dict[str, int]:
    """{module pattern: floor} from docs/design.md's floor lines ("data.*" covers the data package)."""
    floors = {}
    for line in (REPO / "docs" / "design.md").read_text().splitlines():
        match = FLOOR_LINE.match(line.strip())
        if match:
            for pattern in match.group(2).split():
                floors[pattern] = int(match.group(1))
    return floors


def package_modules() -> dict[str, Path]:
    """{dotted name under dsv3_jax: file}; package __init__ files are named after their package."""
    modules = {}
    for path in sorted((REPO / "dsv3_jax").rglob("*.py")):
        parts = path.relative_to(REPO / "dsv3_jax").with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `path` imports anywhere in its body (`from dsv3_jax.x import y` counts y when y is
    a module, else x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dsv3_jax":
            base = node.module.removeprefix("dsv3_jax").lstrip(".")
            for alias in node.names:
                child = f"{base}.{alias.name}".lstrip(".")
                found.add(child if child in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("dsv3_jax.") for a in node.names if a.name.startswith("dsv3_jax."))
    return {name for name in found if name in modules}


def floor_of(module: str, floors: dict[str, int]) -> int | None:
    hits = [floor for pattern, floor in floors.items() if fnmatch.fnmatchcase(module, pattern)]
    return hits[0] if len(hits) == 1 else None


def test_every_module_has_one_documented_floor():
    floors = documented_floors()
    assert len(floors) > 30, "docs/design.md lost its floor lines"
    packages = {"data", "train"}  # __init__ files that only name their package
    for module in package_modules():
        if module not in packages:
            assert floor_of(module, floors) is not None, f"{module} is on no floor (or several) in docs/design.md"


def test_no_module_imports_from_a_floor_above_it():
    floors, modules = documented_floors(), package_modules()
    upward = []
    for module, path in modules.items():
        mine = floor_of(module, floors)
        if mine is None:
            continue
        for target in imports_of(path, modules):
            theirs = floor_of(target, floors)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} (floor {mine}) imports {target} (floor {theirs})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk finds function-level imports, so a lazy upward import cannot hide."""
    (tmp_path / "mod.py").write_text("def f():\n    from dsv3_jax.train.trainer import train\n    return train\n")
    modules = {"mod": tmp_path / "mod.py", "train.trainer": tmp_path / "t.py"}
    assert imports_of(tmp_path / "mod.py", modules) == {"train.trainer"}
