"""The broker matrix (docs/brokers.md) and what the worker checks about a broker.

Each broker is started by the fixtures on a free loopback port (tests/conftest.py):
latency-tuned mosquitto, stock-config mosquitto, amqtt, nats-server (MQTT gateway +
JetStream) and a RabbitMQ node of our own with the MQTT plugin. On each, with the
default settings, the int8 digits split through MQTT must give the unsplit model's
answers bit for bit. A scripted proxy in front of mosquitto stands for the brokers that
say "no shared subscriptions" in MQTT 5 terms (CONNACK property, SUBACK 0x9E) and for
those that refuse or ignore an MQTT 5 CONNECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import launch_rabbitmq
from test_cloud_support import running

from cloud_service.config import Config
from cloud_service.registry import Registry
from cloud_service.server import Server
from edge_agent import AgentConfig, EdgeAgent
from simulators.support.broker import MosquittoBroker
from splitinfer import ort_config
from splitinfer.errors import BadInputError, TransportError
from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import Will, open_client
from splitinfer.topics import DEFAULT_GROUP, Topics, check_level, topic_name
from splitter import split_model, zoo
from splitter.quantize import quantize_static

pytestmark = pytest.mark.integration

Array = np.ndarray[Any, Any]
MODEL_NAME = "digits_cnn.int8"  # the demo's name: a '.' NATS refuses in a topic

# broker -> (fixture, group the worker ends up in, protocol negotiated by "auto")
MATRIX = {
    "mosquitto": ("mosquitto", DEFAULT_GROUP, "5"),
    "mosquitto-stock": ("stock_mosquitto", DEFAULT_GROUP, "5"),
    "amqtt": ("embedded_broker", "", "3.1.1"),
    "nats": ("nats_broker", "", "3.1.1"),
    "rabbitmq": ("rabbitmq_broker", "", "3.1.1"),
}
ROUND_TRIPS: dict[str, tuple[float | None, float]] = {}  # broker -> (worker check, e2e p50)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(split directory, the int8 model it was cut from)."""
    launch_rabbitmq()  # it boots (~15 s) while the other brokers' cases run
    root = tmp_path_factory.mktemp("broker-matrix")
    int8 = quantize_static(zoo.digits_cnn_path(), zoo.digits_calibration_path(),
                           root / "digits_int8.onnx")
    split_model(int8, ["pool_QuantizeLinear_Output"], root / "splits" / "int8",
                model_name=MODEL_NAME)
    return root / "splits" / "int8", int8


@pytest.fixture(scope="module")
def registry(digits: tuple[Path, Path]) -> Registry:
    return Registry.load(digits[0], threads=1)


def serving(url: str, prefix: str, registry: Registry, **kw: Any
            ) -> contextlib.AbstractContextManager[Server]:
    return running(Server(Config(artifacts=Path("."), broker=url, prefix=prefix, threads=1,
                                 metrics_interval_s=0, drain_timeout_s=5, **kw),
                          registry=registry))


async def through_mqtt(split: Path, url: str, prefix: str, images: Array
                       ) -> tuple[Array, str, float]:
    """(logits of every image, protocol, p50 of single-image calls) via the edge agent."""
    agent = EdgeAgent.from_artifacts(split, threads=1, config=AgentConfig(
        device_id="dev-1", broker=url, prefix=prefix))
    async with agent:
        parts = [(await agent.infer({"image": images[:4]})).outputs]
        times = []
        for i in range(4, len(images)):
            start = time.perf_counter()
            parts.append((await agent.infer({"image": images[i:i + 1]})).outputs)
            times.append(time.perf_counter() - start)
        name = next(iter(parts[0]))
        return (np.concatenate([p[name] for p in parts]), agent.protocol,
                float(np.median(times)))


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.filterwarnings(
        # amqtt leaves the server side of closed connections to the GC (see test_broker)
        "ignore::pytest.PytestUnraisableExceptionWarning")) if name == "amqtt" else name
    for name in MATRIX])
