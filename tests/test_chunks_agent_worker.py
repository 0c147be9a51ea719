"""Chunked requests and results through the worker (fake publish) and the agent (memory
broker with a maximum packet size): bit-exact, lost, duplicated and refused chunks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cloud_support import TinySplit, make_split, request_payload
from test_cloud_worker import PREFIX, TOPICS, FakePublish
from test_edge_unit import make_agent

from cloud_service.config import Config
from cloud_service.registry import Registry
from cloud_service.worker import Incoming, Worker
from edge_agent import MemoryBroker
from splitinfer import chunks, wire
from splitinfer.costmodel import mqtt_publish_bytes
from splitinfer.topics import Topics

LIMIT = 131072


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> TinySplit:
    return make_split(tmp_path_factory.mktemp("chunk-artifacts"), "tiny-f", quantized=False,
                      features=4, classes=3, seed=5)


@pytest.fixture(scope="module")
def registry(split: TinySplit) -> Registry:
    return Registry.load(split.directory.parent, threads=1)


def _serve(registry: Registry, messages: list[Incoming], limit: int | None
           ) -> tuple[FakePublish, Worker]:
    pub = FakePublish()

    async def main() -> Worker:
        worker = Worker(Config(artifacts=Path("."), prefix=PREFIX), registry, pub,
                        max_packet=lambda: limit)
        try:
            for m in messages:
                worker.submit(m)
            await asyncio.wait_for(worker.drain(), 20)
        finally:
            await worker.aclose()
        return worker

    return pub, asyncio.run(main())


def _request(split: TinySplit, rows: int) -> tuple[str, str, bytes]:
    cut = np.random.default_rng(1).standard_normal((rows, 4)).astype(np.float32)
    rid, payload = request_payload(split, cut, deadline=time.time() + 60)
    return rid, TOPICS.request(split.manifest.model, "dev-1"), payload


def _chunked(rid: str, topic: str, payload: bytes) -> list[Incoming]:
    return [Incoming(topic, p) for p in chunks.split(
        payload, request_id=rid, device="dev-1", deadline=time.time() + 60,
        max_packet=LIMIT, topic=topic)]


def _answer(pub: FakePublish) -> wire.Envelope:
    r = chunks.Reassembler()
    whole = [out for _, p, _ in pub.sent if (out := r.add(p) if chunks.is_chunk(p) else p)]
    assert len(whole) == 1
    return wire.decode(whole[0])


def test_worker_reassembles_requests_and_chunks_big_results(registry: Registry,
                                                            split: TinySplit) -> None:
    rid, topic, payload = _request(split, 40_000)  # 640 KB in, 480 KB out
    plain, _ = _serve(registry, [Incoming(topic, payload)], None)
    msgs = _chunked(rid, topic, payload)
    msgs.insert(2, msgs[1])  # a duplicated chunk is harmless
    pub, worker = _serve(registry, msgs, LIMIT)
    assert len(pub.sent) > 1
    for t, p, _ in pub.sent:
        assert mqtt_publish_bytes(t, len(p), protocol="5") <= LIMIT
    got, want = _answer(pub), _answer(plain)
    assert got.error is None and got.request_id == rid
    for a, b in zip(got.tensors, want.tensors, strict=True):
        assert a.array.tobytes() == b.array.tobytes()
    s = worker.chunk_stats
    assert s.reassembled == 1 and s.duplicates == 1 and worker.chunks_sent == len(pub.sent)


def test_worker_lost_chunk_never_runs_and_expires(registry: Registry, split: TinySplit
                                                  ) -> None:
    rid, topic, payload = _request(split, 40_000)
    msgs = _chunked(rid, topic, payload)
    pub, worker = _serve(registry, msgs[:-1], LIMIT)
    assert pub.sent == [] and worker.chunk_stats.reassembled == 0
    assert worker._reassembler.bytes_held == len(payload)
    worker._reassembler.clock = lambda: time.time() + 120
    assert worker._reassembler.expire() == 1 and worker.chunk_stats.dropped_expired == 1


def test_worker_refuses_an_oversized_claim_with_an_error(registry: Registry,
                                                         split: TinySplit) -> None:
    import msgpack
    topic = TOPICS.request(split.manifest.model, "dev-1")
    claim = msgpack.packb({"v": 1, "k": "chunk", "id": "r", "dev": "dev-1", "i": 0, "n": 4,
                           "sz": 2**33, "cs": 2**31, "h": bytes(32), "dl": time.time() + 9,
                           "b": b"x"})
    pub, worker = _serve(registry, [Incoming(topic, claim)], LIMIT)
    (_, answer, _), = pub.sent
    env = wire.decode(answer)
    assert env.error is not None and env.error.code == "payload_too_large"
    assert "'sz'" in env.error.message and worker.chunk_stats.refused == 1


def test_agent_chunks_requests_over_the_memory_brokers_limit(topic_prefix: str) -> None:
    cut = np.random.default_rng(2).standard_normal((40_000, 3)).astype(np.float32)

    async def main() -> None:
        broker = MemoryBroker(max_packet_size=LIMIT)
        worker = await broker.connect(client_id="w", will=None)
        await worker.subscribe(Topics(topic_prefix).shared_request_filter())
        async with make_agent(broker, topic_prefix) as agent:
            reasm = chunks.Reassembler()

            async def answer() -> None:
                async for m in worker.messages():
                    whole = reasm.add(m.payload)
                    if whole is None:
                        continue
                    req = wire.decode(whole)
                    res = req.result([wire.WireTensor("y", req.tensors[0].array[:, :1] * 1)])
                    data = wire.encode(res)
                    for part in chunks.split(data, request_id=req.request_id, device="dev-1",
                                             deadline=req.deadline, max_packet=LIMIT,
                                             topic=req.reply_to):
                        await worker.publish(req.reply_to, part)
                    return

            task = asyncio.create_task(answer())
            result = await agent.infer_activation({"h": cut}, timeout=20)
            await task
            assert result.outputs["y"].tobytes() == cut[:, :1].tobytes()
            assert broker.oversized == []
            assert agent.counters.chunks_sent > 1
            assert agent.chunk_stats.reassembled == 1

    asyncio.run(asyncio.wait_for(main(), 30))


def test_memory_broker_drops_oversized(topic_prefix: str) -> None:
    async def main() -> Any:
        broker = MemoryBroker(max_packet_size=1000)
        t = await broker.connect(client_id="a", will=None)
        await t.publish("x/y", b"z" * 2000)
        return broker

    assert len(asyncio.run(main()).oversized) == 1


def test_agent_resends_every_chunk_after_a_lost_one(topic_prefix: str) -> None:
    """The first chunk is lost: the re-send timer sends all chunks again; the copies of
    the ones already in are duplicates, the lost one completes the request."""
    cut = np.random.default_rng(4).standard_normal((20_000, 3)).astype(np.float32)

    async def main() -> None:
        broker = MemoryBroker(max_packet_size=LIMIT)
        worker = await broker.connect(client_id="w", will=None)
        await worker.subscribe(Topics(topic_prefix).shared_request_filter())
        broker.lose(1, Topics(topic_prefix).request_filter())
        async with make_agent(broker, topic_prefix, retry_s=0.2) as agent:
            reasm = chunks.Reassembler()

            async def answer() -> None:
                async for m in worker.messages():
                    whole = reasm.add(m.payload)
                    if whole is not None:
                        req = wire.decode(whole)
                        res = req.result([wire.WireTensor("y", req.tensors[0].array[:, :1])])
                        await worker.publish(req.reply_to, wire.encode(res))
                        return

            task = asyncio.create_task(answer())
            result = await agent.infer_activation({"h": cut}, timeout=20)
            await task
            assert result.outputs["y"].tobytes() == cut[:, :1].tobytes()
            assert agent.counters.retries >= 1 and len(broker.lost) == 1
            assert reasm.stats.reassembled == 1
            sent = agent.counters.chunks_sent  # every chunk, on each of >= 2 publishes
            assert sent >= 2 * 2 and sent % agent.counters.published == 0

    asyncio.run(asyncio.wait_for(main(), 30))
