"""The run-time chooser (edge_agent.adaptive.Policy) on synthetic observation sequences.

No sleeps, no sockets: a tiny discrete-event loop plays a device sending requests at a
fixed rate over a link that changes on a schedule; each cloud request's observation is
what :func:`splitinfer.costmodel.predict` says the *true* link gives (times a seeded
noise), delivered at the time its answer would arrive. The policy's clock is the event
time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import numpy as np
import pytest

from edge_agent.adaptive import Observation, Policy, PolicyConfig
from splitinfer.costmodel import LinkEstimate, SplitCosts, predict
from splitinfer.errors import BadInputError
from splitinfer.link import PROFILES

WIFI = LinkEstimate.from_profile(PROFILES["wifi"])
G3 = LinkEstimate.from_profile(PROFILES["3g"])

# edge_only 50 ms; cut_a small head, 20 KB; cut_b bigger head, 2 KB; cloud_only 100 KB.
SPLITS = [
    SplitCosts("edge", "edge_only", 0, 0, 0.050, 0.0, 0.0, 0.0),
    SplitCosts("cut_a", "split", 20_000, 200, 0.010, 0.0005, 0.0001, 0.005),
    SplitCosts("cut_b", "split", 2_000, 200, 0.025, 0.0002, 0.0001, 0.002),
    SplitCosts("cloud", "cloud_only", 100_000, 200, 0.0, 0.001, 0.0001, 0.020),
]
COSTS = {c.split_id: c for c in SPLITS}


def best_on(link: LinkEstimate) -> str:
    return min(SPLITS, key=lambda c: predict(c, link).total_s).split_id


def observation(t: float, split: str, link: LinkEstimate, noise: float = 1.0, *,
                probe: bool = False) -> tuple[float, Observation]:
    """(arrival time, observation) of a request of ``split`` sent at ``t`` over ``link``."""
    p = predict(COSTS[split], link)
    network = (p.uplink_s + p.broker_s + p.downlink_s) * noise
    uplink = (p.uplink_s + p.broker_s / 2) * noise
    return t + p.total_s * noise, Observation(
        t + p.total_s * noise, split, COSTS[split].request_bytes, COSTS[split].result_bytes,
        network, uplink_s=uplink, queue_s=0.0, tail_s=COSTS[split].tail_s,
        head_s=COSTS[split].head_s, probe=probe, sent=t)


def simulate(policy: Policy, link_at: Callable[[float], LinkEstimate], *, rate: float,
             duration: float, noise: Callable[[], float] = lambda: 1.0,
             deadline_s: float | None = None,
             gaps: Callable[[], float] | None = None) -> list[tuple[float, str, str]]:
    """Requests every 1/rate s (or ``gaps()`` apart) until ``duration``, and the probes the
    policy asks for when it asks (``next_probe_at``, as the agent's prober waits); returns
    (t, split served, fallback) per request."""
    served: list[tuple[float, str, str]] = []
    events: list[tuple[float, int, str, Observation | None]] = []
    seq = 0
    ticks: set[float] = set()

    def push(at: float, kind: str, obs: Observation | None = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, obs))

    def send(t: float, split: str, probe: bool) -> None:
        if COSTS[split].kind != "edge_only":
            at, obs = observation(t, split, link_at(t), noise(), probe=probe)
            push(at, "obs", obs)

    push(0.0, "request")
    while events:
        t, _, kind, obs = heapq.heappop(events)
        if t >= duration:
            continue
        if kind == "obs":
            assert obs is not None
            policy.observe(obs)
        elif kind == "request":
            decision = policy.decide(t, deadline_s)
            served.append((t, decision.split_id, decision.fallback))
            send(t, decision.split_id, False)
            push(t + (gaps() if gaps is not None else 1 / rate), "request")
        probe = policy.probe_due(t)
        if probe is not None:
            policy.probe_started(t, probe)
            send(t, probe, True)
        at = policy.next_probe_at(t)
        if at is not None and at not in ticks:
            ticks.add(at)
            push(max(at, t + 1e-6), "tick")
    return served


def test_initial_choice_is_the_best_prediction_on_the_prior() -> None:
    assert Policy(SPLITS, WIFI).current == best_on(WIFI) == "cut_a"
    assert Policy(SPLITS, G3).current == best_on(G3) == "edge"


def test_stays_put_under_noise() -> None:
    rng = np.random.default_rng(1)
    policy = Policy(SPLITS, WIFI, PolicyConfig())
    served = simulate(policy, lambda t: WIFI, rate=5, duration=60,
                      noise=lambda: float(rng.lognormal(0, 0.15)))
    assert policy.switches == []
    assert {s for _, s, _ in served} == {"cut_a"}


def test_alternating_noise_does_not_flap() -> None:
    """Every other observation looks like 3g: one vote each time, never confirmed."""
    policy = Policy(SPLITS, WIFI)
    for i in range(200):
        t = i * 0.2
        link = G3 if i % 2 else WIFI
        _, obs = observation(t, "cut_a", link)
        policy.observe(obs)
        policy.decide(t + 0.1)
    assert policy.switches == []
    assert policy.current == "cut_a"


@pytest.mark.parametrize("rate", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("arrivals", ["constant", "poisson"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_switches_within_two_seconds_of_a_link_change(rate: float, arrivals: str,
                                                      seed: int) -> None:
    changes = [(0.0, WIFI), (20.0, G3), (40.0, WIFI)]
    rng = np.random.default_rng(seed)

    def link_at(t: float) -> LinkEstimate:
        return [link for start, link in changes if start <= t][-1]

    policy = Policy(SPLITS, WIFI, device="dev-1")
    served = simulate(policy, link_at, rate=rate, duration=60,
                      noise=lambda: float(rng.lognormal(0, 0.1)),
                      gaps=(lambda: float(rng.exponential(1 / rate)))
                      if arrivals == "poisson" else None)
    assert [s.to_split for s in policy.switches][-1] == "cut_a"
    for (start, link), end in zip(changes[1:], [40.0, 60.0], strict=True):
        during = [s for s in policy.switches if start <= s.t_s < end]
        assert 1 <= len(during) <= 2, policy.switches
        assert during[0].t_s - start <= 2.0, during
        assert during[-1].to_split == best_on(link)
        # once switched, the rest of the period is served by the link's best split
        after = {split for t, split, _ in served if during[-1].t_s + 1e-9 < t < end}
        assert after == {best_on(link)}
    assert all(s.device == "dev-1" and s.reason == "predicted" for s in policy.switches)


def test_reprobe_while_on_edge_only_notices_a_recovered_link() -> None:
    policy = Policy(SPLITS, G3)
    assert policy.current == "edge"
    cfg = policy.config
    assert policy.probe_due(0.0) in ("cut_a", "cut_b", "cloud")  # never observed: probe
    policy.probe_started(0.0, "cut_b")
    assert policy.probe_due(0.5) is None  # one in flight
    _, obs = observation(0.0, "cut_b", G3, probe=True)
    policy.observe(obs)  # still 3g: no vote
    assert policy.probe_due(obs.t + 0.1) is None
    t = obs.t + cfg.probe_interval_s
    assert policy.next_probe_at(obs.t) == pytest.approx(t)
    probe = policy.probe_due(t)
    assert probe is not None
    # the link is wifi again: the probe votes, a confirmation probe follows, then a switch
    while not policy.switches:
        policy.probe_started(t, probe)
        _, obs = observation(t, probe, WIFI, probe=True)
        policy.observe(obs)
        next_at = policy.next_probe_at(obs.t)
        assert next_at is not None
        t = max(next_at, obs.t)
        policy.decide(t)
        probe = policy.probe_due(t) or probe
        assert t < 2.5
    assert policy.current == best_on(WIFI)


def test_timeouts_fall_back_until_the_cloud_answers_again() -> None:
    policy = Policy(SPLITS, WIFI)
    assert policy.decide(0.0).split_id == "cut_a"
    policy.observe_failure(0.1, "cut_a", "timeout")
    assert policy.decide(0.2) == type(policy.decide(0.2))("edge", "timeout")
    assert policy.current == "cut_a" and policy.switches == []  # a fallback is no switch
    probe = policy.probe_due(0.1 + policy.config.probe_interval_s)
    assert probe == "cut_a"
    policy.probe_started(1.2, probe)
    _, obs = observation(1.2, probe, WIFI, probe=True)
    policy.observe(obs)
    assert policy.decide(obs.t) .split_id == "cut_a"
    assert policy.decide(obs.t).fallback == ""


def test_offline_and_no_worker() -> None:
    policy = Policy(SPLITS, WIFI)
    policy.set_connected(1.0, False)
    assert policy.decide(1.1).fallback == "offline"
    assert policy.probe_due(5.0) is None  # nothing to probe through
    policy.set_connected(2.0, True)
    assert policy.decide(2.0).split_id == "cut_a"  # back at once, no dwell
    policy.observe_failure(2.1, "cut_a", "no_worker")
    assert policy.decide(2.2).fallback == "no_worker"
    with pytest.raises(BadInputError):
        policy.observe_failure(2.3, "cut_a", "gremlins")


def test_deadline_driven_fallback() -> None:
    policy = Policy(SPLITS, WIFI)
    reserve = policy.local_reserve_s()
    assert reserve == pytest.approx(0.050 * 1.5 + 0.02)
    # cut_a (~35 ms predicted) cannot also keep the local reserve within 60 ms: edge, which
    # meets 60 ms, answers; with room for both, cut_a
    assert policy.decide(0.0, deadline_s=0.060).split_id == "edge"
    assert policy.decide(0.0, deadline_s=0.060).fallback == "deadline"
    assert policy.decide(0.0, deadline_s=1.0).split_id == "cut_a"
    # when edge cannot meet it either, the chosen split keeps the request
    assert policy.decide(0.0, deadline_s=0.030).split_id == "cut_a"
    no_edge = Policy(SPLITS[1:], WIFI)
    assert no_edge.local_reserve_s() == 0.0
    assert no_edge.decide(0.0, deadline_s=0.001).split_id == "cut_a"


def test_pinned_never_switches() -> None:
    policy = Policy(SPLITS, WIFI, pinned="cloud")
    simulate(policy, lambda t: G3 if t > 5 else WIFI, rate=5, duration=20)
    assert policy.switches == [] and policy.current == "cloud"


def test_one_way_stamps_only_when_plausible() -> None:
    policy = Policy(SPLITS, WIFI)
    _, base = observation(0.0, "cut_a", WIFI)
    slow_up = Observation(0.1, "cut_a", 20_000, 200, base.network_s * 3,
                          uplink_s=base.network_s * 3 - base.network_s / 4)
    own = policy._state_of(slow_up)
    assert own.log_up > own.log_down  # the uplink is where the time went
    skewed = Observation(0.1, "cut_a", 20_000, 200, base.network_s * 3, uplink_s=-5.0)
    own = policy._state_of(skewed)  # a clock offset: the symmetric split of the round trip
    assert own.log_up == own.log_down and math.log(2.5) < own.log_up < math.log(4)
    blind = Policy(SPLITS, WIFI, PolicyConfig(use_one_way=False))._state_of(slow_up)
    assert blind.log_up == blind.log_down


def test_config_is_checked() -> None:
    with pytest.raises(BadInputError):
        PolicyConfig(confirm=0)
    with pytest.raises(BadInputError):
        PolicyConfig(probe_interval_s=0)
    with pytest.raises(BadInputError):
        Policy(SPLITS, WIFI, pinned="nope")
