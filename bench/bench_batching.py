"""``splitinfer bench batching``: what dynamic batching buys a cloud worker, beside its floor.

In one run, on one tail (default: MobileNetV2 cut late, at ``block12.add``, int8 cut):

1. **floor** — raw onnxruntime throughput of the tail with the worker's own session
   options and ``--threads``, at batch 1, 2, 4 … 32, each size measured in every floor
   slice (below) and pooled; the best size's rate is the ceiling a worker could reach if
   receiving, decoding and answering cost nothing;
2. **worker throughput** — two real workers (``cloud_service.Server``, one at
   ``--max-batch 1``, one at the batching setting, each with its own tail session) on a
   private mosquitto, fed by ``--devices`` closed-loop devices. The devices run in a
   separate process (so they do not take the workers' GIL) and replay recorded
   activations: no head compute;
3. **single-device latency** — one device, p50 with batching on vs ``--max-batch 1``;
   batching may cost a lone device at most ``--max-delay-ms``.

Why slices: a small shared VM drifts by 10-20% within a minute (other tenants), more than
the effects measured here. So the run is ``--rounds`` cycles of *floor, worker at
--max-batch 1, batching worker* slices of ``--duration`` seconds each (the two workers'
order alternating, a last floor slice closing), and each figure is the pooled rate over
its slices: drift hits all three alike. One thing runs at a time: during a floor slice
the devices pause, during a worker slice the floor does. Every batch size gets its share
of every floor slice, so the best one is picked from rates averaged over the whole run,
not from the luckiest of a dozen short samples.

Targets (issue #3): batched worker ≥ 0.85x the floor, and ≥ the ``--max-batch 1`` worker.

Also runs as a script::

    python bench/bench_batching.py                      # MobileNetV2 tail at block12.add
    python bench/bench_batching.py --devices 32 --json
    python bench/bench_batching.py --model m.onnx --at CUT --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitinfer import ort_config

__all__ = ["add_parser", "run", "main", "format_report"]

log = logging.getLogger(__name__)

DEFAULT_CUT = "block12.add"
RAW_BATCHES = (1, 2, 4, 8, 16, 32)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="ONNX model to cut (default: MobileNetV2 224x224 from "
                        "splitter.zoo, random weights)")
    parser.add_argument("--at", dest="cut", default=None,
                        help=f"cut tensor(s), comma separated (default for MobileNetV2: "
                        f"{DEFAULT_CUT})")
    parser.add_argument("--artifacts", default=None,
                        help="use this split directory instead of cutting a model")
    parser.add_argument("--float-cut", action="store_true",
                        help="send the cut as float32 (default: int8 with scale/zero point)")
    parser.add_argument("--devices", type=int, default=32, help="concurrent devices")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="the batching setting compared with --max-batch 1")
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads, for the floor and the worker")
    parser.add_argument("--duration", type=float, default=2.0,
                        help="seconds measured per slice (after --warmup)")
    parser.add_argument("--warmup", type=float, default=0.3,
                        help="seconds at the start of each slice that are not counted")
    parser.add_argument("--single-duration", type=float, default=3.0,
                        help="seconds measured for the single-device latency, per setting")
    parser.add_argument("--rounds", type=int, default=6,
                        help="cycles of floor / --max-batch 1 / batching slices")
    parser.add_argument("--nice", type=int, default=10,
                        help="niceness of the device process (default %(default)s: the "
                        "devices stand for other machines; 0 to compete as equals)")
    parser.add_argument("--broker", default=None,
                        help="mqtt://HOST:PORT of a running broker (default: a private "
                        "mosquitto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a target is missed")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("batching", help="dynamic batching: worker throughput and "
                            "latency beside raw onnxruntime on the same tail",
                            description=(__doc__ or "").split("\n\n")[0])
    _arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_batching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    return run(parser.parse_args(argv))


# --- the split under test ----------------------------------------------------------------


def _prepare_split(args: argparse.Namespace, work: Path) -> Path:
    """A split directory: given, or cut from --model / MobileNetV2, int8 cut by default."""
    if args.artifacts:
        return Path(args.artifacts)
    from splitinfer.errors import BadInputError
    from splitter import split_model, zoo
    from splitter.surgery import quantize_cut

    model = Path(args.model) if args.model else zoo.mobilenet_v2(work / "mobilenet_v2.onnx")
    cut = args.cut or (DEFAULT_CUT if not args.model else None)
    if cut is None:
        raise BadInputError("--model needs --at CUT (see 'splitinfer inspect MODEL')")
    split_dir = work / "split"
    split_model(model, cut, split_dir, num_samples=2)
    if not args.float_cut:
        try:  # QuantizeLinear ends the head, DequantizeLinear starts the tail
            quantize_cut(split_dir)
        except BadInputError as exc:  # not one float32 tensor: sent as it is
            log.info("sending the cut as it is: %s", exc)
    return split_dir


def _random_inputs(manifest: Any, n: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for spec in manifest.inputs:
        shape = [n] + [d if isinstance(d, int) else 1 for d in spec.sample_shape]
        feeds[spec.name] = rng.random(shape).astype(spec.dtype)
    return feeds


def _replay_set(directory: Path, n: int = 8) -> list[dict[str, Any]]:
    """Activations the head produces on random inputs: what devices would send."""
    import numpy as np
    import onnxruntime as ort

    from splitinfer.manifest import Manifest

    manifest = Manifest.load(directory)
    head = ort.InferenceSession(str(manifest.resolve(directory, "head")),
                                ort_config.apply(ort.SessionOptions()),
                                providers=["CPUExecutionProvider"])
    names = [s.name for s in manifest.cut]
    outs = head.run(names, _random_inputs(manifest, n))
    samples = []
    for i in range(n):
        samples.append({
            s.name: {"array": np.ascontiguousarray(out[i:i + 1]),
                     "q": s.quantization.to_dict() if s.quantization else None}
            for s, out in zip(manifest.cut, outs, strict=True)})
    return samples


# --- 1. the floor: raw onnxruntime ---------------------------------------------------------


class _RawTail:
    """The tail in plain onnxruntime, as the floor measures it."""

    def __init__(self, directory: Path, replay: list[dict[str, Any]], threads: int) -> None:
        import onnxruntime as ort

        from cloud_service.registry import session_options
        from splitinfer.manifest import Manifest

        manifest = Manifest.load(directory)
        self.session = ort.InferenceSession(str(manifest.resolve(directory, "tail")),
                                            sess_options=session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.names = [s.name for s in manifest.outputs]
        self.replay = replay

    def measure(self, batch: int, seconds: float) -> tuple[int, float]:
        """(samples, seconds) of runs at ``batch`` for about ``seconds`` (at least 3 runs,
        after two warm-up runs)."""
        import numpy as np

        replay = self.replay
        feeds = {name: np.concatenate([replay[i % len(replay)][name]["array"]
                                       for i in range(batch)])
                 for name in replay[0]}
        for _ in range(2):
            self.session.run(self.names, feeds)
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
            self.session.run(self.names, feeds)
            runs += 1
        return runs * batch, elapsed


# --- 2./3. devices in their own process ----------------------------------------------------


def _warm_up() -> None:
    import paho.mqtt.client  # noqa: F401

    import splitinfer.mqtt_client
    import splitinfer.wire  # noqa: F401


def _devices_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Entry point of the requester process.

    It runs niced: the devices stand for machines elsewhere, so on a small box they
    should take the CPU the worker leaves, not compete with its tail for it. For the same
    reason they are as cheap as a real MQTT client allows: ``splitinfer.mqtt_client`` (paho
    driven from the loop, no task per message) speaking MQTT 3.1.1, which needs no
    property packing or parsing (the envelope carries the reply address).
    """
    import asyncio
    import os

    if spec.get("nice"):
        with contextlib.suppress(OSError):
            os.nice(int(spec["nice"]) - os.nice(0))

    return asyncio.run(_devices(spec))


