"""The dynamic batcher on its own: sizes, shape grouping, delay, bound, deadlines."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from cloud_service.batcher import Batcher


@dataclass(eq=False)
class FakeJob:
    name: str
    samples: int = 1
    key: tuple[int, ...] = (4,)
    deadline: float = 0.0
    lane: str = "split-a"


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.expired: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.threads: set[str] = set()

    def run(self, lane: str, jobs: list[FakeJob]) -> None:
        self.threads.add(threading.current_thread().name)
        self.batches.append([j.name for j in jobs])
        self.gate.wait(10)

    def expire(self, job: FakeJob) -> None:
        self.expired.append(job.name)


def make(rec: Recorder, *, start: bool = True, **kw: float) -> Batcher[FakeJob]:
    batcher: Batcher[FakeJob] = Batcher(run=rec.run, expire=rec.expire, **kw)  # type: ignore[arg-type]
    if start:
        batcher.start()
    return batcher


def finish(b: Batcher[FakeJob]) -> None:
    assert b.join(10)
    b.stop()


def test_max_batch_counts_samples_and_keeps_order() -> None:
    rec = Recorder()
    b = make(rec, max_batch=4, max_delay_s=0.05, start=False)
    for i in range(10):
        assert b.offer(FakeJob(f"j{i}", samples=2 if i == 1 else 1))
    b.start()
    finish(b)
    assert [j for batch in rec.batches for j in batch] == [f"j{i}" for i in range(10)]
    assert rec.batches[0] == ["j0", "j1", "j2"]  # 1 + 2 + 1 samples
    assert all(len(batch) <= 4 for batch in rec.batches)
    assert rec.threads == {"tail-0"}


def test_only_matching_sample_shapes_share_a_batch() -> None:
    rec = Recorder()
    b = make(rec, max_batch=8, max_delay_s=0.0, start=False)
    for i in range(6):
        b.offer(FakeJob(f"j{i}", key=(4,) if i % 2 == 0 else (5,)))
    b.offer(FakeJob("other", lane="split-b"))
    b.start()
    finish(b)
    assert rec.batches == [["j0", "j2", "j4"], ["j1", "j3", "j5"], ["other"]]


def test_lone_request_is_not_held_for_the_delay() -> None:
    rec = Recorder()
    b = make(rec, max_batch=32, max_delay_s=0.5)
    t0 = time.monotonic()
    b.offer(FakeJob("only"))
    finish(b)
    assert time.monotonic() - t0 < 0.25


def test_steady_arrivals_wait_for_company_within_the_delay() -> None:
    rec = Recorder()
    b = make(rec, max_batch=4, max_delay_s=0.5)
    for i in range(8):
        b.offer(FakeJob(f"j{i}"))
        time.sleep(0.01)
    finish(b)
    # The first arrives alone (no gap known yet); from then on gaps (10 ms) are far
    # below the delay, so batches fill up to max_batch.
    assert max(len(batch) for batch in rec.batches) == 4
    assert sum(len(batch) for batch in rec.batches) == 8


def test_bound_refuses_when_full_and_recovers() -> None:
    rec = Recorder()
    rec.gate.clear()
    b = make(rec, max_batch=1, max_delay_s=0.0, max_queue=2)
    b.offer(FakeJob("running"))
    deadline = time.monotonic() + 5
    while b.running == 0:  # it leaves the queue and blocks in run()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    accepted = [b.offer(FakeJob(f"q{i}")) for i in range(3)]
    assert b.depth == 2
    rec.gate.set()
    assert b.join(10)
    accepted.append(b.offer(FakeJob("later")))
    finish(b)
    assert accepted == [True, True, False, True]
    assert [j for batch in rec.batches for j in batch] == ["running", "q0", "q1", "later"]


def test_deadline_checked_again_when_the_batch_forms() -> None:
    rec = Recorder()
    rec.gate.clear()
    b = make(rec, max_batch=8, max_delay_s=0.0)
    b.offer(FakeJob("blocker"))
    while b.running == 0:
        time.sleep(0.001)
    b.offer(FakeJob("late", deadline=time.time() + 0.02))
    b.offer(FakeJob("fine", deadline=time.time() + 60))
    time.sleep(0.05)  # "late" expires while the tail is busy
    rec.gate.set()
    finish(b)
    assert rec.expired == ["late"]
    assert rec.batches == [["blocker"], ["fine"]]


def test_stop_finishes_the_queue_then_refuses() -> None:
    rec = Recorder()
    b = make(rec, max_batch=2, max_delay_s=0.0, threads=2, start=False)
    for i in range(5):
        b.offer(FakeJob(f"j{i}"))
    b.start()
    b.stop()
    assert sorted(j for batch in rec.batches for j in batch) == [f"j{i}" for i in range(5)]
    assert not b.offer(FakeJob("after"))


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch=0"):
        make(Recorder(), max_batch=0, start=False)


def test_stop_discarding_drops_the_queue() -> None:
    rec = Recorder()
    b = make(rec, start=False)
    for i in range(3):
        b.offer(FakeJob(f"j{i}"))
    assert b.stop(discard=True) == 3
    assert b.depth == 0 and rec.batches == []


# --- claim: a lone job run by the caller ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_claim_only_when_idle_and_arrivals_are_far_apart() -> None:
    rec, clock = Recorder(), Clock()
    b = make(rec, max_delay_s=0.0, clock=clock, start=False)  # a frozen clock: never hold
    assert b.claim("split-a", 0.002)  # first arrival: no gap known, nothing queued
    assert b.running == 1
    assert not b.claim("split-b", 0.0)  # one claimed job counts as running
    b.release()
    clock.now += 0.001  # 1 ms after the last: closer than the 2 ms asked for
    assert not b.claim("split-a", 0.002)
    assert b.offer(FakeJob("j0"), counted=True)  # the same arrival, not counted twice
    assert not b.claim("split-c", 0.0)  # something waits: never past the queue
    b.start()
    assert b.join(10)
    assert rec.batches == [["j0"]]
    clock.now += 1.0  # the mean gap grows past 2 ms again (0.2 * 1 s + 0.8 * 1 ms)
    assert b.claim("split-a", 0.002)
    b.release()
    finish(b)


def test_counted_arrivals_keep_the_gap_an_offer_gives() -> None:
    clock = Clock()
    one = make(Recorder(), clock=clock, start=False)
    two = make(Recorder(), clock=clock, start=False)
    for _ in range(3):
        clock.now += 0.01
        assert one.offer(FakeJob("x"))
        if two.claim("split-a", 1.0):  # the first: no gap known yet
            two.release()
        else:  # later ones: a gap of 10 ms is under the 1 s asked
            assert two.offer(FakeJob("x"), counted=True)
    assert one._lanes["split-a"].gap == pytest.approx(two._lanes["split-a"].gap) == 0.01
    one.stop(discard=True)
    two.stop(discard=True)


def test_no_claim_while_stopping() -> None:
    b = make(Recorder(), start=False)
    b.stop()
    assert not b.claim("split-a", 0.0)
