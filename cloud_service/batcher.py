"""Dynamic batching: per split id, bounded, deadline-aware, formed by the tail threads.

Jobs (checked requests) are offered from the event loop; one or more *tail threads* take
batches and run them. A tail thread forms its next batch the moment it is free, so the
tail never waits for the event loop between two batches (the loop is busy receiving and
answering; under load that gap was a quarter of the tail's time).

A batch is formed from the oldest waiting job on, per split id (*lane*): jobs whose
per-sample shapes match it, up to ``max_batch`` samples. The thread waits for more only
while the oldest job has waited less than ``max_delay`` and more are expected in time —
it keeps a moving average of the gap between arrivals per lane, so a lone device is never
held back for company that will not come. Jobs that queued while the threads were busy
leave at once: under load, batches form by themselves.

All lanes share one bound on waiting jobs; :meth:`Batcher.offer` says no when it is
reached (the caller answers OVERLOADED). Deadlines are checked again when a batch forms.

A caller may instead :meth:`Batcher.claim` a lone job and run it itself: granted only when
nothing waits or runs and the lane's arrivals are further apart than the caller says
(for the worker: the batching delay and a few tail runs), so no batch is given up; the
arrival is counted in the lane's gap as if offered, and :meth:`Batcher.release` ends it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
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
    queue: deque[tuple[float, J]] = field(default_factory=deque)  # (enqueued, job)
    gap: float = math.inf
    last: float | None = None


class Batcher(Generic[J]):
    """Groups jobs per lane; tail threads call ``run(lane, jobs)`` for each batch.

    ``run`` and ``expire(job)`` (a job whose deadline passed while it waited) are called
    on a tail thread; they must hand results back to the event loop themselves.
    ``offer``, ``depth`` and ``stop`` may be called from any thread.
    """

    def __init__(self, *, run: Callable[[str, list[J]], None], expire: Callable[[J], None],
                 max_batch: int = 32, max_delay_s: float = 0.002, max_queue: int = 1024,
                 threads: int = 1, name: str = "tail",
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if max_batch < 1 or max_queue < 1 or threads < 1 or max_delay_s < 0:
            raise ValueError(f"batcher: max_batch={max_batch}, max_queue={max_queue}, "
                             f"threads={threads}, max_delay_s={max_delay_s}: expected "
                             "positive sizes and a delay >= 0")
        self._run = run
        self._expire = expire
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._clock = clock
        self._wall = wall_clock
        self._cond = threading.Condition()
        self._lanes: dict[str, _Lane[J]] = {}
        self._depth = 0
        self._running = 0
        self._stopping = False
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        self._started = False
        # Seconds the tail threads spent waiting: for any job at all (the tail was
        # starved), and for company within max_delay (the price of batching).
        self.starved_s = 0.0
        self.held_s = 0.0

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch, all lanes together."""
        return self._depth

    @property
    def running(self) -> int:
        return self._running

    def start(self) -> None:
        with self._cond:
            if self._started:
                return
            self._started = True
        for thread in self._threads:
            thread.start()

    def offer(self, job: J, *, counted: bool = False) -> bool:
        """Queue ``job``; False (and nothing queued) when full or stopping. ``counted``:
        its arrival was already counted by a :meth:`claim` that said no."""
        with self._cond:
            if self._depth >= self.max_queue or self._stopping:
                return False
            lane = self._lanes.get(job.lane) if counted else None
            if lane is None:
                lane = self._arrival(job.lane)
            lane.queue.append((self._clock(), job))
            self._depth += 1
            self._cond.notify_all()
        return True

    def claim(self, lane_name: str, min_gap_s: float) -> bool:
        """Count an arrival on ``lane_name``; True when its caller may run it right away,
        outside the queue: nothing waits or runs, the batcher is not stopping and the
        lane's mean gap between arrivals exceeds ``min_gap_s``. While claimed, the job
        counts as a running batch (``join`` waits for it); :meth:`release` ends that."""
        with self._cond:
            lane = self._arrival(lane_name)
            if self._depth or self._running or self._stopping or lane.gap <= min_gap_s:
                return False
            self._running += 1
            return True

    def release(self) -> None:
        """End a :meth:`claim` that returned True."""
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def _arrival(self, name: str) -> _Lane[J]:
        """The lane ``name`` (made on first use), its gap updated for an arrival now."""
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane()
        now = self._clock()
        if lane.last is not None:
            gap = now - lane.last
            lane.gap = gap if math.isinf(lane.gap) else (
                _GAP_WEIGHT * gap + (1 - _GAP_WEIGHT) * lane.gap)
        lane.last = now
        return lane

    def join(self, timeout: float | None = None) -> bool:
        """Block until no job waits and no batch runs; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._depth and not self._running,
                                       timeout)

    def stop(self, timeout: float | None = 5.0, *, discard: bool = False) -> int:
        """End the threads once the queue is empty; return how many jobs were discarded.

        ``discard`` drops what still waits instead of running it; ``timeout`` 0 returns
        without waiting for the threads (a run in progress finishes on its own).
        """
        dropped = 0
        with self._cond:
            self._stopping = True
            if discard:
                for lane in self._lanes.values():
                    dropped += len(lane.queue)
                    lane.queue.clear()
                self._depth = 0
            self._cond.notify_all()
        if timeout != 0:
            for thread in self._threads:
                if thread.is_alive():
                    thread.join(timeout)
        return dropped

    # --- tail threads --------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                picked = self._next_batch()
                if picked is None:
                    return
                self._running += 1
            name, jobs = picked
            try:
                self._run(name, jobs)
            except Exception:  # run() answers its own failures; this is a bug, keep serving
                log.exception("batch of %d for split %s failed unexpectedly", len(jobs), name)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def _next_batch(self) -> tuple[str, list[J]] | None:
        """Called with the lock held; waits (releasing it) until a batch is due."""
        while True:
            name = self._oldest_lane()
            if name is None:
                if self._stopping:
                    return None
                since = self._clock()
                self._cond.wait()
                self.starved_s += self._clock() - since
                continue
            lane = self._lanes[name]
            if self._drop_expired(name, lane):
                continue
            chosen, samples = self._select(lane)
            remaining = lane.queue[0][0] + self.max_delay_s - self._clock()
            if (samples >= self.max_batch or remaining <= 0 or lane.gap > remaining
                    or self._stopping):
                self._take(lane, chosen)
                return name, [job for _, job in chosen]
            since = self._clock()
            self._cond.wait(remaining)  # an offer wakes us to look again
            self.held_s += self._clock() - since

    def _oldest_lane(self) -> str | None:
        oldest: tuple[float, str] | None = None
        for name, lane in self._lanes.items():
            if lane.queue and (oldest is None or lane.queue[0][0] < oldest[0]):
                oldest = (lane.queue[0][0], name)
        return None if oldest is None else oldest[1]

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

    def _drop_expired(self, name: str, lane: _Lane[J]) -> bool:
        """Hand jobs past their deadline to ``expire``; True if any went."""
        now = self._wall()
        if not any(0 < job.deadline < now for _, job in lane.queue):
            return False
        keep: deque[tuple[float, J]] = deque()
        for entry in lane.queue:
            job = entry[1]
            if 0 < job.deadline < now:
                self._depth -= 1
                try:
                    self._expire(job)
                except Exception:
                    log.exception("expire callback failed for a job of split %s", name)
            else:
                keep.append(entry)
        lane.queue = keep
        self._cond.notify_all()
        return True
