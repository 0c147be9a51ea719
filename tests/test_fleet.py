"""Small fleets over a real mosquitto and real ``splitinfer cloud serve`` workers.

Most tests share one worker process (started once, serving the digits int8 split under a
prefix of its own) and pass ``workers=0``; the tests that break things start their own.
Each fleet names its devices with a fresh token, so fleets never take over each other's
client ids on the shared broker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulators.fleet import REPORT_STAGES, Fleet, FleetConfig
from simulators.fleet_stats import FleetResult
from simulators.fleet_support import WorkerPool
from simulators.support.broker import MosquittoBroker

pytestmark = pytest.mark.integration

SHARED_PREFIX = "fleettest"


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN, int8 (static QDQ), split at its smallest int8 cut; the quantized
    model sits in the parent folder, where the fleet finds it as the reference."""
    from simulators.support.demo import choose_cut
    from splitter import list_cuts, split_model
    from splitter.quantize import quantize_static
    from splitter.zoo import digits_calibration_path, digits_cnn_path

    root = tmp_path_factory.mktemp("fleet-digits")
    int8 = quantize_static(digits_cnn_path(), digits_calibration_path(),
                           root / "digits_cnn.int8.onnx")
    cut = choose_cut(list_cuts(int8))
    split_model(int8, [t.name for t in cut.tensors], root / "split", num_samples=4)
    return root / "split"


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitter.zoo import digits_test_set

    images, labels = digits_test_set()
    path = tmp_path_factory.mktemp("fleet-data") / "digits_test.npz"
    np.savez(path, image=images, label=labels)
    return path


