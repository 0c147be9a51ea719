"""The shaping model on a virtual clock: serialization, delay, jitter, loss, stalls."""

from __future__ import annotations

import math
import random

import pytest

from simulators.shaper import DirectionStats, Shaper, StallWindows
from splitinfer.link import LinkProfile


def test_idle_link_costs_serialization_plus_delay() -> None:
    s = Shaper(rate_bps=8e6, delay_s=0.03)  # 1 byte per microsecond
    assert s.schedule(10.0, 100_000) == pytest.approx(10.0 + 0.1 + 0.03)
    # once idle again, the next chunk starts from its own arrival
    assert s.schedule(20.0, 1_000) == pytest.approx(20.0 + 0.001 + 0.03)


def test_back_to_back_chunks_queue_fifo() -> None:
    s = Shaper(rate_bps=8e6, delay_s=0.01)
    first = s.schedule(0.0, 50_000)
    second = s.schedule(0.0, 50_000)  # waits for the first to leave the serializer
    assert [first, second] == pytest.approx([0.06, 0.11])
    assert s.schedule(0.05, 1_000) == pytest.approx(0.101 + 0.01)  # behind both
    assert s.schedule(0.5, 1_000) == pytest.approx(0.501 + 0.01)  # idle again


def test_unlimited_rate_is_pure_delay() -> None:
    s = Shaper(rate_bps=math.inf, delay_s=0.02)
    assert s.schedule(1.0, 10**9) == pytest.approx(1.02)


def test_jitter_never_reorders_and_stays_in_bounds() -> None:
    s = Shaper(rate_bps=1e9, delay_s=0.05, jitter_s=0.04, rng=random.Random(3))
    deliveries = [s.schedule(i * 0.001, 100) for i in range(2000)]
    assert deliveries == sorted(deliveries)
    lat = [d - i * 0.001 for i, d in enumerate(deliveries)]
    # dense traffic bunches behind the latest delivery: latency only goes up, never past
    # delay + jitter
    assert min(lat) >= 0.05 - 0.04 and max(lat) <= 0.05 + 0.04 + 1e-6
    sparse = [s.schedule(10.0 + i, 100) - 10.0 - i for i in range(2000)]
    assert min(sparse) >= 0.01 and max(sparse) <= 0.09 + 1e-6
    assert sum(sparse) / len(sparse) == pytest.approx(0.05, abs=0.002)  # centred on delay


def test_loss_rate_and_retransmission_delay() -> None:
    stats = DirectionStats()
    profile = LinkProfile.parse("up=1gbit,delay=10ms,loss=5%,rto=100ms")
    s = Shaper.for_profile(profile, "up", rng=random.Random(11), stats=stats)
    n, extra = 20_000, []
    for i in range(n):
        now = i * 10.0  # far apart: every chunk meets an idle link, no queueing
        extra.append(s.schedule(now, 1460) - now - 1460 * 8 / 1e9 - 0.01)
    p = 0.05
    sigma = math.sqrt(n * p * (1 - p))
    assert stats.segments == n
    assert abs(stats.lost_segments - n * p) < 4 * sigma, stats
    lost = [e for e in extra if e > 1e-9]
    assert len(lost) == stats.lost_segments
    # one RTO; each lost retransmission doubles it: 0.1, 0.1 + 0.2, 0.1 + 0.2 + 0.4 ...
    tries = [round(math.log2(e / 0.1 + 1)) for e in lost]
    assert all(e == pytest.approx(0.1 * (2**k - 1)) for e, k in zip(lost, tries, strict=True))
    assert stats.retransmissions == sum(tries)
    assert abs(sum(1 for k in tries if k > 1) - n * p * p) < 4 * math.sqrt(n * p * p) + 1
    assert stats.loss_delay_s == pytest.approx(sum(lost))


def test_loss_counts_segments_inside_large_chunks() -> None:
    stats = DirectionStats()
    s = Shaper(rate_bps=1e9, loss=0.02, rto_s=0.0, mss=1000, rng=random.Random(5), stats=stats)
    for i in range(200):
        s.schedule(float(i), 64_000)  # 64 segments each
    n = 200 * 64
    assert stats.segments == n
    assert abs(stats.lost_segments - n * 0.02) < 4 * math.sqrt(n * 0.02 * 0.98)


def test_stall_windows_hold_and_pause_serialization() -> None:
    stats = DirectionStats()
    windows = StallWindows()
    windows.add(1.0, 1.5)
    windows.add(1.4, 2.0)  # merged: [1.0, 2.0)
    windows.add(5.0, 6.0)
    assert windows.windows == [(1.0, 2.0), (5.0, 6.0)]
    s = Shaper(rate_bps=8e6, delay_s=0.01, stats=stats, stalls=windows)
    assert s.schedule(0.0, 1000) == pytest.approx(0.011)  # before any window
    assert s.schedule(1.2, 1000) == pytest.approx(2.011)  # waits for the window's end
    # starts at 4.95, 0.1 s of serialization is cut by [5, 6): 0.05 before, 0.05 after
    assert s.schedule(4.95, 100_000) == pytest.approx(6.05 + 0.01)
    assert stats.stalled_chunks == 2
    assert stats.stall_s == pytest.approx(0.8 + 1.0)
    assert s.schedule(7.0, 1000) == pytest.approx(7.011)
    assert windows.windows == []  # past windows are dropped as time moves on


def test_retune_keeps_scheduled_deliveries_and_applies_to_the_next_chunk() -> None:
    wifi, slow = LinkProfile.parse("up=8mbit,delay=10ms"), LinkProfile.parse(
        "up=0.8mbit,delay=100ms,loss=0")
    s = Shaper.for_profile(wifi, "up")
    first = s.schedule(0.0, 100_000)  # 0.1 s serializing + 10 ms
    assert first == pytest.approx(0.11)
    s.retune(slow, "up")
    # serializer still busy until 0.1 s: the next chunk starts then, at the new rate/delay
    assert s.schedule(0.05, 1_000) == pytest.approx(0.1 + 0.01 + 0.1)
    assert s.schedule(5.0, 1_000) == pytest.approx(5.0 + 0.01 + 0.1)
    s.retune(wifi, "up")
    assert s.schedule(10.0, 1_000) == pytest.approx(10.0 + 0.001 + 0.01)
    # faster after slower: never before the previous chunk's delivery (no reordering)
    s.retune(slow, "up")
    late = s.schedule(20.0, 1_000)
    s.retune(wifi, "up")
    assert s.schedule(20.0, 10) >= late


def test_retune_loss_on_and_off() -> None:
    stats = DirectionStats()
    s = Shaper(rate_bps=1e9, rng=random.Random(2), stats=stats, mss=1000)
    s.retune(LinkProfile.parse("up=1gbit,loss=10%,rto=50ms"), "up")
    for i in range(1000):
        s.schedule(float(i), 1000)
    assert 50 < stats.lost_segments < 150
    s.retune(LinkProfile.parse("up=1gbit"), "up")
    lost = stats.lost_segments
    for i in range(1000):
        s.schedule(2000.0 + i, 1000)
    assert stats.lost_segments == lost
