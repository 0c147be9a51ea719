"""``splitinfer bench overhead``: what splitinfer adds on top of physics.

End-to-end p50 through the real path (edge agent → broker → worker process → back, the
agent and the worker at their default settings) beside three floors measured in the same
run:

    floor      = best head + best tail + raw round trip     (the independent floor)
    own floor  = head + tail with the agent's and the worker's own session settings
                 + raw round trip                          (what the ratio used to be)
    hot floor  = best head + best tail, each spinning session alone in a loop
                 + raw round trip

*best head*, *best tail*: plain onnxruntime sessions (``ORT_ENABLE_ALL``, the shared
:mod:`splitinfer.ort_config` arithmetic) at each of :func:`floor_settings` — all usable
cores (:func:`splitinfer.ort_config.usable_cpus`) with their pool threads spinning, all
cores without spinning, one thread — each side taking its fastest. A user compares
splitinfer with what onnxruntime can do on their machine, not with our defaults.

*raw round trip*: plain paho-mqtt, nothing of ours on the path: this process publishes the
request's bytes at QoS 1 (paho's own ``loop()``, TCP_NODELAY) to a paho echo process
(``loop_forever()``) through the same broker, which answers at QoS 1 with as many bytes as
the worker's result envelope holds; the trip ends when the answer arrives.

One request at a time, its floors measured right beside it — head and tail at every
setting, the raw round trip, then the real request — so drift in the machine's speed and
the state of its caches hit all of them alike, as they hit the real request. As every
floor run follows an untimed run of its session, every block of real requests follows
one untimed request. The report names the thread counts the worker chose for its tail
and the agent for its head at load (``worker_tail``, ``agent_head``).

Spinning: in the floor's spinning setting the pool threads spin while a run lasts and stop
when it returns (``session.force_spinning_stop``; the worker's and the agent's default too,
see :func:`cloud_service.registry.session_options`). onnxruntime's own default
keeps them spinning for tens of milliseconds after every run — on a 2-core machine a whole
core, which would slow whatever is measured next. That setting, and the spinning
one beside it, are measured for the *hot floor*: after the loop, each session alone, one
run per e2e p50 and nothing in between, so the caches keep the model and the pool stays
awake from run to run — the most a tail could get from a machine that does nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitinfer import ort_config
from splitinfer.cli import env_default
from splitinfer.errors import BadInputError, StartupError, TransportError

if TYPE_CHECKING:
    import onnxruntime as ort
    import paho.mqtt.client as mqtt

    from splitinfer.mqtt import BrokerConfig

__all__ = ["add_parser", "run", "resolve_model", "floor_settings", "FloorSetting",
           "RawRoundTrip", "ZOO"]

Array = np.ndarray[Any, Any]
ZOO = ("mobilenet_v2", "resnet18", "digits_cnn")
TARGET_BYTES = 100_000
HOT_RUNS = 50  # runs per session and side in the hot floor
# Requests per block and the pause before each block's floors (see the measuring loop).
BLOCK = 10
SETTLE_S = 0.1
ECHO_READY = "raw echo ready"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("overhead", help="end-to-end p50 beside the best head + tail + raw "
                       "paho round trip", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2",
                   help=f"ONNX file, a built-in architecture ({', '.join(ZOO)}) or a real "
                   "model of splitter.zoo.REAL_MODELS (e.g. nudenet_320n, YOLOv8n at "
                   "320x320) (default mobilenet_v2 at 224x224)")
    p.add_argument("--at", help="cut tensor(s), comma separated (default: the single-tensor "
                   "cut whose activation is closest to --cut-bytes)")
    p.add_argument("--cut-bytes", type=int, default=TARGET_BYTES,
                   help="activation size the default cut is chosen by (default 100000)")
    p.add_argument("--broker", default=env_default("--broker"),
                   help="broker URL (default: start a latency-tuned mosquitto)")
    p.add_argument("--requests", type=int, default=200, help="measured requests (default 200)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads for the agent's head and the worker's "
                   "tail (default: their own defaults); the independent floor ignores it")
    p.add_argument("--head-in-thread", choices=("auto", "yes", "no"), default="auto",
                   help="run the head in a worker thread (frees the agent's event loop) or "
                   "inline; default: as the edge agent decides")
    p.add_argument("--pace-ms", type=float, default=0.0,
                   help="pause between measured requests in ms (default 0: back to back, as a "
                        "device streaming frames; a pause lets the worker's pool go idle)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


# --- models and cuts -----------------------------------------------------------------------


def resolve_model(spec: str, workdir: Path) -> Path:
    if Path(spec).is_file():
        return Path(spec)
    from splitter import zoo

    if spec == "mobilenet_v2":
        return zoo.mobilenet_v2(workdir / "mobilenet_v2.onnx")
    if spec == "resnet18":
        return zoo.resnet18(workdir / "resnet18.onnx")
    if spec == "digits_cnn":
        return zoo.digits_cnn_path()
    if spec in zoo.REAL_MODELS:
        return zoo.real_model(spec)
    raise BadInputError(f"--model {spec!r}: no such file and not one of {', '.join(ZOO)} "
                        f"or {', '.join(sorted(zoo.REAL_MODELS))}")


def _real_inputs(spec: str, n: int) -> tuple[dict[str, tuple[int, ...]] | None,
                                              dict[str, Array] | None]:
    """For a real model with symbolic dims: its concrete input shapes and ``n`` random
    samples in its documented ranges (else [0, 1)); (None, None) for anything else."""
    from splitter import zoo

    entry = zoo.REAL_MODELS.get(spec)
    if entry is None or Path(spec).is_file():
        return None, None
    rng = np.random.default_rng(1)
    shapes = {name: tuple(dims) for name, dims in entry.input_shape.items()}
    samples = {}
    for name, dims in shapes.items():
        lo, hi = entry.ranges.get(name, (0.0, 1.0))
        samples[name] = (lo + (hi - lo) * rng.random((n, *dims[1:]))).astype(np.float32)
    return shapes, samples


def _p50(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, 50))


def run(args: argparse.Namespace) -> int:
    from splitter import list_cuts, make_samples, split_model

    if args.pace_ms < 0:
        raise BadInputError(f"--pace-ms {args.pace_ms}: expected >= 0")
    if args.requests < 1:
        raise BadInputError(f"--requests {args.requests}: expected at least 1")
    if args.threads is not None and args.threads < 0:
        raise BadInputError(f"--threads {args.threads}: expected 0 (onnxruntime's default) "
                            "or more")
    with tempfile.TemporaryDirectory(prefix="splitinfer-bench-") as tmp:
        work = Path(tmp)
        model = resolve_model(args.model, work)
        shapes, real_samples = _real_inputs(args.model, 1)  # batch fixed at 1
        if args.at:
            cut = [n for n in args.at.split(",") if n]
        else:
            singles = [(c, c.bytes_per_sample)
                       for c in list_cuts(model, max_tensors=1, input_shapes=shapes)
                       if c.bytes_per_sample and 0 < c.head_flops_share < 1]
            if not singles:
                raise BadInputError(f"{args.model}: no single-tensor cut; name one with --at")
            best, _ = min(singles, key=lambda cb: abs(cb[1] - args.cut_bytes))
            cut = [t.name for t in best.tensors]
        if real_samples is not None:
            split = split_model(model, cut, work / "split", samples=real_samples,
                                input_shapes=shapes, fix_shapes=True)
            sample = {k: v[:1] for k, v in real_samples.items()}
        else:
            split = split_model(model, cut, work / "split", num_samples=2)
            sample = make_samples(model, 1, seed=1)
        report = asyncio.run(_measure(args, split.manifest.parent, sample))
    report.update({"model": args.model, "cut": cut, "split_id": split.split_id,
                   "activation_bytes": split.manifest_obj.bytes_per_sample})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


# --- the independent onnxruntime floor -----------------------------------------------------


@dataclass(frozen=True)
class FloorSetting:
    """One way to run a plain onnxruntime session for the floor.

    ``spinning``: "run" = pool threads spin while a run is in progress and stop when it
    returns (``session.force_spinning_stop``); "always" = onnxruntime's default, they keep
    spinning after each run; "off" = they never spin.
    """

    name: str
    threads: int
    spinning: str = "off"

    @property
    def spins_after_run(self) -> bool:
        return self.threads > 1 and self.spinning == "always"

    def session(self, path: Path) -> ort.InferenceSession:
        import onnxruntime as ort

        from splitinfer import ort_config

        opts = ort_config.apply(ort.SessionOptions())  # the same arithmetic as every side
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      "0" if self.spinning == "off" else "1")
        if self.spinning == "run":
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def floor_settings(cores: int | None = None) -> list[FloorSetting]:
    """The settings the floors try: all usable cores spinning while a run
    lasts, without spinning, one thread (which beats a pool on small models), and — for
    the hot floor only (``spins_after_run``) — onnxruntime's default spinning, on after
    runs too."""
    n = max(1, cores if cores is not None else ort_config.usable_cpus())
    one = FloorSetting("1 thread", 1, "off")
    if n == 1:
        return [one]
    return [FloorSetting(f"{n} threads, spinning", n, "run"),
            FloorSetting(f"{n} threads, no spinning", n, "off"),
            one,
            FloorSetting(f"{n} threads, spinning after runs too", n, "always")]


class _Timed:
    """One model at one setting, with the times of its runs."""

    def __init__(self, run: Callable[[], object]) -> None:
        self.run = run
        self.times: list[float] = []

    def measure(self, *, warm: bool = True) -> None:
        """Time one run; ``warm``: right after an untimed one, the model's caches and its
        pool (and the core under it) as warm as a tight loop leaves them, the best this
        setting can do here, whatever ran before."""
        if warm:
            self.run()
        t0 = time.perf_counter()
        self.run()
        self.times.append(time.perf_counter() - t0)


# --- the raw paho round trip ---------------------------------------------------------------


def _raw_client(cfg: BrokerConfig, client_id: str) -> tuple[mqtt.Client, str]:
    """A plain paho client, connected (its own ``loop()``), TCP_NODELAY on its socket."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    v5 = cfg.protocol != "3.1.1"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)

    def on_socket_open(_c: mqtt.Client, _u: object, sock: Any) -> None:
        if isinstance(sock, socket.socket) and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = on_socket_open
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    ctx = cfg.tls_context()
    if ctx is not None:
        client.tls_set_context(ctx)
    connected: list[int] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: connected.append(reason.value)
    client.connect(cfg.host, cfg.port, keepalive=60)
    deadline = time.monotonic() + 10
    while not connected and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    if not connected or connected[0] != 0:
        raise TransportError(f"raw paho client {client_id}: connect to {cfg.host}:{cfg.port} "
                             f"failed ({connected or 'no CONNACK within 10 s'})")
    return client, "5" if v5 else "3.1.1"


