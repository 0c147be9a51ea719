"""splitinfer.chunks: split, reassemble, bounded memory, expiry, hostile chunks."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from splitinfer import chunks, wire
from splitinfer.costmodel import mqtt_publish_bytes
from splitinfer.errors import WireError

TOPIC = "splitinfer/v1/req/mobilenet/dev-1"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _envelope(nbytes: int) -> tuple[bytes, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(0)
    arr = rng.standard_normal(nbytes // 4).astype(np.float32)
    env = wire.Envelope(kind=wire.REQUEST, request_id="r1", split_id="s", device_id="dev-1",
                        tensors=[wire.WireTensor("x", arr)], deadline=2000.0)
    return wire.encode(env), arr


def _split(payload: bytes, limit: int = 131072, rid: str = "r1", dl: float = 2000.0
           ) -> list[bytes]:
    return chunks.split(payload, request_id=rid, device="dev-1", deadline=dl,
                        max_packet=limit, topic=TOPIC)


@pytest.mark.parametrize("nbytes", [400_000, 1024 * 1024])
def test_round_trip_bit_exact_and_under_limit(nbytes: int) -> None:
    payload, arr = _envelope(nbytes)
    assert chunks.needs_chunking(len(payload), 131072, TOPIC)
    parts = _split(payload)
    assert len(parts) >= 2
    for p in parts:
        assert chunks.is_chunk(p)
        assert mqtt_publish_bytes(TOPIC, len(p), protocol="5") + 512 <= 131072
    r = chunks.Reassembler(clock=Clock())
    out = [r.add(p) for p in reversed(parts)]
    assert out[:-1] == [None] * (len(parts) - 1)
    assert out[-1] == payload
    assert out[-1] is not None
    got = wire.decode(out[-1]).tensors[0].array
    assert got.dtype == arr.dtype and got.tobytes() == arr.tobytes()
    assert r.stats.reassembled == 1 and r.bytes_held == 0


def test_small_payload_not_chunked() -> None:
    assert not chunks.needs_chunking(1000, 131072, TOPIC)
    assert not chunks.needs_chunking(10**7, None, TOPIC)
    assert not chunks.is_chunk(_envelope(1000)[0])


def test_duplicated_chunk_harmless() -> None:
    payload, _ = _envelope(400_000)
    parts = _split(payload)
    r = chunks.Reassembler(clock=Clock())
    assert r.add(parts[0]) is None
    assert r.add(parts[0]) is None
    results = [r.add(p) for p in parts[1:]]
    assert results[-1] == payload
    assert r.add(parts[1]) is None  # after completion too: no second delivery
    assert r.stats.duplicates == 2 and r.stats.reassembled == 1


def test_lost_chunk_expires_with_deadline_and_is_counted() -> None:
    clock = Clock()
    payload, _ = _envelope(400_000)
    parts = _split(payload, dl=clock.t + 5)
    r = chunks.Reassembler(clock=clock)
    for p in parts[1:]:
        assert r.add(p) is None
    assert r.bytes_held == len(payload)
    clock.t += 6
    assert r.expire() == 1
    assert r.bytes_held == 0 and r.stats.dropped_expired == 1
    assert r.add(parts[0]) is None  # late chunk of an expired request: dropped
    assert r.stats.dropped_expired == 2 and r.stats.reassembled == 0


def test_no_deadline_means_held_for_a_while_not_dropped() -> None:
    """dl = 0 is "no deadline" in the wire contract: reassembled, and an incomplete one
    goes after NO_DEADLINE_TTL_S (not at once, not never)."""
    clock = Clock()
    payload, _ = _envelope(400_000)
    whole = _split(payload, dl=0.0)
    r = chunks.Reassembler(clock=clock)
    assert [r.add(p) for p in whole][-1] == payload
    lost = _split(payload, rid="r2", dl=0.0)
    for p in lost[1:]:
        assert r.add(p) is None
    clock.t += chunks.NO_DEADLINE_TTL_S - 1
    assert r.expire() == 0 and r.bytes_held == len(payload)
    clock.t += 2
    assert r.expire() == 1 and r.bytes_held == 0


@pytest.mark.parametrize("dl", [float("nan"), float("inf"), -1.0])
def test_a_non_finite_or_negative_deadline_is_refused(dl: float) -> None:
    payload, _ = _envelope(400_000)
    body = msgpack.unpackb(_split(payload)[0])
    body["dl"] = dl
    with pytest.raises(WireError, match="'dl'"):
        chunks.Reassembler().add(msgpack.packb(body))


def test_oversized_claim_refused_before_allocating() -> None:
    chunk = msgpack.packb({"v": 1, "k": "chunk", "id": "r", "dev": "d", "i": 0, "n": 2,
                           "sz": 2**40, "cs": 2**39, "h": b"\0" * 32, "dl": 2000.0,
                           "b": b"x"})
    r = chunks.Reassembler(clock=Clock())
    with pytest.raises(WireError, match="'sz'"):
        r.add(chunk)
    assert r.bytes_held == 0 and r.stats.refused == 1


def test_inconsistent_claim_refused() -> None:
    chunk = msgpack.packb({"v": 1, "k": "chunk", "id": "r", "dev": "d", "i": 0, "n": 1000,
                           "sz": 5000, "cs": 10, "h": b"\0" * 32, "dl": 2000.0, "b": b"x"})
    with pytest.raises(WireError, match="do not make"):
        chunks.Reassembler(clock=Clock()).add(chunk)


def test_memory_bounds_per_device_and_total() -> None:
    payload, _ = _envelope(400_000)
    r = chunks.Reassembler(max_per_device=len(payload) + 10, max_total=2 * len(payload) + 10,
                           clock=Clock())
    r.add(_split(payload, rid="a")[0], device="d1")
    with pytest.raises(WireError, match="per device"):
        r.add(_split(payload, rid="b")[0], device="d1")
    r.add(_split(payload, rid="c")[0], device="d2")
    with pytest.raises(WireError, match="memory full"):
        r.add(_split(payload, rid="e")[0], device="d3")
    assert r.bytes_held == 2 * len(payload) and r.stats.dropped_memory == 2


def test_digest_mismatch_dropped() -> None:
    payload, _ = _envelope(400_000)
    parts = _split(payload)
    body = msgpack.unpackb(parts[-1])
    body["b"] = bytes(len(body["b"]))
    parts[-1] = msgpack.packb(body)
    r = chunks.Reassembler(clock=Clock())
    for p in parts[:-1]:
        r.add(p)
    with pytest.raises(WireError, match="digest"):
        r.add(parts[-1])
    assert r.stats.dropped_digest == 1 and r.bytes_held == 0


def test_hostile_chunk_envelope_uses_wire_budget() -> None:
    deep = b"\x81\xa1a" * 50 + b"\xc0"
    with pytest.raises(WireError):
        chunks.parse(deep)
    with pytest.raises(WireError, match="'h'"):
        chunks.parse(msgpack.packb({"v": 1, "k": "chunk", "id": "r", "i": 0, "n": 1,
                                    "sz": 1, "cs": 1, "h": b"", "dl": 1.0, "b": b"x"}))


def test_limit_too_small_is_clear() -> None:
    with pytest.raises(WireError, match="max_packet 2000"):
        chunks.chunk_size(2000, TOPIC)


def test_chunks_cross_strict_mosquitto_bit_exact() -> None:
    """1 MiB through a real mosquitto with max_packet_size 131072: chunks arrive and
    reassemble bit-exact; the same payload unchunked is dropped by that broker."""
    import queue
    import time

    import paho.mqtt.client as mqtt

    from simulators.support.broker import MosquittoBroker

    broker = MosquittoBroker(extra_config=("max_packet_size 131072",))
    broker.start()
    try:
        got: queue.Queue[bytes] = queue.Queue()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chunk-test",
                             protocol=mqtt.MQTTv5)
        client.on_message = lambda _c, _u, m: got.put(m.payload)
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            client.subscribe("t/chunks", qos=1)
            time.sleep(0.3)
            payload, _ = _envelope(1 << 20)
            parts = chunks.split(payload, request_id="r1", device="dev", deadline=time.time() + 60,
                                 max_packet=131072, topic="t/chunks")
            for part in parts:
                client.publish("t/chunks", part, qos=1)
            r = chunks.Reassembler()
            whole = None
            for _ in parts:
                whole = r.add(got.get(timeout=10)) or whole
            assert whole == payload
            other = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chunk-big",
                                protocol=mqtt.MQTTv5)
            other.connect(broker.host, broker.port)
            other.loop_start()
            other.publish("t/chunks", payload, qos=1)  # over the broker's limit: dropped
            time.sleep(1.0)
            other.loop_stop()
            assert got.empty()  # the unchunked payload never arrived
        finally:
            client.loop_stop()
            client.disconnect()
    finally:
        broker.close()
