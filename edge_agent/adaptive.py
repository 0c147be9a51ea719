"""The run-time split chooser: which split of a bundle serves the next request.

Pure and clock-injected (no I/O, no sleeps), so a synthetic observation sequence tests it::

    policy = Policy(costs_from_profiles(edge, cloud), LinkEstimate.from_profile(PROFILES["wifi"]),
                    PolicyConfig(), clock=time.monotonic)
    decision = policy.decide(now, deadline_s=2.0)    # Decision(split_id, fallback)
    ...                                              # the agent serves it, then
    policy.observe(Observation(t, split_id, request_bytes, result_bytes, network_s, ...))

**Prediction.** Every split's latency is :func:`splitinfer.costmodel.predict` on the
*prior* link (``--link``, or ``wifi`` when none is given), corrected by what the device
observes of its own requests:

* **link factors** ``k_up``, ``k_down``: how much slower (>1) or faster (<1) than the prior
  each direction is. One observation gives ``k = observed / predicted-on-the-prior`` for the
  bytes that request moved; the predicted uplink and downlink terms of every split are
  multiplied by them. Scaling the delay and the transfer time together is exact when a link
  changes as the named profiles do (wifi -> 3g: delay x15, uplink rate /17, downlink /10),
  and off where only one of them changes (see below).
* The observed round trip ``network`` = (reply received - sent) - (worker reply - worker
  recv) needs no synced clocks; it is the sum of both directions. When the worker's
  ``recv`` stamp minus the device's ``sent`` stamp is plausible (``0 <= up <= network``
  within :attr:`PolicyConfig.clock_tolerance_s`) it is taken as the uplink's one-way time
  and the rest as the downlink's, so asymmetric changes are told apart. **Clock assumption:**
  that one-way figure is only right when the device and worker clocks agree to well under the
  link's one-way delay (NTP/chrony on a LAN, or one host as in the fleet); an implausible
  stamp falls back to the symmetric round-trip split, and ``use_one_way=False`` never
  trusts it.
* **queue**: the worker's queueing (``tail_start - recv``, one clock) replaces the model's
  queue term; **head** and **tail** per split: the observed times replace the profile's.
  All are exponentially smoothed (``alpha``; the link factors in log space, so 2x slower and
  2x faster weigh alike).

**Hysteresis.** Each observation *votes* for the split that is best under that observation
alone, when it beats the current split by ``margin_rel`` *and* ``margin_abs_s``. The policy
switches once ``confirm`` consecutive observations voted for the same split over at least
``dwell_s``, and not within ``min_hold_s`` of its last switch. A lone outlier gets one vote
and the next ordinary observation resets it; alternating noise never gathers two in a row;
a real change gathers them at once. On a switch the smoothed state restarts from the mean
of the confirming observations (a change point: no slow convergence, hence no second
switch as the average catches up). While a vote waits for confirmation, :meth:`probe_due`
asks for a *confirmation probe* after ``probe_gap_s``, so a device sending 1 req/s still
decides within about a second.

**Re-probing.** Observations come only from cloud requests. When no cloud observation came
for ``probe_interval_s`` (the device is on edge_only, or the cloud was found down),
:meth:`probe_due` names a cloud split — the best predicted one — for a *shadow request*: the
agent sends it beside the real one (answered as usual), uses its answer only to measure,
and a recovered link or worker is noticed within ``probe_interval_s`` + a round trip.

**Fallback** (not a switch: the chosen split stays, requests are answered locally with a
reason until the cloud is back): ``offline`` (no broker connection), ``no_worker`` (no
subscriber, or the worker refused the split), ``timeout`` (a request got no answer within
its budget); any successful observation or a reconnect ends it. ``deadline``: the chosen
split is predicted to miss the request's deadline (less the local reserve) and edge_only
is predicted to meet it. The local reserve (:meth:`Policy.local_reserve_s`) is what the
agent keeps back to answer locally when a cloud request is abandoned.

Chosen values (:class:`PolicyConfig`) and why, for requests at 1-5 req/s and the
``splitinfer.link`` profiles: a 10 % / 3 ms margin is above the run-to-run spread of a
p50 on this machine (a few %) and of wifi's ±1 ms jitter, far below the gap a link change
opens (x3 to x17); two confirming votes over >= 0.25 s reject single outliers and still fit
two observations in 0.5 s (the confirmation probe, 0.1 s after a vote); alpha 0.5
follows a change in two or three observations when no switch restarts it; a 0.75 s
re-probe interval costs ~1.3 small requests a second while on edge_only and notices a
recovered link within ~1 s; a 2 s hold caps a change at two switches. Together: a
switch within ~0.25 s + 2 round trips of the first observation after a change (< 2 s at
1 req/s, probes included), at most 2 per change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splitinfer.costmodel import DEFAULT_BROKER_S, LinkEstimate, SplitCosts, mqtt_publish_bytes
from splitinfer.costmodel import predict as cost_predict
from splitinfer.errors import BadInputError

__all__ = ["PolicyConfig", "Observation", "Decision", "Switch", "Policy", "FALLBACKS"]

Clock = Callable[[], float]
FALLBACKS = ("offline", "no_worker", "deadline", "timeout")


@dataclass(frozen=True)
class PolicyConfig:
    """The chooser's knobs (module docstring: what each does and why these values)."""

    margin_rel: float = 0.10  # a candidate must be predicted >= 10 % faster ...
    margin_abs_s: float = 0.003  # ... and >= 3 ms faster
    confirm: int = 2  # consecutive observations voting for it
    dwell_s: float = 0.25  # from its first vote to the switch, at least
    min_hold_s: float = 2.0  # no switch within this of the previous one
    alpha: float = 0.5  # weight of a new observation in the smoothed state
    probe_interval_s: float = 0.75  # no cloud observation for this long: shadow probe
    probe_gap_s: float = 0.1  # confirmation probe this long after an unconfirmed vote
    probe_timeout_s: float = 2.0  # a probe unanswered by then failed
    reserve_factor: float = 1.5  # local reserve = edge_only head x this + reserve_abs_s
    reserve_abs_s: float = 0.02
    use_one_way: bool = True  # trust worker recv - device sent when plausible
    clock_tolerance_s: float = 0.002
    k_min: float = 0.01  # link factors are clamped to [k_min, k_max]
    k_max: float = 200.0
    broker_s: float = DEFAULT_BROKER_S
    topic_len: int = 48
    qos: int = 1

    def __post_init__(self) -> None:
        if not (self.margin_rel >= 0 and self.margin_abs_s >= 0 and self.dwell_s >= 0
                and self.min_hold_s >= 0 and self.confirm >= 1 and 0 < self.alpha <= 1):
            raise BadInputError(f"policy config {self}: expected margins, dwell and hold >= 0,"
                                " confirm >= 1, 0 < alpha <= 1")
        if not (self.probe_interval_s > 0 and self.probe_gap_s > 0
                and self.probe_timeout_s > 0 and 0 < self.k_min < 1 < self.k_max):
            raise BadInputError(f"policy config {self}: expected probe times > 0 and "
                                "0 < k_min < 1 < k_max")


