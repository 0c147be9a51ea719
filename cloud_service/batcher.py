"""Dynamic batching: per split id, bounded, deadline-aware.

One *lane* per split id holds the requests waiting for that split's tail. A lane's
dispatcher first takes a free *slot* (a tail run may start), then forms a batch from the
oldest request on: requests whose per-sample shapes match it, up to ``max_batch`` samples.
It waits for more only while the oldest request has waited less than ``max_delay`` and
more are expected in time — it keeps a moving average of the gap between arrivals, so a
lone device is never held back for company that will not come. Requests that queued
while every slot was busy leave at once: under load, batches form by themselves.

All lanes share one bound on waiting requests; :meth:`Batcher.offer` says no when it is
reached (the caller answers OVERLOADED). Deadlines are checked again when a batch forms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

__all__ = ["Batchable", "Batcher"]

log = logging.getLogger(__name__)


class Batchable(Protocol):
    @property
    def lane(self) -> str: ...  # split id
    @property
    def samples(self) -> int: ...
    @property
    def key(self) -> Hashable: ...  # only equal keys share a batch
    @property
    def deadline(self) -> float: ...  # unix seconds; 0 = none


J = TypeVar("J", bound=Batchable)

_GAP_WEIGHT = 0.2  # moving average of inter-arrival gaps: weight of the newest gap


@dataclass(eq=False)
class _Lane(Generic[J]):
    name: str
    queue: deque[tuple[float, J]] = field(default_factory=deque)  # (enqueued, job)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # queue non-empty
    arrival: asyncio.Event = field(default_factory=asyncio.Event)  # a job came in
    gap: float = math.inf
    last: float | None = None
    task: asyncio.Task[None] | None = None


class Batcher(Generic[J]):
    """Groups jobs per lane and hands each batch to ``run(lane, jobs)``.

    ``expire(job)`` is called for jobs whose deadline passed while they waited.
    ``slots`` bounds how many ``run`` calls are in progress at once, across lanes.
    """

    def __init__(self, *, run: Callable[[str, list[J]], Awaitable[None]],
                 expire: Callable[[J], None], max_batch: int = 32, max_delay_s: float = 0.002,
                 max_queue: int = 1024, slots: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if max_batch < 1 or max_queue < 1 or slots < 1 or max_delay_s < 0:
            raise ValueError(f"batcher: max_batch={max_batch}, max_queue={max_queue}, "
                             f"slots={slots}, max_delay_s={max_delay_s}: expected "
                             "positive sizes and a delay >= 0")
        self._run = run
        self._expire_cb = expire
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(slots)
        self._clock = clock
        self._wall = wall_clock
        self._lanes: dict[str, _Lane[J]] = {}
        self._depth = 0
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._runs: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch, all lanes together."""
        return self._depth

    @property
    def running(self) -> int:
        return self._running

    def offer(self, job: J) -> bool:
        """Queue ``job``; False (and nothing queued) when the bound is reached."""
        if self._depth >= self.max_queue:
            return False
        lane = self._lanes.get(job.lane)
        if lane is None:
            lane = self._lanes[job.lane] = _Lane(job.lane)
            lane.task = asyncio.get_running_loop().create_task(
                self._dispatch(lane), name=f"batcher-{job.lane}")
        now = self._clock()
        if lane.last is not None:
            gap = now - lane.last
            lane.gap = gap if math.isinf(lane.gap) else (
                _GAP_WEIGHT * gap + (1 - _GAP_WEIGHT) * lane.gap)
        lane.last = now
        lane.queue.append((now, job))
        self._depth += 1
        self._idle.clear()
        lane.ready.set()
        lane.arrival.set()
        return True

    async def join(self) -> None:
        """Return once no job waits and no batch runs."""
        while self._depth or self._running:
            self._idle.clear()
            await self._idle.wait()

    async def aclose(self) -> None:
        """Stop the dispatchers (jobs still queued are left alone; join() first)."""
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        tasks += list(self._runs)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _update_idle(self) -> None:
        if not self._depth and not self._running:
            self._idle.set()

    async def _dispatch(self, lane: _Lane[J]) -> None:
        while True:
            await lane.ready.wait()
            await self._slots.acquire()
            try:
                batch = await self._form(lane)
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                self._update_idle()
                continue
            self._running += 1
            task = asyncio.get_running_loop().create_task(
                self._execute(lane.name, batch), name=f"tail-{lane.name}")
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)

    async def _execute(self, name: str, batch: list[J]) -> None:
        try:
            await self._run(name, batch)
        except Exception:  # run() answers its own failures; this is a bug, keep serving
            log.exception("batch of %d for split %s failed unexpectedly", len(batch), name)
        finally:
            self._running -= 1
            self._slots.release()
            self._update_idle()

    async def _form(self, lane: _Lane[J]) -> list[J]:
        while True:
            self._drop_expired(lane)
            if not lane.queue:
                lane.ready.clear()
                return []
            chosen, samples = self._select(lane)
            if samples >= self.max_batch:
                break
            remaining = lane.queue[0][0] + self.max_delay_s - self._clock()
            if remaining <= 0 or lane.gap > remaining:
                break
            lane.arrival.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # 3.10: not the builtin one
                await asyncio.wait_for(lane.arrival.wait(), remaining)
        self._take(lane, chosen)
        return [job for _, job in chosen]

    def _select(self, lane: _Lane[J]) -> tuple[list[tuple[float, J]], int]:
        key = lane.queue[0][1].key
        chosen: list[tuple[float, J]] = []
        samples = 0
        for entry in lane.queue:
            job = entry[1]
            if job.key != key:
                continue
            if chosen and samples + job.samples > self.max_batch:
                break
            chosen.append(entry)
            samples += job.samples
            if samples >= self.max_batch:
                break
        return chosen, samples

    def _take(self, lane: _Lane[J], chosen: list[tuple[float, J]]) -> None:
        queue = lane.queue
        if all(queue[i] is entry for i, entry in enumerate(chosen)):
            for _ in chosen:
                queue.popleft()
        else:
            ids = {id(entry) for entry in chosen}
            lane.queue = deque(e for e in queue if id(e) not in ids)
        self._depth -= len(chosen)
        if not lane.queue:
            lane.ready.clear()

    def _drop_expired(self, lane: _Lane[J]) -> None:
        now = self._wall()
        if not any(0 < job.deadline < now for _, job in lane.queue):
            return
        keep: deque[tuple[float, J]] = deque()
        for entry in lane.queue:
            job = entry[1]
            if 0 < job.deadline < now:
                self._depth -= 1
                try:
                    self._expire_cb(job)
                except Exception:
                    log.exception("expire callback failed for a job of split %s", lane.name)
            else:
                keep.append(entry)
        lane.queue = keep
