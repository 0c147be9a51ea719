"""EdgeAgent: one device's asyncio client — head, encode, publish, await the matching result.

::

    config = AgentConfig(device_id="cam-7", broker="mqtt://broker:1883")
    async with EdgeAgent.from_artifacts("artifacts/digits_cnn-…", config=config) as agent:
        result = await agent.infer({"x": batch})          # head on the device, tail remote
        result.outputs["logits"], result.timings["e2e"]
        await agent.infer_activation({"q1": recorded})    # skip the head: fleet replay

Connection: :meth:`EdgeAgent.start` connects once (:class:`StartupError` when the broker
cannot be reached), subscribes to ``{prefix}/v1/res/{device_id}`` and publishes a retained
``online`` on ``{prefix}/v1/status/{device_id}`` (last will: retained ``offline``). A
supervisor task then reads results. aiomqtt does not reconnect by itself, so when the
connection drops the supervisor reconnects with jittered exponential backoff, subscribes
again and re-publishes every request still pending whose deadline has not passed.

Requests: one per call, QoS 1 on ``{prefix}/v1/req/{model}/{device_id}``; the envelope names
the reply topic and the absolute deadline, and on MQTT 5 the PUBLISH also carries Response
Topic, Correlation Data (the request id) and Message Expiry Interval (time left). Results
are matched by request id through a dict of futures; an entry is removed in ``finally``
whatever happens. An error result raises :class:`RemoteError`; no result before the
deadline raises :class:`DeadlineExceeded`.

Compression: the cut tensors go compressed with the split manifest's ``compression``
(``zstd`` | ``lz4``, set by ``splitinfer split --compression``), each one only where that
saves at least 5 % (:func:`splitinfer.compression.worth_sending`); a call's
``compression=`` overrides it for its requests (``"none"`` or a codec). The worker answers
in the codec the request used. :meth:`EdgeAgent.compression_for` says which applies.

Re-sending (a request is idempotent: its id is the key, the worker answers a copy from its
cache): QoS 1 ends at the broker, and a broker holds nothing for a shared-subscription
group with no member, so the agent re-sends the *same* request (same id, payload and
absolute deadline) until it is answered or its deadline passes:

* no answer within the retry interval (:class:`RetryBackoff`: ``retry_s``, or longer when
  the measured round trips say so (srtt + 4 x rttvar, as TCP), each re-send doubling up to
  ``retry_max_s``, jittered) — a lost copy, a hung replica, a worker killed mid-request;
* a PUBACK "no matching subscribers" (MQTT 5 reason 16; mosquitto 2 sends it), or a
  ``shutting_down`` answer (a draining replica): re-sent after 0.25 s doubling to 2 s,
  while a worker is expected back (below);
* a reconnect: everything pending goes out again at once on the new connection.

One heap and one timer per agent drive every re-send (no task per pending request). The
first answer for an id resolves the call; a later one is dropped and counted
(``counters.duplicates``), so the application never sees two. ``InferenceResult.attempts``
says how many times the request went out.

No worker (fail fast): a "no matching subscribers" PUBACK raises :class:`NoSubscriberError`
at once, naming the topic, when this agent has seen no worker (no result, no PUBACK that
matched a subscriber) for ``worker_grace_s`` — at first use, or long after the last worker
left — and it is not within ``reconnect_grace_s`` of a reconnect. Otherwise a worker is
probably restarting (or re-subscribing to a restarted broker) and the request is re-sent.
A bundle agent with an edge_only split falls back at the first such PUBACK instead
(:mod:`edge_agent.bundle_agent`). Elsewhere (MQTT 3.1.1, other brokers) only the re-sends
on silence and the deadline's :class:`DeadlineExceeded` apply.

Samples: the first axis of every input counts samples, and a call takes any number of
them. When the split's files are fixed at a batch size B (their first dimension, e.g. 1:
:func:`~edge_agent.runtime.fixed_batch`), a call of N != B samples goes out as
ceil(N / B) requests of B (the last one padded with copies of its last sample, whose
results are dropped), ``chunk_concurrency`` of them in flight, heads pipelined with the
requests before them; the outputs come back concatenated in input order under the one
deadline. A dynamic batch goes as one request, as before.

Baselines (``manifest.kind``): a ``cloud_only`` split has no head; its model inputs go
out as the cut. An ``edge_only`` split runs its head (the whole model) here and never
touches a broker: ``start()`` connects to nothing, ``infer`` answers locally (timings
``e2e`` and ``head`` only).

Nothing here blocks the loop except the head of a lone agent (``head_in_thread`` decides;
by default a head runs inline only when its agent is the only one on the loop), so
thousands of agents — one connection each, no thread each — can share one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import math
import random
import time
import weakref
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge_agent.runtime import HeadRuntime, PassThroughHead, check_head, fixed_batch, load_head
from edge_agent.stats import STAGES, worker_stages
from edge_agent.transport import (
    NO_MATCHING_SUBSCRIBERS,
    Connector,
    IncomingMessage,
    LastWill,
    MqttConnector,
    PublishOptions,
    Transport,
    reason_text,
)
from splitinfer import chunks
from splitinfer.batches import padded_chunks
from splitinfer.compression import supported as supported_codecs
from splitinfer.errors import (
    BadInputError,
    DeadlineExceeded,
    ErrorCode,
    NoSubscriberError,
    RemoteError,
    StartupError,
    TensorError,
    TransportError,
    WireError,
)
from splitinfer.manifest import Manifest
from splitinfer.tensors import check_tensors
from splitinfer.topics import DEFAULT_PREFIX, Topics, check_level, topic_name
from splitinfer.wire import (
    DEFAULT_MAX_PAYLOAD,
    REQUEST,
    RESULT,
    Envelope,
    WireTensor,
    decode,
    encode,
    new_request_id,
    peek_reply_address,
)

if TYPE_CHECKING:
    from edge_agent.adaptive import Switch
    from edge_agent.bundle_agent import BundleAgent

__all__ = ["AgentConfig", "AgentCounters", "EdgeAgent", "InferenceResult", "RetryBackoff",
           "SplitState", "check_tensors", "ONLINE", "OFFLINE"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]
Inputs = Mapping[str, Array] | Array

# Agents started per event loop: decides where a head runs when head_in_thread is None.
_AGENTS_ON_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = \
    weakref.WeakKeyDictionary()

ONLINE = b"online"
OFFLINE = b"offline"
# PUBACK refusals that may pass on a re-send (0x97 quota exceeded: the broker's limit on
# messages in flight); every other reason >= 0x80 fails the call at once.
_TRANSIENT_REFUSALS = frozenset({0x97})
_PACKET_TOO_LARGE = 0x95
# Re-sending after a "no matching subscribers" PUBACK: first wait, and the doubling's cap.
_NOSUB_MIN_S = 0.25
_NOSUB_MAX_S = 2.0
# Every wait is jittered down by up to this share, so agents that lost their requests at
# the same moment (a broker or worker restart) do not re-send in lockstep.
_JITTER = 0.25
# Ids of answered requests kept to tell a duplicate answer from a late one (per agent).
_ANSWERED_KEEP = 1024
# A timer may fire this much before its due time (the loop's clock resolution).
_TIMER_SLACK_S = 1e-3
# A worker's answer that says "not me, I am leaving": re-sent like "no matching subscribers".
_SHUTTING_DOWN = ErrorCode.SHUTTING_DOWN.value


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything an agent needs besides its split; maps one-to-one onto ``edge run`` flags."""

    device_id: str
    broker: str = "mqtt://127.0.0.1:1883"
    prefix: str = DEFAULT_PREFIX
    timeout_s: float = 10.0  # default deadline of a call, head included
    qos: int = 1
    presence: bool = True
    # Run the head in a thread so the loop stays free (True), inline (False), or decide per
    # call (None): in a thread when other agents share this loop (their heads overlap and
    # their traffic keeps flowing), inline for a lone agent, which has nothing else for its
    # loop to do and saves two thread hops (~0.3-0.6 ms a request on a loaded 2-core box).
    head_in_thread: bool | None = None
    reconnect_min_s: float = 0.05
    reconnect_max_s: float = 2.0
    connect_timeout_s: float = 10.0
    max_payload: int = DEFAULT_MAX_PAYLOAD
    # Requests of one call in flight at once when a fixed batch splits it into several.
    chunk_concurrency: int = 8
    # After a reconnect, "no matching subscribers" is retried this long, not raised: the
    # workers may still be subscribing again to a restarted broker.
    reconnect_grace_s: float = 5.0
    # Re-send a request with no answer after retry_s (0: never re-send on silence),
    # doubling with jitter up to retry_max_s, never past its deadline; with
    # retry_adaptive the first wait follows the measured round trips (RetryBackoff).
    retry_s: float = 1.0
    retry_max_s: float = 4.0
    retry_adaptive: bool = True
    # "No matching subscribers" is re-sent, not raised, for this long after the last sign
    # of a worker (a result, or a PUBACK that matched a subscriber): a worker restarting.
    worker_grace_s: float = 10.0

    def __post_init__(self) -> None:
        check_level(self.device_id, "device id")
        Topics(self.prefix)  # raises BadInputError naming a bad prefix
        if not (self.timeout_s > 0 and self.connect_timeout_s > 0):
            raise BadInputError(f"timeouts must be > 0, got timeout_s={self.timeout_s}, "
                                f"connect_timeout_s={self.connect_timeout_s}")
        if self.qos not in (0, 1, 2):
            raise BadInputError(f"qos must be 0, 1 or 2, got {self.qos}")
        if self.chunk_concurrency < 1 or not self.reconnect_grace_s >= 0:
            raise BadInputError(f"expected chunk_concurrency >= 1 and reconnect_grace_s >= 0, "
                                f"got {self.chunk_concurrency}, {self.reconnect_grace_s}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise BadInputError("expected 0 < reconnect_min_s <= reconnect_max_s, got "
                                f"{self.reconnect_min_s}, {self.reconnect_max_s}")
        if not (math.isfinite(self.retry_s) and math.isfinite(self.retry_max_s)
                and 0 <= self.retry_s <= self.retry_max_s and self.retry_max_s > 0):
            raise BadInputError("retry: expected finite 0 <= retry_s <= retry_max_s and "
                                f"retry_max_s > 0 (seconds), got retry_s={self.retry_s}, "
                                f"retry_max_s={self.retry_max_s}")
        if not (math.isfinite(self.worker_grace_s) and self.worker_grace_s >= 0):
            raise BadInputError(f"worker_grace_s: expected a finite number of seconds >= 0, "
                                f"got {self.worker_grace_s}")


