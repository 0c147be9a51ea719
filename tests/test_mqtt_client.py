"""splitinfer.mqtt_client.MqttClient against real brokers (mosquitto, amqtt)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from simulators.support.broker import (
    EmbeddedBroker,
    MosquittoBroker,
    dynsec_plugin,
    mosquitto_binary,
)
from splitinfer.errors import BadInputError, TransportError
from splitinfer.mqtt import BrokerConfig, parse_size
from splitinfer.mqtt_client import Message, MqttClient, SubscribeRefused, Will


def _cfg(broker: object, **query: str) -> BrokerConfig:
    url = broker.url  # type: ignore[attr-defined]
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return BrokerConfig.from_url(url)


def _topic() -> str:
    return f"t/{uuid.uuid4().hex}"


async def _client(cfg: BrokerConfig, **kw: object) -> MqttClient:
    client = MqttClient(cfg, f"c-{uuid.uuid4().hex[:8]}", **kw)  # type: ignore[arg-type]
    await client.connect(timeout_s=5)
    return client


def test_publish_subscribe_round_trip_mqtt5(mosquitto: MosquittoBroker) -> None:
    async def main() -> None:
        sub, pub = await _client(_cfg(mosquitto)), await _client(_cfg(mosquitto))
        assert sub.protocol == pub.protocol == "5" and sub.connected
        topic = _topic()
        assert await sub.subscribe(topic, qos=1) == 1
        payload = bytes(range(256)) * 1000
        code = await pub.publish(topic, payload, response_topic="r/1", correlation=b"c1",
                                 expiry_s=2.5)
        assert code == 0
        it = sub.messages()
        msg = await asyncio.wait_for(it.__anext__(), 5)
        assert (msg.topic, msg.payload, msg.qos, msg.response_topic, msg.correlation) == (
            topic, payload, 1, "r/1", b"c1")
        # no subscriber: PUBACK 16
        assert await pub.publish(_topic(), b"x") == 16
        assert await pub.publish(_topic(), b"x", qos=0) is None
        await sub.disconnect()
        await pub.disconnect()
        assert not sub.connected and sub.lost.is_set()

    asyncio.run(main())


def test_on_message_fast_path_and_many_in_flight(mosquitto: MosquittoBroker) -> None:
    async def main() -> None:
        got: list[Message] = []
        sub = await _client(_cfg(mosquitto), on_message=got.append)
        pub = await _client(_cfg(mosquitto))
        topic = _topic()
        await sub.subscribe(topic)
        futures = [pub.publish(topic, i.to_bytes(4, "big")) for i in range(2000)]
        assert set(await asyncio.gather(*futures)) == {0}
        for _ in range(500):
            if len(got) == 2000:
                break
            await asyncio.sleep(0.01)
        assert [int.from_bytes(m.payload, "big") for m in got] == list(range(2000))
        await sub.disconnect()
        await pub.disconnect()

    asyncio.run(main())


# amqtt leaves the server side of closed connections (its own port probe's among them) to
# the garbage collector, which may run inside the test: conftest's embedded_broker notes.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fallback_to_311_on_amqtt(embedded_broker: EmbeddedBroker) -> None:
    async def main() -> None:
        client = await _client(_cfg(embedded_broker))
        assert client.protocol == "3.1.1"
        topic = _topic()
        await client.subscribe(topic)
        assert await client.publish(topic, b"hi") is None  # 3.1.1: no reason code
        msg = await asyncio.wait_for(client.messages().__anext__(), 5)
        assert msg.payload == b"hi"
        await client.disconnect()

    asyncio.run(main())


def test_lost_connection_fails_pending_publishes(fresh_mosquitto: MosquittoBroker) -> None:
    async def main() -> None:
        client = await _client(_cfg(fresh_mosquitto))
        fresh_mosquitto.kill()
        await asyncio.wait_for(client.wait_closed(), 10)
        assert not client.connected and isinstance(client.lost_reason, TransportError)
        with pytest.raises(TransportError):
            await client.publish(_topic(), b"x")
        with pytest.raises(TransportError):
            await client.messages().__anext__()

    asyncio.run(main())


def test_pending_publish_future_fails_when_connection_drops(
        fresh_mosquitto: MosquittoBroker) -> None:
    async def main() -> None:
        client = await _client(_cfg(fresh_mosquitto))
        fresh_mosquitto.stop()
        # Published before the client has noticed: the PUBACK never comes.
        future = client.publish(_topic(), b"x" * 1000)
        with pytest.raises(TransportError):
            await asyncio.wait_for(future, 10)

    asyncio.run(main())


def test_bounded_inbox_pauses_reading(mosquitto: MosquittoBroker) -> None:
    async def main() -> None:
        sub = await _client(_cfg(mosquitto), inbox_size=10)
        pub = await _client(_cfg(mosquitto))
        topic = _topic()
        await sub.subscribe(topic)
        await asyncio.gather(*(pub.publish(topic, bytes([i % 256]) * 100) for i in range(300)))
        await asyncio.sleep(0.3)
        # paho parses a few packets per read after the limit at most; never all 300
        assert 10 <= sub.pending() < 300
        got = []
        it = sub.messages()
        while len(got) < 300:
            got.append(await asyncio.wait_for(it.__anext__(), 5))
        assert [m.payload[0] for m in got] == [i % 256 for i in range(300)]
        await sub.disconnect()
        await pub.disconnect()

    asyncio.run(main())


def test_deliver_to_drains_the_inbox_then_hands_over_as_read(
        mosquitto: MosquittoBroker) -> None:
    """deliver_to: what the full inbox holds first, in order, then every message as it
    is read (reading resumed); a publish made from the handler (a worker answering
    inline) is written and acknowledged."""
    async def main() -> None:
        sub = await _client(_cfg(mosquitto), inbox_size=10)
        pub = await _client(_cfg(mosquitto))
        topic, answers = _topic(), _topic()
        await sub.subscribe(topic)
        await pub.subscribe(answers)
        await asyncio.gather(*(pub.publish(topic, bytes([i])) for i in range(100)))
        await asyncio.sleep(0.3)
        assert 10 <= sub.pending() < 100  # reading paused on the full inbox
        got: list[int] = []
        acks: list[asyncio.Future[int | None]] = []

        def handler(msg: Message) -> None:
            got.append(msg.payload[0])
            acks.append(sub.publish(answers, msg.payload))

        sub.deliver_to(handler)
        assert sub.pending() == 0 and got  # the inbox went to the handler at once
        await asyncio.gather(*(pub.publish(topic, bytes([i])) for i in range(100, 150)))
        for _ in range(500):
            if len(got) == 150:
                break
            await asyncio.sleep(0.01)
        assert got == list(range(150))
        assert set(await asyncio.wait_for(asyncio.gather(*acks), 5)) == {0}
        echoed = []
        it = pub.messages()
        while len(echoed) < 150:
            echoed.append((await asyncio.wait_for(it.__anext__(), 5)).payload[0])
        assert echoed == list(range(150))
        await sub.disconnect()
        await pub.disconnect()

    asyncio.run(main())


@pytest.fixture()
def limited_mosquitto() -> Iterator[MosquittoBroker]:
    if not mosquitto_binary():
        pytest.fail("mosquitto is not installed")
    broker = MosquittoBroker(extra_config=("max_packet_size 131072",))
    broker.start()
    yield broker
    broker.close()


def test_max_packet_size_from_connack_and_url(limited_mosquitto: MosquittoBroker,
                                              mosquitto: MosquittoBroker) -> None:
    async def main() -> None:
        client = await _client(_cfg(limited_mosquitto))
        assert client.max_packet_size == 131072
        await client.disconnect()
        client = await _client(_cfg(limited_mosquitto, max_packet="64k"))
        assert client.max_packet_size == 65536  # the smaller of the two
        await client.disconnect()
        client = await _client(_cfg(mosquitto))
        # the session broker's own limit (simulators/support/broker.py sets one), well above 128 KiB
        assert client.max_packet_size is None or client.max_packet_size > 131072
        await client.disconnect()
        client = await _client(_cfg(mosquitto, max_packet="128KiB"))
        assert client.max_packet_size == 131072
        await client.disconnect()

    asyncio.run(main())


@pytest.mark.parametrize(("text", "size"), [("131072", 131072), ("128k", 131072),
                                            ("128KiB", 131072), ("1m", 1 << 20),
                                            ("2MiB", 2 << 20), ("256kb", 262144)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text, "x") == size
    assert BrokerConfig.from_url(f"mqtt://h?max_packet={text}").max_packet == size


@pytest.mark.parametrize("text", ["", "k", "12q", "-5", "1.5m", "10"])
def test_bad_max_packet_names_the_field(text: str) -> None:
    with pytest.raises(BadInputError, match="max_packet"):
        BrokerConfig.from_url(f"mqtt://h?max_packet={text}")


def test_will_and_persistent_session(fresh_mosquitto: MosquittoBroker,
                                     mosquitto: MosquittoBroker) -> None:
    async def main() -> None:
        topic = _topic()
        watcher = await _client(_cfg(mosquitto))
        await watcher.subscribe(topic)
        # will: published when the connection dies without a DISCONNECT
        cfg = _cfg(mosquitto)
        doomed = MqttClient(cfg, "doomed-" + uuid.uuid4().hex[:6],
                            will=Will(topic, b"gone", qos=1))
        await doomed.connect()
        doomed._close_socket()
        msg = await asyncio.wait_for(watcher.messages().__anext__(), 10)
        assert msg.payload == b"gone"
        await watcher.disconnect()

        # persistent session: what arrives while away is kept
        cid = "keep-" + uuid.uuid4().hex[:6]
        fcfg = _cfg(fresh_mosquitto)
        first = MqttClient(fcfg, cid, clean_start=False, session_expiry_s=60)
        await first.connect()
        await first.subscribe(topic)
        await first.disconnect()
        pub = await _client(fcfg)
        assert await pub.publish(topic, b"queued") == 0
        again = MqttClient(fcfg, cid, clean_start=False, session_expiry_s=60)
        await again.connect()
        assert again.session_present
        msg = await asyncio.wait_for(again.messages().__anext__(), 5)
        assert msg.payload == b"queued"
        await again.disconnect()
        await pub.disconnect()

    asyncio.run(main())


def test_unreachable_broker_is_a_transport_error() -> None:
    from simulators.support.broker import free_port

    async def main() -> None:
        client = MqttClient(BrokerConfig(port=free_port()), "nobody")
        with pytest.raises(TransportError, match="cannot reach broker"):
            await client.connect(timeout_s=2)

    asyncio.run(main())


@pytest.fixture(scope="module")
def dynsec_broker() -> Iterator[tuple[MosquittoBroker, dict[str, str]]]:
    from cloud_service.broker_setup import dynsec_config

    if not mosquitto_binary():
        pytest.fail("mosquitto is not installed")
    if not dynsec_plugin():
        pytest.skip("mosquitto's dynamic-security plugin is not installed")
    passwords = {"cam-1": "pw-" + uuid.uuid4().hex, "worker": "pw-" + uuid.uuid4().hex,
                 "admin": "pw-" + uuid.uuid4().hex}
    config, _ = dynsec_config(devices=["cam-1"], workers=["worker"], prefix="acl",
                              passwords=passwords)
    broker = MosquittoBroker(dynsec=config)
    broker.start()
    yield broker, passwords
    broker.close()


def test_suback_refusal_and_bad_password(
        dynsec_broker: tuple[MosquittoBroker, dict[str, str]]) -> None:
    broker, passwords = dynsec_broker

    async def main() -> None:
        cfg = BrokerConfig(host=broker.host, port=broker.port, username="cam-1",
                           password=passwords["cam-1"])
        client = MqttClient(cfg, "cam-1")
        await client.connect()
        with pytest.raises(SubscribeRefused, match="cam-1") as info:
            await client.subscribe("acl/v1/req/#")
        assert info.value.reason == 0x87 and "not authorized" in str(info.value)
        assert await client.subscribe("acl/v1/res/cam-1") == 1  # its own results: granted
        # a refused publish: the PUBACK says so
        assert await client.publish("acl/v1/res/other", b"x") == 0x87
        await client.disconnect()
        bad = MqttClient(BrokerConfig(host=broker.host, port=broker.port, username="cam-1",
                                      password="wrong"), "cam-1")
        with pytest.raises(TransportError, match=r"docs/security\.md"):
            await bad.connect()

    asyncio.run(main())
