"""The worker's core, free of MQTT: message in → checks → batch → tail → answer out.

:class:`Worker` takes raw messages (:class:`Incoming`) and answers through an injected
``publish(topic, payload, correlation)`` coroutine, so unit tests drive it without a
broker and the server only adds the connection. Every request gets exactly one answer
when a reply address can be read: a result, or an error result with an
:class:`~splitinfer.errors.ErrorCode`. Nothing a device sends stops the worker.

Reply address: the result topic of the device named by the **request topic**, which the
broker ACL binds to the sender (``pattern write …/req/+/%c``). The MQTT 5 response topic
and the envelope's ``rt`` are ignored for a message on a request topic, so a device can
neither make the worker publish outside ``{prefix}/v1/res/`` nor aim results at another
device. Only a message on a topic that is not a request topic (which the
worker's subscription never delivers) falls back to a claimed ``{prefix}/v1/res/…``
address.

Idempotency (:mod:`cloud_service.dedupe`): a request whose (device, id) is still queued
or running is not run again, one already answered is answered again from a bounded cache
of recent results (``Metrics.duplicates`` counts both).

Compression: a request's compressed tensors are decompressed by :func:`splitinfer.wire.decode`
(bounded by the size their shape implies); the answer goes in the codec the request used
(:func:`answer_compression`), never in one the device did not show it reads.

Error answers name the field and what was expected; they never carry exception text or
what else the worker serves. A bug costs its request an ``internal`` answer and the log
one traceback per interval (:class:`~cloud_service.metrics.ErrorLog`), counts for the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_service.batcher import Batcher
from cloud_service.config import Config
from cloud_service.dedupe import Key, ResultCache
from cloud_service.metrics import ErrorLog, Metrics
from cloud_service.registry import Prepared, Registry, Tail
from splitinfer import chunks
from splitinfer.batches import padded_chunks
from splitinfer.errors import BadInputError, ErrorCode, TensorError, WireError
from splitinfer.topics import Topics, check_level
from splitinfer.wire import (
    REQUEST,
    RESULT,
    Envelope,
    ErrorInfo,
    WireTensor,
    decode,
    encode,
    peek_reply_address,
)

__all__ = ["Incoming", "ReplyAddress", "Publish", "PublishNowait", "Job", "Worker",
           "reply_address", "answer_compression"]

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
_REASSEMBLY_TOTAL = 256 * 1024 * 1024  # bytes of partial chunked requests, all devices
# Config.inline: a lone request runs on the loop only while its split's requests arrive
# further apart than this many of its tail runs (a load under 2/3 of one tail thread: a
# sequential client, whose gap is its whole round trip, has at least 1.5 on any real link).
INLINE_LOAD = 1.5
# ... and only when that run is expected to take at most this long (the loop answers
# nothing else meanwhile; the heartbeat is 1 s, peers fence after 3 s).
INLINE_MAX_S = 0.05
# publish(topic, payload, correlation): QoS 1, returns once acknowledged; raises when it
# gives up (the server's gives up after Config.reply_timeout_s without a broker).
Publish = Callable[[str, bytes, "bytes | None"], Awaitable[None]]
# publish_nowait(topic, payload, correlation): the fast path of a connected publisher —
# sends now and returns a future resolved by the PUBACK (failed if the connection goes),
# or None when it cannot send now; then (and on failure) the worker uses ``publish``.
PublishNowait = Callable[[str, bytes, "bytes | None"], "asyncio.Future[None] | None"]


@dataclass(frozen=True)
class Incoming:
    """One message as the subscription delivered it."""

    topic: str
    payload: bytes
    response_topic: str | None = None  # MQTT 5 properties
    correlation: bytes | None = None


@dataclass(frozen=True)
class ReplyAddress:
    topic: str
    correlation: bytes | None = None


def _is_result_topic(topics: Topics, topic: str) -> bool:
    head = f"{topics.prefix}/v1/res/"
    if not topic.startswith(head):
        return False
    try:
        check_level(topic[len(head):], "device id")
    except BadInputError:
        return False
    return True


def reply_address(topics: Topics, msg: Incoming, envelope_rt: str = "") -> ReplyAddress | None:
    """Where to answer ``msg`` (see the module docstring), or None when nowhere."""
    parsed = topics.parse_request(msg.topic)
    if parsed is not None:
        try:
            return ReplyAddress(topics.result(parsed[1]), msg.correlation)
        except BadInputError:
            return None
    for candidate in (msg.response_topic, envelope_rt):
        if candidate and _is_result_topic(topics, candidate):
            return ReplyAddress(candidate, msg.correlation)
    return None


@dataclass(eq=False)
class Job:
    """An accepted request waiting for its batch."""

    request: Envelope
    prepared: Prepared
    reply: ReplyAddress
    received: float  # unix seconds
    dedupe: Key | None = None  # (device, request id) while pending
    # The tail that checked it and runs it: a split reloaded meanwhile (hot reload) still
    # answers this request with the version that accepted it.
    tail: Tail | None = None
    lane: str = field(init=False)
    samples: int = field(init=False)
    key: tuple[int, tuple[tuple[int, ...], ...]] = field(init=False)
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.lane = self.request.split_id
        self.samples = self.prepared.samples
        # two versions of one split never share a batch
        self.key = (self.tail.version if self.tail is not None else 0, self.prepared.key)
        self.deadline = self.request.deadline


class Worker:
    """Checks, batches and answers requests; see the module docstring."""

    def __init__(self, config: Config, registry: Registry, publish: Publish, *,
                 metrics: Metrics | None = None,
                 publish_nowait: PublishNowait | None = None,
                 max_packet: Callable[[], int | None] | None = None) -> None:
        self.config = config
        # the broker's maximum packet size now (None: no limit): bigger answers go as
        # chunks; chunked requests are reassembled per device (splitinfer.chunks)
        self._max_packet = max_packet
        self._reassembler = chunks.Reassembler(
            max_per_device=2 * config.max_payload,
            max_total=max(_REASSEMBLY_TOTAL, 2 * config.max_payload),
            max_payload=config.max_payload)
        self.chunks_sent = 0  # chunk envelopes of answers published
        self.registry = registry
        self.topics = config.topics()
        self.metrics = metrics or Metrics()
        self._publish = publish
        self._publish_nowait = publish_nowait
        self._errors = ErrorLog(log)
        self._pending: set[Key] = set()  # accepted, not yet answered
        self._results = ResultCache(config.dedupe_size, config.dedupe_bytes)
        # answers not yet acknowledged: delivery tasks, and PUBACK futures of the fast path
        self._replies: set[asyncio.Future[None]] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepted = 0  # offered to the batcher, not yet answered
        self._settled = asyncio.Event()  # set while _accepted == 0
        self._settled.set()
        self._batcher: Batcher[Job] = Batcher(
            run=self._run_batch, expire=self._expired, max_batch=config.max_batch,
            max_delay_s=config.max_delay_s, max_queue=config.queue_size,
            threads=config.tail_workers)
        self.metrics.queue_depth = lambda: self._batcher.depth
        self.metrics.tail_waits = lambda: (self._batcher.starved_s, self._batcher.held_s)
        self.metrics.in_flight = lambda: len(self._replies)
        self.metrics.splits = frozenset(registry)
        self.metrics.splits_now = lambda: frozenset(self.registry)

    # --- intake --------------------------------------------------------------------------

    def submit(self, msg: Incoming, received: float | None = None) -> None:
        """Take one message; never raises (a failure becomes an error answer)."""
        now = time.time() if received is None else received
        self.metrics.received += 1
        if self._loop is None:  # the first message: tail threads start with the loop known
            self._loop = asyncio.get_running_loop()
            self._batcher.start()
        try:
            self._submit(msg, now)
        except Exception:  # a bug must cost one request, not the worker (nor the log)
            self._fail(ErrorCode.INTERNAL, "the worker failed on this request; retry, or "
                       "report it if it persists", msg=msg,
                       addr=reply_address(self.topics, msg), now=now, exc_info=True)

    @property
    def chunk_stats(self) -> chunks.ReassemblyStats:
        """Chunks of requests received, reassembled, duplicated, dropped and refused."""
        return self._reassembler.stats

    def _reassemble(self, msg: Incoming, now: float) -> Incoming | None:
        """The whole request once its last chunk is in; None until then (or refused)."""
        parsed = self.topics.parse_request(msg.topic)
        device = parsed[1] if parsed is not None else None
        try:
            whole = self._reassembler.add(msg.payload, device=device)
        except WireError as exc:
            self._fail(exc.code, exc.message, msg=msg, addr=reply_address(self.topics, msg),
                       now=now)
            return None
        return None if whole is None else dataclasses.replace(msg, payload=whole)

    def _submit(self, msg: Incoming, now: float) -> None:
        if chunks.is_chunk(msg.payload):
            whole = self._reassemble(msg, now)
            if whole is None:
                return
            msg = whole
        try:
            env = decode(msg.payload, max_bytes=self.config.max_payload,
                         codecs=self.registry.codecs)  # image inputs decoded here
        except WireError as exc:
            request_id, rt = peek_reply_address(msg.payload, max_bytes=self.config.max_payload)
            self._fail(exc.code, exc.message, msg=msg, addr=reply_address(self.topics, msg, rt),
                       now=now, request_id=request_id)
            return
        addr = reply_address(self.topics, msg, env.reply_to)
        env.timestamps["recv"] = now
        self.metrics.request(env.split_id)
        if env.kind != REQUEST:
            self._fail(ErrorCode.BAD_MESSAGE, f"expected a {REQUEST!r} envelope on a request "
                       f"topic, got {env.kind!r}", msg=msg, addr=addr, now=now, env=env)
            return
        key = self._dedupe_key(msg, env)
        if key is not None and self._duplicate(key, addr):
            return
        if self._closing:
            self._fail(ErrorCode.SHUTTING_DOWN, "worker is shutting down; retry (another "
                       "replica takes it)", msg=msg, addr=addr, now=now, env=env)
            return
        if env.expired(now):
            self._fail(ErrorCode.DEADLINE_EXPIRED, f"arrived {now - env.deadline:.3f} s after "
                       "its deadline", msg=msg, addr=addr, now=now, env=env)
            return
        tail = self.registry.get(env.split_id)
        if tail is None:
            self._fail(ErrorCode.UNKNOWN_SPLIT, f"no tail for split {env.split_id!r} on this "
                       "worker (envelope field 'split'); expected a split this worker group "
                       "serves", msg=msg, addr=addr, now=now, env=env)
            return
        try:
            prepared = tail.prepare(env)
        except TensorError as exc:
            self._fail(ErrorCode.BAD_TENSOR, exc.message, msg=msg, addr=addr, now=now, env=env)
            return
        if addr is None:  # a fine request that nobody could receive the answer to
            self._fail(ErrorCode.BAD_MESSAGE, "no reply address (no response topic, no 'rt', "
                       "not a request topic)", msg=msg, addr=None, now=now, env=env)
            return
        job = Job(env, prepared, addr, now, key, tail)
        claimed: bool | None = None  # None: not asked (the arrival is counted by offer)
        if self.config.inline and self._short_run(job):
            claimed = self._batcher.claim(job.lane, self._inline_gap(job))
        inline = bool(claimed)
        if not inline and not self._batcher.offer(job, counted=claimed is not None):
            self._fail(ErrorCode.OVERLOADED, f"queue full ({self.config.queue_size} requests "
                       "waiting); retry later", msg=msg, addr=addr, now=now, env=env)
            return
        if key is not None:
            self._pending.add(key)
        tail.in_flight += 1
        self._accepted += 1
        self._settled.clear()
        if inline:
            self._run_inline(job)

    @staticmethod
    def _short_run(job: Job) -> bool:
        """Whether ``job``'s tail run is known to be short enough to hold the event loop
        for (INLINE_MAX_S: heartbeats, PUBACKs and keep-alives wait meanwhile). A tail
        never run yet is not: its first run is measured on a tail thread."""
        run_s = job.tail.sample_s * job.samples if job.tail is not None else 0.0
        return 0.0 < run_s <= INLINE_MAX_S

    def _inline_gap(self, job: Job) -> float:
        """How far apart a lane's requests must arrive for ``job`` to run on the loop: more
        than the batching delay (no batch is given up) and INLINE_LOAD runs of this size
        (the loop stays free most of the time for what else arrives)."""
        run_s = job.tail.sample_s * job.samples if job.tail is not None else 0.0
        return max(self.config.max_delay_s, INLINE_LOAD * run_s)

    def _run_inline(self, job: Job) -> None:
        """Run a claimed lone job here, on the event loop, and answer it."""
        batched = time.time()
        try:
            per_job, t0, t1 = _run(self._tail_of(job.lane, (job,)), (job,))
        except Exception as exc:
            self._answer_batch(job.lane, [job], exc, batched, batched, batched)
            return
        finally:
            self._batcher.release()
        self.metrics.inline += 1
        self._answer_batch(job.lane, [job], per_job, batched, t0, t1)

    def _dedupe_key(self, msg: Incoming, env: Envelope) -> Key | None:
        parsed = self.topics.parse_request(msg.topic)
        if parsed is None or not env.request_id:
            return None  # no device bound by the topic: nothing safe to key on
        return (parsed[1], env.request_id)

    def _duplicate(self, key: Key, addr: ReplyAddress | None) -> bool:
        """True when ``key`` was seen before and is taken care of (dropped or re-sent)."""
        if key in self._pending:
            self.metrics.duplicates += 1  # the answer to the first copy covers it
            return True
        cached = self._results.get(key)
        if cached is None or addr is None:
            return False
        self.metrics.duplicates += 1
        self._send_payload(addr, cached, ok=False)  # counted once, as the first answer
        return True

    def _settle(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            if job.tail is not None:
                job.tail.in_flight -= 1
        self._accepted -= len(jobs)
        if self._accepted <= 0:
            self._settled.set()

    # --- answers -------------------------------------------------------------------------

    def _fail(self, code: ErrorCode, message: str, *, msg: Incoming | None,
              addr: ReplyAddress | None, now: float, env: Envelope | None = None,
              request_id: str = "", exc_info: BaseException | bool | None = None) -> None:
        self.metrics.error(code, env.split_id if env is not None else None)
        topic = msg.topic if msg is not None else "?"
        self._errors.report(code.value, "%s (request topic %s)", message, topic,
                            exc_info=exc_info)
        if addr is None:
            self.metrics.unanswerable += 1
            return
        if env is not None:
            answer = env.result(error=ErrorInfo.of(code, message))
        else:
            parsed = self.topics.parse_request(topic)
            answer = Envelope(kind=RESULT, request_id=request_id,
                              device_id=parsed[1] if parsed else "", split_id="",
                              timestamps={"recv": now}, error=ErrorInfo.of(code, message))
        self._send(addr, answer, ok=False)

    def _send(self, addr: ReplyAddress, answer: Envelope, *, ok: bool,
              compression: str | None = None) -> bytes | None:
        """Encode and send ``answer`` (its tensors compressed with ``compression`` where
        that pays, see :func:`answer_compression`); the payload sent, or None when it
        cannot be encoded."""
        answer.timestamps["reply"] = reply = time.time()
        try:
            payload = encode(answer, compression=compression)
        except WireError as exc:
            self._errors.report("encode_failed", "cannot encode the answer to %r: %s",
                                answer.request_id, exc)
            return None
        self._send_payload(addr, payload, ok=ok, split=answer.split_id)
        if ok:  # counted after the answer is on its way, not in its latency
            self.metrics.replied(answer.split_id, reply - answer.timestamps.get("recv", reply))
        return payload

    def _send_payload(self, addr: ReplyAddress, payload: bytes, *, ok: bool,
                      split: str = "") -> None:
        limit = self._max_packet() if self._max_packet is not None else None
        if chunks.needs_chunking(len(payload), limit, addr.topic):
            assert limit is not None
            request_id, _ = peek_reply_address(payload, max_bytes=self.config.max_payload)
            parts = chunks.split(payload, request_id=request_id or "?",
                                 device=addr.topic.rsplit("/", 1)[-1],
                                 deadline=time.time() + self.config.reply_timeout_s,
                                 max_packet=limit, topic=addr.topic)
            self.chunks_sent += len(parts)
            for i, part in enumerate(parts):  # counted answered once, by its last chunk
                self._send_one(addr, part, ok=ok and i == len(parts) - 1, split=split)
            return
        self._send_one(addr, payload, ok=ok, split=split)

    def _send_one(self, addr: ReplyAddress, payload: bytes, *, ok: bool,
                  split: str = "") -> None:
        if self._publish_nowait is not None:
            # No task per answer: sent now, the PUBACK resolves a future.
            acked = self._publish_nowait(addr.topic, payload, addr.correlation)
            if acked is not None:
                self._replies.add(acked)
                acked.add_done_callback(
                    lambda fut: self._acked(fut, addr, payload, ok, split))
                return
        self._deliver_later(addr, payload, ok, split)

    def _deliver_later(self, addr: ReplyAddress, payload: bytes, ok: bool,
                       split: str = "") -> None:
        task = asyncio.get_running_loop().create_task(
            self._deliver(addr, payload, ok, split), name=f"reply-{addr.topic[-24:]}")
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    def _acked(self, fut: asyncio.Future[None], addr: ReplyAddress, payload: bytes,
               ok: bool, split: str = "") -> None:
        self._replies.discard(fut)
        if fut.cancelled():
            return  # aclose(): a forced exit
        if fut.exception() is not None:  # the connection went: the slow path retries
            self._deliver_later(addr, payload, ok, split)
        elif ok:
            self.metrics.answer(split)

    async def _deliver(self, addr: ReplyAddress, payload: bytes, ok: bool,
                       split: str = "") -> None:
        # No wait_for here: it would cost a task per answer; the publisher gives up by
        # itself after reply_timeout_s (the server's does).
        try:
            await self._publish(addr.topic, payload, addr.correlation)
        except Exception as exc:
            self.metrics.reply_failures += 1
            self._errors.report("reply_failed", "answer to %s not delivered: %r",
                                addr.topic, exc)
            return
        if ok:
            self.metrics.answer(split)

    # --- tail runs (on a tail thread; answers hop back to the loop) --------------------

    def _expired(self, job: Job) -> None:
        late = time.time() - job.deadline
        self._post(self._answer_expired, job, late)

    def _answer_expired(self, job: Job, late: float) -> None:
        self._settle((job,))
        self._forget(job)
        self._fail(ErrorCode.DEADLINE_EXPIRED, f"deadline passed while queued ({late:.3f} s "
                   "late)", msg=None, addr=job.reply, now=job.received, env=job.request)

    def _run_batch(self, split_id: str, jobs: list[Job]) -> None:
        batched = time.time()
        try:
            per_job, t0, t1 = _run(self._tail_of(split_id, jobs), jobs)
        except Exception as exc:
            self._post(self._answer_batch, split_id, jobs, exc, batched, batched, batched)
            return
        self._post(self._answer_batch, split_id, jobs, per_job, batched, t0, t1)

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            log.error("event loop gone: answers dropped")
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # closed in between (forced exit)
            log.error("event loop closed: answers dropped")

    def _answer_batch(self, split_id: str, jobs: list[Job],
                      per_job: list[Outputs | Exception] | Exception, batched: float,
                      t0: float, t1: float) -> None:
        self._settle(jobs)
        for job in jobs:
            self._forget(job)
            job.request.timestamps["batched"] = batched
        try:
            self._answer_jobs(split_id, jobs, per_job, t0, t1)
        finally:  # the metrics after the answers are on their way, not in their latency
            for job in jobs:
                self.metrics.queued(split_id, batched - job.received)
            if not isinstance(per_job, Exception):
                self.metrics.batch(len(jobs), sum(job.samples for job in jobs), t1 - t0,
                                   split=split_id)

    def _answer_jobs(self, split_id: str, jobs: list[Job],
                     per_job: list[Outputs | Exception] | Exception, t0: float,
                     t1: float) -> None:
        if isinstance(per_job, Exception):
            for job in jobs:
                self._fail(ErrorCode.INTERNAL, f"the tail of split {split_id!r} failed on "
                           "this request", msg=None, addr=job.reply, now=job.received,
                           env=job.request, exc_info=per_job)
            return
        tail = self._tail_of(split_id, jobs)
        specs = tail.output_specs
        for job, outputs in zip(jobs, per_job, strict=True):
            job.request.timestamps["tail_start"] = t0
            job.request.timestamps["tail_end"] = t1
            if isinstance(outputs, Exception):
                self._fail(ErrorCode.INTERNAL, f"the tail of split {split_id!r} failed on "
                           "this request", msg=None, addr=job.reply, now=job.received,
                           env=job.request, exc_info=outputs)
                continue
            tensors = [WireTensor(name, array, specs[name].quantization)
                       for name, array in zip(tail.output_names, outputs, strict=True)]
            payload = self._send(job.reply, job.request.result(tensors), ok=True,
                                 compression=answer_compression(job.request))
            if payload is not None and job.dedupe is not None:
                self._results.put(job.dedupe, payload, job.deadline)

    def _tail_of(self, split_id: str, jobs: Sequence[Job]) -> Tail:
        """The tail a batch runs on: the one its jobs were accepted by (one version per
        batch: the version is in the batching key)."""
        tail = jobs[0].tail
        return tail if tail is not None else self.registry[split_id]

    def _forget(self, job: Job) -> None:
        if job.dedupe is not None:
            self._pending.discard(job.dedupe)

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def accepted(self) -> int:
        """Requests taken for a tail run and not answered yet (queued or running)."""
        return self._accepted

    def close(self) -> None:
        """Stop accepting: later requests are answered SHUTTING_DOWN."""
        self._closing = True

    async def drain(self) -> None:
        """Close, then wait until every accepted request is answered and acknowledged."""
        self.close()
        await self._settled.wait()
        while self._replies:
            await asyncio.wait(set(self._replies))

    async def aclose(self) -> None:
        """Stop the tail threads (not waiting for a run in progress) and pending answers."""
        dropped = self._batcher.stop(timeout=0, discard=True)
        if dropped:
            log.warning("%d queued request(s) left unanswered (forced exit)", dropped)
        for task in list(self._replies):
            task.cancel()
        await asyncio.gather(*self._replies, return_exceptions=True)


def answer_compression(request: Envelope) -> str | None:
    """The codec a result is sent in: the one the request's tensors used, if any.

    The split's manifest sets it for the device (:meth:`EdgeAgent.compression_for`), and
    a device may override it per request; a request that arrived compressed shows the
    device reads that codec, so the answer may use it. One that arrived uncompressed (no
    codec on the device, an override to ``none``, or tensors that did not shrink) is
    answered uncompressed. The encoder then compresses only tensors where that saves at
    least 5 % (:func:`splitinfer.compression.worth_sending`): a classifier's few logits
    stay raw. Error answers carry no tensors.
    """
    return next((t.compression for t in request.tensors if t.compression), None)


# --- on a tail thread (onnxruntime releases the GIL while it computes) -------------------

Outputs = list[Array]


def _run(tail: Tail, jobs: Sequence[Job]) -> tuple[list[Outputs | Exception], float, float]:
    t0 = time.time()
    if tail.batchable and len(jobs) > 1:
        per_job = _run_concatenated(tail, jobs)
        if per_job is None:
            per_job = [_run_one(tail, job) for job in jobs]
    else:
        per_job = [_run_one(tail, job) for job in jobs]
    t1 = time.time()
    tail.observe_run(t1 - t0, sum(job.samples for job in jobs))
    return per_job, t0, t1


def _run_concatenated(tail: Tail, jobs: Sequence[Job]) -> list[Outputs | Exception] | None:
    feeds = [np.concatenate([job.prepared.feeds[i] for job in jobs])
             for i in range(len(tail.input_names))]
    total = int(feeds[0].shape[0])
    outputs = tail.run(feeds)
    if any(out.ndim == 0 or out.shape[0] != total for out in outputs):
        # The outputs do not keep the batch first: no way to split them back.
        log.warning("split %s: outputs %s do not carry the batch (%d) first; running one "
                    "request at a time from now on", tail.split_id,
                    [tuple(o.shape) for o in outputs], total)
        tail.batchable = False
        return None
    per_job: list[Outputs | Exception] = []
    start = 0
    for job in jobs:
        end = start + job.samples
        per_job.append([out[start:end] for out in outputs])
        start = end
    return per_job


def _run_one(tail: Tail, job: Job) -> Outputs | Exception:
    try:
        fixed = tail.fixed_batch
        if fixed is None or job.samples == fixed:
            return tail.run(job.prepared.feeds)
        # A tail whose batch dimension is fixed runs in chunks of that size; the last
        # chunk is padded with copies of its last sample and the padding's outputs dropped
        # (inference is per sample), so any number of samples is answered.
        chunks = [tail.run(list(chunk.values()))
                  for chunk in padded_chunks(dict(enumerate(job.prepared.feeds)), fixed)]
        return [np.concatenate(parts)[:job.samples] for parts in zip(*chunks, strict=True)]
    except Exception as exc:  # answered as INTERNAL for this request only
        return exc
