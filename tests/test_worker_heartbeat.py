"""Heartbeat payload, the silence rules on an injected clock, and the watchdog (no broker)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from cloud_service.heartbeat import (
    STANDBY_FACTOR,
    HeartbeatPublisher,
    Load,
    PeerWatcher,
    Status,
    Watchdog,
)

CONTRACT_KEYS = {"worker", "state", "ts", "seq", "interval_s", "queue", "in_flight", "rate",
                 "loop_lag_ms", "session"}


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def beat(worker: str, seq: int, *, state: str = "online", session: str = "persistent",
         ts: float | None = None, interval_s: float = 1.0) -> bytes:
    return Status(worker=worker, state=state, ts=1000.0 + seq if ts is None else ts, seq=seq,
                  interval_s=interval_s, session=session).to_json()


# --- the payload -------------------------------------------------------------------------


def test_status_round_trip_has_exactly_the_contract_keys() -> None:
    status = Status(worker="w1", state="draining", ts=5.5, seq=3, interval_s=1.0, queue=2,
                    in_flight=4, rate=10.5, loop_lag_ms=0.25, session="clean")
    body = json.loads(status.to_json())
    assert set(body) == CONTRACT_KEYS
    assert Status.parse(status.to_json(), worker="w1") == status
    fenced = Status(worker="w1", state="offline", ts=1, seq=0, interval_s=1, fenced_by="w0")
    assert json.loads(fenced.to_json())["fenced_by"] == "w0"


@pytest.mark.parametrize(("change", "field"), [
    ({"worker": "w2"}, "'worker'"),
    ({"state": "asleep"}, "'state'"),
    ({"session": "maybe"}, "'session'"),
    ({"seq": True}, "'seq'"),
    ({"seq": 1.5}, "'seq'"),
    ({"ts": float("nan")}, "'ts'"),
    ({"queue": -1}, "'queue'"),
    ({"interval_s": 0}, "'interval_s'"),
    ({"interval_s": 1e9}, "'interval_s'"),
    ({"rate": "fast"}, "'rate'"),
    ({"loop_lag_ms": None}, "'loop_lag_ms'"),
    ({"fenced_by": 7}, "'fenced_by'"),
])
def test_bad_status_names_the_field(change: dict[str, Any], field: str) -> None:
    body = json.loads(beat("w1", 1))
    body.update(change)
    with pytest.raises(ValueError, match=field):
        Status.parse(json.dumps(body).encode(), worker="w1")


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"[1, 2]", b"{", b"x" * 5000,
                                     b"[" * 100_000])
def test_unreadable_status_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="worker status"):
        Status.parse(payload, worker="w1")


def test_publisher_beats_states_lag_and_will() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    clock = Clock()
    received = [0]

    async def publish(topic: str, payload: bytes) -> None:
        sent.append((topic, json.loads(payload)))

    pub = HeartbeatPublisher("w1", "p/v1/workers/w1", publish, interval_s=1.0,
                             persistent=True, clock=clock, wall=lambda: 1e9,
                             load=Load(queue=lambda: 3, in_flight=lambda: 5,
                                       received=lambda: received[0]))

    async def main() -> None:
        received[0] = 20
        clock.now += 2.0
        pub.observe_lag(0.040)
        pub.observe_lag(0.010)
        await pub.beat()
        await pub.beat("draining")
        await pub.beat("offline", session="clean")

    asyncio.run(main())
    assert [t for t, _ in sent] == ["p/v1/workers/w1"] * 3
    first, second, third = (body for _, body in sent)
    assert set(first) == CONTRACT_KEYS
    assert first["state"] == "online" and first["session"] == "persistent"
    assert (first["queue"], first["in_flight"], first["rate"]) == (3, 5, 10.0)
    assert first["loop_lag_ms"] == 40.0 and second["loop_lag_ms"] == 0.0  # reset per beat
    assert [b["seq"] for b in (first, second, third)] == [0, 1, 2]
    assert second["state"] == "draining" and pub.state == "offline"
    assert third["session"] == "clean"
    will = json.loads(pub.will())
    assert will["state"] == "offline" and will["session"] == "persistent"


def test_publisher_run_measures_a_blocked_loop() -> None:
    sent: list[dict[str, Any]] = []

    async def publish(topic: str, payload: bytes) -> None:
        sent.append(json.loads(payload))

    async def main() -> None:
        pub = HeartbeatPublisher("w1", "t", publish, interval_s=0.2, persistent=False,
                                 tick_s=0.01)
        task = asyncio.create_task(pub.run())
        while not sent:
            await asyncio.sleep(0.01)
        time.sleep(0.15)  # the loop is blocked: the ticker wakes up late
        while len(sent) < 2:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert sent[1]["loop_lag_ms"] >= 100  # at least most of the 150 ms it was blocked


# --- who is silent -----------------------------------------------------------------------


def watcher(self_id: str = "w1", fence_after: float = 3.0) -> tuple[PeerWatcher, Clock]:
    clock = Clock()
    w = PeerWatcher(self_id, fence_after, clock=clock)
    w.connected()
    w.due()
    return w, clock


def advance(w: PeerWatcher, clock: Clock, seconds: float, step: float = 0.1) -> list[str]:
    """Let ``seconds`` pass with the watchdog checking every ``step``; whom it fenced."""
    fenced: list[str] = []
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now = min(clock.now + step, end)
        fenced += w.due()
    return fenced


def test_silent_online_peer_is_fenced_once_per_silence() -> None:
    w, clock = watcher()
    w.observe("w2", beat("w2", 1))
    assert advance(w, clock, 2.9) == []
    w.observe("w2", beat("w2", 2))  # a new beat: the silence starts again
    assert advance(w, clock, 2.95) == []
    assert advance(w, clock, 0.1) == ["w2"]  # once past 3 s
    assert advance(w, clock, 1.0) == []  # once
    w.observe("w2", beat("w2", 2))  # the same retained beat again: still the same silence
    w.observe("w2", beat("w2", 3, state="offline"))  # its will after the takeover
    assert advance(w, clock, 10) == []
    w.observe("w2", beat("w2", 0, ts=5000.0))  # woke up (or restarted): beats again
    assert advance(w, clock, 3.1) == ["w2"]  # a new silence, fenced again


def test_only_the_lowest_live_id_fences_first() -> None:
    w, clock = watcher("w3")
    w.observe("w1", beat("w1", 1))
    w.observe("w2", beat("w2", 1))
    fenced = []
    for seq in range(2, 6):  # w1 (the lowest) stays alive, w2 goes silent
        fenced += advance(w, clock, 1.0)
        w.observe("w1", beat("w1", seq))
    assert fenced == []  # w1 fences it, not w3
    fenced = advance(w, clock, 1.0)
    w.observe("w1", beat("w1", 6))
    assert fenced == []
    assert advance(w, clock, 1.1) == ["w2"]  # 6 s: w1 did not, w3 steps in
    assert STANDBY_FACTOR == 2.0

    w, clock = watcher("w3")
    w.observe("w1", beat("w1", 1))
    w.observe("w2", beat("w2", 1))
    assert sorted(advance(w, clock, 3.1)) == ["w1", "w2"]  # w3 the lowest live one


def test_offline_peers_clean_never_persistent_after_a_grace() -> None:
    w, clock = watcher()
    w.observe("w2", beat("w2", 1, state="offline", session="clean"))  # a goodbye
    w.observe("w4", beat("w4", 1))
    advance(w, clock, 0.5)
    w.observe("w4", beat("w4", 2, state="offline"))  # kill -9: the will, session kept
    assert advance(w, clock, 2.9) == []  # time to come back and take what was queued
    w.observe("w2", beat("w2", 2, state="offline", session="clean"))
    assert advance(w, clock, 0.2) == ["w4"]
    assert advance(w, clock, 20) == []


def test_silence_counts_only_while_connected_active_and_awake() -> None:
    w, clock = watcher()
    w.observe("w2", beat("w2", 1))
    w.disconnected()
    assert advance(w, clock, 10) == []
    w.connected()  # after a broker restart every peer needs time to beat again
    assert advance(w, clock, 2.9) == []
    w.active = False  # draining: leaves it to the others
    assert advance(w, clock, 1) == []
    w.active = True
    assert advance(w, clock, 0.1) == ["w2"]
    assert PeerWatcher("w1", 0.0, clock=clock).due() == []  # 0 = never

    # This worker was SIGSTOPped (or its loop blocked) for 20 s: on waking it must not
    # take its own silence for the others' and fence a healthy peer.
    w, clock = watcher()
    w.observe("w2", beat("w2", 1))
    clock.now += 20
    assert w.due() == []
    assert advance(w, clock, 2.9) == []  # the peer's next beats arrive in time
    w.observe("w2", beat("w2", 2))
    assert advance(w, clock, 2.9) == []
    assert advance(w, clock, 0.2) == ["w2"]  # really silent now


def test_a_slow_peer_interval_and_bad_or_own_statuses() -> None:
    w, clock = watcher()
    w.observe("w2", beat("w2", 1, interval_s=5.0))
    assert advance(w, clock, 9.9) == []  # its own interval says 5 s: silent only past 2
    assert advance(w, clock, 0.2) == ["w2"]
    assert w.observe("w1", beat("w1", 1)) is None and "w1" not in w.peers  # itself
    assert w.observe("w5", b"garbage") is None and "w5" not in w.peers
    w.observe("w5", beat("w5", 1))
    w.observe("w5", b"")  # cleared retained status: forgotten
    assert "w5" not in w.peers


def test_watchdog_fences_records_and_retries_a_failure() -> None:
    w, clock = watcher()
    fenced: list[str] = []
    records: list[tuple[str, dict[str, Any]]] = []
    fail = [True]

    async def fence(wid: str) -> None:
        if fail[0]:
            raise OSError("refused")
        fenced.append(wid)

    async def publish(topic: str, payload: bytes) -> None:
        records.append((topic, json.loads(payload)))

    counted: list[str] = []
    dog = Watchdog(w, fence, publish, topic_of=lambda wid: f"p/v1/workers/{wid}",
                   on_fenced=counted.append)

    async def main() -> None:
        w.observe("w2", beat("w2", 1))
        advance(w, clock, 3.0)
        clock.now += 0.1
        assert await dog.check() == []  # failed: tried again, fence_after later
        fail[0] = False
        advance(w, clock, 2.9)
        clock.now += 0.2
        assert await dog.check() == ["w2"]
        assert await dog.check() == []

    asyncio.run(main())
    assert fenced == ["w2"] and counted == ["w2"]
    (topic, record), = records
    assert topic == "p/v1/workers/w2"
    assert (record["state"], record["session"], record["fenced_by"]) == (
        "offline", "clean", "w1")
    w.observe("w2", json.dumps(record).encode())  # the record keeps the others quiet
    assert advance(w, clock, 10) == []
