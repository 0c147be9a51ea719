"""The repository keeps its promises: CI runs the README's test command; lint is clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_first_two_commands_are_demo_and_tests() -> None:
    first, second = _readme_commands()[:2]
    assert "splitinfer demo" in first and "pip install" in first
    assert "pytest" in second and "pip install" in second


def test_ci_runs_the_readme_test_command() -> None:
    second = _readme_commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert second in ci, ".ci/run must call the README's test command verbatim"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (dev extra)")
def test_ruff_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                           str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_edge_packages_never_import_onnx_or_torch() -> None:
    code = ("import sys, splitinfer, splitinfer.wire, splitinfer.mqtt, edge_agent; "
            "bad = [m for m in ('onnx', 'torch') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_edge_extra_never_asks_for_onnx_or_torch() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in ("edge", "edge-tflite"):
        names = {re.split(r"[<>=!\[; ]", dep, maxsplit=1)[0].lower() for dep in extras[extra]}
        assert not names & {"onnx", "torch", "splitinfer"}, (extra, names)
