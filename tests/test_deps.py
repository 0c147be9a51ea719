"""Every third-party import the packages, benchmarks and tests make is declared.

A dependency that happens to be on the developer's machine but is named nowhere in
``pyproject.toml`` passes there and fails on a fresh one (issue 8: ``sympy``). This test
reads the imports out of the source (``ast``, no import is executed), maps each top-level
module to the distribution that installs it and checks that the distribution is declared
directly (the base dependencies or an extra), not merely pulled in by something else.

Imports inside ``try: … except ImportError`` are optional by construction and skipped.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"splitinfer", "edge_agent", "cloud_service", "splitter", "simulators", "bench", "tests"}
SOURCE_DIRS = ("splitinfer", "edge_agent", "cloud_service", "splitter", "simulators", "bench",
               "tests")

# Needed at run time but never imported by name in our code: onnxruntime's quantization
# tooling imports sympy for its shape inference (onnxruntime itself does not declare it).
RUNTIME_ONLY = {"sympy"}

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        deps.extend(extra)
    names = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0] for dep in deps}
    return {_canon(n) for n in names if n}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type
    names: list[ast.expr] = list(kinds.elts) if isinstance(kinds, ast.Tuple) else [kinds] \
        if kinds is not None else []
    return kinds is None or any(isinstance(n, ast.Name) and n.id in
                                {"ImportError", "ModuleNotFoundError", "Exception"}
                                for n in names)


def _imports(tree: ast.AST, optional: bool = False) -> Iterator[tuple[str, bool]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], optional
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.module.split(".")[0], optional
        elif isinstance(node, ast.Try):
            guarded = optional or any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), guarded)
            for rest in (*node.handlers, *node.orelse, *node.finalbody):
                yield from _imports(rest, optional)
        else:
            yield from _imports(node, optional)


def _local_modules() -> set[str]:
    """Test helpers imported by bare name (tests/ is on sys.path under pytest)."""
    return {p.stem for p in (REPO / "tests").glob("*.py")}


def test_every_import_is_declared() -> None:
    declared = _declared()
    local = _local_modules()
    dists = md.packages_distributions()
    missing: dict[str, list[str]] = {}
    for folder in SOURCE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for module, optional in _imports(tree):
                if optional or module in OURS or module in local or \
                        module in sys.stdlib_module_names or module == "__future__":
                    continue
                names = {_canon(d) for d in dists.get(module, [module])}
                if not names & declared:
                    missing.setdefault(module, []).append(str(path.relative_to(REPO)))
    assert not missing, ("imported but not declared in pyproject.toml (base or an extra): "
                         + "; ".join(f"{m} in {', '.join(sorted(set(p))[:3])}"
                                     for m, p in sorted(missing.items())))


def test_runtime_only_dependencies_are_declared() -> None:
    assert _declared() >= RUNTIME_ONLY


def test_optional_import_detection() -> None:
    src = ("import numpy\ntry:\n    import tqdm\nexcept ImportError:\n    tqdm = None\n"
           "def f():\n    import msgpack\n")
    found = dict(_imports(ast.parse(src)))
    assert found == {"numpy": False, "tqdm": True, "msgpack": False}
