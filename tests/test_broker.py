from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from simulators.support.broker import TUNING, EmbeddedBroker, MosquittoBroker
from splitinfer.errors import BadInputError, TransportError
from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import open_client

REPO = Path(__file__).resolve().parents[1]


def test_docker_config_carries_the_same_tuning() -> None:
    conf = (REPO / "docker" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    for line in TUNING:
        assert line in conf, f"docker/mosquitto/mosquitto.conf lacks {line!r}"


def test_broker_url_parsing() -> None:
    cfg = BrokerConfig.from_url("mqtts://dev%2F1:s3cret@broker.example:9883?protocol=5&ca=/c.pem")
    assert (cfg.host, cfg.port, cfg.tls, cfg.username, cfg.password, cfg.protocol,
            cfg.ca_file) == ("broker.example", 9883, True, "dev/1", "s3cret", "5", "/c.pem")
    assert "s3cret" not in cfg.url()
    assert BrokerConfig.from_url("localhost").port == 1883
    assert BrokerConfig.from_url("mqtts://h").port == 8883
    for bad in ("http://h", "mqtt://h?bogus=1", "mqtt://h?protocol=4", "mqtt://:1883"):
        with pytest.raises(BadInputError):
            BrokerConfig.from_url(bad)


async def _round_trip(url: str, n: int = 20) -> tuple[str, float]:
    cfg = BrokerConfig.from_url(url)
    a = await open_client(cfg, "rt-a")
    b = await open_client(cfg, "rt-b")
    try:
        await b.subscribe("rt/x", qos=1)
        inbox = b.messages()
        times = []
        payload = b"\0" * 100_000
        for _ in range(n):
            t0 = time.perf_counter()
            await a.publish("rt/x", payload, qos=1)
            msg = await anext(inbox)
            times.append(time.perf_counter() - t0)
            assert msg.topic == "rt/x" and msg.payload == payload
        times.sort()
        assert a.protocol is not None
        return a.protocol, times[n // 2]
    finally:
        await a.disconnect()
        await b.disconnect()


def test_mosquitto_qos1_round_trip_has_no_nagle_stall(mosquitto: MosquittoBroker) -> None:
    proto, p50 = asyncio.run(_round_trip(mosquitto.url))
    assert proto == "5"
    # The stock config + no TCP_NODELAY stalls ~40 ms; tuned loopback is ~1 ms.
    assert p50 < 0.02, f"QoS1 100 KB round trip p50 {p50 * 1e3:.1f} ms"


# amqtt leaves the socket of the MQTT 5 CONNECT it rejects for the GC to close.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_embedded_broker_falls_back_to_311() -> None:
    # A broker of its own: amqtt logs the refused MQTT 5 CONNECT but, once in a while,
    # leaves that socket open, so the client waits out its timeout; one such stall seen in
    # a full run made both attempts time out on the shared broker. Known amqtt behaviour,
    # so one more try on a fresh broker before calling the fall-back broken.
    for attempt in range(2):
        broker = EmbeddedBroker()
        broker.start()
        try:
            proto, _ = asyncio.run(_round_trip(broker.url, n=3))
            break
        except TransportError:
            if attempt:
                raise
        finally:
            broker.stop()
    assert proto == "3.1.1"


def test_mosquitto_restart_same_port(fresh_mosquitto: MosquittoBroker) -> None:
    port = fresh_mosquitto.port
    fresh_mosquitto.restart()
    assert fresh_mosquitto.running and fresh_mosquitto.port == port


def test_result_properties_decode_as_paho_would() -> None:
    """A result carries only the request's correlation data (the request's three
    properties: tests/test_mqtt_paho_api.py)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from splitinfer.mqtt_client import publish_properties

    res = Properties(PacketTypes.PUBLISH)
    res.unpack(publish_properties(correlation=b"rid-1").pack())
    assert res.CorrelationData == b"rid-1"
    assert not hasattr(res, "ResponseTopic") and not hasattr(res, "MessageExpiryInterval")
    assert publish_properties(correlation=None).pack() == b"\x00"
