"""BundleAgent: one device holding every head of a bundle, choosing the split per request.

::

    agent = EdgeAgent.from_bundle("bundles/mnv2", config=AgentConfig(device_id="cam-7"),
                                  edge_profile="edge.json", cloud_profile="cloud.json",
                                  link="wifi")
    async with agent:
        result = await agent.infer(frame, timeout=1.0)
        result.split_id, result.served_by, result.fallback   # which split, cloud or edge, why
        agent.switches                                        # [Switch(t_s, device, from, to)]

One broker connection serves every split (:class:`~edge_agent.client.EdgeAgent` keeps a
:class:`~edge_agent.client.SplitState` per split; requests name their split, results are
matched by request id on the one result topic). :class:`~edge_agent.adaptive.Policy`
decides per request; this class measures what the policy observes (each answered
request's bytes, round trip, the worker's stamps), sends the shadow probes it asks for,
and answers locally with the bundle's edge_only split when the cloud cannot answer in time:

* not connected (at start-up too: an unreachable broker is no start-up error when the
  bundle has edge_only; the agent keeps reconnecting in the background) -> ``offline``;
* ``NoSubscriberError`` or a worker's ``unknown_split`` / ``overloaded`` /
  ``shutting_down`` -> ``no_worker``; no answer within the cloud budget -> ``timeout``
  (a request with no answer is re-sent within the budget as by any agent; but the first
  "no matching subscribers" PUBACK falls back at once, where a plain agent would re-send
  it while a worker is expected back: a local answer now beats waiting for a restart);
* the chosen split is predicted to miss the deadline -> ``deadline``.

The **cloud budget** of a request is its deadline less the local reserve (edge_only's head
time x 1.5 + 20 ms, :meth:`Policy.local_reserve_s`), so an abandoned cloud request still
leaves time for the local answer. A fallback answer is never refused for lateness: nothing
goes unanswered because the network went away.

**Costs without profiles.** Without ``edge_profile`` the agent measures every head here at
load time (median of 5 runs on random inputs after one warm-up) and the request bytes of
each split by encoding a real request envelope; without ``cloud_profile`` it assumes each
tail takes ``(1 - head_flops_share)`` of the full model's time on this device divided by
:data:`ASSUMED_CLOUD_SPEEDUP` (a server core is several times a device's), and the result
bytes of one encoded result. The observed tail times replace that guess after the first
answers. Profiles made by ``splitinfer profile`` are better: use them when you have them.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.adaptive import Decision, Observation, Policy, PolicyConfig, Switch
from edge_agent.client import (
    _AGENTS_ON_LOOP,
    AgentConfig,
    EdgeAgent,
    InferenceResult,
    Inputs,
    SplitState,
    _Pending,
    _Reply,
)
from edge_agent.runtime import HeadRuntime, fixed_batch, load_head
from edge_agent.transport import Connector, Transport
from splitinfer.bundle import Bundle
from splitinfer.compression import supported as supported_codecs
from splitinfer.costmodel import PROFILE_FORMAT, LinkEstimate, costs_from_profiles
from splitinfer.errors import (
    BadInputError,
    DeadlineExceeded,
    ErrorCode,
    ManifestError,
    NoSubscriberError,
    RemoteError,
    StartupError,
    TransportError,
)
from splitinfer.link import LinkProfile
from splitinfer.manifest import Manifest
from splitinfer.wire import REQUEST, RESULT, Envelope, WireTensor, encode

__all__ = ["BundleAgent", "ASSUMED_CLOUD_SPEEDUP", "DEFAULT_LINK", "measure_edge_profile",
           "assumed_cloud_profile"]

log = logging.getLogger(__name__)

ASSUMED_CLOUD_SPEEDUP = 4.0
DEFAULT_LINK = "wifi"
Array = Any
Profile = Mapping[str, Any] | str | Path | None
_NO_WORKER_CODES = {ErrorCode.UNKNOWN_SPLIT.value, ErrorCode.OVERLOADED.value,
                    ErrorCode.SHUTTING_DOWN.value}
_MEASURED: dict[tuple[str, tuple[tuple[str, int], ...]], dict[str, Any]] = {}
_PROBE: contextvars.ContextVar[bool] = contextvars.ContextVar("splitinfer_probe",
                                                              default=False)


class BundleAgent(EdgeAgent):
    """Every split of a bundle on one connection; the policy picks one per request."""

    def __init__(self, *, bundle: Bundle, manifests: Mapping[str, Manifest],
                 heads: Mapping[str, HeadRuntime | None], config: AgentConfig, policy: Policy,
                 connector: Connector | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        first = manifests[policy.current]
        super().__init__(manifest=first, config=config, head=heads.get(first.split_id),
                         connector=connector)
        for split_id, manifest in manifests.items():
            if split_id != first.split_id:
                self.add_split(manifest, heads.get(split_id))
        self.bundle = bundle
        self.policy = policy
        self._clock = clock or policy.clock
        self.served: Counter[str] = Counter()  # split_id -> calls it answered
        self.served_locally = 0
        self.fallbacks: Counter[str] = Counter()
        self.probes = 0
        self._last_inputs: dict[str, Array] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()  # the prober re-reads next_probe_at()

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, bundle_dir: str | Path, *, config: AgentConfig, edge_profile: Profile = None,
             cloud_profile: Profile = None, link: str | None = None,
             policy: PolicyConfig | None = None, split: str | None = None,
             heads: Mapping[str, HeadRuntime] | None = None,
             connector: Connector | None = None, threads: int | None = None,
             clock: Callable[[], float] | None = None) -> BundleAgent:
        """See :meth:`EdgeAgent.from_bundle` (module docstring for the costs)."""
        bundle = Bundle.load(bundle_dir)
        manifests = {s.split_id: bundle.manifest(s) for s in bundle}
        _check_same_io(manifests)
        loaded: dict[str, HeadRuntime | None] = {}
        for s in bundle:
            given = (heads or {}).get(s.split_id)
            loaded[s.split_id] = given if given is not None else load_head(
                manifests[s.split_id], bundle.path(s), threads=threads)
        edge = _read_profile(edge_profile, "edge")
        cloud = _read_profile(cloud_profile, "cloud")
        if edge is None:  # measured once per bundle and set of head objects (a fleet)
            key = (str(bundle.root.resolve()), tuple((k, id(h)) for k, h in loaded.items()))
            edge = _MEASURED.get(key)
            if edge is None:
                edge = _MEASURED[key] = measure_edge_profile(bundle, manifests, loaded)
        if cloud is None:
            cloud = assumed_cloud_profile(bundle, manifests, loaded, edge)
        costs = {c.split_id: c for c in costs_from_profiles(edge, cloud)}
        missing = [s for s in bundle.ids if s not in costs]
        if missing:
            raise BadInputError(f"the profiles have no entry for split(s) {missing} of bundle "
                                f"{bundle.root}; profile this bundle (splitinfer profile)")
        prior = LinkEstimate.from_profile(LinkProfile.parse(link or DEFAULT_LINK))
        pinned = bundle.get(split).split_id if split is not None else None
        chooser = Policy([costs[s] for s in bundle.ids], prior, policy, clock,
                         device=config.device_id, pinned=pinned)
        return cls(bundle=bundle, manifests=manifests, heads=loaded, config=config,
                   policy=chooser, connector=connector, clock=clock)

    # ------------------------------------------------------------------ lifecycle

    @property
    def switches(self) -> list[Switch]:
        return self.policy.switches

    async def start(self) -> None:
        """As EdgeAgent's; an unreachable broker only means answering locally meanwhile."""
        try:
            await super().start()
        except StartupError:
            if self.policy.edge_only is None or self._closed:
                raise
            self.policy.set_connected(self._clock(), False)
            self._supervisor = asyncio.create_task(self._supervise(None),
                                                   name=f"edge-agent:{self.device_id}")
            self._loop_counted = asyncio.get_running_loop()
            _AGENTS_ON_LOOP[self._loop_counted] = _AGENTS_ON_LOOP.get(self._loop_counted, 0) + 1
        if self._supervisor is not None and self._prober is None and self.policy.cloud:
            self._prober = asyncio.create_task(self._probe_loop(),
                                               name=f"edge-prober:{self.device_id}")

    async def close(self) -> None:
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        await super().close()

    async def _establish(self, transport: Transport) -> None:
        await super()._establish(transport)
        self.policy.set_connected(self._clock(), True)
        self._poke.set()

    def _no_subscriber_fails(self, now: float) -> bool:
        """With an edge_only split, "no matching subscribers" falls back at once."""
        return self.policy.edge_only is not None or super()._no_subscriber_fails(now)

    def _detach(self, transport: Transport) -> None:
        lost = self._transport is transport
        super()._detach(transport)
        if lost:
            self.policy.set_connected(self._clock(), False)

    # ------------------------------------------------------------------ inference

    async def infer(self, inputs: Inputs, *, timeout: float | None = None,
                    split: str | None = None,
                    compression: str | None = None) -> InferenceResult:
        """Answer ``inputs`` through the split the policy picks (``split``: this one), in the
        cloud or, when it cannot answer in time, locally (``served_by="edge"``).
        ``compression`` overrides the chosen split's manifest for a cloud request
        (:meth:`EdgeAgent.compression_for`)."""
        started = time.perf_counter()
        timeout = self._timeout(timeout)
        self._check_started()
        arrays = self.check_inputs(inputs)
        if self._last_inputs is None:
            self._poke.set()
        self._last_inputs = arrays
        now = self._clock()
        decision = self.policy.decide(now, timeout)
        if split is not None:  # this split, unless the cloud is known to be unusable
            sid = self.split_state(self.bundle.get(split).split_id).split_id
            down = self.policy.down if self.splits[sid].kind != "edge_only" else ""
            decision = Decision(sid, down if self.policy.edge_only else "")
        state = self.splits[decision.split_id]
        if decision.fallback:
            return await self._answer_locally(arrays, started, decision.fallback)
        if state.kind == "edge_only":
            result = await self._infer_split(state, arrays, started=started, timeout=timeout)
            self.policy.observe_local(self._clock(), result.timings.get("head", 0.0))
            return self._count(result)
        if not self.connected and self.policy.edge_only is not None:
            self.policy.set_connected(now, False)
            return await self._answer_locally(arrays, started, "offline")
        budget = timeout - self.policy.local_reserve_s() if self.policy.edge_only else timeout
        if budget <= 0:
            budget = timeout  # no room for both: the cloud keeps the whole deadline
        self.compression_for(state, compression)  # a bad override is the caller's error
        try:
            return self._count(await self._infer_split(state, arrays, started=started,
                                                       timeout=budget,
                                                       compression=compression))
        except Exception as exc:
            reason = self._reason(exc)
            if reason is None or self.policy.edge_only is None:
                raise
            return await self._answer_locally(arrays, started, reason)

    async def _answer_locally(self, arrays: Mapping[str, Array], started: float,
                     reason: str) -> InferenceResult:
        """The edge_only answer; late rather than none (an hour is no deadline to refuse)."""
        edge = self.policy.edge_only
        if edge is None:
            raise TransportError(f"edge agent {self.device_id}: the cloud cannot answer "
                                 f"({reason}) and bundle {self.bundle.root} has no edge_only "
                                 "split to answer locally", device_id=self.device_id)
        result = await self._infer_split(self.splits[edge], arrays, started=started,
                                         timeout=3600.0)
        self.policy.observe_local(self._clock(), result.timings.get("head", 0.0))
        self.fallbacks[reason] += 1
        return self._count(dataclasses.replace(result, fallback=reason))

    def _count(self, result: InferenceResult) -> InferenceResult:
        self.served[result.split_id] += 1
        if result.served_by == "edge":
            self.served_locally += 1
        return result

    def _reason(self, exc: BaseException) -> str | None:
        """The fallback a failed cloud request calls for (None: not the network's fault)."""
        if isinstance(exc, NoSubscriberError):
            return "no_worker"
        if isinstance(exc, DeadlineExceeded):
            return "timeout" if self.connected else "offline"
        if isinstance(exc, RemoteError):
            if exc.code in _NO_WORKER_CODES:
                return "no_worker"
            return "timeout" if exc.code == ErrorCode.DEADLINE_EXPIRED.value else None
        if isinstance(exc, TransportError):
            return "offline"
        return None

    # ------------------------------------------------------------------ observing

    def _observe_reply(self, pending: _Pending, reply: _Reply, result: InferenceResult) -> None:
        state = pending.split
        if state is None:
            return
        stamps = reply.envelope.timestamps
        uplink = None
        if pending.publishes == 1 and "recv" in stamps and "sent" in stamps:
            uplink = stamps["recv"] - stamps["sent"]
        t = result.timings
        now = self._clock()
        self.policy.observe(Observation(
            now, state.split_id, len(pending.payload), reply.size,
            t.get("network", 0.0), uplink_s=uplink, queue_s=t.get("queue"),
            tail_s=t.get("tail"), head_s=t.get("head") or None, probe=_PROBE.get(),
            sent=now - (time.perf_counter() - pending.sent)))
        self._poke.set()

    def _observe_failure(self, pending: _Pending, exc: BaseException) -> None:
        reason = self._reason(exc)
        if reason is not None and pending.split is not None:
            self.policy.observe_failure(self._clock(), pending.split.split_id, reason,
                                        probe=_PROBE.get())
            self._poke.set()

    # ------------------------------------------------------------------ probing

    async def _probe_loop(self) -> None:
        """Send the shadow requests the policy asks for, when it asks (``next_probe_at``);
        woken early by every observation, failure, reconnect and first input."""
        while True:
            at = self.policy.next_probe_at(self._clock())
            wait = 1.0 if at is None else min(1.0, max(0.0, at - self._clock()))
            self._poke.clear()
            # asyncio.wait, not wait_for: 3.11's wait_for can swallow a cancel that races
            # the event being set, and close() would wait for this task forever
            waiter = asyncio.ensure_future(self._poke.wait())
            try:
                await asyncio.wait({waiter}, timeout=wait + 0.001)
            finally:
                waiter.cancel()
            if self._closed:
                return
            arrays = self._last_inputs
            if arrays is None or not self.connected:
                continue
            now = self._clock()
            split = self.policy.probe_due(now)
            if split is None:
                continue
            self.policy.probe_started(now, split)
            self.probes += 1
            self._spawn(self._probe(self.splits[split], arrays),
                        f"edge-probe:{self.device_id}")

    async def _probe(self, state: SplitState, arrays: Mapping[str, Array]) -> None:
        _PROBE.set(True)  # this task's context only: the hooks mark the observation
        try:
            await self._infer_split(state, arrays, started=time.perf_counter(),
                                    timeout=self.policy.config.probe_timeout_s)
        except Exception as exc:  # measured by the hooks; a probe never fails a call
            log.debug("%s: probe through %s failed: %s", self.device_id, state.split_id, exc)

    # ------------------------------------------------------------------ reporting

    def summary(self) -> dict[str, Any]:
        """Which splits served how many calls, how many locally and why, the switches."""
        return {
            "splits_used": dict(sorted(self.served.items())),
            "served_locally": self.served_locally,
            "fallbacks": dict(sorted(self.fallbacks.items())),
            "switches": [s.to_dict() for s in self.switches],
            "probes": self.probes,
            "current": self.policy.current,
            "pinned": self.policy.pinned,
            "predicted_ms": {s: round(v * 1e3, 3) for s, v in
                             self.policy.predictions().items()},
            "link_estimate": self.policy.link_estimate(),
        }


