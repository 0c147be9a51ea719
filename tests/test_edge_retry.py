"""Re-sending idempotent requests: the agent against the in-memory broker, no sockets.

The fault is injected by the broker (``MemoryBroker.lose``: acknowledged, delivered to
nobody; a broker with no subscriber answers PUBACK 16) or by the fake worker (slow,
answering twice). Timing logic runs on :class:`VirtualTimeLoop`, an event loop whose clock
jumps to the next timer whenever nothing else is ready, so backoff and deadlines are
checked exactly without sleeping; the real broker and worker are in
test_edge_retry_integration.py.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from test_edge_unit import W, X, fake_worker, make_agent, tail

from edge_agent import MemoryBroker
from edge_agent.client import AgentConfig, RetryBackoff
from splitinfer.cli import main as cli_main
from splitinfer.errors import EXIT_BAD_INPUT, BadInputError, DeadlineExceeded, NoSubscriberError


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock: when no callback is ready, time jumps to the next
    timer. Everything in these tests lives on the loop (the memory broker has no I/O), so
    a 10 s deadline takes microseconds and every wait is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def _run_once(self) -> None:
        # CPython's BaseEventLoop internals (not in the typeshed stubs)
        ready: Any = getattr(self, "_ready")  # noqa: B009
        scheduled: Any = getattr(self, "_scheduled")  # noqa: B009
        if not ready:
            live = [h.when() for h in scheduled if not h.cancelled()]
            if live:
                self.now = max(self.now, min(live))
        super()._run_once()  # type: ignore[misc]


def run_virtual(coro_fn: Callable[[], Any]) -> Any:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), 600))
    finally:
        loop.close()


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 30))


# ---------------------------------------------------------------------- RetryBackoff


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    backoff = RetryBackoff(1.0, 4.0, adaptive=False, rng=random.Random(1))
    assert backoff.rto == 1.0
    for k, base in enumerate([1.0, 2.0, 4.0, 4.0, 4.0]):
        for _ in range(50):
            wait = backoff.wait(k)
            assert wait is not None and 0.75 * base <= wait <= base
    backoff.observe(0.01)
    assert backoff.rto == 1.0  # not adaptive: the fixed doubling
    assert RetryBackoff(0.0, 4.0).wait(0) is None  # retry_s 0: never on silence


def test_adaptive_backoff_follows_the_round_trips_within_its_clamp() -> None:
    backoff = RetryBackoff(1.0, 10.0, rng=random.Random(2))
    backoff.observe(0.5)  # first sample: srtt = R, rttvar = R / 2
    assert backoff.srtt == pytest.approx(0.5) and backoff.rttvar == pytest.approx(0.25)
    assert backoff.rto == pytest.approx(1.5)
    backoff.observe(1.0)  # rttvar = 3/4 0.25 + 1/4 |0.5 - 1.0|, srtt = 7/8 0.5 + 1/8 1.0
    assert backoff.rttvar == pytest.approx(0.3125) and backoff.srtt == pytest.approx(0.5625)
    assert backoff.rto == pytest.approx(1.8125)
    fast = RetryBackoff(1.0, 4.0)
    for _ in range(20):
        fast.observe(0.002)
    assert fast.rto == 1.0  # never sooner than retry_s
    slow = RetryBackoff(1.0, 4.0)
    slow.observe(3.0)
    assert slow.rto == 4.0  # a loaded worker: no copies before retry_max_s
    slow.observe(float("nan"))
    slow.observe(-1.0)
    assert slow.samples == 1
    wait = slow.wait(3)
    assert wait is not None and 3.0 <= wait <= 4.0


def test_backoff_keeps_the_backed_off_wait_until_a_sample() -> None:
    """Karn: answers after a re-send are no samples, so a link slower than retry_s would
    be re-sent to forever; the backed-off wait stays the first one until a sample comes."""
    backoff = RetryBackoff(1.0, 4.0)
    backoff.backed_off(1)  # answered after one re-send at ~1 s
    assert backoff.rto == 2.0
    backoff.backed_off(3)
    assert backoff.rto == 4.0  # capped
    backoff.observe(1.5)  # the next request, answered at its first publish
    assert backoff.rto == pytest.approx(min(1.5 + 4 * 0.75, 4.0))
    fixed = RetryBackoff(1.0, 4.0, adaptive=False)
    fixed.backed_off(2)
    assert fixed.rto == 1.0


def test_a_link_slower_than_retry_s_stops_being_resent(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix, delay=1.2, parallel=True) as seen, \
                make_agent(broker, topic_prefix) as agent:
            first = await agent.infer(X, timeout=10)
            assert first.attempts == 2  # re-sent at ~1 s: no sample, but a longer wait
            later = [await agent.infer(X, timeout=10) for _ in range(3)]
            assert [r.attempts for r in later] == [1, 1, 1]
            await asyncio.sleep(5)
            assert len(seen) == 5 and agent.counters.duplicates == 1

    run_virtual(main)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"retry_s": -1.0}, "retry_s=-1.0"),
    ({"retry_s": float("nan")}, "retry_s=nan"),
    ({"retry_s": 5.0, "retry_max_s": 4.0}, "retry_s <= retry_max_s"),
    ({"retry_s": 0.0, "retry_max_s": 0.0}, "retry_max_s > 0"),
    ({"retry_max_s": float("inf")}, "finite"),
    ({"worker_grace_s": -1.0}, "worker_grace_s"),
])
def test_retry_config_is_checked(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(BadInputError) as info:
        AgentConfig(device_id="d", **kwargs)
    assert words in str(info.value)


def test_edge_run_refuses_bad_retry_flags(tmp_path: Any,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["edge", "run", "--artifacts", str(tmp_path), "--input", "in.npz",
                     "--output", "out.npz", "--retry-s", "5", "--retry-max-s", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "retry_s=5.0" in err and "retry_max_s=1.0" in err


# ---------------------------------------------------------------------- re-sending


def test_a_lost_request_is_answered_after_one_retry(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        broker.lose(1, f"{topic_prefix}/v1/req/#")
        async with fake_worker(broker, topic_prefix) as seen, \
                make_agent(broker, topic_prefix, retry_s=0.5) as agent:
            result = await agent.infer(X, timeout=10)
            assert result.attempts == 2 and len(seen) == 1 and len(broker.lost) == 1
            # the same request went out twice: same id, same payload, same deadline
            assert broker.lost[0].payload == seen[0][0].payload
            c = agent.counters
            assert (c.published, c.retries, c.duplicates, c.late_results) == (2, 1, 0, 0)
            again = await agent.infer(X, timeout=10)
            assert again.attempts == 1
        assert (result.outputs["y"] == tail(X @ W, None)).all()

    run_virtual(main)


def test_mqtt311_loses_no_request_either(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker(protocol="3.1.1")  # no PUBACK reasons: only silence tells
        broker.lose(2, f"{topic_prefix}/v1/req/#")
        async with fake_worker(broker, topic_prefix) as seen, \
                make_agent(broker, topic_prefix) as agent:
            result = await agent.infer(X, timeout=10)
        assert result.attempts == 3 and len(seen) == 1

    run_virtual(main)


def test_backoff_and_deadline_on_a_virtual_clock(topic_prefix: str) -> None:
    """A worker that never answers: re-sends after ~1, 2, 4, 4 s (jittered down by up to a
    quarter), none at or past the 10 s deadline, which raises exactly on time."""
    async def main() -> None:
        broker = MemoryBroker()
        loop = asyncio.get_running_loop()
        sent: list[float] = []
        original = broker._route

        def route(message: Any) -> bool:
            if "/v1/req/" in message.topic:
                sent.append(loop.time())
            return original(message)

        broker._route = route  # type: ignore[method-assign]
        async with fake_worker(broker, topic_prefix, mode="silent"), \
                make_agent(broker, topic_prefix, retry_adaptive=False) as agent:
            start = loop.time()
            with pytest.raises(DeadlineExceeded):
                await agent.infer(X, timeout=10)
            assert loop.time() - start == pytest.approx(10.0, abs=1e-6)
            assert agent.pending == 0 and agent.counters.retries == len(sent) - 1
            await asyncio.sleep(20)  # nothing more goes out for it
        gaps = [b - a for a, b in itertools.pairwise(sent)]
        assert len(sent) >= 4 and all(t < start + 10 for t in sent)
        for gap, base in zip(gaps, [1.0, 2.0, 4.0, 4.0, 4.0], strict=False):
            assert 0.75 * base - 1e-6 <= gap <= base + 1e-6, gaps
        expiries = [p.options.expiry_s or 0.0 for p in broker.published
                    if "/v1/req/" in p.topic and p.options is not None]
        assert all(0 < e <= 10 for e in expiries)
        assert sorted(expiries, reverse=True) == expiries  # time left, same deadline

    run_virtual(main)


def test_a_slow_worker_answering_every_copy_gives_one_answer(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix, delay=2.5) as seen, \
                make_agent(broker, topic_prefix, retry_adaptive=False) as agent:
            result = await agent.infer(X, timeout=10)
            await asyncio.sleep(10)  # the other copies' answers arrive
            assert len(seen) == result.attempts >= 2
            c = agent.counters
            assert c.duplicates == len(seen) - 1 and c.late_results == 0
        return None

    run_virtual(main)


def test_a_hung_replica_costs_a_retry_not_the_request(topic_prefix: str) -> None:
    """Two replicas in the share group, one hung (takes requests, never answers) until it
    is fenced after 3 s (the worker side's job): what went to it is re-sent to the group
    until the healthy one has it. (Before the fencing each copy has an even chance of
    landing on the hung replica again: the broker's round robin.)"""
    async def main() -> None:
        broker = MemoryBroker()
        loop = asyncio.get_running_loop()
        async with fake_worker(broker, topic_prefix, mode="silent", client_id="hung") as hung, \
                fake_worker(broker, topic_prefix, client_id="ok") as ok, \
                make_agent(broker, topic_prefix) as agent:
            loop.call_later(3.0, broker.drop, "hung")
            results = await asyncio.gather(*(agent.infer(X, timeout=10) for _ in range(20)))
            assert len(ok) == 20 and hung  # the healthy one answered each request once
            assert sum(r.attempts for r in results) == len(ok) + len(hung)
            assert max(r.attempts for r in results) >= 2
            assert agent.counters.duplicates == 0

    run_virtual(main)


def test_duplicate_answer_is_dropped_and_counted(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix, mode="twice"), \
                make_agent(broker, topic_prefix) as agent:
            result = await agent.infer(X)
            await asyncio.sleep(0.5)
            assert result.attempts == 1
            assert agent.counters.duplicates == 1 and agent.counters.late_results == 0

    run_virtual(main)


def test_no_subscriber_after_a_worker_was_seen_is_resent_until_one_is_back(
        topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        loop = asyncio.get_running_loop()
        async with make_agent(broker, topic_prefix) as agent:
            async with fake_worker(broker, topic_prefix):
                await agent.infer(X)  # a worker was seen
            call = asyncio.create_task(agent.infer(X, timeout=10))
            await asyncio.sleep(3.4)  # the worker restarts: PUBACK 16, re-sent with backoff
            assert not call.done() and agent.counters.no_subscriber >= 3
            back = loop.time()
            async with fake_worker(broker, topic_prefix) as seen:
                result = await call
                assert loop.time() - back <= 2.0  # the no-subscriber backoff's cap
            assert len(seen) == 1 and result.attempts == 1 + agent.counters.no_subscriber

    run_virtual(main)


def test_no_subscriber_fails_fast_at_first_use_and_after_the_grace(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        loop = asyncio.get_running_loop()
        async with make_agent(broker, topic_prefix, worker_grace_s=5.0) as agent:
            t0 = loop.time()
            with pytest.raises(NoSubscriberError):  # never saw a worker: at once
                await agent.infer(X, timeout=10)
            assert loop.time() - t0 < 0.01
            async with fake_worker(broker, topic_prefix):
                await agent.infer(X)
            gone = loop.time()
            with pytest.raises(NoSubscriberError, match="no worker subscribed to"):
                await agent.infer(X, timeout=30)  # re-sent for 5 s, then raised
            assert 5.0 <= loop.time() - gone <= 5.0 + 2.0
            assert agent.pending == 0

    run_virtual(main)


def test_shutting_down_answer_is_resent_to_the_next_worker(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with make_agent(broker, topic_prefix) as agent:
            async with fake_worker(broker, topic_prefix):
                await agent.infer(X)
            async with fake_worker(broker, topic_prefix, mode="leaving") as leaving:
                call = asyncio.create_task(agent.infer(X, timeout=10))
                await asyncio.sleep(0.1)
                assert len(leaving) == 1 and not call.done()  # not raised: re-sent
            async with fake_worker(broker, topic_prefix) as seen:
                result = await call
            assert len(seen) == 1 and result.attempts >= 2 and not agent.counters.errors

    run_virtual(main)


def test_retry_s_zero_never_resends_on_silence(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        broker.lose(1, f"{topic_prefix}/v1/req/#")
        async with fake_worker(broker, topic_prefix), \
                make_agent(broker, topic_prefix, retry_s=0.0) as agent:
            with pytest.raises(DeadlineExceeded):
                await agent.infer(X, timeout=5)
            assert agent.counters.published == 1 and agent.counters.retries == 0

    run_virtual(main)


def test_one_timer_for_many_pending_requests(topic_prefix: str) -> None:
    """200 silent requests: one armed timer, re-sends in batches, no task per request
    waiting out its retry interval."""
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix, mode="silent"), \
                make_agent(broker, topic_prefix, retry_adaptive=False) as agent:
            calls = [asyncio.create_task(agent.infer(X, timeout=3)) for _ in range(200)]
            await asyncio.sleep(0.5)
            assert agent.pending == 200 and not agent._tasks  # nothing in flight
            assert agent._timer is not None and len(agent._resends) == 200
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, DeadlineExceeded) for r in results)
            assert agent.counters.retries >= 200

    run_virtual(main)


def test_counters_are_a_read_only_view(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix), make_agent(broker, topic_prefix) as agent:
            view = agent.counters
            await agent.infer(X)
            assert view.published == 1  # live
            with pytest.raises(AttributeError):
                view.published = 5  # type: ignore[misc]
            with pytest.raises(TypeError):
                view.errors["x"] = 1  # type: ignore[index]
            assert set(view.as_dict()) >= {"published", "republished", "retries",
                                           "duplicates", "late_results", "reconnects"}

    run(main)


@pytest.mark.parametrize("reason, code", [(0x87, "broker_refused"),
                                          (0x95, "payload_too_large")])
def test_a_broker_refusal_fails_the_call_at_once(topic_prefix: str, monkeypatch: Any,
                                                 reason: int, code: str) -> None:
    """PUBACK 0x87 (ACL) or 0x95 (over message_size_limit): the same bytes cannot pass on a
    re-send, so the call fails with the reason instead of waiting out its deadline."""
    from edge_agent.memory import MemoryTransport
    from splitinfer.errors import RemoteError

    original = MemoryTransport.publish

    async def refusing(self: Any, topic: str, payload: bytes, **kw: Any) -> int | None:
        if "/v1/req/" in topic:
            await original(self, topic, payload, **kw)  # the worker must not see it: below
            return reason
        return await original(self, topic, payload, **kw)

    async def main() -> None:
        broker = MemoryBroker()
        monkeypatch.setattr(MemoryTransport, "publish", refusing)
        broker.lose(100, f"{topic_prefix}/v1/req/#")  # refused: delivered to nobody
        async with fake_worker(broker, topic_prefix), make_agent(broker, topic_prefix,
                                                                 retry_s=0.5) as agent:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(RemoteError) as info:
                await agent.infer(X, timeout=10)
            assert loop.time() - started < 0.5  # at once, not at a re-send or the deadline
            assert info.value.code == code and f"0x{reason:02X}" in str(info.value)
            assert agent.counters.retries == 0 and agent.counters.errors[code] == 1

    run_virtual(main)