@dataclass(frozen=True)
class Observation:
    """What one answered cloud request tells (seconds; bytes are MQTT payloads)."""

    t: float  # the policy's clock, when the answer came
    split_id: str
    request_bytes: int
    result_bytes: int
    network_s: float  # round trip minus the worker's time: clock-free
    uplink_s: float | None = None  # worker recv - device sent: needs synced clocks
    queue_s: float | None = None
    tail_s: float | None = None
    head_s: float | None = None
    probe: bool = False
    sent: float | None = None  # the policy's clock when the request went out (None: t)


@dataclass(frozen=True)
class Decision:
    split_id: str
    fallback: str = ""  # why edge_only serves although it was not chosen (FALLBACKS)


@dataclass(frozen=True)
class Switch:
    t_s: float
    device: str
    from_split: str
    to_split: str
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"t_s": round(self.t_s, 4), "device": self.device, "from": self.from_split,
                "to": self.to_split, "reason": self.reason}


@dataclass(frozen=True)
class _State:
    """Link factors (log), worker queue: smoothed, or one observation's own."""

    log_up: float = 0.0
    log_down: float = 0.0
    queue_s: float | None = None


@dataclass
class _Vote:
    split_id: str
    since: float
    sent: float  # when the first voting observation's request went out
    states: list[_State] = field(default_factory=list)


