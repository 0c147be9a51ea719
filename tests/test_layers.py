"""The package layering of ../shared/ARCHITECTURE.md holds: ``lint-imports`` (import-linter)
checks the contracts in pyproject.toml (``[tool.importlinter]``) against every import,
function-level ones included."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("lint-imports") is None,
                    reason="import-linter not installed (dev extra)")
def test_import_contracts_kept() -> None:
    proc = subprocess.run(["lint-imports", "--no-cache"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_every_package_of_ours_is_under_the_contracts() -> None:
    """A new top-level package (as ``bench`` was) must join ``root_packages``, mypy's
    ``packages`` and the installed packages, or the contracts silently skip it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    ours = {p.parent.name for p in REPO.glob("*/__init__.py")
            if p.parent.name not in {"tests", "docs"}}
    assert {"splitinfer", "bench", "simulators"} <= ours
    assert set(config["tool"]["importlinter"]["root_packages"]) == ours
    assert set(config["tool"]["mypy"]["packages"]) == ours
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {name.rstrip("*") for name in include} == ours
    # nothing but the tests imports the benchmarks
    bench_rules = [c for c in config["tool"]["importlinter"]["contracts"]
                   if c.get("forbidden_modules") == ["bench"]]
    assert bench_rules and set(bench_rules[0]["source_modules"]) == ours - {"bench"}
