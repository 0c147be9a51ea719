"""The link model of the shaping proxy: when bytes sent on an emulated link arrive.

Pure and clock-free (the caller passes ``now``), so it is tested without sockets and the
proxy (:mod:`simulators.shaper`) only moves bytes at the times it says.

Per direction of each connection (:class:`Shaper`):

* **Serialization.** A virtual clock: bytes enter the link when the proxy reads them and
  are serialized back to back, FIFO, at ``rate``: ``start = max(now, link free)``,
  ``end = start + bytes * 8 / rate``. Rates are goodput; header bytes are not counted.
* **Propagation and jitter.** ``deliver = end + delay + U(-jitter, +jitter)``, but never
  before ``end`` and never before the previous chunk's delivery: jitter does not reorder
  a TCP stream, it only bunches it.
* **Loss.** TCP hides loss as latency, so the proxy never drops bytes; it counts segments
  (``ceil(chunk / mss)``) and loses each with probability ``p`` (a Bernoulli process,
  drawn as geometric gaps). A lost segment holds its chunk and everything after it
  (head-of-line blocking) for one RTO; a lost retransmission doubles the RTO (Karn), and
  each retransmission occupies the link for one more segment. ``rto`` defaults to
  ``max(200 ms, 2 * RTT)``.
* **Stalls** (:class:`StallWindows`): serialization stops for the window; data waits
  and flows when it ends (bytes already in flight still land).

:class:`LinkStats` and :class:`DirectionStats` count what a proxy's links carried, lost
and held.

Not modelled: congestion control (slow start, cwnd after a loss) and header overhead.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from splitinfer.link import LinkProfile

__all__ = ["DirectionStats", "LinkStats", "Shaper", "StallWindows"]

_MAX_TRIES = 8  # a segment's RTO doubles at most 7 times (Linux caps at 120 s anyway)


@dataclass
class DirectionStats:
    """Counters for one direction of one proxy, summed over its connections."""

    bytes: int = 0  # payload accepted into the link
    delivered_bytes: int = 0
    chunks: int = 0
    segments: int = 0  # original segments, ceil(chunk / mss)
    lost_segments: int = 0  # original segments lost (Binomial(segments, p))
    retransmissions: int = 0  # >= lost_segments: retransmissions get lost too
    loss_delay_s: float = 0.0  # sum of RTO penalties
    stalled_chunks: int = 0  # chunks that arrived during a stall, or were held by one
    stall_s: float = 0.0  # serializer time lost to stall windows
    dropped_bytes: int = 0  # queued when a cut or a closed peer threw them away

    @property
    def loss_rate(self) -> float:
        return self.lost_segments / self.segments if self.segments else 0.0


@dataclass
class LinkStats:
    """What one proxy (one link profile) has seen, queryable while it runs."""

    up: DirectionStats = field(default_factory=DirectionStats)
    down: DirectionStats = field(default_factory=DirectionStats)
    accepted: int = 0
    active: int = 0
    refused: int = 0  # reset on accept during a cut (the kernel refuses the rest, uncounted)
    cut: int = 0  # open connections reset by a cut
    upstream_failed: int = 0  # the broker could not be reached
    cuts: int = 0  # cut windows begun

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["up"]["loss_rate"] = self.up.loss_rate
        out["down"]["loss_rate"] = self.down.loss_rate
        return out


class StallWindows:
    """Sorted, merged ``[start, end)`` windows (absolute clock) during which a link stalls."""

    __slots__ = ("windows",)

    def __init__(self) -> None:
        self.windows: list[tuple[float, float]] = []

    def add(self, start: float, end: float) -> None:
        merged: list[tuple[float, float]] = []
        for a, b in sorted([*self.windows, (start, end)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.windows = merged

    def adjust(self, now: float, start: float, busy: float) -> tuple[float, float, float, bool]:
        """Push a serialization ``[start, start + busy)`` past the windows it meets.

        Returns ``(start, busy, held, stalled)``: a start inside a window moves to its end;
        a window opening mid-serialization pauses it; ``held`` is the time added; and
        ``stalled`` says whether the chunk met a window, either arriving (at ``now``) inside
        one or being held by one.
        """
        windows = self.windows
        while windows and windows[0][1] <= now:
            windows.pop(0)  # past for good: the clock only moves forward
        held = 0.0
        stalled = bool(windows) and windows[0][0] <= now
        for a, b in windows:
            if b <= start:
                continue
            if a <= start:
                held += b - start
                start = b
            elif a < start + busy:
                held += b - a
                busy += b - a
            else:
                break
        return start, busy, held, stalled or held > 0


class Shaper:
    """One direction of one connection's link. Pure: the caller supplies the clock."""

    __slots__ = ("_log_keep", "_to_loss", "delay", "free_at", "jitter", "last_at", "loss",
                 "mss", "rng", "rto", "sec_per_byte", "stalls", "stats")

    def __init__(self, *, rate_bps: float, delay_s: float = 0.0, jitter_s: float = 0.0,
                 loss: float = 0.0, rto_s: float = 0.2, mss: int = 1460,
                 rng: random.Random | None = None, stats: DirectionStats | None = None,
                 stalls: StallWindows | None = None) -> None:
        self.sec_per_byte = 8.0 / rate_bps  # 0.0 when unlimited
        self.delay = delay_s
        self.jitter = jitter_s
        self.loss = loss
        self.rto = rto_s
        self.mss = mss
        self.rng = rng or random.Random()
        self.stats = stats or DirectionStats()
        self.stalls = stalls
        self.free_at = -math.inf  # when the serializer is next idle
        self.last_at = -math.inf  # the latest delivery scheduled
        self._log_keep = math.log1p(-loss) if loss else 0.0
        self._to_loss = self._gap() if loss else 0

    @classmethod
    def for_profile(cls, profile: LinkProfile, direction: Literal["up", "down"], *,
                    rng: random.Random | None = None, stats: DirectionStats | None = None,
                    stalls: StallWindows | None = None) -> Shaper:
        return cls(rate_bps=profile.rate_bps(direction), delay_s=profile.delay_s,
                   jitter_s=profile.jitter_s, loss=profile.loss, rto_s=profile.effective_rto_s,
                   mss=profile.mss, rng=rng, stats=stats, stalls=stalls)

    def retune(self, profile: LinkProfile, direction: Literal["up", "down"]) -> None:
        """Take ``profile``'s rate, delay, jitter, loss, RTO and MSS from now on.

        Chunks already scheduled keep their delivery times (they were serialized, or
        queued for it, on the old link), and the stream's order holds: a chunk never lands
        before the one ahead of it. The next chunk starts when the serializer is free.
        """
        self.sec_per_byte = 8.0 / profile.rate_bps(direction)
        self.delay = profile.delay_s
        self.jitter = profile.jitter_s
        self.rto = profile.effective_rto_s
        self.mss = profile.mss
        if profile.loss != self.loss:
            self.loss = profile.loss
            self._log_keep = math.log1p(-self.loss) if self.loss else 0.0
            self._to_loss = self._gap() if self.loss else 0

    def _gap(self) -> int:
        """Segments up to and including the next lost one: Geometric(p) >= 1."""
        return int(math.log(1.0 - self.rng.random()) / self._log_keep) + 1

    def schedule(self, now: float, nbytes: int) -> float:
        """The time the last of ``nbytes`` entering the link at ``now`` reaches the far end."""
        stats = self.stats
        start = self.free_at if self.free_at > now else now
        busy = nbytes * self.sec_per_byte
        if self.stalls is not None and self.stalls.windows:
            start, busy, held, stalled = self.stalls.adjust(now, start, busy)
            if stalled:
                stats.stalled_chunks += 1
                stats.stall_s += held
        end = start + busy
        at = end + self.delay
        if self.jitter:
            at += self.jitter * (2.0 * self.rng.random() - 1.0)
            if at < end:
                at = end
        segments = -(-nbytes // self.mss)
        stats.bytes += nbytes
        stats.chunks += 1
        stats.segments += segments
        if self.loss:
            self._to_loss -= segments
            while self._to_loss <= 0:
                tries, penalty = 1, self.rto
                while tries < _MAX_TRIES and self.rng.random() < self.loss:
                    penalty += self.rto * (1 << tries)
                    tries += 1
                stats.lost_segments += 1
                stats.retransmissions += tries
                stats.loss_delay_s += penalty
                at += penalty
                end += tries * self.mss * self.sec_per_byte
                self._to_loss += self._gap()
        self.free_at = end
        if at < self.last_at:
            at = self.last_at
        self.last_at = at
        return at
