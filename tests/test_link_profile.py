"""LinkProfile: named profiles, the spec grammar, its errors, and the figures it derives."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitinfer.errors import BadInputError
from splitinfer.link import PROFILES, LinkProfile, Outage, format_time, parse_time


def test_named_profiles_carry_the_issue_uplinks() -> None:
    assert LinkProfile.parse("3g").up_bps == 1.1e6
    assert LinkProfile.parse("4g").up_bps == 5.85e6
    assert LinkProfile.parse("wifi").up_bps == 18.88e6
    assert LinkProfile.parse("LTE") == PROFILES["4g"]
    lan = LinkProfile.parse("lan")
    assert (lan.up_bps, lan.down_bps, lan.delay_s) == (1e9, 1e9, 1e-4)
    for profile in PROFILES.values():
        assert profile.down_bps >= profile.up_bps
        assert profile.loss == 0 and not profile.outages
        assert profile.spec() == profile.name


def test_custom_spec_from_the_issue() -> None:
    p = LinkProfile.parse("up=5.85mbit,down=20mbit,delay=30ms,jitter=5ms,loss=0.5%")
    assert (p.up_bps, p.down_bps, p.delay_s, p.jitter_s, p.loss) == (
        5.85e6, 20e6, 0.03, 0.005, 0.005)
    assert p.name == p.spec() == "up=5.85mbit,down=20mbit,delay=30ms,jitter=5ms,loss=0.5%"
    assert p.rtt_s == 0.06
    assert p.effective_rto_s == 0.2  # max(200 ms, 2 * 60 ms)
    assert LinkProfile.parse("delay=150ms").effective_rto_s == pytest.approx(0.6)
    assert LinkProfile.parse("lan,rto=5ms").effective_rto_s == 0.005


def test_overrides_on_a_named_profile_keep_a_readable_name() -> None:
    p = LinkProfile.parse("4g, loss=1%")
    assert p.name == "4g,loss=1%"
    assert replace(p, name="4g", loss=0.0) == PROFILES["4g"]


def test_units() -> None:
    p = LinkProfile.parse("up=512kbit,down=1gbps,delay=0.5s,jitter=250us,mss=1400")
    assert (p.up_bps, p.down_bps, p.delay_s, p.jitter_s, p.mss) == (512e3, 1e9, 0.5, 25e-5,
                                                                    1400)
    assert math.isinf(LinkProfile.parse("delay=1ms").up_bps)  # unshaped unless given


def test_outages_repeat_and_take_a_mode() -> None:
    p = LinkProfile.parse("4g,outage=10s+5s,outage=500ms+2s:cut")
    assert p.outages == (Outage(10, 5, "stall"), Outage(0.5, 2, "cut"))
    assert p.outages[0].end_s == 15
    assert LinkProfile.parse(p.spec()).outages == p.outages


def test_transfer_time_is_serialization_plus_delay() -> None:
    p = PROFILES["4g"]
    assert p.transfer_s(100_000) == pytest.approx(100_000 * 8 / 5.85e6 + 0.03)
    assert p.transfer_s(100_000, "down") == pytest.approx(0.04 + 0.03)
    lossy = LinkProfile.parse("4g,loss=1%")
    assert lossy.expected_loss_delay_s(146_000) == pytest.approx(100 * 0.01 * 0.2)


@pytest.mark.parametrize(("spec", "names"), [
    ("", "profile name"),
    ("5g", "unknown profile '5g'"),
    ("up=5.85mbt", "up '5.85mbt': expected a rate like 5.85mbit"),
    ("up=-1mbit", "rate > 0"),
    ("delay=30", "delay '30': expected a time like 30ms"),
    ("jitter=fast", "jitter 'fast'"),
    ("loss=0.5", "loss '0.5': expected a percentage like 0.5%"),
    ("loss=100%", "expected a percentage"),
    ("outage=10s", "expected START+DURATION"),
    ("outage=1s+2s:boom", "mode 'boom'"),
    ("outage=1s+0s", "duration"),
    ("4g,bandwidth=1mbit", "unknown field 'bandwidth'"),
    ("4g,delay", "not key=value"),
    ("mss=0", "mss '0'"),
    ("rto=soon", "rto 'soon'"),
])
def test_bad_specs_name_the_field_and_the_form(spec: str, names: str) -> None:
    with pytest.raises(BadInputError) as err:
        LinkProfile.parse(spec)
    assert names in str(err.value)


def test_time_helpers() -> None:
    assert parse_time("30ms") == 0.03 and parse_time("0") == 0.0
    assert format_time(0.03) == "30ms" and format_time(2.5) == "2.5s"
    assert format_time(0.0) == "0s"


rates = st.one_of(st.just(math.inf), st.floats(1, 1e11, allow_nan=False))
times = st.floats(0, 100, allow_nan=False)


@settings(max_examples=60, deadline=None, database=None)
@given(up=rates, down=rates, delay=times, jitter=times,
       loss=st.floats(0, 0.99), rto=st.one_of(st.none(), times),
       mss=st.integers(1, 65535),
       outages=st.lists(st.tuples(times, st.floats(1e-6, 100), st.sampled_from(["stall", "cut"])),
                        max_size=3))
def test_spec_round_trips(up: float, down: float, delay: float, jitter: float, loss: float,
                          rto: float | None, mss: int,
                          outages: list[tuple[float, float, str]]) -> None:
    p = LinkProfile(up_bps=up, down_bps=down, delay_s=delay, jitter_s=jitter, loss=loss,
                    rto_s=rto, mss=mss,
                    outages=tuple(Outage(a, d, m) for a, d, m in outages))  # type: ignore[arg-type]
    q = LinkProfile.parse(p.spec())
    assert replace(q, name="") == replace(p, name="")
