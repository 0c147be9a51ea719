"""`splitinfer bench overhead` runs end to end and reports its figure beside the floor."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_overhead_json_shape() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "splitinfer.cli", "bench", "overhead", "--model", "digits_cnn",
         "--at", "pool", "--requests", "20", "--json"],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    for key in ("e2e_p50_ms", "floor_p50_ms", "ratio", "payload_bytes"):
        assert report[key] > 0, key
    parts = report["head_p50_ms"] + report["tail_p50_ms"] + report["echo_p50_ms"]
    assert abs(report["floor_p50_ms"] - parts) < 1e-3
    assert abs(report["ratio"] - report["e2e_p50_ms"] / report["floor_p50_ms"]) < 1e-3
    # 2048 B of float32 at the cut plus the envelope's header
    assert 2048 < report["payload_bytes"] < 2048 + 512
    assert report["requests"] == 20