@pytest.fixture(scope="module")
def shared_worker(mosquitto: MosquittoBroker, digits_split: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    pool = WorkerPool(count=1, broker=mosquitto.url + "?protocol=3.1.1",
                      artifacts=digits_split, prefix=SHARED_PREFIX, group="fleet",
                      log_dir=tmp_path_factory.mktemp("fleet-worker"))
    pool.start()
    yield pool
    pool.stop()


def _run(**kwargs: Any) -> FleetResult:
    config = FleetConfig(**{"warmup_s": 0.3, "png": False, **kwargs})
    return asyncio.run(Fleet(config).run())


def _shared(mosquitto: MosquittoBroker, split: Path, tmp_path: Path,
            **kwargs: Any) -> FleetResult:
    return _run(artifacts=split, broker=mosquitto.url, workers=0, prefix=SHARED_PREFIX,
                out=tmp_path, **kwargs)


def _accounted(report: dict[str, Any]) -> None:
    assert report["sent"] == (report["answered"] + report["errors"] + report["timeouts"]
                              + report["lost"])
    assert report["errors"] == sum(report["error_kinds"].values())


@pytest.mark.usefixtures("shared_worker")
def test_small_fleet_accounts_for_every_request(mosquitto: MosquittoBroker, digits_split: Path,
                                                tmp_path: Path) -> None:
    result = _shared(mosquitto, digits_split, tmp_path, devices=30, rate=5.0, duration_s=2.0,
                     replay=True, arrivals="constant", png=True)
    r = result.report
    _accounted(r)
    assert r["sent"] == 30 * 5 * 2  # constant arrivals: exactly rate x duration per device
    assert r["lost"] == r["errors"] == r["timeouts"] == 0
    assert r["answered"] == r["sent"]
    assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert set(r["stages"]) == set(REPORT_STAGES)
    assert r["stages"]["tail"] > 0 and r["stages"]["uplink"] == 0.0  # loopback: no link
    assert r["throughput_rps"] > 0
    assert r["cpu"]["fleet"]["cpu_s"] > 0 and "broker" not in r["cpu"]  # an external broker
    assert r["config"]["transport"] == "paho"  # splitinfer.mqtt_client drives paho
    assert Path(r["png"]).stat().st_size > 10_000
    on_disk = json.loads(Path(r["report"]).read_text())
    assert on_disk["sent"] == r["sent"]


@pytest.mark.usefixtures("shared_worker")
def test_same_seed_gives_the_same_schedule_and_counts(mosquitto: MosquittoBroker,
                                                      digits_split: Path,
                                                      tmp_path: Path) -> None:
    runs = [_shared(mosquitto, digits_split, tmp_path / str(i), devices=10, rate=4.0,
                    duration_s=1.0, replay=True, seed=seed).report
            for i, seed in enumerate((7, 7, 8))]
    same, again, other = runs
    for r in runs:
        _accounted(r)
        assert r["lost"] == 0
    assert (same["sent"], same["warmup"]["sent"]) == (again["sent"], again["warmup"]["sent"])

    def schedule(seed: int) -> tuple[Any, Any]:
        return Fleet(FleetConfig(artifacts=digits_split, devices=10, rate=4.0, duration_s=1.0,
                                 warmup_s=0.3, seed=seed, broker="mqtt://x", workers=0)
                     )._schedule()

    first, second, changed = schedule(7), schedule(7), schedule(8)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert same["sent"] + same["warmup"]["sent"] == len(first[0])
    assert len(changed[0]) != len(first[0]) or not np.array_equal(changed[0], first[0])
    assert other["sent"] + other["warmup"]["sent"] == len(changed[0])


@pytest.mark.usefixtures("shared_worker")
def test_link_profile_runs_through_the_shaping_proxy(mosquitto: MosquittoBroker,
                                                     digits_split: Path,
                                                     tmp_path: Path) -> None:
    r = _shared(mosquitto, digits_split, tmp_path, devices=10, rate=2.0, duration_s=1.5,
                replay=True, links=("4g",)).report
    _accounted(r)
    assert r["lost"] == 0 and r["answered"] == r["sent"]
    (link,) = r["links"]
    assert link["name"] == "4g" and link["devices"] == 10
    assert link["proxy"]["accepted"] >= 10 and link["proxy"]["up"]["bytes"] > 0
    # 4g: 30 ms each way, so a round trip is at least 60 ms; uplink is derived from the model
    assert r["p50_ms"] >= 60.0
    assert 30.0 < r["stages"]["uplink"] < 35.0 and 30.0 < r["stages"]["downlink"] < 35.0
    assert r["stages"]["broker_queue"] < r["p50_ms"]


@pytest.mark.usefixtures("shared_worker")
def test_cut_link_fault_is_reported_and_accounted(mosquitto: MosquittoBroker,
                                                  digits_split: Path, tmp_path: Path) -> None:
    r = _shared(mosquitto, digits_split, tmp_path, devices=20, rate=5.0, duration_s=3.0,
                replay=True, faults="cut-link@0.5s+1s", timeout_s=4.0).report
    _accounted(r)
    (event,) = r["faults"]
    assert event["kind"] == "cut-link" and event["ok"], event
    assert r["links"][0]["name"] == "direct"  # an unshaped proxy, there to be cut
    assert r["links"][0]["proxy"]["cuts"] == 1 and r["links"][0]["proxy"]["cut"] >= 20
    assert r["retries"]["reconnects"] >= 20
    # requests made during the cut wait for the reconnect, then go out: late, not lost
    assert r["lost"] == 0
    assert r["answered"] + r["timeouts"] + r["errors"] == r["sent"]
    assert r["answered"] >= 0.9 * r["sent"]
    assert r["max_ms"] >= 500.0  # someone waited out the cut


def test_broker_restart_with_its_own_broker_and_worker(digits_split: Path,
                                                       tmp_path: Path) -> None:
    r = _run(artifacts=digits_split, out=tmp_path, devices=15, rate=5.0, duration_s=3.0,
             replay=True, faults="broker-restart@0.5s", timeout_s=5.0).report
    _accounted(r)
    (event,) = r["faults"]
    assert event["kind"] == "broker-restart" and event["ok"], event
    assert r["broker"]["kind"].startswith("mosquitto")
    assert {"fleet", "broker", "workers"} <= set(r["cpu"])
    assert r["retries"]["reconnects"] >= 15
    assert r["lost"] == 0
    assert r["answered"] >= 0.8 * r["sent"]


@pytest.mark.usefixtures("shared_worker")
def test_fleet_accuracy_equals_the_unsplit_model(mosquitto: MosquittoBroker, digits_split: Path,
                                                 digits_npz: Path, tmp_path: Path) -> None:
    # Not replay: every device runs the head on its own samples and every answer is checked.
    r = _shared(mosquitto, digits_split, tmp_path, devices=8, rate=15.0, duration_s=3.0,
                input=digits_npz, arrivals="constant").report
    _accounted(r)
    assert r["lost"] == 0 and r["answered"] == r["sent"] == 8 * 15 * 3
    acc = r["accuracy"]
    assert acc["checked"] == r["answered"] and acc["distinct_samples"] == 360
    assert acc["accuracy"] == acc["reference_accuracy"] > 0.9
    assert acc["agreement"] == 1.0
    assert acc["reference"].endswith("digits_cnn.int8.onnx")
    assert r["stages"]["head"] > 0


@pytest.mark.parametrize("mqtt", ["5", "auto"])
@pytest.mark.usefixtures("shared_worker")
def test_devices_on_mqtt_5_answer_the_same(mosquitto: MosquittoBroker, digits_split: Path,
                                           tmp_path: Path, mqtt: str) -> None:
    """The devices' one client speaks MQTT 5 (and negotiates it) as well as 3.1.1."""
    r = _shared(mosquitto, digits_split, tmp_path, devices=10, rate=5.0, duration_s=1.0,
                replay=True, arrivals="constant", mqtt=mqtt).report
    _accounted(r)
    assert r["config"]["transport"] == "paho" and r["config"]["mqtt"] == mqtt
    assert r["answered"] == r["sent"] == 50 and r["lost"] == 0


@pytest.mark.usefixtures("shared_worker")
def test_cli_json_shape(mosquitto: MosquittoBroker, digits_split: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    from splitinfer.cli import main

    code = main(["fleet", "--artifacts", str(digits_split), "--devices", "10", "--rate", "3",
                 "--duration", "1", "--replay", "--seed", "3", "--broker", mosquitto.url,
                 "--workers", "0", "--prefix", SHARED_PREFIX, "--warmup", "0.2",
                 "--out", str(tmp_path), "--json", "--check"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    assert {"sent", "answered", "lost", "p50_ms", "p99_ms", "throughput_rps",
            "stages"} <= set(report)
    assert set(report["stages"]) == set(REPORT_STAGES)
    assert all(isinstance(v, float) for v in report["stages"].values())
    assert report["lost"] == 0 and report["sent"] > 0
    assert Path(report["png"]).is_file() and Path(report["report"]).is_file()
    assert out.err == ""  # no progress bar when not a terminal or with --json
