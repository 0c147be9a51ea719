"""The dynamic batcher on its own: sizes, shape grouping, delay, bound, deadlines."""

from __future__ import annotations

import asyncio
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
    def __init__(self, hold: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.expired: list[str] = []
        self.hold = hold
        self.gate: asyncio.Event | None = None

    async def run(self, lane: str, jobs: list[FakeJob]) -> None:
        self.batches.append([j.name for j in jobs])
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.hold)

    def expire(self, job: FakeJob) -> None:
        self.expired.append(job.name)


def make(rec: Recorder, **kw: float) -> Batcher[FakeJob]:
    return Batcher(run=rec.run, expire=rec.expire, **kw)  # type: ignore[arg-type]


def test_max_batch_counts_samples_and_keeps_order() -> None:
    async def main() -> list[list[str]]:
        rec = Recorder()
        b = make(rec, max_batch=4, max_delay_s=0.05)
        for i in range(10):
            assert b.offer(FakeJob(f"j{i}", samples=2 if i == 1 else 1))
        await b.join()
        await b.aclose()
        return rec.batches

    batches = asyncio.run(main())
    assert [j for batch in batches for j in batch] == [f"j{i}" for i in range(10)]
    assert batches[0] == ["j0", "j1", "j2"]  # 1 + 2 + 1 samples
    assert all(len(b) <= 4 for b in batches)


def test_only_matching_sample_shapes_share_a_batch() -> None:
    async def main() -> list[list[str]]:
        rec = Recorder()
        b = make(rec, max_batch=8, max_delay_s=0.0)
        for i in range(6):
            b.offer(FakeJob(f"j{i}", key=(4,) if i % 2 == 0 else (5,)))
        b.offer(FakeJob("other", lane="split-b"))
        await b.join()
        await b.aclose()
        return rec.batches

    batches = asyncio.run(main())
    assert ["j0", "j2", "j4"] in batches and ["j1", "j3", "j5"] in batches
    assert ["other"] in batches


def test_lone_request_is_not_held_for_the_delay() -> None:
    async def main() -> float:
        rec = Recorder()
        b = make(rec, max_batch=32, max_delay_s=0.5)
        t0 = time.monotonic()
        b.offer(FakeJob("only"))
        await b.join()
        await b.aclose()
        return time.monotonic() - t0

    assert asyncio.run(main()) < 0.25


def test_steady_arrivals_wait_for_company_within_the_delay() -> None:
    async def main() -> list[list[str]]:
        rec = Recorder()
        b = make(rec, max_batch=4, max_delay_s=0.5)
        for i in range(8):
            b.offer(FakeJob(f"j{i}"))
            await asyncio.sleep(0.01)
        await b.join()
        await b.aclose()
        return rec.batches

    batches = asyncio.run(main())
    # The first arrives alone (no gap known yet); from then on gaps (10 ms) are far
    # below the delay, so batches fill up to max_batch.
    assert max(len(b) for b in batches) == 4
    assert sum(len(b) for b in batches) == 8


def test_bound_refuses_when_full_and_recovers() -> None:
    async def main() -> tuple[list[bool], list[list[str]]]:
        rec = Recorder()
        rec.gate = asyncio.Event()
        b = make(rec, max_batch=1, max_delay_s=0.0, max_queue=2)
        b.offer(FakeJob("running"))
        await asyncio.sleep(0.01)  # it leaves the queue and blocks in run()
        accepted = [b.offer(FakeJob(f"q{i}")) for i in range(3)]
        assert b.depth == 2
        rec.gate.set()
        await b.join()
        accepted.append(b.offer(FakeJob("later")))
        await b.join()
        await b.aclose()
        return accepted, rec.batches

    accepted, batches = asyncio.run(main())
    assert accepted == [True, True, False, True]
    assert [j for batch in batches for j in batch] == ["running", "q0", "q1", "later"]


def test_deadline_checked_again_when_the_batch_forms() -> None:
    async def main() -> Recorder:
        rec = Recorder()
        rec.gate = asyncio.Event()
        b = make(rec, max_batch=8, max_delay_s=0.0)
        b.offer(FakeJob("blocker"))
        await asyncio.sleep(0.01)
        b.offer(FakeJob("late", deadline=time.time() + 0.02))
        b.offer(FakeJob("fine", deadline=time.time() + 60))
        await asyncio.sleep(0.05)  # "late" expires while the tail is busy
        rec.gate.set()
        await b.join()
        await b.aclose()
        return rec

    rec = asyncio.run(main())
    assert rec.expired == ["late"]
    assert rec.batches == [["blocker"], ["fine"]]


def test_bad_sizes_rejected() -> None:
    rec = Recorder()
    with pytest.raises(ValueError, match="max_batch=0"):
        make(rec, max_batch=0)