# ---- costs ----------------------------------------------------------------------------


def _read_profile(profile: Profile, side: str) -> Mapping[str, Any] | None:
    if profile is None or isinstance(profile, Mapping):
        return profile
    try:
        data = json.loads(Path(profile).read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{side} profile {profile}: cannot read it as JSON ({exc}); make "
                            f"one with `splitinfer profile --side {side}`") from None
    if not isinstance(data, Mapping):
        raise BadInputError(f"{side} profile {profile}: expected a JSON object")
    return data


def _check_same_io(manifests: Mapping[str, Manifest]) -> None:
    signatures = {sid: ([(s.name, s.dtype) for s in m.inputs],
                        [(s.name, s.dtype) for s in m.outputs]) for sid, m in manifests.items()}
    if len({json.dumps(v) for v in signatures.values()}) > 1:
        raise ManifestError(f"the splits of a bundle must share the model's inputs and "
                            f"outputs; got {signatures}")


def _sample_inputs(manifest: Manifest, seed: int = 0) -> dict[str, Array]:
    """One call's worth of random inputs (the split's fixed batch, else 1 sample)."""
    rng = np.random.default_rng(seed)
    batch = fixed_batch(manifest) or 1
    out: dict[str, Array] = {}
    for spec in manifest.inputs:
        dims = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = rng.random(dims).astype(dtype)
        else:
            out[spec.name] = rng.integers(0, 2, dims).astype(dtype)
    return out