def test_digits_split_through_each_broker(request: pytest.FixtureRequest,
                                          digits: tuple[Path, Path], registry: Registry,
                                          topic_prefix: str, name: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    fixture, group, protocol = MATRIX[name]
    split, model = digits
    # the reference first, before a broker thread runs beside it (see EmbeddedBroker._drain)
    images = zoo.digits_test_set()[0][:16]
    want = ort.InferenceSession(str(model), ort_config.apply(ort.SessionOptions()),
                                providers=["CPUExecutionProvider"]).run(
        None, {"image": images})[0]
    broker = request.getfixturevalue(fixture)
    with caplog.at_level(logging.INFO, logger="cloud_service.server"), \
            serving(broker.url, topic_prefix, registry) as server:
        got, agent_protocol, p50 = asyncio.run(
            through_mqtt(split, broker.url, topic_prefix, images))
    if name == "amqtt":
        gc.collect()  # while this case's warning filter still applies
    np.testing.assert_array_equal(got, want)
    assert (server.protocol, agent_protocol, server.group) == (protocol, protocol, group)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "cloud_service.server" and r.levelno >= logging.WARNING]
    fallback = [w for w in warnings if "no shared subscriptions" in w]
    assert len(fallback) == (0 if group else 1), warnings
    if not group:
        assert "run only one" in fallback[0] and "--no-group" in fallback[0]
    check = server.broker_check
    assert check is not None and check.round_trip_s is not None
    if name == "mosquitto-stock":  # Nagle on the broker's sockets: ~40 ms per answer
        assert check.slow and any("set_tcp_nodelay true" in w for w in warnings), warnings
        assert p50 > 0.02
    ROUND_TRIPS[name] = (check.round_trip_s, p50)
    print(f"\n{name}: worker's check {check.round_trip_s * 1e3:.2f} ms, device p50 "
          f"{p50 * 1e3:.2f} ms, MQTT {protocol}, {server.ready_line()}")


def test_names_in_topics_are_what_every_broker_takes() -> None:
    assert topic_name("digits_cnn.int8") == "digits_cnn_int8"
    assert topic_name("my model/v2+#") == "my_model_v2__"
    assert topic_name("") == "_"
    for bad in ("cam.1", "cam 1", "a>b", "a*b", "a/b", "a+b", "#", "$sys", ""):
        with pytest.raises(BadInputError, match="letters, digits, '_' and '-'"):
            check_level(bad, "device id")
    assert check_level("cam-1_A", "device id") == "cam-1_A"
    with pytest.raises(BadInputError, match=r"device id 'cam\.7'.*contains '\.'"):
        Topics().request("m", "cam.7")
    with pytest.raises(BadInputError, match="topic prefix"):
        Topics("fleet.eu/splitinfer")
    # a bad device id stops an agent before it connects, instead of a reconnect storm
    with pytest.raises(BadInputError, match=r"cam\.1"):
        AgentConfig(device_id="cam.1")


def test_nats_disconnects_a_client_that_publishes_a_dot(nats_broker: Any) -> None:
    """Why names are normalised: NATS drops the connection, the agent used to reconnect."""
    async def main() -> None:
        client = await open_client(BrokerConfig.from_url(nats_broker.url), "dot-check")
        try:
            with pytest.raises((TransportError, asyncio.TimeoutError)):  # closed, or no PUBACK
                await asyncio.wait_for(client.publish(
                    "splitinfer/v1/req/digits_cnn.int8/dev-1", b"x", qos=1), 2)
            await asyncio.wait_for(client.lost.wait(), 5)  # NATS closed the connection
        finally:
            await client.disconnect()

    asyncio.run(main())


# --- a scripted proxy in front of mosquitto -------------------------------------------


