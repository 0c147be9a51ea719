"""Worker heartbeats, and fencing a replica that went silent (plain MQTT, no plugins).

Every worker publishes a retained JSON status on ``{prefix}/v1/workers/{id}``
(:meth:`~splitinfer.topics.Topics.worker_status`) every ``heartbeat_s``::

    {"worker": "w1", "state": "online", "ts": 1764345600.1, "seq": 42, "interval_s": 1.0,
     "queue": 3, "in_flight": 5, "rate": 180.0, "loop_lag_ms": 0.4, "session": "persistent"}

``state`` is ``online``, ``draining`` (SIGTERM: finishing its queue) or ``offline`` (the
last will, retained, or the graceful goodbye); ``queue`` counts requests waiting for a
tail run, ``in_flight`` those accepted and not yet answered; ``rate`` requests received
per second since the last beat; ``loop_lag_ms`` the longest the event loop was late for
:class:`HeartbeatPublisher`'s ticks since the last beat; ``session`` whether the broker
keeps a session for this worker's id between connections (``persistent``) or not
(``clean``; also said by a worker that has ended its session on the way out).

Fencing. A SIGSTOPped (or wedged) worker keeps its TCP connection, so the broker goes on
handing it its share of the requests until keep-alive expiry (1.5 times the keep-alive). Each
worker watches the others' statuses (:class:`PeerWatcher`); a peer whose last beat is
older than ``fence_after_s`` while it said ``online``/``draining``, or that went
``offline`` with a ``persistent`` session (mosquitto goes on queueing that session's share
of a shared subscription while it is away), is *fenced*: a worker connects once with the
peer's client id and a clean start, which makes the broker close the hung connection and
drop its session and subscriptions, then disconnects (:func:`fence`). A fenced worker that
wakes up finds its connection gone, reconnects, resubscribes and beats again.

No storms: only the lowest worker id among the live ones (``online``, fresh, itself
included) fences at ``fence_after_s``; the others step in after ``STANDBY_FACTOR`` times
that, in case the lowest cannot. Each peer is fenced once per silence (an episode ends
with a fresh ``online``/``draining`` beat of that peer), and the fencer then publishes the
peer's status as ``offline``/``clean`` with ``"fenced_by"`` so the others stand down. A
watcher judges silence only while its own connection is up (after a broker restart every
peer looks silent until its beats come back), and never fences with a limit shorter than
twice the peer's own ``interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cloud_service.metrics import ErrorLog
from splitinfer.errors import TransportError
from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import open_client

__all__ = ["STATES", "SESSIONS", "Status", "HeartbeatPublisher", "PeerWatcher", "Watchdog",
           "fence", "STANDBY_FACTOR", "MAX_STATUS_BYTES"]

log = logging.getLogger(__name__)

STATES = ("online", "draining", "offline")
SESSIONS = ("persistent", "clean")
MAX_STATUS_BYTES = 4096
STANDBY_FACTOR = 2.0
_FENCE_TIMEOUT_S = 10.0
_MAX_INTERVAL_S = 3600.0


def _number(body: dict[str, Any], name: str, *, integer: bool = False,
            positive: bool = False, limit: float = math.inf) -> Any:
    value: Any = body.get(name)
    ok = (isinstance(value, int) or (not integer and isinstance(value, float))) \
        and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0 or (positive and value == 0) \
            or value > limit:
        what = "an integer" if integer else "a number"
        bound = "> 0" if positive else ">= 0"
        if limit != math.inf:
            bound += f" and <= {limit:g}"
        raise ValueError(f"worker status field {name!r}: expected {what} {bound}, "
                         f"got {value!r:.40}")
    return value


@dataclass(frozen=True)
class Status:
    """One heartbeat (the module docstring has the JSON)."""

    worker: str
    state: str
    ts: float
    seq: int
    interval_s: float
    queue: int = 0
    in_flight: int = 0
    rate: float = 0.0
    loop_lag_ms: float = 0.0
    session: str = "clean"
    fenced_by: str = ""  # only in the record a fencer writes for the peer it fenced

    def to_json(self) -> bytes:
        body = asdict(self)
        if not self.fenced_by:
            del body["fenced_by"]
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, payload: bytes, *, worker: str) -> Status:
        """A status read off ``worker``'s topic; ValueError naming the field when bad."""
        if len(payload) > MAX_STATUS_BYTES:
            raise ValueError(f"worker status: {len(payload)} bytes, expected at most "
                             f"{MAX_STATUS_BYTES}")
        try:
            body = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValueError("worker status: expected a UTF-8 JSON object") from None
        if not isinstance(body, dict):
            raise ValueError(f"worker status: expected a JSON object, got "
                             f"{type(body).__name__}")
        if body.get("worker") != worker:
            raise ValueError(f"worker status field 'worker': expected {worker!r} (the topic's "
                             f"id), got {body.get('worker')!r:.80}")
        state, session = body.get("state"), body.get("session")
        if state not in STATES:
            raise ValueError(f"worker status field 'state': expected one of {STATES}, got "
                             f"{state!r:.40}")
        if session not in SESSIONS:
            raise ValueError(f"worker status field 'session': expected one of {SESSIONS}, "
                             f"got {session!r:.40}")
        fenced_by = body.get("fenced_by", "")
        if not isinstance(fenced_by, str) or len(fenced_by) > 256:
            raise ValueError("worker status field 'fenced_by': expected a worker id")
        return cls(worker=worker, state=state, session=session, fenced_by=fenced_by,
                   ts=float(_number(body, "ts")), seq=int(_number(body, "seq", integer=True)),
                   interval_s=float(_number(body, "interval_s", positive=True,
                                            limit=_MAX_INTERVAL_S)),
                   queue=int(_number(body, "queue", integer=True)),
                   in_flight=int(_number(body, "in_flight", integer=True)),
                   rate=float(_number(body, "rate")),
                   loop_lag_ms=float(_number(body, "loop_lag_ms")))


