"""Idempotent requests and error hygiene in the worker core (no broker: a fake publisher)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from test_cloud_support import TinySplit, make_split, request_payload
from test_cloud_worker import PREFIX, TOPICS, FakePublish, run_worker

from cloud_service.config import Config
from cloud_service.dedupe import EXPIRY_MARGIN_S, NO_DEADLINE_TTL_S, ResultCache
from cloud_service.metrics import render_prometheus
from cloud_service.registry import Registry
from cloud_service.worker import Incoming, Worker
from splitinfer.wire import decode


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> TinySplit:
    return make_split(tmp_path_factory.mktemp("dedupe"), "tiny-dd", seed=7)


@pytest.fixture(scope="module")
def registry(split: TinySplit) -> Registry:
    return Registry.load(split.directory, threads=1)


def incoming(split: TinySplit, rid: str, device: str = "dev-1",
             correlation: bytes | None = None, seed: int = 0) -> Incoming:
    _, payload = request_payload(split, split.sample(seed=seed), device_id=device,
                                 request_id=rid)
    return Incoming(TOPICS.request("tiny", device), payload, correlation=correlation)


# --- the cache ---------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_cache_bounded_by_entries_bytes_and_deadline() -> None:
    clock = Clock()
    cache = ResultCache(3, 100, clock=clock)
    for i in range(4):
        assert cache.put(("d", f"r{i}"), b"x" * 10, deadline=clock.now + 10)
    assert len(cache) == 3 and cache.get(("d", "r0")) is None  # oldest evicted by count
    assert cache.get(("d", "r3")) == b"x" * 10
    assert not cache.put(("d", "huge"), b"y" * 101, deadline=clock.now + 10)  # > bytes
    assert cache.put(("d", "big"), b"y" * 91, deadline=clock.now + 10)
    assert cache.nbytes <= 100 and len(cache) == 1  # bytes evicted the rest
    # expiry: deadline + margin; no deadline: a fixed time to live
    assert cache.put(("d", "soon"), b"s", deadline=clock.now + 1)
    clock.now += 1 + EXPIRY_MARGIN_S
    assert cache.get(("d", "soon")) is None
    assert cache.put(("d", "nodl"), b"n", deadline=0)
    clock.now += NO_DEADLINE_TTL_S - 0.5
    assert cache.get(("d", "nodl")) == b"n"
    clock.now += 1
    assert cache.get(("d", "nodl")) is None
    assert not cache.put(("d", "late"), b"l", deadline=clock.now - EXPIRY_MARGIN_S - 1)
    off = ResultCache(0)
    assert not off.put(("d", "r"), b"x", deadline=0) and off.get(("d", "r")) is None


# --- the worker --------------------------------------------------------------------------


def held(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    tail = registry["tiny-dd"]
    gate = threading.Event()
    real_run = tail.run

    def run(feeds: Any) -> Any:
        gate.wait(10)
        return real_run(feeds)

    monkeypatch.setattr(tail, "run", run)
    return gate


def test_duplicate_of_a_queued_request_runs_once(registry: Registry, split: TinySplit,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gate = held(registry, monkeypatch)

    async def body(worker: Worker) -> None:
        for _ in range(3):  # the first runs (held), the copies arrive while it runs
            worker.submit(incoming(split, "rid-q"))
        worker.submit(incoming(split, "rid-q", device="dev-2"))  # another device's id
        gate.set()

    # inline=False: the first request is held on a tail thread while the loop takes copies
    pub, worker = run_worker(registry, body, max_batch=1, inline=False)
    by_topic = [(t, decode(p).request_id) for t, p, _ in pub.sent]
    assert sorted(by_topic) == [(TOPICS.result("dev-1"), "rid-q"),
                                (TOPICS.result("dev-2"), "rid-q")]
    assert worker.metrics.duplicates == 2 and worker.metrics.batches == 2


def test_duplicate_of_an_answered_request_gets_the_same_payload(
        registry: Registry, split: TinySplit) -> None:
    async def body(worker: Worker) -> None:
        worker.submit(incoming(split, "rid-a", correlation=b"c1"))
        while worker.metrics.answered < 1:
            await asyncio.sleep(0.002)
        worker.submit(incoming(split, "rid-a", correlation=b"c2", seed=9))
        worker.close()  # even a draining worker answers a duplicate from the cache
        worker.submit(incoming(split, "rid-a", correlation=b"c3"))

    pub, worker = run_worker(registry, body)
    assert len(pub.sent) == 3
    (t1, p1, c1), (t2, p2, c2), (t3, p3, c3) = pub.sent
    assert p1 == p2 == p3 and t1 == t2 == t3 == TOPICS.result("dev-1")
    assert (c1, c2, c3) == (b"c1", b"c2", b"c3")  # each copy's own correlation data
    assert decode(p1).error is None
    assert worker.metrics.duplicates == 2 and worker.metrics.batches == 1
    assert worker.metrics.answered == 1  # one answer to the application
    text = render_prometheus(worker.metrics)
    assert "splitinfer_worker_duplicates_total 2\n" in text
    assert "splitinfer_worker_fenced_total 0\n" in text


def test_errors_are_not_cached_and_dedupe_can_be_off(registry: Registry, split: TinySplit
                                                      ) -> None:
    async def body(worker: Worker) -> None:
        for _ in range(2):
            worker.submit(Incoming(TOPICS.request("tiny", "dev-1"), request_payload(
                "no-such", split.sample(), request_id="rid-e")[1]))
        worker.submit(incoming(split, "rid-off"))
        while worker.metrics.answered < 1:
            await asyncio.sleep(0.002)
        worker.submit(incoming(split, "rid-off"))

    pub, worker = run_worker(registry, body, dedupe_size=0)
    codes = [decode(p).error.code if decode(p).error else None  # type: ignore[union-attr]
             for _, p, _ in pub.sent]
    assert codes.count("unknown_split") == 2  # an error is answered again, not replayed
    assert codes.count(None) == 2  # cache off: the answered one ran again
    assert worker.metrics.duplicates == 0 and worker.metrics.batches == 2


def test_unknown_split_does_not_list_what_is_served(registry: Registry, split: TinySplit
                                                    ) -> None:
    async def body(worker: Worker) -> None:
        worker.submit(Incoming(TOPICS.request("tiny", "dev-1"),
                               request_payload("nope", split.sample(), request_id="u")[1]))

    pub, _ = run_worker(registry, body)
    error = decode(pub.sent[0][1]).error
    assert error is not None and error.code == "unknown_split"
    assert "tiny-dd" not in error.message and "'split'" in error.message


def test_internal_failures_are_throttled_and_not_echoed(
        registry: Registry, split: TinySplit, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    secret = "SECRET-LIBRARY-DETAIL"

    def broken(self: Worker, msg: Incoming, now: float) -> None:
        raise KeyError(secret)

    tail = registry["tiny-dd"]

    def failing_run(feeds: Any) -> Any:
        raise RuntimeError(secret)

    caplog.set_level(logging.WARNING, logger="cloud_service.worker")
    pub = FakePublish()

    async def main() -> None:
        worker = Worker(Config(artifacts=Path("."), prefix=PREFIX), registry, pub)
        with monkeypatch.context() as patch:
            patch.setattr(Worker, "_submit", broken)
            for i in range(20):
                worker.submit(incoming(split, f"b{i}"))
        with monkeypatch.context() as patch:
            patch.setattr(tail, "run", failing_run)
            for i in range(5):
                worker.submit(incoming(split, f"t{i}"))
            await asyncio.wait_for(worker.drain(), 20)
        await worker.aclose()
        assert worker.metrics.errors["internal"] == 25

    asyncio.run(main())
    assert len(pub.sent) == 25
    for _, payload, _ in pub.sent:
        error = decode(payload).error
        assert error is not None and error.code == "internal"
        assert secret not in error.message and "Error" not in error.message
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1  # one per interval, not one per message
    assert len([r for r in caplog.records if "internal" in r.getMessage()]) == 1