def _request_bytes(manifest: Manifest, cut: Mapping[str, Array]) -> int:
    env = Envelope(kind=REQUEST, request_id="0" * 32, device_id="d" * 24,
                   split_id=manifest.split_id, deadline=time.time(), reply_to="r" * 40,
                   tensors=[WireTensor(s.name, np.asarray(cut[s.name]), s.quantization,
                                       codec=manifest.codec_for(s.name)) for s in manifest.cut],
                   timestamps={"head_start": 0.0, "head_end": 0.0, "sent": 0.0})
    # compressed as EdgeAgent.compression_for sends it: the manifest's codec, if installed
    how = manifest.compression if manifest.compression in supported_codecs() else None
    return len(encode(env, compression=how))


def measure_edge_profile(bundle: Bundle, manifests: Mapping[str, Manifest],
                         heads: Mapping[str, HeadRuntime | None], runs: int = 5,
                         ) -> dict[str, Any]:
    """An edge profile (contract format) measured here: head p50 and request bytes per split.

    Share it between devices that hold the same heads (the fleet) instead of measuring each.
    """
    splits: dict[str, Any] = {}
    for s in bundle:
        manifest, head = manifests[s.split_id], heads[s.split_id]
        inputs = _sample_inputs(manifest)
        times: list[float] = []
        cut: Mapping[str, Array] = inputs
        if head is not None and s.kind != "cloud_only":
            head.run({n: inputs[n] for n in head.input_names})  # warm-up
            for _ in range(runs):
                t0 = time.perf_counter()
                cut = head.run({n: inputs[n] for n in head.input_names})
                times.append(time.perf_counter() - t0)
        head_ms = statistics.median(times) * 1e3 if times else 0.0
        splits[s.split_id] = {
            "kind": s.kind, "dir": s.dir, "input_codec": s.input_codec,
            "head_ms": {"p50": head_ms, "n": len(times)},
            "request_bytes": 0 if s.kind == "edge_only" else _request_bytes(manifest, cut),
            "outputs": {k: np.asarray(v) for k, v in cut.items()} if s.kind == "edge_only"
            else None,
        }
    result_bytes = _result_bytes(bundle, manifests, splits)
    for entry in splits.values():
        entry.pop("outputs")
        entry["result_bytes_estimate"] = result_bytes
    return {"format": PROFILE_FORMAT, "side": "edge", "model": bundle.model,
            "source_sha256": bundle.source_sha256, "measured": "at start-up", "splits": splits}


