"""The fleet simulator: N virtual devices in one asyncio process against a real broker.

::

    config = FleetConfig(artifacts="artifacts/digits", devices=1000, rate=1.0,
                         duration_s=60, replay=True)
    result = asyncio.run(Fleet(config).run())       # FleetResult: .report (a dict), raw data
    result.report["p99_ms"], result.report["lost"], result.report["stages"]

Each device is an :class:`~edge_agent.EdgeAgent` (the real client: envelopes, topics,
deadlines, reconnects and re-publishing) with its own client id and MQTT connection; many
share one head runtime. Devices send on their own seeded arrival process
(:mod:`simulators.arrivals`; ``--rate`` is per device), open loop: a slow answer does not
delay the next request. Without ``broker`` the fleet starts a mosquitto (else the embedded
amqtt) and ``workers`` cloud workers, each ``splitinfer cloud serve`` in its own process.

**Replay** sends recorded head outputs (:meth:`EdgeAgent.infer_activation`): a few inputs
go through the head once, and devices cycle through the recorded activations, so a large
fleet costs no head compute. The head stage is then *emulated*: a device waits the head
time recorded for that sample times ``speed`` (``asyncio.sleep`` when it is 1 ms or more;
shorter times are added to the figures without waiting).

**Speed factor** ``speed = F`` emulates a device F times slower than this machine: the head
runs for real, then its thread sleeps ``(F - 1) * head_time`` (:class:`SlowHead`), so the
device's head time is F times this machine's without spending that CPU here.

**Links**: each ``links`` entry (a :class:`~splitinfer.link.LinkProfile` spec) is one
shaping proxy (:mod:`simulators.shaper`) in this process; devices are split into
contiguous, equal groups, one per entry, and connect through their group's proxy.

**Accounting**, per request, by what the agent's call ended with: ``answered`` (a result),
``errors`` (an error result or a failure, by kind), ``timeouts`` (no result by the
deadline), and ``lost`` = ``sent - answered - errors - timeouts``: requests with no outcome
at all when the run ended (cancelled after ``drain_s``). Requests scheduled during the
warm-up are counted apart and left out of every figure.

**Baselines**: a ``cloud_only`` split (no head) sends each sample's inputs as the cut; an
``edge_only`` split (no tail) answers on the device: the fleet then starts no broker, no
worker and no link proxy, and a request's latency is its head time (the whole model).

**Samples** go one per request (a split fixed at a batch B > 1 pads each to B); the
reference predictions run the unsplit model at its own fixed batch, if it has one. Keys
of ``--input`` other than the model inputs and ``label`` are ignored, with one warning.

**Latency** of a request runs from its *scheduled* arrival to the result (so the fleet's
own lag is charged, never hidden). Stages: see :data:`STAGE_SOURCES`.

**Bundles** (:mod:`simulators.fleet_bundle`): with a bundle as ``artifacts`` the devices
are adaptive (``EdgeAgent.from_bundle``: every head, the split chosen per request, answers
on the device when the cloud cannot make it), sharing one loaded head per split; the
workers serve every tail. ``split`` pins one split of the bundle instead (a plain agent
of that split, workers serving that split). The report then says which split served how
many requests (``splits_used``, ``per_split``), how many were answered on the device
(``served_locally``), every device's ``switches``, and, per fault, what happened to the
requests due during it (``during_faults``).

**Link schedule** (``link_schedule``, :mod:`simulators.link_schedule`): every device link
proxy follows it (without ``links`` the proxies start from its first entry). Its times, the
faults' and the switches' ``t_s`` all count from the start of the measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from simulators.arrivals import ArrivalProcess
from simulators.faults import FAULT_KINDS, FaultInjector, FaultPlan
from simulators.fleet_bundle import (
    SplitSizes,
    Target,
    adaptive_summary,
    derived_times,
    load_heads,
    read_profiles,
    record_connectivity,
    resolve,
    source_model,
    split_sizes,
    switch_list,
    warm_up_tails,
)
from simulators.fleet_stats import (
    RAW_STAGES,
    REPORT_STAGES,
    STAGE_SOURCES,
    FleetResult,
    Tally,
    accuracy,
    agent_counters,
    agent_retry,
    counters_since,
    fault_windows,
    split_figures,
    write_outputs,
)
from simulators.fleet_support import (
    CpuMeter,
    Inputs,
    SlowHead,
    WorkerPool,
    load_inputs,
    random_inputs,
    record_head_outputs,
    reference_predictions,
)
from simulators.fleet_transport import connector_for, pick_transport
from splitinfer.errors import (
    BadInputError,
    DeadlineExceeded,
    RemoteError,
    SplitInferError,
    StartupError,
)
from splitinfer.link import LinkProfile
from splitinfer.topics import DEFAULT_PREFIX, Topics

__all__ = ["FleetConfig", "Fleet", "FleetResult", "Progress", "STAGE_SOURCES",
           "REPORT_STAGES", "FAULT_EXTRA_KINDS"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]

# link-cut (cut every device link) is simulators.faults' own kind where it has one
FAULT_EXTRA_KINDS: tuple[str, ...] = ("restart-worker",) + \
    (() if "link-cut" in FAULT_KINDS else ("link-cut",))
LINK_FAULTS = ("cut-link", "stall-link", "link-cut")
PROTOCOLS = ("3.1.1", "5", "auto")
_HEAD_WAIT_MIN_S = 1e-3


@dataclass(frozen=True, kw_only=True)
class FleetConfig:
    """One fleet run; maps one-to-one onto ``splitinfer fleet`` flags."""

    artifacts: Path
    devices: int = 10
    rate: float = 1.0  # requests/s per device
    duration_s: float = 10.0  # the measured window
    arrivals: str = "poisson"  # a kind or an ArrivalProcess spec; `rate` overrides its rate
    seed: int = 0
    replay: bool = False
    speed: float = 1.0
    links: tuple[str, ...] = ()
    broker: str | None = None  # None: start one
    embedded_broker: bool = False
    faults: str = ""
    input: Path | None = None
    reference: Path | None = None
    split: str | None = None  # which split under `artifacts` (default: the only one);
    # with a bundle: pin this split (default: adaptive devices)
    link_schedule: str = ""  # e.g. "wifi@0s,3g@20s,wifi@40s" (from the window's start)
    edge_profile: Path | None = None  # profile JSONs the adaptive devices plan with
    cloud_profile: Path | None = None
    reconnect_max_s: float | None = None  # devices' longest reconnect backoff (agent's own)
    retry_s: float | None = None  # devices' first re-send on silence (agent's own default)
    retry_max_s: float | None = None
    workers: int = 1  # started by the fleet; 0 = workers already serve the broker
    worker_threads: int = 1
    max_batch: int | None = None
    max_delay_ms: float | None = None
    timeout_s: float = 10.0
    drain_s: float | None = None  # after the window; default timeout_s + 1
    warmup_s: float = 1.0
    connect_rate: float = 1000.0  # connections per second while the fleet ramps up
    prefix: str | None = None
    mqtt: str = "3.1.1"
    transport: str = "auto"  # auto = paho: the one client (splitinfer.mqtt_client)
    qos: int = 1
    presence: bool = True
    record: int = 16  # replay: head outputs recorded
    out: Path | None = None
    png: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "artifacts", Path(self.artifacts))
        if self.devices < 1:
            raise BadInputError(f"devices {self.devices}: expected at least 1")
        for name in ("rate", "duration_s", "timeout_s", "connect_rate"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise BadInputError(f"{name} {value!r}: expected a number > 0")
        if not (np.isfinite(self.warmup_s) and self.warmup_s >= 0):
            raise BadInputError(f"warmup_s {self.warmup_s!r}: expected seconds >= 0")
        if self.drain_s is not None and not self.drain_s >= 0:
            raise BadInputError(f"drain_s {self.drain_s!r}: expected seconds >= 0")
        if not (np.isfinite(self.speed) and self.speed >= 1.0):
            raise BadInputError(f"speed {self.speed!r}: expected a factor >= 1 (1 = this "
                                "machine, 4 = a device four times slower)")
        if self.reconnect_max_s is not None and not self.reconnect_max_s > 0:
            raise BadInputError(f"reconnect_max_s {self.reconnect_max_s!r}: expected s > 0")
        for name in ("retry_s", "retry_max_s"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value >= 0):
                raise BadInputError(f"{name} {value!r}: expected seconds >= 0 (0 = never)")
        if self.workers < 0 or self.worker_threads < 0 or self.record < 1:
            raise BadInputError("expected workers >= 0, worker_threads >= 0, record >= 1")
        if self.workers == 0 and self.broker is None:
            raise BadInputError("workers 0 means workers already serve the broker; give "
                                "--broker URL too")
        if self.mqtt not in PROTOCOLS:
            raise BadInputError(f"mqtt {self.mqtt!r}: expected one of {', '.join(PROTOCOLS)}")
        pick_transport(self.transport)  # BadInputError naming the choices
        if self.qos not in (0, 1, 2):
            raise BadInputError(f"qos {self.qos}: expected 0, 1 or 2")
        if self.embedded_broker and self.workers > 1:
            raise BadInputError("the embedded broker has no shared subscriptions: use one "
                                "worker, or mosquitto")
        self.arrival_process()
        self.link_profiles()
        self.fault_plan()
        self.schedule()

    def schedule(self) -> Any:
        """The :class:`~simulators.link_schedule.LinkSchedule`, None without one."""
        if not self.link_schedule.strip():
            return None
        from simulators.link_schedule import LinkSchedule

        return LinkSchedule.parse(self.link_schedule)

    def arrival_process(self) -> ArrivalProcess:
        return ArrivalProcess.parse(self.arrivals).with_rate(self.rate)

    def link_profiles(self) -> list[LinkProfile]:
        return [LinkProfile.parse(spec) for spec in self.links]

    def fault_plan(self) -> FaultPlan:
        return FaultPlan.parse(self.faults, extra_kinds=FAULT_EXTRA_KINDS)

    @property
    def drain(self) -> float:
        return self.timeout_s + 1.0 if self.drain_s is None else self.drain_s


@dataclass(frozen=True)
class Progress:
    elapsed_s: float
    total_s: float  # warm-up + window
    sent: int
    answered: int
    failed: int
    phase: str  # "warmup", "run", "drain"


@dataclass(eq=False)
class _Group:
    name: str
    profile: LinkProfile | None
    url: str
    proxy: Any = None  # ShapingProxy
    up_s: float = 0.0  # derived one-way time of a request
    down_s: float = 0.0  # and of a result
    devices: int = 0
    connector: Any = None


@dataclass(eq=False)
class _Device:
    index: int
    agent: Any  # EdgeAgent
    group: int
    sent: int = 0


class Fleet:
    """Runs one :class:`FleetConfig`; see the module docstring."""

    def __init__(self, config: FleetConfig, *,
                 progress: Callable[[Progress], None] | None = None) -> None:
        self.config = config
        self.progress = progress
        self.token = secrets.token_hex(3)
        self.warm = Tally()
        self.measured = Tally()
        self._tasks: set[asyncio.Task[None]] = set()
        self._groups: list[_Group] = []
        self._devices: list[_Device] = []
        self._phase = "warmup"
        self._t0 = 0.0  # perf_counter at the start of the schedule (warm-up included)
        self._window_start = 0.0  # perf_counter at the start of the measured window
        self.transport = pick_transport(config.transport)  # as the report names it
        self._sizes: dict[str, SplitSizes] = {}
        self._derived_cache: dict[tuple[int, str], tuple[float, float]] = {}
        self._link_schedule: Any = None
        self._applied: list[tuple[float, LinkProfile]] = []  # link changes as applied
        self._connectivity: list[tuple[float, str, bool]] = []  # (perf_counter, device, up)
        self._counters0: dict[str, int | None] = {}  # agents' counters as the window began

    def _link_changed(self, at_s: float, profile: LinkProfile) -> None:
        self._applied.append((at_s, profile))

    # ------------------------------------------------------------------ preparation

    def _prefix(self) -> str:
        if self.config.prefix:
            return self.config.prefix
        return DEFAULT_PREFIX if self.config.workers == 0 else f"fleet{self.token}"

    def _with_protocol(self, url: str) -> str:
        if self.config.mqtt == "auto" or "protocol=" in url:
            return url
        return f"{url}{'&' if '?' in url else '?'}protocol={self.config.mqtt}"

    def _sizes_for(self, target: Target, topics: Topics) -> dict[str, SplitSizes]:
        """Request/result sizes of every split the devices may use (the last device's ids:
        the longest)."""
        cfg = self.config
        device = f"{self.token}-{cfg.devices:05d}"
        codec: dict[str, int | None] = {}
        if target.bundle is not None:
            for s in target.bundle.splits:
                codec[s.split_id] = s.bytes_per_sample if s.input_codec != "raw" else None
        return {split_id: split_sizes(manifest, topics=topics, device_id=device,
                                      replay=cfg.replay, qos=cfg.qos,
                                      codec_bytes=codec.get(split_id))
                for split_id, (_, manifest) in target.manifests.items()}

    def _derived(self, group: _Group, split_id: str, due_s: float) -> tuple[float, float]:
        """Derived one-way link times of a ``split_id`` request due at ``due_s`` (from the
        window's start) on ``group``'s link, as the schedule has it then."""
        profile = group.profile
        if self._link_schedule is not None and group.proxy is not None:
            scheduled = self._link_schedule.profile_at(due_s)
            if scheduled is not None:
                profile = scheduled
        key = (id(profile), split_id)
        times = self._derived_cache.get(key)
        if times is None:
            sizes = self._sizes.get(split_id)
            times = (0.0, 0.0) if sizes is None else derived_times(profile, sizes)
            self._derived_cache[key] = times
        return times

    def _agent(self, index: int, group: _Group, target: Target, head: Any,
               heads: dict[str, Any], prefix: str, profiles: dict[str, Any]) -> Any:
        from edge_agent import AgentConfig, EdgeAgent

        cfg = self.config
        config = AgentConfig(device_id=f"{self.token}-{index:05d}", broker=group.url,
                             prefix=prefix, timeout_s=cfg.timeout_s, qos=cfg.qos,
                             presence=cfg.presence)
        if cfg.reconnect_max_s is not None:
            config = dataclasses.replace(config, reconnect_max_s=cfg.reconnect_max_s,
                                         reconnect_min_s=min(config.reconnect_min_s,
                                                             cfg.reconnect_max_s))
        config = agent_retry(config, cfg.retry_s, cfg.retry_max_s)
        if target.mode == "adaptive":
            shaped = group.profile is not None and group.profile.spec() != "up=inf"
            # the prior: the link the device starts on (loopback or unshaped: lan)
            agent = EdgeAgent.from_bundle(
                target.split_dir, config=config, heads=heads, connector=group.connector,
                link=group.profile.spec() if shaped and group.profile else "lan",
                clock=time.perf_counter, **profiles)
            record_connectivity(agent, self._connectivity)
            return agent
        return EdgeAgent(manifest=target.manifest, head=None if cfg.replay else head,
                         connector=group.connector, config=config)

    # ------------------------------------------------------------------ the run

    async def run(self) -> FleetResult:
        cfg = self.config
        loop = asyncio.get_running_loop()
        target = resolve(cfg.artifacts, cfg.split, replay=cfg.replay)
        split_dir, manifest = target.split_dir, target.manifest
        out = cfg.out or Path(f"reports/fleet-{time.strftime('%Y%m%d-%H%M%S')}-{self.token}")
        out.mkdir(parents=True, exist_ok=True)
        inputs = load_inputs(cfg.input, manifest) if cfg.input else \
            random_inputs(manifest, max(cfg.record, 1), cfg.seed)
        if inputs.ignored:
            log.warning("--input %s: ignoring %s (neither inputs of %s %s nor 'label')",
                        inputs.source, list(inputs.ignored), manifest.model,
                        [s.name for s in manifest.inputs])
        local = target.local  # the whole model on the device: no broker
        reference = cfg.reference or source_model(target)
        ref_pred = reference_predictions(reference, inputs) if reference is not None and \
            (inputs.labels is not None or cfg.reference is not None) else None
        from edge_agent import load_head

        head: Any = None
        heads: dict[str, Any] = {}
        recorded: list[dict[str, Array]] = []
        head_times: list[float] = []
        if target.mode == "adaptive":
            heads = load_heads(target.manifests, speed=cfg.speed)
        else:
            head = load_head(manifest, split_dir, threads=1)
            if cfg.replay:
                recorded, head_times = record_head_outputs(head, inputs, cfg.record)
            elif cfg.speed > 1.0:
                head = SlowHead(head, cfg.speed)
        if cfg.speed > 1.0 and not cfg.replay:
            from concurrent.futures import ThreadPoolExecutor

            # sleeping heads hold a thread each; the default pool (cores + 4) would queue them
            loop.set_default_executor(ThreadPoolExecutor(max(8, min(cfg.devices, 256)),
                                                         thread_name_prefix="fleet-head"))
        profiles = read_profiles(cfg.edge_profile, cfg.cloud_profile)
        _raise_file_limit(3 * cfg.devices + 256)
        prefix = self._prefix()
        topics = Topics(prefix)
        self._sizes = {} if local else self._sizes_for(target, topics)
        if local:
            self._sizes = {manifest.split_id: SplitSizes(manifest.split_id, "edge_only",
                                                         0, 0, 0, 0)}
        sizes = self._sizes.get(manifest.split_id) if target.mode != "adaptive" else None
        checking = inputs.labels is not None or ref_pred is not None
        plan = cfg.fault_plan()
        self._link_schedule = cfg.schedule()
        events: list[Any] = []
        broker: Any = None
        pool: WorkerPool | None = None
        async with contextlib.AsyncExitStack() as stack:
            broker, url, broker_kind = await self._start_broker(stack, local=local)
            if cfg.workers and not local:
                pool = WorkerPool(count=cfg.workers, broker=self._with_protocol(url),
                                  artifacts=target.worker_artifacts, prefix=prefix,
                                  group="" if broker_kind.startswith("embedded") else "fleet",
                                  log_dir=out, threads=cfg.worker_threads,
                                  extra=self._worker_flags(broker_kind))
                stack.callback(pool.stop)
                await asyncio.to_thread(pool.start)
            if local:
                self._groups.append(_Group("local", None, url))
            else:
                await self._start_links(stack, url, plan, sizes)
            for index in range(cfg.devices):
                group = index * len(self._groups) // cfg.devices
                self._groups[group].devices += 1
                agent = self._agent(index, self._groups[group], target, head, heads, prefix,
                                    profiles)
                self._devices.append(_Device(index, agent, group))
            stack.push_async_callback(self._close_devices)
            connect_s = await self._connect_all()
            await self._warm_up_path(recorded, inputs, target, heads, url, prefix)
            schedule_t, schedule_dev = self._schedule()
            _freeze_setup()
            stack.callback(gc.unfreeze)
            meter = CpuMeter(self._cpu_roles(broker, broker_kind, pool))
            links = {g.name: g.proxy for g in self._groups if g.proxy}
            injector = FaultInjector(broker=broker, workers=pool.procs if pool else [],
                                     links=links,
                                     restart_worker=pool.restart if pool else None)
            if "link-cut" in FAULT_EXTRA_KINDS:
                injector.register("link-cut",
                                  lambda f: injector.cut_link(None, f.duration_s or 0.0))
            if pool is not None:
                injector.register("restart-worker", lambda f: pool.spawn_and_wait())
            self._t0 = time.perf_counter()
            window_start = self._t0 + cfg.warmup_s
            self._window_start = window_start
            ticker = asyncio.create_task(self._tick(meter, window_start), name="fleet-tick")
            faults_task: asyncio.Task[list[Any]] | None = None
            schedule_task: asyncio.Task[Any] | None = None
            try:
                dispatch = asyncio.create_task(
                    self._dispatch(schedule_t, schedule_dev, recorded, head_times, inputs,
                                   checking), name="fleet-dispatch")
                await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
                self._phase = "run"
                meter.start()
                self._counters0 = self._retry_counters()
                if len(plan):
                    faults_task = asyncio.create_task(
                        injector.run(plan, t0=loop.time()), name="fleet-faults")
                if self._link_schedule is not None and links:
                    schedule_task = asyncio.create_task(
                        self._link_schedule.run(list(links.values()), loop.time(),
                                                on_change=self._link_changed),
                        name="fleet-link-schedule")
                await dispatch
                self._phase = "drain"
                await self._drain(cfg.drain)
                meter.stop()
                if faults_task is not None:
                    if not faults_task.done():
                        log.warning("faults planned past the end of the run were skipped")
                    faults_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await faults_task
                    events = [e.as_dict() for e in injector.events]
            finally:
                for task in (ticker, schedule_task):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
                for task in list(self._tasks):
                    task.cancel()
            retries = self._retry_counters()
            link_stats = [self._link_report(g) for g in self._groups]
            agents = [d.agent for d in self._devices]
            switches = switch_list(agents, window_start)
            adaptive = adaptive_summary(agents, self._connectivity, window_start) \
                if target.mode == "adaptive" else None
        result = self._result(
            target=target, url=url, broker_kind=broker_kind,
            connect_s=connect_s, cpu=meter.report(), events=events, retries=retries,
            link_stats=link_stats, inputs=inputs, ref_pred=ref_pred, reference=reference,
            window_start=window_start, sizes=sizes, head_times=head_times, prefix=prefix,
            plan=plan, switches=switches, pool=pool)
        result.report["adaptive"] = adaptive
        result.report["out"] = str(out)
        write_outputs(result, out, png=cfg.png)
        return result

    def _worker_flags(self, broker_kind: str = "") -> list[str]:
        flags: list[str] = []
        if broker_kind.startswith("embedded"):
            # amqtt sends every connecting client the retained messages of *every*
            # subscription, iterating its subscription table across awaits; a retained
            # heartbeat there makes a device connecting while another subscribes fail
            # ("dictionary changed size during iteration"). One worker: nothing to fence.
            flags += ["--heartbeat", "0", "--fence-after", "0"]
        if self.config.max_batch is not None:
            flags += ["--max-batch", str(self.config.max_batch)]
        if self.config.max_delay_ms is not None:
            flags += ["--max-delay-ms", str(self.config.max_delay_ms)]
        return flags

    async def _start_broker(self, stack: contextlib.AsyncExitStack, *,
                            local: bool = False) -> tuple[Any, str, str]:
        cfg = self.config
        if local:  # edge_only: agents never connect; the URL only fills their config
            return None, cfg.broker or "mqtt://127.0.0.1:1883", "none (edge_only split)"
        if cfg.broker is not None:
            return None, cfg.broker, "external"
        from simulators.support.broker import EmbeddedBroker, MosquittoBroker, mosquitto_binary

        if cfg.embedded_broker or not mosquitto_binary():
            embedded = EmbeddedBroker()
            await asyncio.to_thread(embedded.start)
            stack.callback(embedded.stop)
            # amqtt speaks 3.1.1 only and has no $share: one plain-subscribing worker
            return embedded, embedded.url + "?protocol=3.1.1", "embedded amqtt (MQTT 3.1.1)"
        broker = MosquittoBroker()
        await asyncio.to_thread(broker.start)
        stack.callback(broker.close)
        return broker, broker.url, "mosquitto (latency-tuned)"

    async def _start_links(self, stack: contextlib.AsyncExitStack, url: str, plan: FaultPlan,
                           sizes: SplitSizes | None) -> None:
        from simulators.shaper import ShapingProxy
        from splitinfer.mqtt import BrokerConfig

        cfg = self.config
        profiles: list[LinkProfile | None] = list(cfg.link_profiles())
        wants_link = any(f.kind in LINK_FAULTS for f in plan)
        if not profiles and self._link_schedule is not None:
            changes = self._link_schedule.changes()
            if changes:  # every proxy starts from the schedule's first entry
                profiles = [changes[0][1]]
        if not profiles:
            # link faults need a proxy to break: an unshaped one ("direct")
            profiles = [LinkProfile(name="direct")] if wants_link else [None]
        upstream = BrokerConfig.from_url(url)
        query = url.partition("?")[2]
        names: Counter[str] = Counter()
        for index, profile in enumerate(profiles):
            if profile is None:
                group = _Group("loopback", None, self._with_protocol(url))
            else:
                base = profile.name if len(profile.name) <= 24 else f"link{index}"
                names[base] += 1
                name = base if names[base] == 1 else f"{base}-{names[base]}"
                proxy = ShapingProxy(profile, upstream=(upstream.host, upstream.port),
                                     seed=cfg.seed + index, name=name)
                await proxy.start()
                stack.push_async_callback(proxy.close)
                proxy_url = f"mqtt://{proxy.host}:{proxy.port}" + (f"?{query}" if query else "")
                group = _Group(name, profile, self._with_protocol(proxy_url), proxy)
                if sizes is not None:
                    group.up_s, group.down_s = derived_times(profile, sizes)
            group.connector = connector_for(
                group.url, self.transport, timeout_s=max(10.0, cfg.timeout_s))
            self._groups.append(group)

    async def _connect_all(self) -> float:
        """Connect every device, ``connect_rate`` per second at most (no connection storm)."""
        t0 = time.perf_counter()
        gap = 1.0 / self.config.connect_rate
        failures: list[BaseException] = []
        limit = asyncio.Semaphore(256)

        async def one(device: _Device) -> None:
            async with limit:
                for attempt in range(3):
                    try:
                        await device.agent.start()
                        return
                    except StartupError as exc:
                        if attempt == 2:
                            failures.append(exc)
                        await asyncio.sleep(0.2 * (attempt + 1))

        tasks = []
        for k, device in enumerate(self._devices):
            delay = t0 + k * gap - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(device), name=f"fleet-connect-{k}"))
        await asyncio.gather(*tasks)
        if failures:
            raise StartupError(f"{len(failures)} of {len(self._devices)} devices could not "
                               f"connect; first: {failures[0]}")
        return time.perf_counter() - t0

    async def _warm_up_path(self, recorded: list[dict[str, Array]], inputs: Inputs,
                            target: Target, heads: dict[str, Any], url: str,
                            prefix: str) -> None:
        """One request through each worker's path before the clock starts (sessions warm).

        Adaptive devices: two requests per worker for every tail of the bundle, from a plain
        agent pinned to each split on a direct connection, so that no tail's first request
        (session warm-up) lands in the window and no device's chooser sees it."""
        rounds = max(1, self.config.workers) * 2
        if target.mode != "adaptive":
            device = self._devices[0]
            for _ in range(rounds):
                try:
                    if recorded:
                        await device.agent.infer_activation(recorded[0], timeout=60.0)
                    else:
                        await device.agent.infer(inputs.sample(0), timeout=60.0)
                except SplitInferError as exc:
                    raise StartupError(f"the first request got no answer: {exc}") from exc
            return
        await warm_up_tails(target, heads, inputs, url=self._with_protocol(url), prefix=prefix,
                            device_id=f"{self.token}-warm", qos=self.config.qos,
                            transport=self.transport, rounds=rounds)

    def _schedule(self) -> tuple[Array, Array]:
        """Every device's send times (s from the start, warm-up included), merged in order."""
        cfg = self.config
        process = cfg.arrival_process()
        total = cfg.warmup_s + cfg.duration_s
        times = [process.schedule(total, cfg.seed, device=i) for i in range(cfg.devices)]
        t = np.concatenate(times) if times else np.empty(0)
        d = np.concatenate([np.full(len(x), i, dtype=np.int64) for i, x in enumerate(times)])
        order = np.argsort(t, kind="stable")
        return t[order], d[order]

    def _cpu_roles(self, broker: Any, broker_kind: str,
                   pool: WorkerPool | None) -> dict[str, Callable[[], list[int]]]:
        pid = os.getpid()
        roles: dict[str, Callable[[], list[int]]] = {"fleet": lambda: [pid]}
        if broker is not None and not broker_kind.startswith("embedded"):
            roles["broker"] = lambda: [broker.pid] if broker.pid else []
        if pool is not None:
            roles["workers"] = lambda: pool.pids
        return roles

    # ------------------------------------------------------------------ traffic

    async def _dispatch(self, times: Array, devices: Array, recorded: list[dict[str, Array]],
                        head_times: list[float], inputs: Inputs, checking: bool) -> None:
        cfg = self.config
        t0, warmup = self._t0, cfg.warmup_s
        n, i = len(times), 0
        perf = time.perf_counter
        while i < n:
            now = perf() - t0
            if times[i] > now:
                await asyncio.sleep(float(times[i]) - now)
                continue
            horizon = now + 2e-4  # what falls due within 0.2 ms leaves now
            while i < n and times[i] <= horizon:
                due = float(times[i])
                device = self._devices[int(devices[i])]
                k, device.sent = device.sent, device.sent + 1
                tally = self.measured if due >= warmup else self.warm
                tally.sent_one(due - warmup)
                task = asyncio.create_task(
                    self._request(device, k, t0 + due, tally, recorded, head_times, inputs,
                                  checking), name="fleet-request")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                i += 1

    async def _request(self, device: _Device, k: int, due: float, tally: Tally,
                       recorded: list[dict[str, Array]], head_times: list[float],
                       inputs: Inputs, checking: bool) -> None:
        cfg = self.config
        start = time.perf_counter()
        head_s = 0.0
        try:
            if recorded:
                sample = (device.index + k) % len(recorded)
                head_s = head_times[sample] * cfg.speed
                if head_s >= _HEAD_WAIT_MIN_S:
                    t = time.perf_counter()
                    await asyncio.sleep(head_s)
                    head_s = time.perf_counter() - t
                result = await device.agent.infer_activation(recorded[sample])
            else:
                sample = (device.index + k * cfg.devices) % len(inputs)
                result = await device.agent.infer(inputs.sample(sample))
        except DeadlineExceeded:
            tally.failed_one("timeout", due_s=due - self._window_start, device=device.index)
            return
        except RemoteError as exc:
            tally.failed_one("error", error=f"remote:{exc.code}",
                             due_s=due - self._window_start, device=device.index)
            return
        except SplitInferError as exc:
            tally.failed_one("error", error=type(exc).__name__,
                             due_s=due - self._window_start, device=device.index)
            return
        done = time.perf_counter()
        due_s = due - self._window_start
        split_id = result.split_id
        sizes = self._sizes.get(split_id)
        served_by = "edge" if sizes is not None and sizes.kind == "edge_only" else \
            (getattr(result, "served_by", "") or "cloud")
        up_s, down_s = (0.0, 0.0) if served_by == "edge" else \
            self._derived(self._groups[device.group], split_id, due_s)
        if recorded and head_s < _HEAD_WAIT_MIN_S:  # not waited: charged arithmetically
            done += head_s
        tally.answered_one(result.timings if not recorded else {**result.timings, "head": head_s},
                           due=due, start=start, done=done, group=device.group,
                           up_s=up_s, down_s=down_s, split_id=split_id, served_by=served_by,
                           fallback=getattr(result, "fallback", ""), device=device.index,
                           due_s=due_s, attempts=getattr(result, "attempts", 1))
        if checking:
            first = next(iter(result.outputs.values()))
            tally.checks.append((sample, int(np.asarray(first).reshape(-1).argmax())))

    async def _drain(self, limit_s: float) -> None:
        """Wait for requests still out, ``limit_s`` at most; what remains is lost."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=limit_s)
        for task in list(self._tasks):
            task.cancel()

    async def _tick(self, meter: CpuMeter, window_start: float) -> None:
        cfg = self.config
        total = cfg.warmup_s + cfg.duration_s
        while True:
            await asyncio.sleep(0.5)
            if self._phase != "warmup":
                meter.sample()
            if self.progress is not None:
                elapsed = time.perf_counter() - self._t0
                tallies = (self.warm, self.measured)
                self.progress(Progress(
                    elapsed_s=elapsed, total_s=total, sent=sum(t.sent for t in tallies),
                    answered=sum(t.answered for t in tallies),
                    failed=sum(t.failed for t in tallies), phase=self._phase))

    async def _close_devices(self) -> None:
        await asyncio.gather(*(d.agent.close() for d in self._devices), return_exceptions=True)

    def _retry_counters(self) -> dict[str, int | None]:
        return agent_counters([d.agent.counters for d in self._devices])

    def _link_report(self, group: _Group) -> dict[str, Any]:
        pinned = len(self._sizes) == 1
        out: dict[str, Any] = {"name": group.name, "devices": group.devices,
                               "spec": group.profile.spec() if group.profile else None,
                               "uplink_ms_derived": round(group.up_s * 1e3, 3)
                               if pinned else None,
                               "downlink_ms_derived": round(group.down_s * 1e3, 3)
                               if pinned else None}
        if not pinned:  # adaptive: per split, on the link's first profile
            out["derived_ms_per_split"] = {
                split_id: [round(t * 1e3, 3) for t in derived_times(group.profile, sizes)]
                for split_id, sizes in self._sizes.items()}
        if group.proxy is not None:
            out["proxy"] = group.proxy.stats.as_dict()
        return out

    def _applied_padded(self, changes: list[Any]) -> list[Any]:
        return [*self._applied, *([None] * (len(changes) - len(self._applied)))][:len(changes)]

    def _fault_spans(self, plan: FaultPlan, events: list[dict[str, Any]],
                     ) -> list[tuple[float, float, str]]:
        """``[start, end)`` (s from the window's start) of every fault that lasts: its actual
        start (from its event) plus its planned duration."""
        spans = []
        for fault in plan:
            if not fault.duration_s:
                continue
            start = next((e["start_s"] for e in events if e["kind"] == fault.kind
                          and e["planned_s"] == fault.at_s), fault.at_s)
            spans.append((float(start), float(start) + fault.duration_s, fault.spec()))
        return spans

    # ------------------------------------------------------------------ the report

    def _result(self, *, target: Target, url: str, broker_kind: str,
                connect_s: float, cpu: dict[str, Any], events: list[Any],
                retries: dict[str, int | None], link_stats: list[dict[str, Any]], inputs: Inputs,
                ref_pred: Array | None, reference: Path | None, window_start: float,
                sizes: SplitSizes | None, head_times: list[float], prefix: str,
                plan: FaultPlan, switches: list[dict[str, Any]],
                pool: WorkerPool | None = None) -> FleetResult:
        from edge_agent.stats import percentiles

        cfg, m = self.config, self.measured
        lost = m.sent - m.answered - sum(m.errors.values()) - m.timeouts
        changes = self._link_schedule.changes() if self._link_schedule is not None else []
        spans = self._fault_spans(plan, events)
        e2e = percentiles(m.e2e)
        span = (m.last_done - window_start) if m.answered else 0.0
        stage_detail = {s: percentiles(m.stages.get(s, [])) for s in (*REPORT_STAGES,
                                                                      *RAW_STAGES)}
        report: dict[str, Any] = {
            "sent": m.sent, "answered": m.answered, "errors": sum(m.errors.values()),
            "timeouts": m.timeouts, "lost": lost,
            "answered_after_retry": m.after_retry, "attempts": dict(sorted(m.attempts.items())),
            "within_deadline": sum(1 for v in m.e2e if v <= cfg.timeout_s),
            "error_kinds": dict(sorted(m.errors.items())),
            "p50_ms": e2e.get("p50"), "p95_ms": e2e.get("p95"), "p99_ms": e2e.get("p99"),
            "max_ms": e2e.get("max"), "mean_ms": e2e.get("mean"),
            "throughput_rps": round(m.answered / span, 2) if span > 0 else 0.0,
            "offered_rps": round(cfg.devices * cfg.rate, 2),
            "stages": {s: stage_detail[s].get("p50") for s in REPORT_STAGES},
            # ARCHITECTURE's physical floor, from this run: head + link both ways + tail
            "floor_p50_ms": round(sum(stage_detail[s].get("p50") or 0.0 for s in
                                      ("head", "uplink", "tail", "downlink")), 4),
            "stages_detail_ms": stage_detail,
            "stage_sources": STAGE_SOURCES,
            "schedule_lag_ms": percentiles(m.lag),
            "retries": retries,
            "retries_window": counters_since(retries, self._counters0),
            "faults": events,
            "worker_restarts": list(pool.restarts) if pool is not None else [],
            "cpu": cpu,
            "accuracy": accuracy(m.checks, inputs, ref_pred, reference),
            "warmup": {"seconds": cfg.warmup_s, "sent": self.warm.sent,
                       "answered": self.warm.answered, "failed": self.warm.failed},
            "config": {
                "devices": cfg.devices, "rate_per_device": cfg.rate,
                "duration_s": cfg.duration_s, "arrivals": cfg.arrival_process().spec(),
                "seed": cfg.seed, "replay": cfg.replay, "speed": cfg.speed,
                "recorded_head_ms": round(float(np.mean(head_times)) * 1e3, 4)
                if head_times else None,
                "timeout_s": cfg.timeout_s, "mqtt": cfg.mqtt, "transport": self.transport,
                "qos": cfg.qos, "workers": cfg.workers, "worker_threads": cfg.worker_threads,
                "input": inputs.source, "prefix": prefix, "retry_s": cfg.retry_s,
                "retry_max_s": cfg.retry_max_s,
                "worker_ids": bool(pool is not None and pool.worker_ids),
            },
            "mode": target.mode,
            "split": {"split_id": target.manifest.split_id if target.mode != "adaptive"
                      else "adaptive", "dir": str(target.split_dir),
                      **(sizes.as_dict() if sizes is not None else
                         {"request_bytes": None, "result_bytes": None,
                          "request_wire_bytes": None, "result_wire_bytes": None})},
            "bundle": None if target.bundle is None else {
                "path": str(target.bundle.root), "model": target.bundle.model,
                "splits": [{"dir": s.dir, **self._sizes[s.split_id].as_dict()}
                           for s in target.bundle.splits if s.split_id in self._sizes]},
            "splits_used": dict(m.splits.most_common()),
            "served_locally": m.served_locally,
            "per_split": split_figures(m, cfg.timeout_s),
            "switches": switches,
            "link_schedule": [{"t_s": t, "link": p.spec(), "applied_s": round(a[0], 4)
                               if a is not None else None}
                              for (t, p), a in zip(changes, self._applied_padded(changes),
                                                   strict=True)],
            "during_faults": fault_windows(m, spans, cfg.timeout_s),
            "broker": {"url": url.partition("?")[0], "kind": broker_kind,
                       "cpu": "in the fleet process" if broker_kind.startswith("embedded")
                       else ("not measured (external)" if cfg.broker else "own process")},
            "links": link_stats,
            "connect_s": round(connect_s, 3),
        }
        names = [g.name for g in self._groups]
        return FleetResult(
            report=report, e2e_ms=np.asarray(m.e2e) * 1e3, groups=np.asarray(m.groups),
            group_names=names,
            stages_ms={s: np.asarray(v) * 1e3 for s, v in m.stages.items()},
            outcomes=m.outcomes, link_changes=[(t, p.name) for t, p in changes],
            fault_spans=spans)




def _freeze_setup() -> None:
    """Put what the run set up (agents, their MQTT clients, heads, inputs) out of the
    garbage collector's sight until the run ends.

    A thousand devices are a few hundred thousand long-lived objects; every full collection
    the run's own allocations trigger would scan them all again: on this 2-core machine
    pauses of 50-125 ms of the whole loop, several per minute, which were the fleet's p99.
    """
    gc.collect()
    gc.freeze()


def _raise_file_limit(want: int) -> None:
    """Each device holds a socket (two more through a link proxy): lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