def _subscribe(client: mqtt.Client, topic: str) -> None:
    acked: list[object] = []
    client.on_subscribe = lambda _c, _u, _m, reasons, _p: acked.append(reasons)
    client.subscribe(topic, qos=1)
    deadline = time.monotonic() + 10
    while not acked and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    if not acked:
        raise TransportError(f"raw paho client: no SUBACK for {topic} within 10 s")


def raw_echo(url: str, listen: str, answer: str, reply_bytes: int) -> None:
    """Answer every message on ``listen`` with ``reply_bytes`` bytes (0: the payload
    itself) on ``answer``, QoS 1, in paho's own ``loop_forever()``. Runs until killed."""
    from splitinfer.mqtt import BrokerConfig  # the URL's host, port, credentials only

    client, _ = _raw_client(BrokerConfig.from_url(url), f"raw-echo-{os.getpid()}")
    reply = bytes(reply_bytes) if reply_bytes else None

    def on_message(c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        c.publish(answer, reply if reply is not None else m.payload, qos=1)

    client.on_message = on_message
    _subscribe(client, listen)
    print(ECHO_READY, flush=True)
    client.loop_forever()


class RawRoundTrip:
    """This process's side of the raw round trip: publish, then ``loop()`` until the
    answer is in. Blocking; nothing else runs meanwhile, which is the point."""

    def __init__(self, url: str, request: str, answer: str) -> None:
        from splitinfer.mqtt import BrokerConfig

        self.client, self.protocol = _raw_client(BrokerConfig.from_url(url),
                                                 f"raw-rtt-{os.getpid()}")
        self._answered = 0
        self.last_answer = b""
        self.client.on_message = self._on_message
        _subscribe(self.client, answer)
        self.topic = request

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        self._answered += 1
        self.last_answer = bytes(message.payload)

    def round_trip(self, payload: bytes, timeout: float = 10.0) -> None:
        want = self._answered + 1
        self.client.publish(self.topic, payload, qos=1)
        deadline = time.monotonic() + timeout
        while self._answered < want:
            if time.monotonic() > deadline:
                raise TransportError(f"raw round trip: no answer within {timeout} s")
            self.client.loop(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()


# --- the run -------------------------------------------------------------------------------


def _spawn(cmd: list[str], log: Path, ready: str, timeout: float = 60.0,
           ) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with its output in ``log``; return once ``ready`` appears there."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise StartupError(f"{' '.join(cmd[2:5])} did not start: "
                               f"{log.read_text(errors='replace')[-800:]}")
        time.sleep(0.05)
    return proc


def _result_bytes(request: Any, outputs: Mapping[str, Array]) -> int:
    """The size of the worker's answer to ``request``: a result envelope of the tail's
    outputs with the stamps the worker adds."""
    from splitinfer.wire import WireTensor, encode

    result = request.result([WireTensor(name, np.asarray(a)) for name, a in outputs.items()])
    for stage in ("received", "queued", "tail_start", "tail_end", "sent"):
        result.stamp(stage, 0.0)
    return len(encode(result))


async def _measure(args: argparse.Namespace, split_dir: Path, sample: Mapping[str, Array],
                   ) -> dict[str, Any]:
    from cloud_service.config import Config
    from cloud_service.registry import Tail
    from edge_agent import AgentConfig, EdgeAgent, OrtHead
    from simulators.support.broker import MosquittoBroker
    from splitinfer.manifest import Manifest
    from splitinfer.wire import REQUEST, Envelope, WireTensor, encode

    manifest = Manifest.load(split_dir)
    head_path, tail_path = manifest.resolve(split_dir, "head"), manifest.resolve(split_dir,
                                                                                 "tail")
    # The agent's and the worker's own settings: what `edge run` and `cloud serve` open.
    worker_threads = Config.threads if args.threads is None else args.threads
    own_head = OrtHead(head_path, threads=args.threads)
    own_tail = Tail.open(split_dir, threads=worker_threads, spinning=Config.spinning,
                         providers=["CPUExecutionProvider"])
    own_spins = Config.spinning == "always"
    cut = own_head.run(sample)
    feeds = [cut[name] for name in own_tail.input_names]
    request = Envelope(
        kind=REQUEST, request_id="0" * 32, device_id="bench-dev", split_id=manifest.split_id,
        tensors=[WireTensor(s.name, cut[s.name], s.quantization) for s in manifest.cut],
        deadline=time.time(), reply_to="splitinfer/v1/res/bench-dev",
        timestamps={"created": 0.0, "head_start": 0.0, "head_end": 0.0, "sent": 0.0})
    payload = encode(request)
    reply_bytes = _result_bytes(request, dict(zip(own_tail.output_names, own_tail.run(feeds),
                                                  strict=True)))

    settings = floor_settings()
    interleaved = [s for s in settings if not s.spins_after_run]
    hot_settings = [s for s in settings if s.threads > 1 and s.spinning != "off"]
    heads: dict[str, _Timed] = {}
    tails: dict[str, _Timed] = {}
    for s in interleaved:
        hs, ts = s.session(head_path), s.session(tail_path)
        heads[s.name] = _Timed(partial(hs.run, None, dict(sample)))
        tails[s.name] = _Timed(partial(ts.run, None, cut))
    own = {"head": _Timed(partial(own_head.run, sample)),
           "tail": _Timed(partial(own_tail.run, feeds))}

    broker = None
    url = args.broker
    if url is None:
        broker = MosquittoBroker()
        broker.start()
        url = broker.url
    prefix = f"bench{os.getpid()}"
    worker_cmd = [sys.executable, "-m", "splitinfer.cli", "-v", "cloud", "serve",
                  "--broker", url, "--artifacts", str(split_dir), "--group", prefix,
                  "--prefix", prefix]
    if args.threads is not None:
        worker_cmd += ["--threads", str(args.threads)]
    procs: list[subprocess.Popen[bytes]] = []
    rtt: RawRoundTrip | None = None
    agent = None
    head_choice = _HeadChoice()
    times: list[float] = []
    raw: list[float] = []
    stages: list[dict[str, float]] = []
    try:
        # -v: the worker logs "serving" at INFO once it has subscribed.
        procs.append(_spawn(worker_cmd, split_dir / "worker.log", "serving"))
        procs.append(_spawn([sys.executable, "-m", "bench.bench_overhead", "--raw-echo",
                             url, f"{prefix}/raw/req", f"{prefix}/raw/res", str(reply_bytes)],
                            split_dir / "echo.log", ECHO_READY))
        rtt = RawRoundTrip(url, f"{prefix}/raw/req", f"{prefix}/raw/res")
        knobs: dict[str, Any] = {}
        if args.head_in_thread != "auto":
            knobs["head_in_thread"] = args.head_in_thread == "yes"
        with head_choice.listening():
            agent = EdgeAgent.from_artifacts(split_dir, config=AgentConfig(
                device_id="bench-dev", broker=url, prefix=prefix, timeout_s=30.0, **knobs),
                threads=args.threads)
        await agent.start()
        await agent.infer(dict(sample), timeout=60.0)  # worker up, sessions warm
        for _ in range(20):
            await agent.infer(dict(sample))
            rtt.round_trip(payload)
        for timed in (*own.values(), *heads.values(), *tails.values()):
            for _ in range(5):
                timed.run()
        # Blocks of BLOCK requests, their floors measured right before them, so drift in
        # the machine's speed hits both alike. The floors are measured on a machine doing
        # nothing else: first a pause, since a worker whose pool keeps spinning after its
        # runs (onnxruntime's default, tens of ms) would slow them on a small machine and
        # flatter the ratio. Then the block's requests, one at a time: back to back (a
        # camera sending its next frame when the answer comes), or --pace-ms apart.
        done = 0
        while done < args.requests:
            n = min(BLOCK, args.requests - done)
            time.sleep(SETTLE_S)
            for _ in range(n):
                for name in heads:
                    heads[name].measure()
                    tails[name].measure()
                t0 = time.perf_counter()
                rtt.round_trip(payload)
                raw.append(time.perf_counter() - t0)
                # The agent's and the worker's own settings last: the worker's pool may
                # keep spinning after its run (Config.spinning "always"), so a pause
                # follows before anything else is measured.
                own["head"].measure()
                own["tail"].measure()
                if own_spins:
                    time.sleep(SETTLE_S)
            # One untimed request first, as every floor run follows an untimed one: the
            # floors just measured ran other sessions over the agent's caches and left
            # the worker idle, which a device streaming frames never sees.
            await agent.infer(dict(sample))
            for _ in range(n):
                if args.pace_ms:
                    await asyncio.sleep(args.pace_ms / 1000)
                t1 = time.perf_counter()
                result = await agent.infer(dict(sample))
                times.append(time.perf_counter() - t1)
                stages.append(dict(result.timings))
            done += n
    finally:
        if agent is not None:
            await agent.close()
        if rtt is not None:
            rtt.close()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if broker is not None:
            broker.close()
    worker_tail = _worker_tail(split_dir / "worker.log")
    # The hot floor: each spinning session alone, one run per e2e p50 (the cadence a
    # request sees), nothing in between: the caches keep the model, and onnxruntime's
    # default spinning keeps its pool awake from one run to the next. Measured after
    # everything else, so that the spinning slows nothing else measured.
    gap = _p50(times) / 1e3
    hot_heads: dict[str, _Timed] = {}
    hot_tails: dict[str, _Timed] = {}
    for s in hot_settings:
        for side, path, feed in (("head", head_path, dict(sample)), ("tail", tail_path, cut)):
            session = s.session(path)
            timed = _Timed(partial(session.run, None, feed))
            for _ in range(5):
                timed.run()
            for _ in range(min(args.requests, HOT_RUNS)):
                time.sleep(gap)
                timed.measure(warm=False)
            (hot_heads if side == "head" else hot_tails)[s.name] = timed
            del session, timed
    report = _report(args, times, raw, own, heads, tails, stages, payload_bytes=len(payload),
                     reply_bytes=reply_bytes, protocol=rtt.protocol if rtt else "?",
                     external=broker is None)
    report.update(_hot_report(report, hot_heads, hot_tails))
    report["worker_tail"] = worker_tail
    report["agent_head"] = head_choice.choice if agent is not None else None
    return report


class _HeadChoice(logging.Handler):
    """What the agent chose for its head at load (edge_agent.runtime's "head on ...")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.choice: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.choice = _chosen(record.getMessage(), "head") or self.choice

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Hear the agent's INFO line while it loads, without passing it on."""
        logger = logging.getLogger("edge_agent.runtime")
        level, propagate = logger.level, logger.propagate
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate


def _chosen(line: str, side: str) -> str | None:
    """The threads named by a "split …: {side} on N threads (…)" log line, else None."""
    marker = f": {side} on "
    return line.split(marker, 1)[1].strip() if marker in line else None


def _worker_tail(log: Path) -> str | None:
    """What the worker chose for its tail at load (its "tail on ..." log line)."""
    for line in log.read_text(errors="replace").splitlines():
        if (choice := _chosen(line, "tail")) is not None:
            return choice
    return None


def _hot_report(report: Mapping[str, Any], heads: Mapping[str, _Timed],
                tails: Mapping[str, _Timed]) -> dict[str, Any]:
    """The hot floor's figures beside the report's (None where nothing spins: 1 core)."""
    if not heads:
        return {"hot_floor_p50_ms": None, "hot_ratio": None, "hot_settings_ms": {}}
    head = {name: _p50(t.times) for name, t in heads.items()}
    tail = {name: _p50(t.times) for name, t in tails.items()}
    floor = min(head.values()) + min(tail.values()) + report["rtt_p50_ms"]
    return {"hot_floor_p50_ms": round(floor, 4),
            "hot_ratio": round(report["e2e_p50_ms"] / floor, 4),
            "hot_settings_ms": {name: {"head": round(head[name], 4),
                                       "tail": round(tail[name], 4)} for name in head}}


def _report(args: argparse.Namespace, times: list[float], raw: list[float],
            own: Mapping[str, _Timed], heads: Mapping[str, _Timed],
            tails: Mapping[str, _Timed], stages: list[dict[str, float]], *,
            payload_bytes: int, reply_bytes: int, protocol: str, external: bool,
            ) -> dict[str, Any]:
    from edge_agent.stats import summarize

    head_p50 = {name: _p50(t.times) for name, t in heads.items()}
    tail_p50 = {name: _p50(t.times) for name, t in tails.items()}
    best_head = min(head_p50, key=lambda n: head_p50[n])
    best_tail = min(tail_p50, key=lambda n: tail_p50[n])
    e2e, rtt = _p50(times), _p50(raw)
    floor = head_p50[best_head] + tail_p50[best_tail] + rtt
    own_head, own_tail = _p50(own["head"].times), _p50(own["tail"].times)
    own_floor = own_head + own_tail + rtt
    return {
        "e2e_p50_ms": round(e2e, 4),
        "floor_p50_ms": round(floor, 4),
        "ratio": round(e2e / floor, 4),
        "own_floor_p50_ms": round(own_floor, 4),
        "own_ratio": round(e2e / own_floor, 4),
        "payload_bytes": payload_bytes,
        "reply_bytes": reply_bytes,
        "head_p50_ms": round(head_p50[best_head], 4),
        "tail_p50_ms": round(tail_p50[best_tail], 4),
        "rtt_p50_ms": round(rtt, 4),
        "best_head": best_head,
        "best_tail": best_tail,
        "own_head_p50_ms": round(own_head, 4),
        "own_tail_p50_ms": round(own_tail, 4),
        "settings_ms": {name: {"head": round(head_p50[name], 4),
                               "tail": round(tail_p50[name], 4)} for name in head_p50},
        "threads": "defaults" if args.threads is None else args.threads,
        "cpu_count": ort_config.usable_cpus(),
        "requests": len(times),
        "mqtt_protocol": protocol,
        "broker": "external" if external else "mosquitto (latency-tuned, loopback)",
        "stages_ms": {k: v.get("p50") for k, v in summarize(stages).items()},
        # What no stage accounts for (the worker's answer encode and publish, the agent's
        # own steps): e2e minus its stages, per request.
        "unaccounted_p50_ms": round(_p50([t.get("e2e", 0.0) - sum(
            v for k, v in t.items() if k != "e2e") for t in stages]), 4) if stages else None,
    }


def _print(r: Mapping[str, Any]) -> None:
    print(f"model {r['model']} cut {','.join(r['cut'])}: activation {r['activation_bytes']} B, "
          f"payload {r['payload_bytes']} B (reply {r['reply_bytes']} B), MQTT "
          f"{r['mqtt_protocol']}, {r['requests']} requests, {r['cpu_count']} CPUs")
    print(f"  e2e p50        {r['e2e_p50_ms']:9.3f} ms  (agent and worker threads: "
          f"{r['threads']})")
    print(f"  floor p50      {r['floor_p50_ms']:9.3f} ms = head {r['head_p50_ms']:.3f} "
          f"({r['best_head']}) + tail {r['tail_p50_ms']:.3f} ({r['best_tail']}) + raw paho "
          f"round trip {r['rtt_p50_ms']:.3f}")
    print(f"  ratio          {r['ratio']:9.3f}  (e2e / floor)")
    if r.get("worker_tail"):
        print(f"  worker tail on {r['worker_tail']}")
    if r.get("agent_head"):
        print(f"  agent head on  {r['agent_head']}")
    print(f"  own floor p50  {r['own_floor_p50_ms']:9.3f} ms = head {r['own_head_p50_ms']:.3f} "
          f"+ tail {r['own_tail_p50_ms']:.3f} (the agent's and worker's settings) + round trip")
    print(f"  own ratio      {r['own_ratio']:9.3f}  (e2e / own floor)")
    for name, t in r["settings_ms"].items():
        print(f"    {name:36s} head {t['head']:8.3f}  tail {t['tail']:8.3f}")
    if r.get("hot_floor_p50_ms") is not None:
        print(f"  hot floor p50  {r['hot_floor_p50_ms']:9.3f} ms, hot ratio {r['hot_ratio']:.3f} "
              "(each spinning session alone, runs spaced by the e2e p50):")
        for name, t in r["hot_settings_ms"].items():
            print(f"    {name:36s} head {t['head']:8.3f}  tail {t['tail']:8.3f}")
    print("  stages p50 " + ", ".join(f"{k} {v:.3f}" for k, v in r["stages_ms"].items() if v)
          + (f"; unaccounted {r['unaccounted_p50_ms']:.3f}"
             if r.get("unaccounted_p50_ms") is not None else ""))


def _main(argv: Sequence[str]) -> int:
    """``python -m bench.bench_overhead --raw-echo URL LISTEN ANSWER REPLY_BYTES``:
    the echo process of the raw round trip."""
    if len(argv) != 5 or argv[0] != "--raw-echo":
        print("usage: python -m bench.bench_overhead --raw-echo URL LISTEN ANSWER "
              "REPLY_BYTES (the bench itself: splitinfer bench overhead)", file=sys.stderr)
        return 2
    raw_echo(argv[1], argv[2], argv[3], int(argv[4]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
