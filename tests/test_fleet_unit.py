"""Fleet pieces that need no broker: config checks, transport names, CPU meter, CLI."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.transport import MqttConnector
from simulators.fleet import FleetConfig
from simulators.fleet_support import CpuMeter, SlowHead, cpu_seconds
from simulators.fleet_transport import connector_for, pick_transport
from splitinfer.errors import BadInputError


@pytest.mark.parametrize("kwargs, words", [
    ({"devices": 0}, "devices"),
    ({"rate": 0.0}, "rate"),
    ({"speed": 0.5}, "speed"),
    ({"links": ("5g",)}, "unknown profile"),
    ({"faults": "explode@1s"}, "unknown kind"),
    ({"arrivals": "sometimes"}, "arrival spec"),
    ({"workers": 0}, "--broker"),
    ({"mqtt": "4"}, "mqtt"),
    ({"embedded_broker": True, "workers": 2}, "shared subscriptions"),
])
def test_config_names_the_bad_value(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(BadInputError, match=words):
        FleetConfig(artifacts=Path("."), **kwargs)


def test_config_takes_restart_worker_and_rate_overrides_the_spec() -> None:
    config = FleetConfig(artifacts=Path("."), rate=3.0, arrivals="bursty,rate=1,on=2s,off=8s",
                         faults="restart-worker@2s,cut-link@1s+1s")
    assert config.arrival_process().rate == 3.0
    assert [f.kind for f in config.fault_plan()] == ["cut-link", "restart-worker"]
    assert config.drain == config.timeout_s + 1


@pytest.mark.parametrize("transport", ["auto", "paho"])
def test_every_transport_name_is_the_one_client(transport: str) -> None:
    assert pick_transport(transport) == "paho"
    assert isinstance(connector_for("mqtts://h:8883?protocol=5", transport), MqttConnector)


@pytest.mark.parametrize("transport", ["lite", "mqtt", "PAHO"])
def test_retired_transport_names_are_refused(transport: str) -> None:
    with pytest.raises(BadInputError, match="expected one of auto, paho"):
        pick_transport(transport)
    with pytest.raises(BadInputError, match=transport):
        FleetConfig(artifacts=Path("."), transport=transport)


def test_cpu_meter_counts_this_process() -> None:
    meter = CpuMeter({"me": lambda: [os.getpid()], "nobody": lambda: [2**22 + 1]})
    meter.start()
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    meter.stop()
    report = meter.report()
    assert 0.1 < report["me"]["cpu_s"] < 5 and report["nobody"]["cpu_s"] == 0
    assert report["cores"] == os.cpu_count()
    assert cpu_seconds(2**22 + 1) is None


class _Head:
    input_names = ("x",)
    output_names = ("y",)

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass
        return {"y": inputs["x"] * 2}


def test_slow_head_takes_factor_times_as_long() -> None:
    slow = SlowHead(_Head(), 4.0)
    t0 = time.perf_counter()
    out = slow.run({"x": np.ones(2)})
    assert 0.035 < time.perf_counter() - t0 < 0.2
    assert out["y"].tolist() == [2.0, 2.0]
    with pytest.raises(BadInputError):
        SlowHead(_Head(), 0.5)


def test_cli_flags_map_onto_the_config() -> None:
    from simulators.fleet_cli import config_from_args
    from splitinfer.cli import build_parser

    args = build_parser().parse_args([
        "fleet", "--artifacts", "a", "--devices", "7", "--rate", "2", "--duration", "3",
        "--link", "4g", "--link", "wifi,loss=1%", "--replay", "--seed", "5",
        "--arrivals", "constant", "--speed", "4", "--faults", "kill-worker@2s",
        "--workers", "2", "--mqtt", "5", "--transport", "paho", "--out", "o"])
    config = config_from_args(args)
    assert (config.devices, config.rate, config.duration_s, config.seed) == (7, 2.0, 3.0, 5)
    assert config.links == ("4g", "wifi,loss=1%") and config.replay and config.speed == 4.0
    assert (config.workers, config.mqtt, config.transport) == (2, "5", "paho")
    assert config.out == Path("o") and config.arrival_process().kind == "constant"
