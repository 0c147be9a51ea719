"""An edge agent's requests in flight: publish, match results, re-send, fail fast.

Requests: one per call, QoS 1 on ``{prefix}/v1/req/{model}/{device_id}``; on MQTT 5 the
PUBLISH also carries Response Topic, Correlation Data (the request id) and Message Expiry
Interval (time left). A payload over the broker's maximum packet size goes as chunks
(:mod:`splitinfer.chunks`), and a chunked result is reassembled here. Results are matched
by request id through a dict of futures (:class:`_Pending`); the caller removes an entry
in ``finally`` whatever happens.

Re-sending (a request is idempotent: its id is the key, the worker answers a copy from its
cache): QoS 1 ends at the broker, and a broker holds nothing for a shared-subscription
group with no member, so the agent re-sends the *same* request (same id, payload and
absolute deadline) until it is answered or its deadline passes:

* no answer within the retry interval (:class:`~edge_agent.retry.RetryBackoff`) — a lost
  copy, a hung replica, a worker killed mid-request;
* a PUBACK "no matching subscribers" (MQTT 5 reason 16; mosquitto 2 sends it), or a
  ``shutting_down`` answer (a draining replica): re-sent after 0.25 s doubling to 2 s,
  while a worker is expected back (below);
* a reconnect: everything pending goes out again at once on the new connection
  (:mod:`edge_agent.supervisor`).

One heap and one timer per agent drive every re-send (no task per pending request). The
first answer for an id resolves the call; a later one is dropped and counted
(``counters.duplicates``), so the application never sees two.

No worker (fail fast): a "no matching subscribers" PUBACK raises :class:`NoSubscriberError`
at once, naming the topic, when this agent has seen no worker (no result, no PUBACK that
matched a subscriber) for ``worker_grace_s`` and it is not within ``reconnect_grace_s`` of
a reconnect. Otherwise a worker is probably restarting and the request is re-sent. Any
other PUBACK refusal (not authorized, packet too large) fails the call at once: the same
bytes cannot succeed later.

A mixin of :class:`edge_agent.client.EdgeAgent`, which owns the state it names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.retry import RetryBackoff, jittered
from edge_agent.transport import (
    NO_MATCHING_SUBSCRIBERS,
    IncomingMessage,
    PublishOptions,
    Transport,
    reason_text,
)
from splitinfer import chunks
from splitinfer.errors import (
    ErrorCode,
    NoSubscriberError,
    RemoteError,
    TransportError,
    WireError,
)
from splitinfer.wire import RESULT, Envelope, decode, peek_reply_address

if TYPE_CHECKING:
    from edge_agent.client import SplitState
    from edge_agent.config import AgentConfig
    from edge_agent.counters import _Counters

__all__ = ["PendingRequests"]

log = logging.getLogger(__name__)

# PUBACK refusals that may pass on a re-send (0x97 quota exceeded: the broker's limit on
# messages in flight); every other reason >= 0x80 fails the call at once.
_TRANSIENT_REFUSALS = frozenset({0x97})
_PACKET_TOO_LARGE = 0x95
# Re-sending after a "no matching subscribers" PUBACK: first wait, and the doubling's cap.
_NOSUB_MIN_S = 0.25
_NOSUB_MAX_S = 2.0
# Ids of answered requests kept to tell a duplicate answer from a late one (per agent).
_ANSWERED_KEEP = 1024
# A timer may fire this much before its due time (the loop's clock resolution).
_TIMER_SLACK_S = 1e-3
# A worker's answer that says "not me, I am leaving": re-sent like "no matching subscribers".
_SHUTTING_DOWN = ErrorCode.SHUTTING_DOWN.value


@dataclass(eq=False)
class _Reply:
    envelope: Envelope
    received: float  # perf_counter
    decode_s: float
    size: int = 0  # result payload bytes


@dataclass(eq=False)
class _Pending:
    request_id: str
    future: asyncio.Future[_Reply]
    payload: bytes
    expires: float  # loop.time()
    epoch: int = 0  # connection it was last published on
    # perf_counter of the first publish: timings count from it (a re-send's wait included)
    sent: float = 0.0
    sent_at: float = 0.0  # loop.time() of the last publish (the retry timer's clock)
    publishes: int = 0
    split: SplitState | None = None  # None: the agent's own (first) split
    due: float = 0.0  # loop.time() of the re-send scheduled for it (0: none)
    silent: int = 0  # re-sends for want of an answer so far (the backoff's exponent)
    nosub: int = 0  # "no matching subscribers" PUBACKs in a row
    deadline: float = 0.0  # the envelope's deadline (epoch seconds): chunks carry it


class PendingRequests:
    """Every request of an agent in flight, from its first publish to its answer."""

    # the agent's, set in EdgeAgent.__init__ (and the connection's, in Supervisor)
    config: AgentConfig
    request_topic: str
    result_topic: str
    _counters: _Counters
    _closed: bool
    _transport: Transport | None
    _epoch: int
    _grace_until: float

    if TYPE_CHECKING:
        @property
        def device_id(self) -> str: ...

        def split_state(self, split: str | None = None) -> SplitState: ...

        def _broker_name(self) -> str: ...

        def _no_subscriber_message(self, state: SplitState | None = None) -> str: ...

    def _init_pending(self, config: AgentConfig) -> None:
        self._pending: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker_seen = -math.inf  # loop.time() of the last sign of a worker
        self.backoff = RetryBackoff(config.retry_s, config.retry_max_s,
                                    adaptive=config.retry_adaptive)
        # Re-sends due: (loop.time(), seq, request id), one timer for the earliest of them.
        self._resends: list[tuple[float, int, str]] = []
        self._resend_seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        # chunked results (payloads over the broker's maximum packet size), by request id
        self._reassembler = chunks.Reassembler(max_per_device=4 * config.max_payload,
                                               max_total=4 * config.max_payload,
                                               max_payload=config.max_payload)
        self._answered: dict[str, None] = {}  # recently answered ids, oldest first

    def _send(self, pending: _Pending) -> None:
        transport = self._transport
        if transport is None:
            return  # published by _establish() after the reconnect
        pending.epoch = self._epoch
        pending.due = 0.0  # this publish supersedes a re-send scheduled before it
        nowait = getattr(transport, "publish_nowait", None)
        if nowait is not None and self._chunk_limit(transport, pending) is None:
            # Sent now, no task: the PUBACK's future finishes the bookkeeping.
            begun = self._begin(pending)
            if begun is None:
                return
            topic, options, started = begun
            try:
                acked = nowait(topic, pending.payload, qos=self.config.qos, options=options)
            except TransportError as exc:
                self._unpublished(pending, exc)
                self._published(pending, None, started)
                return
            acked.add_done_callback(lambda fut: self._acked(pending, fut, started))
            return
        self._spawn(self._publish(transport, pending), f"edge-publish:{pending.request_id[:8]}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _topic(self, pending: _Pending) -> str:
        return pending.split.request_topic if pending.split is not None else self.request_topic

    def _chunk_limit(self, transport: Transport, pending: _Pending) -> int | None:
        """The broker's packet limit when ``pending`` must go in chunks under it, else None."""
        limit = getattr(transport, "max_packet_size", None)
        if limit and chunks.needs_chunking(len(pending.payload), limit, self._topic(pending)):
            return int(limit)
        return None

    def _begin(self, pending: _Pending) -> tuple[str, PublishOptions, float] | None:
        """Count a publish of ``pending`` about to go out: its topic, MQTT 5 options and
        loop time; None when it need not go (answered, or past its deadline)."""
        started = asyncio.get_running_loop().time()
        remaining = pending.expires - started
        if remaining <= 0 or pending.future.done():
            return None
        options = PublishOptions(response_topic=self.result_topic,
                                 correlation=pending.request_id.encode(), expiry_s=remaining)
        if not pending.publishes:
            pending.sent = time.perf_counter()
        pending.sent_at = started
        pending.publishes += 1
        self._counters.published += 1
        return self._topic(pending), options, started

    async def _publish(self, transport: Transport, pending: _Pending) -> None:
        begun = self._begin(pending)
        if begun is None:
            return
        topic, options, started = begun
        try:
            limit = self._chunk_limit(transport, pending)
            if limit is not None:
                reason = await self._publish_chunks(transport, topic, pending, limit, options)
            else:
                reason = await transport.publish(topic, pending.payload,
                                                 qos=self.config.qos, options=options)
        except TransportError as exc:
            self._unpublished(pending, exc)
            reason = None
        self._published(pending, reason, started)

    def _acked(self, pending: _Pending, acked: asyncio.Future[int | None],
               started: float) -> None:
        """The PUBACK (or the loss) of a request sent by ``publish_nowait``."""
        if acked.cancelled():
            return  # the connection's teardown; a reconnect re-publishes it
        exc = acked.exception()
        if exc is None:
            self._published(pending, acked.result(), started)
        elif isinstance(exc, TransportError):
            self._unpublished(pending, exc)
            self._published(pending, None, started)
        else:  # a bug: let the retry timer carry the request, but say so
            log.error("%s: request %s: publish failed: %r", self.device_id,
                      pending.request_id, exc)
            self._published(pending, None, started)

    def _unpublished(self, pending: _Pending, exc: TransportError) -> None:
        # A lost connection: the supervisor re-publishes after reconnecting (that
        # supersedes the re-send scheduled below); anything else: the re-send retries.
        log.debug("%s: request %s not published: %s", self.device_id, pending.request_id, exc)

    def _published(self, pending: _Pending, reason: int | None, started: float) -> None:
        """After the PUBACK's ``reason`` (None: none came): fail, re-send or wait."""
        if pending.future.done():
            return
        if reason == NO_MATCHING_SUBSCRIBERS:
            self._no_subscriber(pending)
            return
        if reason is not None and reason >= 0x80 and reason not in _TRANSIENT_REFUSALS:
            self._refused(pending, reason)
            return
        if reason == 0:  # an MQTT 5 PUBACK that found a subscriber: a worker is there
            self._worker_seen = asyncio.get_running_loop().time()
        pending.nosub = 0
        wait = self.backoff.wait(pending.silent)
        if wait is not None:  # counted from the publish, not from its PUBACK
            self._schedule(pending, started + wait)

    async def _publish_chunks(self, transport: Transport, topic: str, pending: _Pending,
                              limit: int, options: PublishOptions) -> int | None:
        """Publish every chunk of ``pending`` (all of them again on a re-send); the PUBACK
        reason that counts: the first refusal, else "no subscriber", else the last."""
        parts = chunks.split(pending.payload, request_id=pending.request_id,
                             device=self.device_id, deadline=pending.deadline or
                             time.time() + max(0.0, pending.expires -
                                               asyncio.get_running_loop().time()),
                             max_packet=limit, topic=topic)
        self._counters.chunks_sent += len(parts)
        reasons = await asyncio.gather(*(
            transport.publish(topic, part, qos=self.config.qos, options=options)
            for part in parts))
        refused = [r for r in reasons if r is not None and r >= 0x80]
        if refused:
            return refused[0]
        if NO_MATCHING_SUBSCRIBERS in reasons:
            return NO_MATCHING_SUBSCRIBERS
        return reasons[-1]

    def _refused(self, pending: _Pending, reason: int) -> None:
        """The broker refused the PUBLISH (not authorized, too large, …): re-sending the
        same bytes cannot succeed, so the call fails now instead of at its deadline."""
        code = (ErrorCode.PAYLOAD_TOO_LARGE.value if reason == _PACKET_TOO_LARGE
                else "broker_refused")
        state = pending.split or self.split_state()
        pending.future.set_exception(RemoteError(
            code, f"{self._broker_name()} refused request {pending.request_id} on "
            f"{state.request_topic}: PUBACK {reason_text(reason)}; check the device's "
            "credentials and the broker's ACL (docs/security.md) or its message_size_limit",
            topic=state.request_topic, split_id=state.split_id, device_id=self.device_id))

    def _no_subscriber(self, pending: _Pending) -> None:
        """The broker took the request but no one subscribes to its topic: no worker now."""
        self._counters.no_subscriber += 1
        if self._resend_later(pending):
            log.debug("%s: no subscriber for %s; a worker is expected back, trying again",
                      self.device_id, pending.request_id)
            return
        state = pending.split or self.split_state()
        pending.future.set_exception(NoSubscriberError(
            self._no_subscriber_message(state), topic=state.request_topic,
            split_id=state.split_id, device_id=self.device_id))

    def _resend_later(self, pending: _Pending) -> bool:
        """No worker took ``pending`` (no subscriber, or one shutting down): re-send it after
        0.25 s doubling to 2 s while a worker is expected back (True), else False."""
        now = asyncio.get_running_loop().time()
        if self._no_subscriber_fails(now):
            return False
        pending.nosub += 1
        self._schedule(pending, now + jittered(
            min(_NOSUB_MIN_S * 2.0 ** min(pending.nosub - 1, 30), _NOSUB_MAX_S)))
        return True

    def _no_subscriber_fails(self, now: float) -> bool:
        """Whether "no matching subscribers" ends a call now (fail fast) or is re-sent:
        re-sent within ``reconnect_grace_s`` of a reconnect or ``worker_grace_s`` of the
        last sign of a worker (a bundle agent with a local answer overrides this)."""
        return now >= self._grace_until and now - self._worker_seen > self.config.worker_grace_s

    # ------------------------------------------------------------------ re-sends

    def _schedule(self, pending: _Pending, due: float) -> None:
        """Re-send ``pending`` at loop time ``due`` unless answered first; not past its
        deadline. One heap and one timer serve every pending request of the agent."""
        if due >= pending.expires:
            pending.due = 0.0
            return
        pending.due = due
        heapq.heappush(self._resends, (due, next(self._resend_seq), pending.request_id))
        if due < self._timer_at:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(due, self._resend_due)
        self._timer_at = due

    def _resend_due(self) -> None:
        """The timer: re-send every request whose time has come, then wait for the next."""
        self._timer, self._timer_at = None, math.inf
        if self._closed:
            return
        now = asyncio.get_running_loop().time()
        heap = self._resends
        while heap and heap[0][0] <= now + _TIMER_SLACK_S:
            due, _, request_id = heapq.heappop(heap)
            pending = self._pending.get(request_id)
            if pending is None or pending.due != due or pending.future.done():
                continue  # answered, failed, or re-scheduled since
            pending.due = 0.0
            if pending.expires <= now or self._transport is None:
                continue  # too late; or a reconnect re-publishes it
            if not pending.nosub:
                pending.silent += 1
            self._counters.retries += 1
            self._send(pending)
        if heap:
            self._arm(heap[0][0])

    def _dispatch(self, message: IncomingMessage) -> None:
        received = time.perf_counter()
        if message.topic != self.result_topic:
            return
        if chunks.is_chunk(message.payload):
            try:
                whole = self._reassembler.add(message.payload)
            except WireError as exc:
                log.warning("%s: dropped a chunk on %s: %s", self.device_id, message.topic, exc)
                return
            if whole is None:
                return
            message = dataclasses.replace(message, payload=whole)
        try:
            envelope = decode(message.payload, max_bytes=self.config.max_payload)
        except WireError as exc:
            request_id, _ = peek_reply_address(message.payload)
            if not request_id and message.correlation:
                request_id = message.correlation.decode("utf-8", "replace")
            pending = self._pending.get(request_id)
            if pending is None or pending.future.done():
                log.warning("%s: dropped an undecodable message on %s: %s", self.device_id,
                            message.topic, exc)
            else:
                self._remember(request_id)
                pending.future.set_exception(WireError(
                    f"result for request {request_id} cannot be decoded: {exc}", code=exc.code,
                    split_id=(pending.split or self.split_state()).split_id,
                    device_id=self.device_id))
            return
        decode_s = time.perf_counter() - received
        if envelope.kind == RESULT:
            self._worker_seen = asyncio.get_running_loop().time()
        pending = self._pending.get(envelope.request_id)
        if envelope.kind != RESULT or pending is None or pending.future.done():
            if envelope.kind == RESULT and envelope.request_id in self._answered:
                self._counters.duplicates += 1
            else:
                self._counters.late_results += 1
            log.debug("%s: late, duplicate or stray %s %s", self.device_id, envelope.kind,
                      envelope.request_id)
            return
        if (envelope.error is not None and envelope.error.code == _SHUTTING_DOWN
                and self._resend_later(pending)):
            return  # a replica leaving: its successor or another replica takes the copy
        self._remember(envelope.request_id)
        state = pending.split or self.split_state()
        if envelope.error is not None:
            pending.future.set_exception(RemoteError(
                envelope.error.code, envelope.error.message, split_id=envelope.split_id,
                device_id=self.device_id, topic=state.request_topic))
        else:
            pending.future.set_result(_Reply(envelope, received, decode_s,
                                             len(message.payload)))

    def _remember(self, request_id: str) -> None:
        """``request_id`` is answered: a later answer for it is a duplicate, not late."""
        answered = self._answered
        answered[request_id] = None
        if len(answered) > _ANSWERED_KEEP:
            del answered[next(iter(answered))]
