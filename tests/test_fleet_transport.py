"""The fleet's devices speak MQTT through the agent's own connector (splitinfer.mqtt_client):
PUBACK reasons as one device sees them, and many devices on one loop, over TLS too."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from test_acl_matrix import make_pki

from edge_agent.transport import NO_MATCHING_SUBSCRIBERS, LastWill, Transport
from simulators.fleet_transport import connector_for
from simulators.support.broker import MosquittoBroker, TlsListener, mosquitto_binary

pytestmark = pytest.mark.integration


def test_puback_reason_no_matching_subscribers(mosquitto: MosquittoBroker) -> None:
    topic = f"fleetpuback/{uuid.uuid4().hex}/req"

    async def main() -> list[int | None]:
        v5 = connector_for(mosquitto.url + "?protocol=5")
        v311 = connector_for(mosquitto.url + "?protocol=3.1.1", "paho")
        device = await v5(client_id=f"d-{uuid.uuid4().hex[:8]}", will=None)
        old = await v311(client_id=f"o-{uuid.uuid4().hex[:8]}", will=None)
        worker = await v5(client_id=f"w-{uuid.uuid4().hex[:8]}", will=None)
        try:
            assert (device.protocol, old.protocol) == ("5", "3.1.1")
            codes = [await device.publish(topic, b"x", qos=1)]  # nobody listens yet
            codes.append(await device.publish(topic, b"x", qos=0))  # no PUBACK at all
            codes.append(await old.publish(topic, b"x", qos=1))  # 3.1.1: no reason codes
            await worker.subscribe(f"$share/g/{topic}", qos=1)
            codes.append(await device.publish(topic, b"x", qos=1))
            return codes
        finally:
            for t in (device, old, worker):
                await t.close()

    assert asyncio.run(main()) == [NO_MATCHING_SUBSCRIBERS, None, None, 0]


@dataclass(frozen=True)
class TlsBroker:
    broker: MosquittoBroker
    ca: str  # the CA file that signed the broker's certificate

    def url(self, query: str = "") -> str:
        return self.broker.tls_url() + query


@pytest.fixture(scope="module")
def tls_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    if not mosquitto_binary():
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does)")
    pki = make_pki(tmp_path_factory.mktemp("fleet-pki"))
    assert pki.dir is not None, "no openssl: no test certificates"
    broker = MosquittoBroker(tls=(TlsListener(cafile=pki.path("ca.pem"),
                                              certfile=pki.path("server.pem"),
                                              keyfile=pki.path("server.key")),))
    broker.start()
    yield TlsBroker(broker, pki.path("ca.pem"))
    broker.close()


def _echo_round(url: str, devices: int, prefix: str) -> tuple[list[bytes], list[str]]:
    """``devices`` agents' transports on one loop through one connector, each asking an
    echo peer on its own topic and reading the answer on its own result topic; then one
    device's session is taken over (its connection dropped by the broker, no DISCONNECT
    from it) and its last will arrives."""

    async def main() -> tuple[list[bytes], list[str]]:
        connector = connector_for(url)
        peer = await connector(client_id=f"{prefix}-peer", will=None)
        await peer.subscribe(f"{prefix}/req/+", qos=1)
        await peer.subscribe(f"{prefix}/status/+", qos=1)
        wills: list[str] = []

        async def echo() -> None:
            async for m in peer.messages():
                if "/status/" in m.topic:
                    wills.append(m.payload.decode())
                    continue
                await peer.publish(m.topic.replace("/req/", "/res/"), m.payload, qos=1)

        echoing = asyncio.create_task(echo())
        fleet: list[Transport] = [
            await connector(client_id=f"{prefix}-{i}",
                            will=LastWill(f"{prefix}/status/{i}", f"gone {i}".encode(),
                                          retain=False))
            for i in range(devices)]
        try:
            for i, t in enumerate(fleet):
                await t.subscribe(f"{prefix}/res/{i}", qos=1)

            async def ask(i: int, t: Transport) -> bytes:
                answers = t.messages()
                await t.publish(f"{prefix}/req/{i}", f"hello {i}".encode(), qos=1)
                message = await asyncio.wait_for(anext(answers), 10)
                return message.payload

            got = await asyncio.gather(*(ask(i, t) for i, t in enumerate(fleet)))
            # another connection with the last device's client id takes its session over:
            # the broker drops the old one without a DISCONNECT from it, so sends its will
            fleet.append(await connector(client_id=f"{prefix}-{devices - 1}", will=None))
            for _ in range(100):
                if wills:
                    break
                await asyncio.sleep(0.05)
            return list(got), wills
        finally:
            for t in fleet:
                await t.close()
            echoing.cancel()
            await peer.close()

    return asyncio.run(main())


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_many_devices_share_one_loop(mosquitto: MosquittoBroker, tls_mosquitto: TlsBroker,
                                     tls: bool) -> None:
    prefix = f"fleettr{uuid.uuid4().hex[:6]}"
    url = (tls_mosquitto.url(f"?ca={tls_mosquitto.ca}&protocol=5") if tls
           else mosquitto.url + "?protocol=3.1.1")
    got, wills = _echo_round(url, 40, prefix)
    assert got == [f"hello {i}".encode() for i in range(40)]
    assert wills == ["gone 39"]


# paho leaves the socket of a failed TLS handshake to the garbage collector (unclosed)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_tls_without_the_ca_is_refused_naming_the_broker(tls_mosquitto: TlsBroker) -> None:
    from splitinfer.errors import TransportError

    async def main() -> None:
        await connector_for(tls_mosquitto.url(), timeout_s=5)(client_id="no-ca", will=None)

    with pytest.raises(TransportError, match=str(tls_mosquitto.broker.tls_ports[0])) as info:
        asyncio.run(main())
    message = str(info.value)
    del info  # its traceback holds paho's frame, which holds the socket
    gc.collect()  # while this test's warning filter still applies
    assert "certificate" in message.lower(), message
