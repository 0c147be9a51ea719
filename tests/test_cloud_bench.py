"""A smoke run of ``splitinfer bench batching`` on a tiny tail: it runs and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cloud_support import make_split

from bench.bench_batching import format_report
from splitinfer.cli import main as cli_main

pytestmark = pytest.mark.integration


def test_bench_batching_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    split = make_split(tmp_path, "bench-tiny", features=64)
    code = cli_main(["bench", "batching", "--artifacts", str(split.directory), "--json",
                     "--devices", "4", "--max-batch", "8", "--duration", "0.4",
                     "--warmup", "0.1", "--single-duration", "0.6",
                     "--rounds", "2"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    sweep = report["raw_ort_samples_per_s"]
    assert set(sweep) == {"1", "2", "4", "8", "16", "32"}
    for phase in ("max_batch_1", "max_batch_8"):
        figures = report["worker"][phase]
        assert figures["samples_per_s"] > 0 and figures["errors"] == 0
        assert len(figures["per_slice_samples_per_s"]) == 2
        assert figures["single_device_p50_ms"] > 0
    assert report["worker"]["max_batch_1"]["mean_batch_size"] == 1.0
    # The floor: every batch size pooled over the floor slices between the workers'
    # (3 = one per cycle + the closing one); the best size's rate.
    floor = report["raw_ort_best"]
    assert str(floor["batch"]) == max(sweep, key=sweep.get)
    assert floor["samples_per_s"] == sweep[str(floor["batch"])]
    assert len(floor["per_slice_samples_per_s"]) == 3
    assert set(report["targets"]) == {"batched_ge_0.85_raw_best", "batched_ge_max_batch_1",
                                      "single_device_delta_le_max_delay"}
    batched = report["worker"]["max_batch_8"]["samples_per_s"]
    assert report["ratios"]["batched_vs_raw_best"] == pytest.approx(
        batched / floor["samples_per_s"])
    assert report["targets"]["batched_ge_0.85_raw_best"] == (
        report["ratios"]["batched_vs_raw_best"] >= 0.85)
    assert len(report["cycle_ratios"]) == 2
    text = format_report(report)
    assert "raw onnxruntime (floor)" in text and "one device p50" in text
    assert "per cycle" in text
