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