# --- publishing ---------------------------------------------------------------------------

# publish(topic, payload): retained, QoS 1; may raise (a skipped beat is only logged).
PublishStatus = Callable[[str, bytes], Awaitable[None]]


@dataclass
class Load:
    """What a beat reports, read from the worker when it beats."""

    queue: Callable[[], int] = lambda: 0
    in_flight: Callable[[], int] = lambda: 0
    received: Callable[[], int] = lambda: 0


class HeartbeatPublisher:
    """Beats every ``interval_s`` and measures the event loop's lag between beats."""

    def __init__(self, worker_id: str, topic: str, publish: PublishStatus, *,
                 interval_s: float, persistent: bool, load: Load | None = None,
                 tick_s: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.worker_id, self.topic = worker_id, topic
        self.interval_s = interval_s
        self.state = "online"
        self.session = "persistent" if persistent else "clean"
        self.seq = 0
        self._publish = publish
        self._load = load or Load()
        self._tick = min(tick_s, interval_s) if interval_s > 0 else tick_s
        self._clock, self._wall = clock, wall
        self._lag_s = 0.0
        self._last_beat = clock()
        self._last_received = self._load.received()

    def status(self, state: str | None = None, *, session: str | None = None) -> Status:
        """The status as of now (without publishing it, nor resetting the figures)."""
        elapsed = max(self._clock() - self._last_beat, 1e-9)
        received = self._load.received()
        return Status(worker=self.worker_id, state=state or self.state, ts=self._wall(),
                      seq=self.seq, interval_s=self.interval_s or 1.0,
                      queue=self._load.queue(), in_flight=self._load.in_flight(),
                      rate=round(max(received - self._last_received, 0) / elapsed, 3),
                      loop_lag_ms=round(self._lag_s * 1e3, 3),
                      session=session or self.session)

    def will(self) -> bytes:
        """The last will's payload: this status, ``offline``."""
        return self.status("offline").to_json()

    def observe_lag(self, lag_s: float) -> None:
        self._lag_s = max(self._lag_s, lag_s)

    async def beat(self, state: str | None = None, *, session: str | None = None) -> Status:
        """Publish one status now (``state`` also becomes the current state)."""
        if state is not None:
            self.state = state
        status = self.status(session=session)
        self.seq += 1
        self._last_beat = self._clock()
        self._last_received = self._load.received()
        self._lag_s = 0.0
        try:
            await self._publish(self.topic, status.to_json())
        except Exception as exc:  # the broker away: the next beat tries again
            log.debug("heartbeat %d not published: %r", status.seq, exc)
        return status

    async def run(self) -> None:
        """Beat every ``interval_s`` (the first at once); between beats, tick to measure
        how late the loop wakes this task up."""
        next_beat = self._clock()
        while True:
            if self._clock() >= next_beat:
                await self.beat()
                next_beat = max(next_beat + self.interval_s, self._clock())
            due = self._clock() + self._tick
            await asyncio.sleep(self._tick)
            self.observe_lag(max(self._clock() - due, 0.0))


# --- watching ----------------------------------------------------------------------------


@dataclass
class _Peer:
    status: Status
    seen: float  # watcher clock: the last new beat (or the offline record) arrived
    fenced: bool = False
    retry_at: float = 0.0  # after a failed fence: not before this (watcher clock)


@dataclass
class PeerWatcher:
    """Decides whom to fence; pure logic on an injected clock (module docstring)."""

    self_id: str
    fence_after_s: float
    clock: Callable[[], float] = time.monotonic
    active: bool = True  # False while this worker drains: it leaves the fencing to others
    peers: dict[str, _Peer] = field(default_factory=dict)
    _connected_at: float | None = None
    _last_due: float | None = None
    _errors: ErrorLog = field(default_factory=lambda: ErrorLog(log))

    def connected(self) -> None:
        """This worker's connection is (back) up: silence is measured from now at most."""
        self._connected_at = self.clock()

    def disconnected(self) -> None:
        self._connected_at = None

    def observe(self, worker_id: str, payload: bytes) -> Status | None:
        """Take a message off ``worker_status_filter()``; the peer's status, if readable."""
        if worker_id == self.self_id:
            return None
        if not payload:  # a cleared retained status: the peer is gone for good
            self.peers.pop(worker_id, None)
            return None
        try:
            status = Status.parse(payload, worker=worker_id)
        except ValueError as exc:
            self._errors.report("bad_status", "%s (worker %r)", exc, worker_id[:80])
            return None
        now = self.clock()
        peer = self.peers.get(worker_id)
        if status.state != "offline":
            fresh = peer is None or (status.ts, status.seq) != (peer.status.ts, peer.status.seq)
            if fresh:  # (a retained beat delivered again keeps its old time)
                self.peers[worker_id] = _Peer(status, now)
            return status
        if peer is None:
            self.peers[worker_id] = _Peer(status, now)
        else:  # the will or a goodbye: the same silence, not a new one
            if peer.status.state != "offline":
                peer.seen = now  # a persistent session is given fence_after to come back
            peer.status = status
        return status

    def failed(self, worker_id: str) -> None:
        """The fence of ``worker_id`` failed: due again ``fence_after_s`` from now."""
        peer = self.peers.get(worker_id)
        if peer is not None:
            peer.fenced = False
            peer.retry_at = self.clock() + self.fence_after_s

    def _limit(self, peer: _Peer) -> float:
        return max(self.fence_after_s, 2.0 * peer.status.interval_s)

    def _silent_for(self, peer: _Peer, now: float) -> float:
        since = self._connected_at if self._connected_at is not None else now
        return now - max(peer.seen, since)

    def due(self) -> list[str]:
        """Peers to fence now; each is returned once per silence. Meant to be called
        often (the watchdog: every 0.1 s): a long gap since the last call means this
        worker itself was stopped or stalled, and its view of the others is stale."""
        now = self.clock()
        last, self._last_due = self._last_due, now
        if self.fence_after_s <= 0 or not self.active or self._connected_at is None:
            return []
        if last is not None and now - last > self.fence_after_s / 2:
            # Woken up (SIGCONT) or the loop was blocked: what looks like everybody's
            # silence is ours. Give the peers fence_after to be heard again, as after
            # a reconnect.
            log.info("worker %s was stalled for %.1f s: not judging its peers for %.1f s",
                     self.self_id, now - last, self.fence_after_s)
            self._connected_at = now
            return []
        live = [self.self_id] + [
            wid for wid, peer in self.peers.items()
            if peer.status.state == "online" and self._silent_for(peer, now) <= self._limit(peer)]
        factor = 1.0 if min(live) == self.self_id else STANDBY_FACTOR
        out = []
        for wid, peer in self.peers.items():
            if peer.fenced or now < peer.retry_at:
                continue
            if peer.status.state == "offline" and peer.status.session != "persistent":
                continue  # nothing of it left on the broker
            if self._silent_for(peer, now) > factor * self._limit(peer):
                peer.fenced = True
                out.append(wid)
        return out


# --- fencing -----------------------------------------------------------------------------


async def fence(broker: BrokerConfig, client_id: str, *,
                timeout_s: float = _FENCE_TIMEOUT_S) -> None:
    """Take over ``client_id`` with a clean start and leave: the broker closes that
    client's connection and drops its session (MQTT 5: no session expiry given, so the
    session ends with this connection; MQTT 3.1.1: clean session). Raises TransportError."""
    try:
        client = await asyncio.wait_for(
            open_client(broker, client_id, clean_start=True, timeout_s=timeout_s),
            timeout_s)
    except asyncio.TimeoutError as exc:
        raise TransportError(f"fencing {client_id!r}: no CONNACK within {timeout_s:g} s") \
            from exc
    # The takeover has happened with the CONNACK: the DISCONNECT is a courtesy (and
    # MqttClient.disconnect never raises).
    await client.disconnect(timeout_s)


Fence = Callable[[str], Awaitable[None]]


@dataclass
class Watchdog:
    """Runs :class:`PeerWatcher` on a timer and fences who it names."""

    watcher: PeerWatcher
    fence: Fence
    publish: PublishStatus  # to write the fenced peer's record
    topic_of: Callable[[str], str]
    on_fenced: Callable[[str], None] = lambda _wid: None
    check_s: float = 0.1
    _errors: ErrorLog = field(default_factory=lambda: ErrorLog(log))

    async def check(self) -> list[str]:
        """Fence every peer due now; the ones fenced. A failed fence is tried again
        ``fence_after_s`` later (logged once a minute)."""
        fenced = []
        for wid in self.watcher.due():
            last = self.watcher.peers[wid].status  # (the takeover's will replaces it)
            try:
                await self.fence(wid)
            except Exception as exc:
                self.watcher.failed(wid)
                self._errors.report("fence_failed", "could not fence silent worker %r: %s",
                                    wid, exc)
                continue
            log.warning("fenced worker %r: silent for more than %.1f s (last state %s, "
                        "last beat #%d)", wid, self.watcher.fence_after_s, last.state, last.seq)
            record = replace(last, state="offline", session="clean", ts=time.time(),
                             fenced_by=self.watcher.self_id)
            with contextlib.suppress(Exception):  # a record only: the fence is done
                await self.publish(self.topic_of(wid), record.to_json())
            self.on_fenced(wid)
            fenced.append(wid)
        return fenced

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            await self.check()