class Policy:
    """Chooses a split per request from predictions corrected by observations (module doc)."""

    def __init__(self, splits: Sequence[SplitCosts], link_prior: LinkEstimate,
                 config: PolicyConfig | None = None, clock: Clock | None = None, *,
                 device: str = "", pinned: str | None = None,
                 initial: str | None = None) -> None:
        if not splits:
            raise BadInputError("the chooser needs at least one split")
        self.config = config or PolicyConfig()
        self.prior = link_prior
        self.device = device
        import time

        self.clock: Clock = clock or time.monotonic
        self.costs: dict[str, SplitCosts] = {c.split_id: c for c in splits}
        self.head_s = {c.split_id: c.head_s for c in splits}
        self.tail_s = {c.split_id: c.tail_s for c in splits}
        edge = [c.split_id for c in splits if c.kind == "edge_only"]
        self.edge_only: str | None = edge[0] if edge else None
        self.cloud = [c.split_id for c in splits if c.kind != "edge_only"]
        for name in (pinned, initial):
            if name is not None and name not in self.costs:
                raise BadInputError(f"split {name!r} is not one of {', '.join(self.costs)}")
        self.pinned = pinned
        self.state = _State()
        self.current = pinned or initial or self.best(self.state)
        self.switches: list[Switch] = []
        self.down = ""  # "", or the fallback reason while the cloud is unusable
        self._vote: _Vote | None = None
        self._last_switch = -math.inf
        self._last_cloud_obs = -math.inf
        self._last_probe = -math.inf
        self._probing: str | None = None
        self._connected = True
        self.observations = 0

    # ---- predictions ---------------------------------------------------------------

    def predicted(self, split_id: str, state: _State | None = None) -> float:
        """Predicted seconds of ``split_id`` under ``state`` (the smoothed one by default)."""
        state = state or self.state
        c = dataclasses.replace(self.costs[split_id], head_s=self.head_s[split_id],
                                tail_s=self.tail_s[split_id])
        cfg = self.config
        p = cost_predict(c, self.prior, broker_s=cfg.broker_s, topic_len=cfg.topic_len,
                         qos=cfg.qos)
        if c.kind == "edge_only":
            return p.total_s
        queue = p.queue_s if state.queue_s is None else state.queue_s
        return (p.total_s + (math.exp(state.log_up) - 1) * p.uplink_s
                + (math.exp(state.log_down) - 1) * p.downlink_s + queue - p.queue_s)

    def predictions(self) -> dict[str, float]:
        return {s: self.predicted(s) for s in self.costs}

    def best(self, state: _State, among: Sequence[str] | None = None) -> str:
        names = list(among if among is not None else self.costs)
        return min(names, key=lambda s: self.predicted(s, state))

    def _better(self, cand: float, cur: float) -> bool:
        return (cand < cur * (1 - self.config.margin_rel)
                and cur - cand > self.config.margin_abs_s)

    def local_reserve_s(self) -> float:
        """Seconds kept back to answer locally when a cloud request must be abandoned."""
        if self.edge_only is None:
            return 0.0
        return (self.head_s[self.edge_only] * self.config.reserve_factor
                + self.config.reserve_abs_s)

    # ---- choosing ------------------------------------------------------------------

    def choose(self, now: float | None = None, deadline_s: float | None = None) -> str:
        return self.decide(now, deadline_s).split_id

    def decide(self, now: float | None = None, deadline_s: float | None = None) -> Decision:
        """The split for a request due ``now`` with ``deadline_s`` seconds to answer."""
        now = self.clock() if now is None else now
        self._maybe_switch(now)
        cur = self.current
        edge = self.edge_only
        if self.costs[cur].kind == "edge_only" or edge is None:
            return Decision(cur)
        if self.down:
            return Decision(edge, self.down)
        if deadline_s is not None:
            budget = deadline_s - self.local_reserve_s()
            if self.predicted(cur) > budget and self.predicted(edge) <= deadline_s:
                return Decision(edge, "deadline")
        return Decision(cur)

    def _maybe_switch(self, now: float) -> None:
        vote = self._vote
        cfg = self.config
        if (self.pinned is not None or vote is None or len(vote.states) < cfg.confirm
                or now - vote.since < cfg.dwell_s or now - self._last_switch < cfg.min_hold_s):
            return
        n = len(vote.states)
        restart = _State(sum(s.log_up for s in vote.states) / n,
                         sum(s.log_down for s in vote.states) / n,
                         _mean([s.queue_s for s in vote.states]))
        self._vote = None
        if not self._better(self.predicted(vote.split_id, restart),
                            self.predicted(self.current, restart)):
            return
        self.state = restart
        self.switches.append(Switch(now, self.device, self.current, vote.split_id,
                                    "predicted"))
        self.current = vote.split_id
        self._last_switch = now

    # ---- observing -----------------------------------------------------------------

    def observe(self, obs: Observation) -> None:
        """One answered cloud request (a probe's too): update the state, vote, maybe switch."""
        cfg = self.config
        own = self._state_of(obs)
        a = cfg.alpha
        queue = own.queue_s if self.state.queue_s is None else (
            self.state.queue_s if own.queue_s is None
            else (1 - a) * self.state.queue_s + a * own.queue_s)
        self.state = _State((1 - a) * self.state.log_up + a * own.log_up,
                            (1 - a) * self.state.log_down + a * own.log_down, queue)
        if obs.split_id in self.costs:
            if obs.head_s is not None and not obs.probe:
                self.head_s[obs.split_id] = _ewma(self.head_s[obs.split_id], obs.head_s, a)
            if obs.tail_s is not None:
                self.tail_s[obs.split_id] = _ewma(self.tail_s[obs.split_id], obs.tail_s, a)
        self.observations += 1
        self._last_cloud_obs = obs.t
        if obs.probe and self._probing == obs.split_id:
            self._probing = None
        if self.down and self._connected:
            self.down = ""  # the cloud answered: it is back
        self._cast(obs.t, own, obs.t if obs.sent is None else obs.sent)
        self._maybe_switch(obs.t)

    def observe_local(self, t: float, head_s: float) -> None:
        """An edge_only run took ``head_s``: keeps the local reserve honest."""
        if self.edge_only is not None:
            self.head_s[self.edge_only] = _ewma(self.head_s[self.edge_only], head_s,
                                                self.config.alpha)

    def observe_failure(self, t: float, split_id: str, reason: str, *,
                        probe: bool = False) -> None:
        """A cloud request failed: ``reason`` one of "offline", "no_worker", "timeout"."""
        if reason not in FALLBACKS:
            raise BadInputError(f"failure reason {reason!r}: expected one of {FALLBACKS}")
        if probe and self._probing == split_id:
            self._probing = None
        if probe:
            self._last_probe = max(self._last_probe, t)
        self.down = reason if not self.down or reason == "offline" else self.down
        self._vote = None

    def set_connected(self, t: float, connected: bool) -> None:
        """The broker connection went down (fallback "offline") or came back (resume)."""
        self._connected = connected
        if not connected:
            self.down = "offline"
            self._vote = None
        elif self.down:
            self.down = ""  # resume the chosen split; a failure says otherwise at once
            self._last_cloud_obs = t

    def _state_of(self, obs: Observation) -> _State:
        cfg = self.config
        up_wire = mqtt_publish_bytes(cfg.topic_len, obs.request_bytes, qos=cfg.qos)
        down_wire = mqtt_publish_bytes(cfg.topic_len, obs.result_bytes, qos=cfg.qos)
        link = self.prior
        up_pred = (up_wire * 8 / link.up_bps + link.delay_s
                   + link.expected_loss_delay_s(up_wire))
        down_pred = (down_wire * 8 / link.down_bps + link.delay_s
                     + link.expected_loss_delay_s(down_wire))
        floor = 1e-5  # a prediction of 0 (an unshaped prior) must not divide by 0
        net = max(0.0, obs.network_s - 2 * cfg.broker_s)
        up = obs.uplink_s
        tol = cfg.clock_tolerance_s
        if cfg.use_one_way and up is not None and -tol <= up <= obs.network_s + tol:
            up_obs = max(0.0, up - cfg.broker_s)
            down_obs = max(0.0, net - up_obs)
            k_up = up_obs / max(up_pred, floor)
            k_down = down_obs / max(down_pred, floor)
        else:
            k_up = k_down = net / max(up_pred + down_pred, floor)
        return _State(math.log(self._clamp(k_up)), math.log(self._clamp(k_down)), obs.queue_s)

    def _clamp(self, k: float) -> float:
        return min(self.config.k_max, max(self.config.k_min, k))

    def _cast(self, t: float, own: _State, sent: float) -> None:
        """This observation's vote: the split best under it alone, if it beats the current.

        An answer to a request sent before the one that opened the vote describes the link
        as it was: it neither confirms nor cancels the vote (answers overtake each other
        across a change)."""
        if self.pinned is not None:
            return
        pick = self.best(own)
        vote = self._vote
        if pick == self.current or not self._better(self.predicted(pick, own),
                                                    self.predicted(self.current, own)):
            if vote is None or sent >= vote.sent:
                self._vote = None
            return
        if vote is not None and vote.split_id == pick:
            vote.states.append(own)
        elif vote is None or sent >= vote.sent:
            self._vote = _Vote(pick, t, sent, [own])

    # ---- probing -------------------------------------------------------------------

    def probe_due(self, now: float | None = None) -> str | None:
        """A cloud split to send a shadow request through now, or None (module docstring)."""
        now = self.clock() if now is None else now
        cfg = self.config
        if not self.cloud or not self._connected:
            return None
        if self._probing is not None:
            if now - self._last_probe < cfg.probe_timeout_s:
                return None
            self._probing = None  # lost: the agent reports a failure; never wait forever
        since_probe = now - self._last_probe
        vote = self._vote
        if vote is not None and len(vote.states) < cfg.confirm and since_probe >= cfg.probe_gap_s \
                and now - self._last_cloud_obs >= cfg.probe_gap_s:
            if self.costs[vote.split_id].kind != "edge_only":
                return vote.split_id
            if self.costs[self.current].kind != "edge_only":
                return self.current
        if now - self._last_cloud_obs >= cfg.probe_interval_s \
                and since_probe >= cfg.probe_interval_s:
            return self.best(self.state, self.cloud)  # on edge_only, or the cloud was down
        return None

    def next_probe_at(self, now: float | None = None) -> float | None:
        """When :meth:`probe_due` will next name a split (None: not while nothing changes),
        so the agent's prober sleeps until then instead of polling."""
        now = self.clock() if now is None else now
        cfg = self.config
        if not self.cloud or not self._connected:
            return None
        if self._probing is not None:
            return self._last_probe + cfg.probe_timeout_s
        vote = self._vote
        if vote is not None and len(vote.states) < cfg.confirm and (
                self.costs[vote.split_id].kind != "edge_only"
                or self.costs[self.current].kind != "edge_only"):
            return max(self._last_probe, self._last_cloud_obs) + cfg.probe_gap_s
        return max(self._last_probe, self._last_cloud_obs) + cfg.probe_interval_s

    def probe_started(self, now: float, split_id: str) -> None:
        self._probing = split_id
        self._last_probe = now

    # ---- reporting -----------------------------------------------------------------

    def link_estimate(self) -> dict[str, float]:
        """The link as the policy now sees it (for summaries and logs)."""
        ku, kd = math.exp(self.state.log_up), math.exp(self.state.log_down)
        return {"k_up": round(ku, 4), "k_down": round(kd, 4),
                "up_bps": self.prior.up_bps / ku, "down_bps": self.prior.down_bps / kd,
                "delay_up_ms": self.prior.delay_s * ku * 1e3,
                "queue_ms": (self.state.queue_s or 0.0) * 1e3}


def _ewma(old: float, new: float, alpha: float) -> float:
    return (1 - alpha) * old + alpha * new


def _mean(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None