async def _devices(spec: dict[str, Any]) -> dict[str, Any]:
    """Follow ``spec["windows"]``: in each, its first ``devices`` devices request in a
    closed loop from its ``target`` worker until the window ends. Per window: answers
    counted after its warm-up, their latencies, errors."""
    import asyncio
    import uuid

    import numpy as np

    from splitinfer.manifest import Quantization
    from splitinfer.mqtt import BrokerConfig
    from splitinfer.mqtt_client import open_client
    from splitinfer.topics import Topics
    from splitinfer.wire import REQUEST, Envelope, WireTensor, decode, encode

    cfg = BrokerConfig.from_url(spec["broker"]).with_protocol("3.1.1")
    replay = [[WireTensor(name, np.asarray(t["array"]),
                          Quantization.from_dict(t["q"]) if t["q"] else None)
               for name, t in sample.items()] for sample in spec["replay"]]
    targets = {name: (Topics(t["prefix"]), t["model"]) for name, t in spec["targets"].items()}
    windows = spec["windows"]
    # per window: [answered in the counted part, errors, latencies (s)]
    tallies: list[tuple[list[int], list[float]]] = [([0, 0], []) for _ in windows]

    async def device(index: int) -> None:
        device_id = f"bench-{index}-{uuid.uuid4().hex[:6]}"
        client = await open_client(cfg, device_id)
        pending: dict[str, asyncio.Future[bool]] = {}

        async def read() -> None:
            async for message in client.messages():
                env = decode(message.payload)
                fut = pending.pop(env.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(env.error is None)

        for topics, _ in targets.values():
            await client.subscribe(topics.result(device_id), qos=1)
        reader = asyncio.create_task(read())
        loop = asyncio.get_running_loop()
        n = index
        try:
            for w, window in enumerate(windows):
                if index >= window["devices"]:
                    continue
                topics, model = targets[window["target"]]
                result_topic = topics.result(device_id)
                req_topic = topics.request(model, device_id)
                counted_from = window["start"] + window["warmup"]
                counts, latencies = tallies[w]
                await asyncio.sleep(max(0.0, window["start"] - time.time()))
                while time.time() < window["end"]:
                    rid = uuid.uuid4().hex
                    env = Envelope(kind=REQUEST, request_id=rid, device_id=device_id,
                                   split_id=spec["split_id"], tensors=replay[n % len(replay)],
                                   reply_to=result_topic, timestamps={"sent": time.time()})
                    n += 1
                    fut: asyncio.Future[bool] = loop.create_future()
                    pending[rid] = fut
                    sent = time.time()
                    await client.publish(req_topic, encode(env), qos=1)
                    try:
                        ok = await asyncio.wait_for(fut, 30)
                    except asyncio.TimeoutError:
                        ok = False
                        pending.pop(rid, None)
                    answered = time.time()
                    if counted_from <= answered <= window["end"]:
                        counts[0 if ok else 1] += 1
                        if ok and sent >= counted_from:
                            latencies.append(answered - sent)
        finally:
            reader.cancel()
            await client.disconnect()

    await asyncio.gather(*(device(i) for i in range(spec["devices"])))
    return {"windows": [{"answered": counts[0], "errors": counts[1], "latencies": lat}
                        for counts, lat in tallies]}


# --- the run -----------------------------------------------------------------------------

_Mark = tuple[float, float, float, float, int, int]  # time, tail_s, starved, held, batches, samples


def _mark(server: Any) -> _Mark:
    m = server.metrics
    starved, held = m.tail_waits()
    return (time.time(), m.tail_s, starved, held, m.batches, m.batched_samples)


def _schedule(start: float, args: argparse.Namespace, batched: str) -> list[dict[str, Any]]:
    """Slices in time order: cycles of floor + both workers, a closing floor, then the
    single-device windows (each setting twice, in mirrored order)."""
    gap = 0.25  # lets a slice's last answers land before the next one starts
    windows: list[dict[str, Any]] = []
    t = start

    def add(kind: str, target: str, devices: int, seconds: float, warmup: float) -> None:
        nonlocal t
        windows.append({"kind": kind, "target": target, "devices": devices, "start": t,
                        "end": t + warmup + seconds, "warmup": warmup})
        t += warmup + seconds + gap

    for cycle in range(args.rounds):
        add("floor", "", 0, args.duration, args.warmup)
        order = ("1", batched) if cycle % 2 == 0 else (batched, "1")
        for target in order:
            add("worker", target, args.devices, args.duration, args.warmup)
    add("floor", "", 0, args.duration, args.warmup)
    half = args.single_duration / 2
    for target in ("1", batched, batched, "1"):
        add("single", target, 1, half, min(args.warmup, 0.2))
    return windows


def run(args: argparse.Namespace) -> int:
    import multiprocessing
    import uuid
    from concurrent.futures import ProcessPoolExecutor

    from cloud_service.config import Config
    from cloud_service.server import Server
    from simulators.support.broker import MosquittoBroker
    from splitinfer.errors import BadInputError
    from splitinfer.manifest import Manifest
    from splitinfer.topics import topic_name

    if (args.devices < 1 or args.max_batch < 2 or args.duration <= 0 or args.rounds < 1
            or args.warmup < 0 or args.single_duration <= 0):
        raise BadInputError("expected --devices >= 1, --max-batch >= 2 (1 is the baseline "
                            "it is compared with), --duration > 0, --warmup >= 0, "
                            "--single-duration > 0 and --rounds >= 1")

    def say(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr)

    batched = str(args.max_batch)
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        say("preparing the split …")
        split_dir = _prepare_split(args, work)
        manifest = Manifest.load(split_dir)
        replay = _replay_set(split_dir)
        batches = sorted({*RAW_BATCHES, args.max_batch} - {b for b in RAW_BATCHES
                                                            if b > max(32, args.max_batch)})
        url = args.broker
        if url is None:
            broker = MosquittoBroker()
            broker.start()
            stack.callback(broker.close)
            url = broker.url
        run_id = uuid.uuid4().hex[:8]
        servers: dict[str, Any] = {}
        threads = []
        for name in ("1", batched):
            config = Config(artifacts=split_dir, broker=url, prefix=f"bench{run_id}b{name}",
                            group="", max_batch=int(name), max_delay_ms=args.max_delay_ms,
                            threads=args.threads, metrics_interval_s=0)
            servers[name] = server = Server(config)
            threads.append(server.start_in_thread(60))

        def stop_servers() -> None:
            for server in servers.values():
                server.should_exit = True

        stack.callback(stop_servers)
        raw_tail = _RawTail(split_dir, replay, args.threads)
        for batch in batches:
            raw_tail.measure(batch, 0.0)  # warm: the first runs of a shape are slow

        ctx = multiprocessing.get_context("spawn")
        pool = stack.enter_context(ProcessPoolExecutor(max_workers=1, mp_context=ctx))
        pool.submit(_warm_up).result()  # spawn and import before any clock runs
        # Connecting and subscribing the devices takes a second or two.
        windows = _schedule(time.time() + 1.0 + 0.05 * args.devices, args, batched)
        spec = {
            "broker": url, "split_id": manifest.split_id, "devices": args.devices,
            "replay": replay, "nice": args.nice, "windows": windows,
            "targets": {name: {"prefix": s.config.prefix, "model": topic_name(manifest.model)}
                        for name, s in servers.items()},
        }
        say(f"{args.rounds} cycles of {args.duration:g} s slices: raw onnxruntime at batch "
            f"{', '.join(map(str, batches))} ({args.threads} thread(s)), worker at "
            f"--max-batch 1, worker at --max-batch {batched} ({args.devices} devices) …")
        future = pool.submit(_devices_main, spec)
        # floors[slice][batch] = (samples, seconds)
        floors: list[dict[int, tuple[int, float]]] = []
        marks: list[tuple[_Mark, _Mark] | None] = []
        for window in windows:
            if window["kind"] == "floor":
                time.sleep(max(0.0, window["start"] - time.time()))
                share = (window["end"] - time.time()) / len(batches)
                order = batches if len(floors) % 2 == 0 else list(reversed(batches))
                floors.append({b: raw_tail.measure(b, share) for b in order})
                marks.append(None)
            else:
                server = servers[window["target"]]
                time.sleep(max(0.0, window["start"] + window["warmup"] - time.time()))
                first = _mark(server)
                time.sleep(max(0.0, window["end"] - time.time()))
                marks.append((first, _mark(server)))
        tallies = future.result()["windows"]
        for server in servers.values():
            server.should_exit = True
        for thread in threads:
            thread.join(60)

    report = _report(args, manifest, floors, windows, marks, tallies)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 1 if args.check and not all(report["targets"].values()) else 0


def _pooled(windows: list[dict[str, Any]], marks: list[tuple[_Mark, _Mark] | None],
            tallies: list[dict[str, Any]], pick: list[int]) -> dict[str, Any]:
    """A worker setting's figures over its slices ``pick``."""
    seconds = sum(windows[i]["end"] - windows[i]["start"] - windows[i]["warmup"]
                  for i in pick)
    answered = sum(tallies[i]["answered"] for i in pick)
    latencies = sorted(x for i in pick for x in tallies[i]["latencies"])
    window = tail = starved = held = 0.0
    batches = samples = 0
    for i in pick:
        pair = marks[i]
        if pair is None:
            continue
        a, b = pair
        window += b[0] - a[0]
        tail += b[1] - a[1]
        starved += b[2] - a[2]
        held += b[3] - a[3]
        batches += b[4] - a[4]
        samples += b[5] - a[5]
    window = max(window, 1e-9)
    return {
        "samples_per_s": answered / seconds if seconds > 0 else 0.0,
        "per_slice_samples_per_s": [
            tallies[i]["answered"] / max(1e-9, windows[i]["end"] - windows[i]["start"]
                                         - windows[i]["warmup"]) for i in pick],
        "p50_ms": 1e3 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "errors": sum(tallies[i]["errors"] for i in pick),
        # Worker counters over the counted parts of the slices:
        "mean_batch_size": samples / max(1, batches),
        "tail_ms_per_sample": 1e3 * tail / max(1, samples),
        # Share of the time the tail ran / waited for any job / waited for company. Busy
        # near 1 with a slower tail_ms_per_sample than the floor means the tail was fed
        # but shared the CPU with receiving and answering.
        "tail_busy": tail / window,
        "tail_starved": starved / window,
        "tail_held": held / window,
    }


def _report(args: argparse.Namespace, manifest: Any,
            floor_slices: list[dict[int, tuple[int, float]]],
            windows: list[dict[str, Any]], marks: list[tuple[_Mark, _Mark] | None],
            tallies: list[dict[str, Any]]) -> dict[str, Any]:
    batched = str(args.max_batch)
    # Each batch size's rate pooled over every floor slice; the best is the floor.
    sweep = {b: sum(s[b][0] for s in floor_slices) / sum(s[b][1] for s in floor_slices)
             for b in floor_slices[0]}
    sweep = dict(sorted(sweep.items()))
    best_batch = max(sweep, key=lambda b: sweep[b])
    floors = [s[best_batch][0] / s[best_batch][1] for s in floor_slices]
    slices = {name: [i for i, w in enumerate(windows)
                     if w["kind"] == "worker" and w["target"] == name]
              for name in ("1", batched)}
    worker = {name: _pooled(windows, marks, tallies, pick) for name, pick in slices.items()}
    singles = {}
    for name in ("1", batched):
        pick = [i for i, w in enumerate(windows) if w["kind"] == "single" and w["target"] == name]
        lat = sorted(x for i in pick for x in tallies[i]["latencies"])
        singles[name] = (1e3 * statistics.median(lat) if lat else None, len(lat),
                         sum(tallies[i]["errors"] for i in pick))
    for name in worker:
        worker[name]["single_device_p50_ms"] = singles[name][0]
        worker[name]["single_device_requests"] = singles[name][1]
        worker[name]["errors"] += singles[name][2]
        worker[name]["max_batch"] = int(name)
    floor = sweep[best_batch]
    base, top = worker["1"], worker[batched]
    cycles = []
    for c in range(args.rounds):
        around = statistics.fmean(floors[c:c + 2])
        one, many = base["per_slice_samples_per_s"][c], top["per_slice_samples_per_s"][c]
        cycles.append({"floor_samples_per_s": around, "batched_samples_per_s": many,
                       "max_batch_1_samples_per_s": one, "batched_vs_raw_best": many / around,
                       "batched_vs_max_batch_1": many / one if one else None})
    p50_on, p50_off = singles[batched][0], singles["1"][0]
    delta = p50_on - p50_off if p50_on is not None and p50_off is not None else None
    ratios = {
        "batched_vs_raw_best": top["samples_per_s"] / floor,
        "batched_vs_max_batch_1": (top["samples_per_s"] / base["samples_per_s"]
                                   if base["samples_per_s"] else None),
        "max_batch_1_vs_raw_best": base["samples_per_s"] / floor,
        "raw_best_vs_raw_batch_1": sweep[best_batch] / sweep[1],
    }
    return {
        "model": manifest.model,
        "split_id": manifest.split_id,
        "cut": [s.to_dict() for s in manifest.cut],
        "bytes_per_request": manifest.bytes_per_sample,
        "threads": args.threads,
        "devices": args.devices,
        "max_batch": args.max_batch,
        "max_delay_ms": args.max_delay_ms,
        "slice_s": args.duration,
        "cycles": args.rounds,
        "raw_ort_samples_per_s": {str(b): v for b, v in sweep.items()},
        # Each batch size pooled over the floor slices; the floor is the best of them
        # (its rate in each slice listed).
        "raw_ort_best": {"batch": best_batch, "samples_per_s": floor,
                         "ms_per_sample": 1e3 / floor, "per_slice_samples_per_s": floors},
        "raw_ort_batch_1_ms": 1e3 / sweep[1],
        "worker": {f"max_batch_{name}": figures for name, figures in worker.items()},
        "single_device": {"p50_ms_batching": p50_on, "p50_ms_max_batch_1": p50_off,
                          "delta_ms": delta, "max_delay_ms": args.max_delay_ms},
        "ratios": ratios,
        "cycle_ratios": cycles,
        "targets": {
            "batched_ge_0.85_raw_best": ratios["batched_vs_raw_best"] >= 0.85,
            "batched_ge_max_batch_1": top["samples_per_s"] >= base["samples_per_s"],
            "single_device_delta_le_max_delay": delta is not None
            and delta <= args.max_delay_ms,
        },
        "note": "measured on whatever CPU ran this, shared with other work; floor and "
                "workers take turns in short slices and share cores and onnxruntime settings",
    }


def format_report(r: dict[str, Any]) -> str:
    raw = r["raw_ort_samples_per_s"]
    best = r["raw_ort_best"]
    slices = best["per_slice_samples_per_s"]
    lines = [
        f"tail of {r['model']} ({r['split_id']}), cut "
        f"{', '.join(c['name'] + ' ' + c['dtype'] for c in r['cut'])}, "
        f"{r['bytes_per_request']} B/request, onnxruntime threads {r['threads']}",
        "raw onnxruntime by batch: " + "  ".join(f"b{b}: {v:.0f}/s" for b, v in raw.items()),
        f"raw onnxruntime (floor): batch {best['batch']}, {best['samples_per_s']:.0f}/s "
        f"({best['ms_per_sample']:.2f} ms/sample) over {len(slices)} slices "
        f"({min(slices):.0f}-{max(slices):.0f}/s)",
    ]
    for name, phase in r["worker"].items():
        per = phase["per_slice_samples_per_s"]
        lines.append(
            f"worker {name:>12}: {phase['samples_per_s']:7.0f} samples/s "
            f"({phase['samples_per_s'] / best['samples_per_s']:.2f}x floor; slices "
            f"{min(per):.0f}-{max(per):.0f}/s), mean batch {phase['mean_batch_size']:.1f}, "
            f"tail {phase['tail_ms_per_sample']:.2f} ms/sample, busy "
            f"{100 * phase['tail_busy']:.0f}% (starved {100 * phase['tail_starved']:.0f}%, "
            f"held {100 * phase['tail_held']:.0f}%), p50 {_ms(phase['p50_ms'])}, "
            f"p99 {_ms(phase['p99_ms'])} with {r['devices']} devices; errors "
            f"{phase['errors']}")
    single = r["single_device"]
    lines.append(
        f"one device p50: {_ms(single['p50_ms_batching'])} batching vs "
        f"{_ms(single['p50_ms_max_batch_1'])} at --max-batch 1 (delta "
        f"{_ms(single['delta_ms'])}, allowed {single['max_delay_ms']:.1f} ms; tail alone "
        f"{r['raw_ort_batch_1_ms']:.2f} ms)")
    cycles = r["cycle_ratios"]
    lines.append("per cycle, batched/floor: " + " ".join(
        f"{c['batched_vs_raw_best']:.2f}" for c in cycles) + "; batched/max-batch-1: " + " ".join(
        _num(c["batched_vs_max_batch_1"]) for c in cycles))
    ratios = r["ratios"]
    lines.append(f"pooled ratios: batched/floor {ratios['batched_vs_raw_best']:.2f} "
                 f"(target >= 0.85), batched/max-batch-1 "
                 f"{_num(ratios['batched_vs_max_batch_1'])} (target >= 1)")
    lines.append("targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}"
                                         for k, v in r["targets"].items()))
    starved = max(phase["tail_starved"] for phase in r["worker"].values())
    if starved > 0.05:
        lines.append(f"warning: the tail waited for requests up to {100 * starved:.0f}% of a "
                     "slice: the devices, not the worker, limited throughput (a busy box? "
                     "try --nice 0 or fewer --devices)")
    lines.append(f"note: {r['note']}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