def _read_packet(sock: socket.socket) -> bytes | None:
    """One whole MQTT packet (fixed header included), or None at EOF."""
    def take(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    head = take(1)
    if head is None:
        return None
    length, shift, raw = 0, 0, b""
    while True:
        byte = take(1)
        if byte is None:
            return None
        raw += byte
        length += (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    body = take(length) if length else b""
    return None if body is None else head + raw + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _split(packet: bytes) -> tuple[int, bytes]:
    i = 1
    while packet[i] & 0x80:
        i += 1
    return packet[0], packet[i + 1:]


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        value += (data[i] & 0x7F) << shift
        shift += 7
        i += 1
        if not data[i - 1] & 0x80:
            return value, i


class Proxy:
    """Relays MQTT to mosquitto packet by packet, and plays a broker that:

    ``v5="close"`` closes an MQTT 5 CONNECT's socket, ``v5="silent"`` never answers it;
    ``shared_available=0`` adds "Shared Subscription Available = 0" to the CONNACK;
    ``refuse_share`` answers a SUBSCRIBE to ``$share/…`` with 0x9E (MQTT 5).
    """

    def __init__(self, upstream: MosquittoBroker, *, v5: str = "pass",
                 shared_available: int | None = None, refuse_share: bool = False) -> None:
        self.upstream, self.v5 = upstream, v5
        self.shared_available, self.refuse_share = shared_available, refuse_share
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = [self.server]
        self.v5_connects = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        connect_packet = _read_packet(client)
        if connect_packet is None:
            return
        _, body = _split(connect_packet)
        level = body[6]  # after the protocol name "MQTT" (2-byte length + 4)
        if level == 5:
            self.v5_connects += 1
            if self.v5 == "close":
                client.close()
                return
            if self.v5 == "silent":
                return  # leave it open, say nothing
        upstream = socket.create_connection((self.upstream.host, self.upstream.port))
        self.sockets.append(upstream)
        upstream.sendall(connect_packet)
        refused: set[bytes] = set()
        threading.Thread(target=self._pump, args=(client, upstream, level, refused, True),
                         daemon=True).start()
        self._pump(upstream, client, level, refused, False)

    def _pump(self, src: socket.socket, dst: socket.socket, level: int, refused: set[bytes],
              from_client: bool) -> None:
        try:
            while (packet := _read_packet(src)) is not None:
                dst.sendall(self._rewrite(packet, level, refused, from_client))
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _rewrite(self, packet: bytes, level: int, refused: set[bytes],
                 from_client: bool) -> bytes:
        header, body = _split(packet)
        kind = header >> 4
        if from_client:
            if kind == 8 and self.refuse_share and b"$share/" in body:
                refused.add(body[:2])  # its packet id: the SUBACK to rewrite
            return packet
        if kind == 2 and level == 5 and self.shared_available is not None:
            size, start = _read_varint(body, 2)
            props = bytes((0x2A, self.shared_available)) + body[start:start + size]
            body = body[:2] + _varint(len(props)) + props
            return bytes((header,)) + _varint(len(body)) + body
        if kind == 9 and body[:2] in refused:
            start = 2
            if level == 5:
                size, start = _read_varint(body, 2)
                start += size
            code = 0x9E if level == 5 else 0x80
            body = body[:start] + bytes([code] * (len(body) - start))
            return bytes((header,)) + _varint(len(body)) + body
        return packet


@pytest.mark.parametrize("behaviour", ["close", "silent"])
def test_mqtt5_fall_back_takes_under_a_second(mosquitto: MosquittoBroker,
                                              behaviour: str) -> None:
    """A broker that drops (RabbitMQ < 3.13) or ignores an MQTT 5 CONNECT: was 10 s."""
    proxy = Proxy(mosquitto, v5=behaviour)

    async def main() -> tuple[str, float]:
        start = time.monotonic()
        client = await open_client(BrokerConfig.from_url(proxy.url), "fallback")
        took = time.monotonic() - start
        gc.collect()  # the dropped MQTT 5 attempt must not close this connection
        assert client.connected, client.lost_reason
        assert await client.publish("fallback/check", b"ok", qos=1) is None  # usable, 3.1.1
        await client.disconnect()
        assert client.protocol is not None
        return client.protocol, took

    try:
        protocol, took = asyncio.run(main())
    finally:
        proxy.close()
    assert protocol == "3.1.1" and proxy.v5_connects == 1
    # measured: ~0.05 s when the socket closes, ~0.5 s when the broker stays silent
    assert took < (0.5 if behaviour == "close" else 1.5), f"fall-back took {took:.2f} s"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_amqtt_auto_protocol_connects_within_a_second(embedded_broker: Any) -> None:
    async def main() -> tuple[str, float]:
        start = time.monotonic()
        # with a will, as the worker has: amqtt then drops the MQTT 5 CONNECT unanswered
        client = await open_client(BrokerConfig.from_url(embedded_broker.url), "am",
                                   will=Will("am/status", b"offline", retain=True))
        took = time.monotonic() - start
        # The refused MQTT 5 attempt, once collected, must not take the 3.1.1 connection
        # down (paho's __del__ reported a socket close: the worker's check failed).
        gc.collect()
        assert client.connected, client.lost_reason
        await asyncio.wait_for(client.subscribe("am/check", 1), 5)
        await client.disconnect()
        assert client.protocol is not None
        return client.protocol, took

    protocol, took = asyncio.run(main())
    gc.collect()
    assert protocol == "3.1.1" and took < 1.0, f"{protocol} after {took:.2f} s"


@pytest.mark.parametrize(("proxy_kw", "reason"), [
    ({"shared_available": 0}, "Shared Subscription Available = 0"),
    ({"refuse_share": True}, "0x9E"),
])
def test_mqtt5_no_shared_subscriptions_falls_back_with_one_warning(
        mosquitto: MosquittoBroker, registry: Registry, topic_prefix: str,
        proxy_kw: dict[str, Any], reason: str, caplog: pytest.LogCaptureFixture) -> None:
    proxy = Proxy(mosquitto, **proxy_kw)
    try:
        with caplog.at_level(logging.WARNING, logger="cloud_service.server"), \
                serving(proxy.url, topic_prefix, registry) as server:
            assert server.protocol == "5"
            assert server.group == "" and server.subscription == f"{topic_prefix}/v1/req/+/+"
    finally:
        proxy.close()
    check = server.broker_check
    assert check is not None and not check.shared and reason in check.reason
    warned = [r.getMessage() for r in caplog.records if "no shared subscriptions" in
              r.getMessage()]
    assert len(warned) == 1 and reason in warned[0]


def test_no_group_skips_the_group_probe(mosquitto: MosquittoBroker, registry: Registry,
                                        topic_prefix: str) -> None:
    with serving(mosquitto.url, topic_prefix, registry, group="") as server:
        assert server.group == "" and "no group" in server.ready_line()
    assert server.broker_check is not None and server.broker_check.reason == ""


def test_cloud_serve_prints_one_ready_line(mosquitto: MosquittoBroker,
                                           digits: tuple[Path, Path],
                                           topic_prefix: str) -> None:
    split, _ = digits
    env = {**os.environ, "SPLITINFER_BROKER_PASSWORD": "s3cret"}
    url = mosquitto.url.replace("mqtt://", "mqtt://worker@")
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitinfer.cli", "cloud", "serve", "--artifacts", str(split),
         "--broker", url, "--prefix", topic_prefix, "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no line on stdout within 30 s"
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    split_id = registry_ids(split)
    assert line, err  # the worker printed its line (else: why it stopped)
    assert line.startswith(f"serving 1 split(s) [{split_id}] on mqtt://worker@127.0.0.1:"
                           f"{mosquitto.port}, group {DEFAULT_GROUP}, MQTT 5"), line
    assert "s3cret" not in line
    assert rest == "" and proc.returncode == 0, err


def registry_ids(split: Path) -> str:
    from splitinfer.manifest import Manifest

    return Manifest.load(split).split_id
