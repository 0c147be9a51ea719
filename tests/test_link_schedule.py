"""LinkSchedule: parsing, the profile in force, a run on an injected clock against fake
proxies, and one real ShapingProxy whose set_profile changes an open connection's delay."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import replace

import pytest

from simulators.link_schedule import LinkSchedule
from simulators.shaper import ShapingProxy
from splitinfer.errors import BadInputError
from splitinfer.link import PROFILES, LinkProfile


def test_parse_the_issue_schedule() -> None:
    s = LinkSchedule.parse("wifi@0s,3g@20s,wifi@40s")
    assert [(t, p.name) for t, p in s.changes()] == [(0.0, "wifi"), (20.0, "3g"),
                                                     (40.0, "wifi")]
    assert s.changes()[1][1] == PROFILES["3g"]
    assert LinkSchedule.parse(s.spec()) == s
    assert len(s) == 3 and s.change_times == [0.0, 20.0, 40.0]


def test_specs_with_commas_and_order() -> None:
    s = LinkSchedule.parse("3g,delay=150ms@30s, 4g,loss=1%@500ms;lan@1s")
    assert s.change_times == [0.5, 1.0, 30.0]  # sorted
    slow = s.profile_at(31.0)
    assert slow is not None and slow.delay_s == pytest.approx(0.15)
    assert slow.up_bps == PROFILES["3g"].up_bps
    first = s.profile_at(0.5)
    assert first is not None and first.loss == pytest.approx(0.01)
    again = LinkSchedule.parse(s.spec())  # the same links (names are the text they came as)
    assert [(t, replace(p, name="")) for t, p in again] == [
        (t, replace(p, name="")) for t, p in s]


def test_profile_at() -> None:
    s = LinkSchedule.parse("3g@10s,wifi@20s")
    assert s.profile_at(0.0) is None  # before the first entry: the proxies' own profile
    assert s.profile_at(9.999) is None
    at10, at19, at20, late = (s.profile_at(t) for t in (10.0, 19.9, 20.0, 1e6))
    assert at10 is not None and at10.name == "3g" and at19 == at10
    assert at20 is not None and at20.name == "wifi" and late == at20


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty"),
    ("wifi", "'wifi' has no @TIME"),
    ("wifi@0s,3g", "'3g' has no @TIME"),
    ("@5s", "no profile before '@'"),
    ("5g@0s", "5g@0s"),  # the entry and the unknown profile named
    ("wifi@soon", "time 'soon'"),
    ("wifi@-1s", "wifi@-1s"),
    ("wifi@0s,3g@0ms", "two entries at 0s"),
    ("wifi@0s,,3g@1s", "empty entry"),
])
def test_bad_schedules_say_what_was_expected(text: str, says: str) -> None:
    with pytest.raises(BadInputError, match=re.escape(says)):
        LinkSchedule.parse(text)


class FakeProxy:
    def __init__(self) -> None:
        self.profiles: list[tuple[float, str]] = []
        self.clock: FakeClock | None = None

    def set_profile(self, profile: LinkProfile | str) -> None:
        name = profile.name if isinstance(profile, LinkProfile) else profile
        self.profiles.append((self.clock.now if self.clock else -1.0, name))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + 0.25  # a late wake-up: the next wait is shorter by it


def test_run_applies_each_change_to_every_proxy_on_time() -> None:
    clock = FakeClock(100.0)
    proxies = [FakeProxy(), FakeProxy()]
    for p in proxies:
        p.clock = clock
    seen: list[tuple[float, str]] = []
    schedule = LinkSchedule.parse("wifi@0s,3g@20s,wifi@40s")
    applied = asyncio.run(schedule.run(proxies, t0=100.0, clock=clock, sleep=clock.sleep,
                                       on_change=lambda t, p: seen.append((t, p.name))))
    assert clock.sleeps == [20.0, 19.75]  # the entry at 0 s applies without a wait
    expected = [(0.0, "wifi"), (20.25, "3g"), (40.25, "wifi")]
    assert [(t, p.name) for t, p in applied] == expected == seen
    for p in proxies:
        assert p.profiles == [(100.0 + t, name) for t, name in expected]


def test_run_skips_waits_for_changes_already_due() -> None:
    clock = FakeClock(50.0)
    proxy = FakeProxy()
    applied = asyncio.run(LinkSchedule.parse("3g@5s,wifi@30s,lan@60s").run(
        [proxy], t0=10.0, clock=clock, sleep=clock.sleep))  # 40 s into the run already
    assert clock.sleeps == [20.0]
    assert [p.name for _, p in applied] == ["3g", "wifi", "lan"]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 16):
            writer.write(data)
    writer.close()


async def _rtt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    t0 = time.perf_counter()
    writer.write(b"x" * 64)
    await reader.readexactly(64)
    return time.perf_counter() - t0


def test_set_profile_changes_an_open_connection_and_new_ones() -> None:
    """delay 5 ms -> 80 ms each way: the echo's round trip grows by ~150 ms on the same
    connection, and a connection opened after the change has it too. Bounds are loose:
    a shared 2-core box adds milliseconds, never removes them."""

    async def main() -> None:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        upstream = ("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            async with ShapingProxy("delay=5ms", upstream=upstream) as proxy:
                reader, writer = await asyncio.open_connection(*proxy.address)
                fast = min([await _rtt(reader, writer) for _ in range(3)])
                proxy.set_profile("delay=80ms")
                slow = await _rtt(reader, writer)
                r2, w2 = await asyncio.open_connection(*proxy.address)
                fresh = await _rtt(r2, w2)
                proxy.set_profile(LinkProfile.parse("delay=5ms"))
                back = min([await _rtt(reader, writer) for _ in range(3)])
                assert proxy.profile.delay_s == pytest.approx(0.005)
                for w in (writer, w2):
                    w.close()
            assert 0.01 <= fast < 0.1
            assert 0.16 <= slow < 0.4 and 0.16 <= fresh < 0.4
            assert slow - fast > 0.1
            assert 0.01 <= back < 0.1
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))
