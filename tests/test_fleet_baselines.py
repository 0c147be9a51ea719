"""The fleet on the baselines and on a fixed-batch split: edge_only (no broker at all),
cloud_only (inputs sent as the cut) and a model whose batch is fixed at 1, whose --input
file carries an extra key."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_edge import baseline_dir, dynamic_model, fixed_batch_model, split_at_pool

from simulators.fleet import Fleet, FleetConfig
from simulators.fleet_stats import FleetResult
from simulators.support.broker import MosquittoBroker

pytestmark = pytest.mark.integration


def _run(**kwargs: Any) -> FleetResult:
    config = FleetConfig(**{"warmup_s": 0.2, "png": False, "devices": 2, "rate": 10.0,
                            "duration_s": 1.0, **kwargs})
    return asyncio.run(Fleet(config).run())


def test_edge_only_fleet_needs_no_broker(tmp_path: Path) -> None:
    split = baseline_dir(dynamic_model(tmp_path / "dyn.onnx"), tmp_path / "edge", "edge_only")
    report = _run(artifacts=split, out=tmp_path / "out").report
    assert report["answered"] == report["sent"] > 0 and report["errors"] == 0
    assert report["broker"]["kind"].startswith("none")
    assert report["split"]["request_bytes"] == 0 == report["split"]["result_wire_bytes"]
    assert report["stages"]["head"] > 0 and report["stages"]["tail"] == 0


@pytest.mark.parametrize("kind", ["cloud_only", "fixed_batch"])
def test_cloud_only_and_fixed_batch_fleets_answer(mosquitto: MosquittoBroker, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture,
                                                  kind: str) -> None:
    model = fixed_batch_model(tmp_path / "b1.onnx", 1)
    if kind == "cloud_only":
        split = baseline_dir(model, tmp_path / "splits" / "b1", "cloud_only")
    else:
        split = split_at_pool(model, tmp_path / "splits" / "b1", 1)
    inp = tmp_path / "in.npz"
    rng = np.random.default_rng(3)
    np.savez(inp, x=rng.random((6, 3, 8, 8)).astype(np.float32), label=np.arange(6) % 10,
             weights=np.ones(6))
    with caplog.at_level(logging.WARNING, logger="simulators.fleet"):
        report = _run(artifacts=split, broker=mosquitto.url, out=tmp_path / "out",
                      input=inp, reference=model).report
    assert report["answered"] == report["sent"] > 0 and report["errors"] == 0
    assert report["accuracy"]["agreement"] == 1.0  # every answer = the unsplit model's
    notes = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(notes) == 1 and "['weights']" in notes[0]
