"""EdgeAgent: one device's asyncio client — head, encode, publish, await the matching result.

::

    config = AgentConfig(device_id="cam-7", broker="mqtt://broker:1883")
    async with EdgeAgent.from_artifacts("artifacts/digits_cnn-…", config=config) as agent:
        result = await agent.infer({"x": batch})          # head on the device, tail remote
        result.outputs["logits"], result.timings["e2e"]
        await agent.infer_activation({"q1": recorded})    # skip the head: fleet replay

Connection: :meth:`EdgeAgent.start` connects once (:class:`StartupError` when the broker
cannot be reached); :mod:`edge_agent.supervisor` keeps the connection up (presence,
reconnect with backoff, re-publishing what is pending). Requests: one per call, QoS 1 on
``{prefix}/v1/req/{model}/{device_id}``; the envelope names the reply topic and the
absolute deadline. :mod:`edge_agent.pending` publishes them (in chunks past the broker's
packet limit), matches results by request id, re-sends a request unanswered within the
retry interval (:class:`~edge_agent.retry.RetryBackoff`), after "no matching
subscribers" while a worker is expected back, or after a reconnect, and fails fast when no
worker is there (:class:`NoSubscriberError`). An error result raises
:class:`RemoteError`; no result before the deadline raises :class:`DeadlineExceeded`.
``InferenceResult.attempts`` says how many times the request went out.

Compression: the cut tensors go compressed with the split manifest's ``compression``
(``zstd`` | ``lz4``, set by ``splitinfer split --compression``), each one only where that
saves at least 5 % (:func:`splitinfer.compression.worth_sending`); a call's
``compression=`` overrides it for its requests (``"none"`` or a codec). The worker answers
in the codec the request used. :meth:`EdgeAgent.compression_for` says which applies.

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
import functools
import logging
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge_agent.config import AgentConfig
from edge_agent.counters import AgentCounters, _Counters
from edge_agent.pending import PendingRequests
from edge_agent.pending import _Pending as _Pending  # re-exported: the bundle agent's hooks
from edge_agent.pending import _Reply as _Reply
from edge_agent.retry import RetryBackoff
from edge_agent.runtime import HeadRuntime, PassThroughHead, check_head, fixed_batch, load_head
from edge_agent.stats import STAGES, worker_stages
from edge_agent.supervisor import OFFLINE, ONLINE, Supervisor
from edge_agent.transport import Connector, MqttConnector, Transport
from splitinfer import chunks
from splitinfer.batches import padded_chunks
from splitinfer.compression import supported as supported_codecs
from splitinfer.errors import (
    BadInputError,
    DeadlineExceeded,
    ErrorCode,
    StartupError,
    TensorError,
    TransportError,
    WireError,
)
from splitinfer.manifest import Manifest
from splitinfer.tensors import check_tensors
from splitinfer.topics import DEFAULT_PREFIX, Topics, topic_name
from splitinfer.wire import REQUEST, Envelope, WireTensor, encode, new_request_id

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


class EdgeAgent(Supervisor, PendingRequests):
    """The device side of one split (or several: :meth:`add_split`), on one broker connection.

    Every split of an agent shares its connection, result topic and presence; a request
    names its split in the envelope and goes to the request topic of its split's model,
    and results are matched by request id whatever split they answer. The connection
    (:class:`~edge_agent.supervisor.Supervisor`) and the requests in flight
    (:class:`~edge_agent.pending.PendingRequests`) live in their own modules; this class
    runs heads, encodes requests and turns answers into results.
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
        self._init_connection(connector or MqttConnector(
            config.broker, timeout_s=config.connect_timeout_s))
        self._init_pending(config)
        topics = self._topics
        self.request_topic = first.request_topic
        self.result_topic = topics.result(config.device_id)
        self.status_topic = topics.status(config.device_id)
        self._counters = _Counters()
        self._loop_counted: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._local = False  # an edge_only agent, started without a broker
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
                       verify: bool = True, head_backend: str | None = None) -> EdgeAgent:
        """Load ``manifest.json`` + the head from a split directory (``splitinfer split``);
        ``head_backend``: ``onnx``, ``tflite`` or ``auto`` (:func:`~edge_agent.runtime.
        choose_backend`)."""
        manifest = Manifest.load(directory)
        head = load_head(manifest, directory, threads=threads, verify=verify,
                         backend=head_backend)
        return cls(manifest=manifest, config=config, head=head, connector=connector)

    # ------------------------------------------------------------------ lifecycle

    @property
    def device_id(self) -> str:
        return self.config.device_id

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
            # The deadline is a timer on the future itself, not asyncio.wait_for: that
            # costs a loop iteration (and a future) between the answer and this task.
            timer = loop.call_at(expires, _expire, pending.future)
            try:
                reply = await pending.future
            except _Expired:
                raise DeadlineExceeded(self._deadline_message(request_id, timeout, state),
                                       split_id=manifest.split_id,
                                       device_id=self.device_id) from None
            finally:
                timer.cancel()
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


class _Expired(Exception):
    """A request's deadline passed before its answer (becomes DeadlineExceeded)."""


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_Expired())


def _samples(arrays: Mapping[str, Array]) -> int | None:
    """The samples in a call (first axis, check_tensors made them agree); None for scalars."""
    first = next(iter(arrays.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else None