def _result_bytes(bundle: Bundle, manifests: Mapping[str, Manifest],
                  splits: Mapping[str, Any]) -> int:
    outputs = next((e["outputs"] for e in splits.values() if e.get("outputs")), None)
    if outputs is None:  # no edge_only: the declared output sizes, batch 1
        manifest = next(iter(manifests.values()))
        outputs = {s.name: np.zeros([d if isinstance(d, int) and d > 0 else 1
                                     for d in s.shape], np.dtype(s.dtype))
                   for s in manifest.outputs}
    env = Envelope(kind=RESULT, request_id="0" * 32, device_id="d" * 24, split_id="s" * 40,
                   tensors=[WireTensor(k, v) for k, v in outputs.items()],
                   timestamps={k: 0.0 for k in ("head_start", "head_end", "sent", "recv",
                                                "tail_start", "tail_end", "reply")})
    return len(encode(env))


def assumed_cloud_profile(bundle: Bundle, manifests: Mapping[str, Manifest],
                          heads: Mapping[str, HeadRuntime | None],
                          edge: Mapping[str, Any]) -> dict[str, Any]:
    """A cloud profile guessed from the edge one: tail = full model here x (1 - FLOPs share)
    / :data:`ASSUMED_CLOUD_SPEEDUP`; result bytes of one encoded result."""
    entries = edge.get("splits", {})
    full_s = max((float(e.get("head_ms", {}).get("p50", 0.0)) for e in entries.values()
                  if e.get("kind") == "edge_only"), default=1.0)
    result_bytes = next((int(e["result_bytes_estimate"]) for e in entries.values()
                         if "result_bytes_estimate" in e), None)
    if result_bytes is None:
        result_bytes = _result_bytes(bundle, manifests, {})
    splits: dict[str, Any] = {}
    for s in bundle:
        if s.kind == "edge_only":
            continue
        share = s.head_flops_share if s.head_flops_share is not None else 0.5
        splits[s.split_id] = {"kind": s.kind, "tail_ms": {
            "p50": full_s * (1.0 - share) / ASSUMED_CLOUD_SPEEDUP}, "result_bytes": result_bytes}
    if not splits:
        splits["-"] = {"kind": "split", "tail_ms": {"p50": 0.0}, "result_bytes": 0}
    return {"format": PROFILE_FORMAT, "side": "cloud", "model": bundle.model,
            "source_sha256": edge.get("source_sha256"), "assumed": True, "splits": splits}