@dataclass(frozen=True)
class InferenceResult:
    """Outputs in manifest order (read-only arrays over the received bytes) and timings (s).

    A call sent as several requests (a fixed batch) has ``requests`` > 1: ``request_id``
    is the first one's, ``e2e`` the whole call and every other stage summed over them.
    """

    request_id: str
    outputs: dict[str, Array]
    timings: dict[str, float]
    split_id: str = ""
    requests: int = 1
    # "cloud" (a worker ran the tail) or "edge" (answered here: an edge_only split, or a
    # bundle agent's fallback); ``fallback`` says why a bundle agent answered locally when
    # it had not chosen to: "offline", "no_worker", "deadline", "timeout" ("" otherwise).
    served_by: str = "cloud"
    fallback: str = ""
    # Publishes of the request before its answer (1: answered at the first try); a call
    # of several requests sums them.
    attempts: int = 1


@dataclass(frozen=True, eq=False)
class SplitState:
    """One split an agent serves: its manifest, head, fixed batch and request topic."""

    manifest: Manifest
    head: HeadRuntime | None
    batch: int | None
    request_topic: str

    @property
    def split_id(self) -> str:
        return self.manifest.split_id

    @property
    def kind(self) -> str:
        return self.manifest.kind


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


@dataclass
class _Counters:
    published: int = 0
    republished: int = 0
    retries: int = 0
    no_subscriber: int = 0
    duplicates: int = 0
    late_results: int = 0
    reconnects: int = 0
    chunks_sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class AgentCounters:
    """A read-only, live view of an agent's counters (``EdgeAgent.counters``).

    ``published`` every PUBLISH of a request (first tries and re-sends), ``republished``
    the re-publishes on a new connection after a reconnect, ``retries`` the re-sends on the
    same connection (no answer within the retry interval, or "no matching subscribers"),
    ``no_subscriber`` the PUBACKs with reason 16, ``duplicates`` the answers dropped
    because their request had been answered already, ``late_results`` results for no
    pending request (after its deadline, or stray), ``reconnects``, and ``errors`` (failed
    calls by code).
    """

    __slots__ = ("_c",)

    def __init__(self, counters: _Counters) -> None:
        self._c = counters

    @property
    def published(self) -> int:
        return self._c.published

    @property
    def republished(self) -> int:
        return self._c.republished

    @property
    def retries(self) -> int:
        return self._c.retries

    @property
    def no_subscriber(self) -> int:
        return self._c.no_subscriber

    @property
    def duplicates(self) -> int:
        return self._c.duplicates

    @property
    def late_results(self) -> int:
        return self._c.late_results

    @property
    def reconnects(self) -> int:
        return self._c.reconnects

    @property
    def errors(self) -> Mapping[str, int]:
        return MappingProxyType(self._c.errors)

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain JSON-ready values (``errors`` sorted by code)."""
        c = self._c
        return {"published": c.published, "republished": c.republished,
                "retries": c.retries, "no_subscriber": c.no_subscriber,
                "duplicates": c.duplicates, "late_results": c.late_results,
                "reconnects": c.reconnects, "errors": dict(sorted(c.errors.items()))}

    def __repr__(self) -> str:
        return f"AgentCounters({self.as_dict()})"


class RetryBackoff:
    """How long to wait for an answer before re-sending: TCP's retransmission timer, simply.

    Until a round trip is measured the first wait is ``retry_s``. Each request answered at
    its first publish is a sample (Karn's rule: the answer of a re-sent request could be to
    either copy, so it is none); with ``adaptive`` the first wait then becomes
    RTO = srtt + 4 x rttvar (RFC 6298: gains 1/8 and 1/4, the first sample sets srtt = R and
    rttvar = R/2), clamped to [``retry_s``, ``retry_max_s``]: never sooner than ``retry_s``
    (a copy costs the link and the worker; a slow link that is suddenly slower must not
    fill with copies), later on a slow link or a loaded worker, which is then not sent
    copies of what it is still working on.
    The k-th re-send waits min(first x 2^k, ``retry_max_s``), less up to a quarter of jitter.
    A request answered only after re-sends for silence gives no sample but keeps its last
    wait as the first one (:meth:`backed_off`, TCP's "keep the backed-off RTO") until a
    sample comes: on a link slower than ``retry_s`` every request would otherwise be sent
    twice and never measured. ``retry_s`` = 0 turns re-sending on silence off (:meth:`wait`
    is None).
    """

    def __init__(self, retry_s: float, retry_max_s: float, *, adaptive: bool = True,
                 rng: random.Random | None = None) -> None:
        if not 0 <= retry_s <= retry_max_s:
            raise BadInputError(f"expected 0 <= retry_s <= retry_max_s, got {retry_s}, "
                                f"{retry_max_s}")
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.adaptive = adaptive
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples = 0
        self._floor = 0.0  # the backed-off first wait, until the next sample
        self._rng = rng or random.Random()  # jitter, not crypto

    def observe(self, rtt_s: float) -> None:
        """A round trip (publish to answer) of a request published once."""
        if not (math.isfinite(rtt_s) and rtt_s >= 0):
            return
        self.samples += 1
        self._floor = 0.0
        if self.srtt is None:
            self.srtt, self.rttvar = rtt_s, rtt_s / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt_s)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt_s

    def backed_off(self, resends: int) -> None:
        """A request was answered only after ``resends`` re-sends for silence."""
        if self.adaptive and resends > 0 and self.retry_s > 0:
            self._floor = max(self._floor, min(self.rto * 2.0 ** min(resends, 30),
                                               self.retry_max_s))

    @property
    def rto(self) -> float:
        """The first wait before jitter: ``retry_s``, or the clamped estimate once measured."""
        if not self.adaptive or self.retry_s == 0:
            return self.retry_s
        if self.srtt is None:
            return max(self.retry_s, self._floor)
        estimate = max(self.srtt + 4 * self.rttvar, self._floor)
        return min(max(estimate, self.retry_s), self.retry_max_s)

    def wait(self, resends: int) -> float | None:
        """Seconds to wait for an answer after the publish that followed ``resends``
        re-sends for silence (0: the first publish); None: never re-send."""
        if self.retry_s == 0:
            return None
        base = min(self.rto * 2.0 ** min(resends, 30), self.retry_max_s)
        return base * (1.0 - _JITTER * self._rng.random())


def _jittered(seconds: float) -> float:
    return seconds * (1.0 - _JITTER * random.random())  # jitter, not crypto


class EdgeAgent:
    """The device side of one split (or several: :meth:`add_split`), on one broker connection.

    Every split of an agent shares its connection, result topic and presence; a request
    names its split in the envelope and goes to the request topic of its split's model,
    and results are matched by request id whatever split they answer.
    """

    def __init__(self, *, manifest: Manifest, config: AgentConfig,
                 head: HeadRuntime | None = None, connector: Connector | None = None) -> None:
        self.config = config
        self._topics = Topics(config.prefix)
        self.splits: dict[str, SplitState] = {}
        first = self.add_split(manifest, head)
        self.manifest = manifest
        self.head = first.head
        self.kind = manifest.kind
        self.batch = first.batch
        self._connector: Connector = connector or MqttConnector(
            config.broker, timeout_s=config.connect_timeout_s)
        topics = self._topics
        self.request_topic = first.request_topic
        self.result_topic = topics.result(config.device_id)
        self.status_topic = topics.status(config.device_id)
        self._counters = _Counters()
        self._pending: dict[str, _Pending] = {}
        self._transport: Transport | None = None
        self._protocol = ""
        self._epoch = 0
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._loop_counted: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._local = False  # an edge_only agent, started without a broker
        self._grace_until = 0.0  # loop.time() until which no-subscriber PUBACKs are retried
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
        self._compression_warned: set[str] = set()  # splits whose codec is missing here

    def add_split(self, manifest: Manifest, head: HeadRuntime | None = None) -> SplitState:
        """Serve one more split on this agent's connection (before :meth:`start`)."""
        if head is None and manifest.kind == "cloud_only":
            head = PassThroughHead(manifest)
        if head is not None:
            check_head(head, manifest)
        if manifest.split_id in self.splits:
            raise BadInputError(f"edge agent {self.config.device_id}: split "
                                f"{manifest.split_id} added twice", split_id=manifest.split_id)
        state = SplitState(manifest, head, fixed_batch(manifest),
                           self._topics.request(topic_name(manifest.model),
                                                self.config.device_id))
        self.splits[manifest.split_id] = state
        return state

    def split_state(self, split: str | None = None) -> SplitState:
        """The split named ``split`` (this agent's first one when None)."""
        if split is None:
            return self.splits[self.manifest.split_id]
        state = self.splits.get(split)
        if state is None:
            raise BadInputError(f"edge agent {self.device_id} serves no split {split!r}; it "
                                f"has {', '.join(self.splits)}", split_id=split)
        return state

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, *, config: AgentConfig,
                    edge_profile: Mapping[str, Any] | str | Path | None = None,
                    cloud_profile: Mapping[str, Any] | str | Path | None = None,
                    link: str | None = None, policy: Any = None, split: str | None = None,
                    heads: Mapping[str, HeadRuntime] | None = None,
                    connector: Connector | None = None, threads: int | None = None,
                    clock: Any = None) -> BundleAgent:
        """An agent holding every head of a bundle (``splitinfer bundle``) on one connection,
        choosing the split per request: :class:`edge_agent.bundle_agent.BundleAgent`."""
        from edge_agent.bundle_agent import BundleAgent

        return BundleAgent.load(bundle_dir, config=config, edge_profile=edge_profile,
                                cloud_profile=cloud_profile, link=link, policy=policy,
                                split=split, heads=heads, connector=connector,
                                threads=threads, clock=clock)

    @classmethod
    def from_artifacts(cls, directory: str | Path, *, config: AgentConfig,
                       connector: Connector | None = None, threads: int | None = None,
                       verify: bool = True) -> EdgeAgent:
        """Load ``manifest.json`` + the head from a split directory (``splitinfer split``)."""
        manifest = Manifest.load(directory)
        head = load_head(manifest, directory, threads=threads, verify=verify)
        return cls(manifest=manifest, config=config, head=head, connector=connector)

    # ------------------------------------------------------------------ lifecycle

    @property
    def device_id(self) -> str:
        return self.config.device_id

    @property
    def connected(self) -> bool:
        return self._transport is not None

    @property
    def protocol(self) -> str:
        """MQTT version of the current (or last) connection: ``"5"`` or ``"3.1.1"``."""
        return self._protocol

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def counters(self) -> AgentCounters:
        """Publishes, re-sends, duplicates and late results so far (a read-only live view)."""
        return AgentCounters(self._counters)

    @property
    def chunk_stats(self) -> chunks.ReassemblyStats:
        """Chunks of results received, reassembled, duplicated and dropped (expired,
        over memory, bad digest, refused)."""
        return self._reassembler.stats

    @property
    def switches(self) -> list[Switch]:
        """Split changes so far: none for a plain agent (a bundle agent's policy makes them)."""
        return []

    async def start(self) -> None:
        """Connect, subscribe, announce presence; then keep the connection up in a task."""
        if self._closed:
            raise StartupError(f"edge agent {self.device_id}: closed agents cannot restart",
                               device_id=self.device_id)
        if self._supervisor is not None or self._local:
            return
        if all(s.kind == "edge_only" for s in self.splits.values()):
            self._local = True  # the whole model is here: nothing to connect to
            return
        transport: Transport | None = None
        try:
            transport = await self._connect()
            await self._establish(transport)
        except TransportError as exc:
            if transport is not None:
                await transport.close()
            raise StartupError(f"edge agent {self.device_id}: cannot reach the broker: "
                               f"{exc}", device_id=self.device_id) from exc
        self._supervisor = asyncio.create_task(self._supervise(transport),
                                               name=f"edge-agent:{self.device_id}")
        self._loop_counted = asyncio.get_running_loop()
        _AGENTS_ON_LOOP[self._loop_counted] = _AGENTS_ON_LOOP.get(self._loop_counted, 0) + 1

    async def close(self) -> None:
        """Announce ``offline``, disconnect, and fail whatever is still pending."""
        counted, self._loop_counted = self._loop_counted, None
        if counted is not None:
            _AGENTS_ON_LOOP[counted] = max(0, _AGENTS_ON_LOOP.get(counted, 1) - 1)
        if self._closed:
            return
        self._closed = True
        if self._local:
            return
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for task in list(self._tasks):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._resends.clear()
        transport, self._transport = self._transport, None
        self._connected.clear()
        if transport is not None:
            if self.config.presence:
                try:
                    await asyncio.wait_for(
                        transport.publish(self.status_topic, OFFLINE, qos=1, retain=True), 2.0)
                except (TransportError, asyncio.TimeoutError) as exc:
                    log.debug("%s: could not announce offline: %s", self.device_id, exc)
            await transport.close()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(TransportError(
                    f"edge agent {self.device_id} closed with the request pending",
                    device_id=self.device_id))

    async def __aenter__(self) -> EdgeAgent:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once connected (a test or a daemon waiting out a broker restart)."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise TransportError(f"edge agent {self.device_id}: not connected to "
                                 f"{self._broker_name()} after {timeout} s",
                                 device_id=self.device_id) from None

    # ------------------------------------------------------------------ inference

    async def infer(self, inputs: Inputs, *, timeout: float | None = None,
                    split: str | None = None,
                    compression: str | None = None) -> InferenceResult:
        """Run the head on ``inputs`` (one array per model input, samples first, any number
        of them), send the cut, and return the tail's outputs. The deadline (``timeout`` or
        the config's) covers it all, every request of a call fed in fixed-size batches too.
        ``split`` names one of the agent's splits (default: its first). ``compression``
        overrides the split manifest's for this call's requests (``"zstd"``, ``"lz4"``,
        ``"none"``; None: the manifest's, see :meth:`compression_for`).
        """
        started = time.perf_counter()
        timeout = self._timeout(timeout)
        self._check_started()
        state = self.split_state(split)
        self.compression_for(state, compression)  # a bad override fails before the head runs
        return await self._infer_split(state, self.check_inputs(inputs, state), started=started,
                                       timeout=timeout, compression=compression)

    def compression_for(self, state: SplitState, override: str | None = None) -> str | None:
        """The codec this agent's requests of ``state`` use (None: uncompressed).

        ``override`` (a call's ``compression=``): ``"none"`` or a codec, which must be
        installed here (BadInputError naming the installed ones otherwise). Without it, the
        manifest's ``compression``; a manifest codec this device lacks (its binding not
        installed) is logged once and the requests go uncompressed, which every worker
        reads, rather than failing every call. The worker answers in the codec the request
        used, so a device never receives a codec it did not send.
        """
        if override is not None:
            if override == "none":
                return None
            if override not in supported_codecs():
                raise BadInputError(f"compression {override!r}: expected 'none' or a codec "
                                    f"installed here {list(supported_codecs())}",
                                    split_id=state.split_id)
            return override
        how = state.manifest.compression
        if how is None or how in supported_codecs():
            return how
        if state.split_id not in self._compression_warned:
            self._compression_warned.add(state.split_id)
            log.warning("%s: split %s asks for %s compression, which is not installed here "
                        "(supported: %s); sending its requests uncompressed", self.device_id,
                        state.split_id, how, list(supported_codecs()) or "none")
        return None

    async def _infer_split(self, state: SplitState, arrays: Mapping[str, Array], *,
                           started: float, timeout: float,
                           compression: str | None = None) -> InferenceResult:
        """``arrays`` (checked model inputs) through ``state`` under one ``timeout``
        (``compression``: the call's override, None = the manifest's)."""
        loop = asyncio.get_running_loop()
        deadline, expires = time.time() + timeout, loop.time() + timeout
        if state.head is None:
            raise BadInputError(f"edge agent {self.device_id} has no head for "
                                f"{state.split_id}; use infer_activation()",
                                split_id=state.split_id)
        samples = _samples(arrays)
        if state.batch is None or samples is None or samples == state.batch:
            return await self._infer_one(state, arrays, started=started, deadline=deadline,
                                         expires=expires, timeout=timeout,
                                         compression=compression)
        return await self._infer_chunked(state, arrays, samples, state.batch, started=started,
                                         deadline=deadline, expires=expires, timeout=timeout,
                                         compression=compression)

    async def _infer_one(self, state: SplitState, arrays: Mapping[str, Array], *,
                         started: float, deadline: float, expires: float,
                         timeout: float, compression: str | None = None) -> InferenceResult:
        loop = asyncio.get_running_loop()
        stamps = {"head_start": time.time()}
        t0 = time.perf_counter()
        in_thread = self.config.head_in_thread
        if in_thread is None:
            in_thread = _AGENTS_ON_LOOP.get(loop, 0) > 1
        if in_thread:
            cut = await loop.run_in_executor(None, functools.partial(self._run_head, arrays,
                                                                     state))
        else:
            cut = self._run_head(arrays, state)
        head_s = time.perf_counter() - t0
        stamps["head_end"] = time.time()
        if loop.time() >= expires:
            raise DeadlineExceeded(f"the head of {state.split_id} took {head_s:.3f} s, "
                                   f"past the {timeout:.3g} s deadline",
                                   split_id=state.split_id, device_id=self.device_id)
        if state.kind == "edge_only":
            return self._local_result(cut, head_s=head_s, started=started, state=state)
        return await self._request(cut, head_s=head_s, stamps=stamps, started=started,
                                   deadline=deadline, expires=expires, timeout=timeout,
                                   state=state, compression=compression)

    async def _infer_chunked(self, state: SplitState, arrays: Mapping[str, Array],
                             samples: int, batch: int, *,
                             started: float, deadline: float, expires: float,
                             timeout: float, compression: str | None = None
                             ) -> InferenceResult:
        """``samples`` in requests of the split's fixed ``batch``, outputs in input order."""
        gate = asyncio.Semaphore(self.config.chunk_concurrency)

        async def one(chunk: dict[str, Array]) -> InferenceResult:
            async with gate:
                return await self._infer_one(state, chunk, started=time.perf_counter(),
                                             deadline=deadline, expires=expires,
                                             timeout=timeout, compression=compression)

        # The files take exactly `batch`: the last chunk is padded, its extra results dropped.
        tasks = [asyncio.create_task(one(chunk), name=f"edge-chunk:{self.device_id}:{i}")
                 for i, chunk in enumerate(padded_chunks(arrays, batch))]
        try:
            parts = await asyncio.gather(*tasks)
        finally:  # the first failure ends the call: the other requests are not waited for
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        outputs = {name: np.concatenate([p.outputs[name] for p in parts])[:samples]
                   for name in parts[0].outputs}
        timings: dict[str, float] = {}
        for part in parts:
            for stage, value in part.timings.items():
                timings[stage] = timings.get(stage, 0.0) + value
        timings["e2e"] = time.perf_counter() - started
        return InferenceResult(request_id=parts[0].request_id, outputs=outputs,
                               timings={k: timings[k] for k in STAGES if k in timings},
                               split_id=parts[0].split_id, requests=len(parts),
                               served_by=parts[0].served_by,
                               attempts=sum(p.attempts for p in parts))

    def _local_result(self, cut: Mapping[str, Array], *, head_s: float, started: float,
                      state: SplitState | None = None) -> InferenceResult:
        """An edge_only answer: the head is the whole model, its outputs are the result."""
        manifest = (state or self.split_state()).manifest
        outputs = check_tensors({s.name: cut[s.name] for s in manifest.outputs},
                                manifest.outputs, "outputs", manifest.split_id,
                                any_batch=True)
        return InferenceResult(request_id=new_request_id(), outputs=outputs,
                               timings={"e2e": time.perf_counter() - started, "head": head_s},
                               split_id=manifest.split_id, served_by="edge")

    async def infer_activation(self, cut_tensors: Mapping[str, Array], *,
                               timeout: float | None = None,
                               split: str | None = None,
                               compression: str | None = None) -> InferenceResult:
        """Send recorded head outputs (the manifest's cut tensors) without running the head
        (``compression``: as for :meth:`infer`)."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        timeout = self._timeout(timeout)
        self._check_started()
        state = self.split_state(split)
        self.compression_for(state, compression)
        cut = check_tensors(cut_tensors, state.manifest.cut, "cut tensors", state.split_id)
        if state.kind == "edge_only":  # recorded outputs of the whole model: nothing to send
            return self._local_result(cut, head_s=0.0, started=started, state=state)
        return await self._request(cut, head_s=0.0, stamps={}, started=started,
                                   deadline=time.time() + timeout,
                                   expires=loop.time() + timeout, timeout=timeout, state=state,
                                   compression=compression)

    def check_inputs(self, inputs: Inputs, state: SplitState | None = None) -> dict[str, Array]:
        """The model inputs by name, checked against the manifest (TensorError/BadInputError);
        any number of samples, whatever the split's batch dimension."""
        manifest = (state or self.split_state()).manifest
        if isinstance(inputs, np.ndarray):
            if len(manifest.inputs) != 1:
                raise BadInputError(
                    f"{manifest.split_id} has {len(manifest.inputs)} inputs "
                    f"{[s.name for s in manifest.inputs]}; pass a dict keyed by input name",
                    split_id=manifest.split_id)
            inputs = {manifest.inputs[0].name: inputs}
        return check_tensors(inputs, manifest.inputs, "model inputs",
                             manifest.split_id, any_batch=True)

    def _run_head(self, arrays: Mapping[str, Array],
                  state: SplitState | None = None) -> dict[str, Array]:
        state = state or self.split_state()
        manifest, head = state.manifest, state.head
        if head is None:  # infer() checked; keeps mypy and python -O honest
            raise BadInputError(f"edge agent {self.device_id} has no head")
        out = head.run({n: arrays[n] for n in head.input_names})
        try:
            return check_tensors({s.name: out[s.name] for s in manifest.cut},
                                manifest.cut, "head outputs", manifest.split_id)
        except TensorError as exc:
            raise TensorError(f"the head disagrees with the manifest's cut: {exc}",
                              split_id=manifest.split_id) from None

    async def _request(self, cut: Mapping[str, Array], *, head_s: float,
                       stamps: dict[str, float], started: float, deadline: float,
                       expires: float, timeout: float,
                       state: SplitState | None = None,
                       compression: str | None = None) -> InferenceResult:
        loop = asyncio.get_running_loop()
        state = state or self.split_state()
        manifest = state.manifest
        how = self.compression_for(state, compression)
        request_id = new_request_id()
        t0 = time.perf_counter()
        envelope = Envelope(
            kind=REQUEST, request_id=request_id, device_id=self.device_id,
            split_id=manifest.split_id, deadline=deadline, reply_to=self.result_topic,
            tensors=[WireTensor(s.name, cut[s.name], s.quantization,
                               codec=manifest.codec_for(s.name)) for s in manifest.cut],
            timestamps=stamps)
        envelope.stamp("sent")
        payload = encode(envelope, compression=how)
        encode_s = time.perf_counter() - t0
        if len(payload) > self.config.max_payload:
            raise WireError(f"request of {len(payload)} bytes exceeds the {self.config.max_payload}"
                            f" byte limit; send fewer samples per call",
                            code=ErrorCode.PAYLOAD_TOO_LARGE, split_id=manifest.split_id)
        pending = _Pending(request_id, loop.create_future(), payload, expires, split=state,
                           deadline=deadline)
        self._pending[request_id] = pending
        try:
            self._send(pending)
            try:
                reply = await asyncio.wait_for(pending.future, max(0.0, expires - loop.time()))
            except asyncio.TimeoutError:
                if pending.future.done() and not pending.future.cancelled():
                    raise  # a TimeoutError the future itself carried
                raise DeadlineExceeded(self._deadline_message(request_id, timeout, state),
                                       split_id=manifest.split_id,
                                       device_id=self.device_id) from None
        except Exception as exc:
            self._counters.errors[getattr(exc, "code", type(exc).__name__)] += 1
            self._observe_failure(pending, exc)
            raise
        finally:
            self._pending.pop(request_id, None)
        if pending.publishes == 1:  # Karn: only an answer no copy could have earned
            self.backoff.observe(loop.time() - pending.sent_at)
        elif pending.silent:
            self.backoff.backed_off(pending.silent)
        t1 = time.perf_counter()
        outputs = self._outputs(reply.envelope, state)
        done = time.perf_counter()
        worker = worker_stages(reply.envelope.timestamps)
        measured = {
            "e2e": done - started,
            "head": head_s,
            "encode": encode_s,
            "network": max(0.0, reply.received - pending.sent - worker.get("worker", 0.0)),
            "queue": worker.get("queue"),
            "tail": worker.get("tail"),
            "decode": reply.decode_s + (done - t1),
        }
        timings = {k: v for k in STAGES if (v := measured.get(k)) is not None}
        result = InferenceResult(request_id=request_id, outputs=outputs, timings=timings,
                                 split_id=reply.envelope.split_id,
                                 attempts=max(1, pending.publishes))
        self._observe_reply(pending, reply, result)
        return result

    def _observe_reply(self, pending: _Pending, reply: _Reply, result: InferenceResult) -> None:
        """Hook: a request was answered (the bundle agent measures its link here)."""

    def _observe_failure(self, pending: _Pending, exc: BaseException) -> None:
        """Hook: a request failed (no worker, deadline, error result, lost connection)."""

    def _outputs(self, envelope: Envelope, state: SplitState | None = None) -> dict[str, Array]:
        manifest = (state or self.split_state()).manifest
        try:
            return check_tensors(envelope.arrays(), manifest.outputs, "result tensors",
                                manifest.split_id)
        except BadInputError as exc:
            raise TensorError(f"result {envelope.request_id} does not match the manifest: "
                              f"{exc}", split_id=manifest.split_id) from None

    # ------------------------------------------------------------------ connection

    async def _connect(self) -> Transport:
        will = LastWill(self.status_topic, OFFLINE) if self.config.presence else None
        return await self._connector(client_id=self.device_id, will=will)

    async def _establish(self, transport: Transport) -> None:
        await transport.subscribe(self.result_topic, qos=self.config.qos)
        if self.config.presence:
            await transport.publish(self.status_topic, ONLINE, qos=1, retain=True)
        self._epoch += 1
        if self._epoch > 1:
            self._grace_until = asyncio.get_running_loop().time() + self.config.reconnect_grace_s
        self._transport = transport
        self._protocol = transport.protocol
        self._connected.set()
        now = asyncio.get_running_loop().time()
        again = [p for p in self._pending.values()
                 if p.epoch < self._epoch and not p.future.done() and p.expires > now]
        for pending in again:
            if pending.publishes:
                self._counters.republished += 1
            self._send(pending)
        if again:
            log.info("%s: (re)published %d pending request(s)", self.device_id, len(again))

    def _detach(self, transport: Transport) -> None:
        if self._transport is transport:
            self._transport = None
            self._connected.clear()

    async def _supervise(self, transport: Transport | None) -> None:
        delay = self.config.reconnect_min_s
        while True:
            if transport is not None:
                try:
                    await self._pump(transport)
                except TransportError as exc:
                    log.warning("%s: %s; reconnecting", self.device_id, exc)
                self._detach(transport)
                await transport.close()
                transport = None
            try:
                transport = await self._connect()
                await self._establish(transport)
            except TransportError as exc:
                if transport is not None:
                    self._detach(transport)
                    await transport.close()
                    transport = None
                pause = delay * random.uniform(0.5, 1.0)  # jitter, not crypto
                log.info("%s: reconnect to %s failed (%s); next try in %.2f s", self.device_id,
                         self._broker_name(), exc, pause)
                await asyncio.sleep(pause)
                delay = min(delay * 2, self.config.reconnect_max_s)
            else:
                self._counters.reconnects += 1
                delay = self.config.reconnect_min_s
                log.info("%s: reconnected to %s", self.device_id, self._broker_name())

    async def _pump(self, transport: Transport) -> None:
        async for message in transport.messages():
            self._dispatch(message)
        raise TransportError(f"the message stream from {self._broker_name()} ended")

    def _send(self, pending: _Pending) -> None:
        transport = self._transport
        if transport is None:
            return  # published by _establish() after the reconnect
        pending.epoch = self._epoch
        pending.due = 0.0  # this publish supersedes a re-send scheduled before it
        self._spawn(self._publish(transport, pending), f"edge-publish:{pending.request_id[:8]}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, transport: Transport, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        remaining = pending.expires - started
        if remaining <= 0 or pending.future.done():
            return
        options = PublishOptions(response_topic=self.result_topic,
                                 correlation=pending.request_id.encode(), expiry_s=remaining)
        if not pending.publishes:
            pending.sent = time.perf_counter()
        pending.sent_at = started
        pending.publishes += 1
        self._counters.published += 1
        topic = pending.split.request_topic if pending.split is not None else self.request_topic
        try:
            limit = getattr(transport, "max_packet_size", None)
            if limit and chunks.needs_chunking(len(pending.payload), limit, topic):
                reason = await self._publish_chunks(transport, topic, pending, limit, options)
            else:
                reason = await transport.publish(topic, pending.payload,
                                                 qos=self.config.qos, options=options)
        except TransportError as exc:
            # A lost connection: the supervisor re-publishes after reconnecting (that
            # supersedes the re-send scheduled below); anything else: the re-send retries.
            log.debug("%s: request %s not published: %s", self.device_id,
                      pending.request_id, exc)
            reason = None
        if pending.future.done():
            return
        if reason == NO_MATCHING_SUBSCRIBERS:
            self._no_subscriber(pending)
            return
        if reason is not None and reason >= 0x80 and reason not in _TRANSIENT_REFUSALS:
            self._refused(pending, reason)
            return
        if reason == 0:  # an MQTT 5 PUBACK that found a subscriber: a worker is there
            self._worker_seen = loop.time()
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
        self._schedule(pending, now + _jittered(
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

    # ------------------------------------------------------------------ helpers

    def _timeout(self, timeout: float | None) -> float:
        value = self.config.timeout_s if timeout is None else timeout
        if not value > 0:
            raise BadInputError(f"timeout must be > 0 seconds, got {value}")
        return value

    def _check_started(self) -> None:
        if self._closed or (self._supervisor is None and not self._local):
            raise TransportError(f"edge agent {self.device_id} is not running; use "
                                 "'async with agent' or await agent.start()",
                                 device_id=self.device_id)

    def _broker_name(self) -> str:
        url = getattr(self._connector, "url", None)
        return url if isinstance(url, str) else "the broker"

    def serve_hint(self, state: SplitState | None = None) -> str:
        """The command that starts a worker for this agent's requests."""
        split_id = (state or self.split_state()).split_id
        prefix = "" if self.config.prefix == DEFAULT_PREFIX else f" --prefix {self.config.prefix}"
        return (f"splitinfer cloud serve --broker {self._broker_name()}{prefix} "
                f"--artifacts DIR (holding {split_id})")

    def _no_subscriber_message(self, state: SplitState | None = None) -> str:
        state = state or self.split_state()
        return (f"no worker subscribed to {state.request_topic} (broker: no matching "
                f"subscribers); start one with: {self.serve_hint(state)}")

    def _deadline_message(self, request_id: str, timeout: float,
                          state: SplitState | None = None) -> str:
        state = state or self.split_state()
        where = "" if self.connected else f"; not connected to {self._broker_name()}"
        return (f"no result for request {request_id} of {state.split_id} on "
                f"{state.request_topic} within {timeout:.3g} s{where}; is a cloud worker "
                f"serving model {state.manifest.model!r} under prefix "
                f"{self.config.prefix!r}? start one with: {self.serve_hint(state)}")


def _samples(arrays: Mapping[str, Array]) -> int | None:
    """The samples in a call (first axis, check_tensors made them agree); None for scalars."""
    first = next(iter(arrays.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else None
