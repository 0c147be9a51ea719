"""``splitinfer demo`` end to end, as the README's first command runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _demo(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "splitinfer.cli", "demo", "--json", "--devices", "3",
         "--out", str(tmp_path / "report"), *extra],
        capture_output=True, text=True, timeout=240, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, object] = json.loads(proc.stdout)
    assert Path(str(report["report"])).is_file()
    return report


@pytest.mark.parametrize("mosquitto_installed", [True, False], ids=["mosquitto", "embedded"])
def test_demo_split_accuracy_equals_unsplit(tmp_path: Path, mosquitto_installed: bool) -> None:
    # SPLITINFER_MOSQUITTO="" makes the demo behave as on a machine without mosquitto.
    env = {} if mosquitto_installed else {"SPLITINFER_MOSQUITTO": ""}
    report = _demo(tmp_path, env=env)
    assert ("mosquitto" in str(report["broker"])) == mosquitto_installed
    assert report["mqtt_protocol"] == ("5" if mosquitto_installed else "3.1.1")
    acc = report["accuracy"]
    assert isinstance(acc, dict)
    assert acc["int8_split"] == acc["int8_unsplit"]
    assert acc["int8_split"] > 0.95
    assert report["split_matches_unsplit_int8"] == report["samples"] == 360
    cut = report["cut"]
    assert isinstance(cut, list) and cut[0]["dtype"] == "int8"
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    assert {"e2e", "head", "network", "tail"} <= set(latency)
