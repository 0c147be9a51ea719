"""Fleet pieces that need no broker: config checks, the lite MQTT codec, CPU meter, CLI."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.transport import LastWill
from simulators.fleet import FleetConfig
from simulators.fleet_support import CpuMeter, SlowHead, cpu_seconds, mqtt_publish_bytes
from simulators.fleet_transport import pick_transport
from simulators.mqtt_lite import LiteTransport, encode_connect, encode_publish
from splitinfer.errors import BadInputError, TransportError


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


@pytest.mark.parametrize("transport, protocol, qos, tls, expected", [
    ("auto", "3.1.1", 1, False, "paho"),
    ("lite", "3.1.1", 1, False, "lite"),
    ("auto", "5", 1, False, "paho"),
    ("auto", "3.1.1", 2, False, "paho"),
    ("auto", "3.1.1", 1, True, "aiomqtt"),
    ("paho", "5", 1, False, "paho"),
    ("aiomqtt", "3.1.1", 1, False, "aiomqtt"),
])
def test_pick_transport(transport: str, protocol: str, qos: int, tls: bool,
                        expected: str) -> None:
    assert pick_transport(transport, protocol=protocol, qos=qos, tls=tls) == expected


def test_lite_transport_refuses_what_it_cannot_speak() -> None:
    with pytest.raises(BadInputError, match=r"3\.1\.1"):
        pick_transport("lite", protocol="5", qos=1, tls=False)


class _Wire:
    """Stands in for an asyncio transport: records what the client writes."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def test_encode_connect_and_publish_bytes() -> None:
    packet = encode_connect("dev-1", keepalive=30, will=LastWill("s/dev-1", b"offline"),
                            username="u", password="p")
    assert packet[0] == 0x10 and packet[2:8] == b"\x00\x04MQTT" and packet[8] == 4
    assert packet[9] == 0x02 | 0x04 | 0x08 | 0x20 | 0x80 | 0x40  # clean, will qos1 retained
    big = encode_publish("a/b", b"x" * 300, qos=1, retain=False, mid=258)
    assert big[0] == 0x32 and big[1:3] == bytes([(300 + 7) % 128 | 0x80, (300 + 7) // 128])
    assert big[3:8] == b"\x00\x03a/b" and big[8:10] == b"\x01\x02"
    assert len(big) == mqtt_publish_bytes("a/b", 300, qos=1)


def test_lite_transport_parses_packets_split_anywhere() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        wire = _Wire()
        client = LiteTransport("mqtt://test", loop)
        client._made(wire)  # type: ignore[arg-type]
        stream = (b"\x20\x02\x00\x00"  # CONNACK accepted
                  + encode_publish("res/d", b"A" * 200, qos=1, retain=False, mid=7)
                  + encode_publish("res/d", b"B", qos=0, retain=False, mid=0)
                  + b"\x40\x02\x00\x01")  # PUBACK for mid 1
        publish = asyncio.ensure_future(client.publish("req/d", b"hello", qos=1))
        await asyncio.sleep(0)
        assert wire.out[-1] == encode_publish("req/d", b"hello", 1, False, 1)
        for i in range(len(stream)):  # one byte at a time: every split point
            client._feed(stream[i:i + 1])
        await asyncio.wait_for(publish, 1)
        messages = client.messages()
        first = await anext(messages)
        second = await anext(messages)
        assert (first.topic, first.payload, second.payload) == ("res/d", b"A" * 200, b"B")
        assert b"\x40\x02\x00\x07" in wire.out  # the QoS 1 message was acknowledged
        await client.close()
        assert wire.out[-1] == b"\xe0\x00"  # DISCONNECT: a clean leave, no last will
        client._feed(encode_publish("res/d", b"C", qos=1, retain=False, mid=9))  # ignored
        with pytest.raises(TransportError):
            await anext(messages)
        with pytest.raises(TransportError):
            await client.publish("req/d", b"late", qos=1)

    asyncio.run(scenario())


def test_lite_transport_fails_pending_acks_when_the_connection_drops() -> None:
    async def scenario() -> None:
        client = LiteTransport("mqtt://test", asyncio.get_running_loop())
        client._made(_Wire())  # type: ignore[arg-type]
        publish = asyncio.ensure_future(client.publish("req/d", b"x", qos=1))
        await asyncio.sleep(0)
        client._fail(TransportError("gone"))
        with pytest.raises(TransportError, match="gone"):
            await publish

    asyncio.run(scenario())


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
