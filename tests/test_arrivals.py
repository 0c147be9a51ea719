"""Arrival schedules: reproducible per (seed, device), at the configured rates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulators.arrivals import KINDS, ArrivalProcess, schedule
from splitinfer.errors import BadInputError

SPECS = ["constant,rate=2", "poisson,rate=2", "bursty,rate=2,on=1s,off=4s",
         "batch,rate=2,size=5,spacing=20ms"]


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_schedule_other_seed_differs(spec: str) -> None:
    p = ArrivalProcess.parse(spec)
    a = p.schedule(60, seed=42, device=3)
    assert np.array_equal(a, p.schedule(60, seed=42, device=3))
    assert not np.array_equal(a, p.schedule(60, seed=43, device=3))
    assert not np.array_equal(a, p.schedule(60, seed=42, device=4))
    assert a.dtype == np.float64 and np.all(np.diff(a) >= 0)
    assert a.size and a[0] >= 0 and a[-1] < 60


def test_a_device_schedule_ignores_fleet_size_and_order() -> None:
    p = ArrivalProcess.parse("poisson,rate=1")
    small = {d: p.schedule(30, 7, d) for d in range(5)}
    large = {d: p.schedule(30, 7, d) for d in reversed(range(50))}
    for d in small:
        assert np.array_equal(small[d], large[d])
    assert np.array_equal(schedule(30, 1.0, 7, device=2), small[2])


def test_poisson_counts_and_gaps() -> None:
    rate, duration = 5.0, 2000.0
    t = schedule(duration, rate, seed=1)
    mean = rate * duration
    assert abs(t.size - mean) < 4 * math.sqrt(mean)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1


def test_constant_is_periodic_with_a_per_device_phase() -> None:
    p = ArrivalProcess("constant", 4.0)
    t = p.schedule(10, seed=0, device=0)
    assert t.size in (39, 40) and np.allclose(np.diff(t), 0.25)
    phases = {round(float(p.schedule(10, 0, d)[0]), 6) for d in range(20)}
    assert len(phases) == 20 and all(0 <= x < 0.25 for x in phases)  # not in lock-step


@pytest.mark.parametrize("spec", SPECS[2:])
def test_bursty_and_batch_keep_the_mean_rate_and_are_burstier(spec: str) -> None:
    p = ArrivalProcess.parse(spec)
    devices, duration = 200, 100.0
    counts = np.array([p.schedule(duration, 5, d).size for d in range(devices)])
    expected = p.rate * duration
    # per-device counts are overdispersed; the fleet mean is still tight (CLT, 4 sigma)
    assert abs(counts.mean() - expected) < 4 * counts.std(ddof=1) / math.sqrt(devices)
    assert counts.mean() == pytest.approx(expected, rel=0.05)
    assert counts.var() > 2 * expected  # a Poisson count would have variance == mean
    gaps = np.diff(p.schedule(2000, 5, 0))
    assert gaps.std() / gaps.mean() > 1.3  # burstier than Poisson's CV of 1


def test_batch_requests_keep_their_spacing() -> None:
    t = ArrivalProcess.parse("batch,rate=1,size=4,spacing=50ms").schedule(200, 3)
    gaps = np.diff(t)
    assert np.isclose(gaps, 0.05).sum() > 0.5 * t.size  # most gaps are within a batch


def test_spec_round_trip_and_errors() -> None:
    for spec in SPECS:
        p = ArrivalProcess.parse(spec)
        assert ArrivalProcess.parse(p.spec()) == p
    assert set(KINDS) == {"constant", "poisson", "bursty", "batch"}
    for bad, says in [("uniform", "kind 'uniform'"), ("poisson,rate=-1", "rate"),
                      ("poisson,rate=fast", "rate 'fast'"), ("bursty,on=0s", "on"),
                      ("batch,size=0.5", "batch size"), ("poisson,burst=2", "field")]:
        with pytest.raises(BadInputError, match=says):
            ArrivalProcess.parse(bad)
    with pytest.raises(BadInputError):
        schedule(-1, 1.0, 0)
    with pytest.raises(BadInputError):
        schedule(1, 1.0, -5)
    assert schedule(0, 1.0, 0).size == 0
