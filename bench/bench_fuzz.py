"""``splitinfer bench fuzz``: hostile messages against a real worker process.

Generated messages of many kinds (structured mutations of a valid request: wrong types,
huge / negative / bool dimensions, dtype and size mismatches, nesting bombs, flat element
floods, huge str/bin claims, truncated msgpack, ext types, bad version / kind / deadline /
quantization / codec fields, random bytes, …), reproducible from ``--seed``, are published
over MQTT 5 to a private mosquitto on a request topic, to a worker running in its own
process (``cloud_service.server.Server``, plus a task on its event loop that measures how
late its own timer fires: the longest stall). Every ``--valid-every``-th message is a valid
request whose answer is checked against onnxruntime running the tail here. Each message
carries its index as MQTT 5 correlation data, which the worker echoes, so every answer is
matched to what caused it.

Reported beside the targets of issue 10: replies by ``err.code``, ``internal`` replies
(target 0), crashes (worker process gone, target 0), no reply within 20 s (target 0),
longest event-loop stall (target <= 50 ms), worker RSS at start and end (growth target
<= 20 MB, read from /proc/PID/status), valid requests answered correctly (target all).
A benchmark, not a test: ``tests/test_fuzz.py`` runs a short version.

The private mosquitto lets payloads up to twice the worker's limit through (the shipped
config stops them at the worker's limit), so the worker's own ``payload_too_large`` is
exercised too. Bytes in flight are bounded to about one largest payload (a bounded broker
drops what exceeds a client's queue). Reading the figures: the stall of an 8 MiB message
is mostly paho copying the packet on the loop (``max_stall_cpu_bound_ms``: the worst stall
counting only the loop thread's own CPU time; the rest of a longer stall is waiting for a
CPU on a busy machine); RSS growth up to about twice the payload limit is glibc keeping
the freed 8 MiB buffers in its heap (its mmap threshold rises after the first big free),
not a leak: it does not grow with the number of messages.

``python -m bench.bench_fuzz --child …`` is the worker side (used by the bench).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulators.fuzz_messages import BURST, FuzzGenerator, schedule
from splitinfer.errors import BadInputError, StartupError

__all__ = ["add_parser", "run_fuzz", "TARGETS"]

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

MODEL_TOPIC = "fuzzed"
REPLY_TIMEOUT_S = 20.0
WINDOW = 16  # messages in flight at once
LAG_WINDOW_S = 0.25  # the worker's lag monitor writes its worst per window of this length
TARGETS = {"internal": 0, "crashes": 0, "no_reply": 0, "leaky_replies": 0,
           "max_stall_ms": 50.0, "rss_growth_mb": 20.0}
# An error message that names a Python class, shows an object or quotes a library's
# exception: what a reply must never carry (issue 10).
LEAK = re.compile(r"Traceback|Exception\b|Error\b|NoneType|object at 0x|<class '|"
                  r"'(dict|list|tuple|bytes|bytearray)'|\b(dict|list|tuple)\b")


# --- the worker side (a child process) -----------------------------------------------------


async def _lag_monitor(path: Path, tick_s: float = 0.005, window_s: float = LAG_WINDOW_S
                       ) -> None:
    """Append ``unix_time max_lag_ms cpu_ms`` per window to ``path``: how late a timer on
    this loop fired beyond its tick, the longest in each window, and the CPU time the
    loop's thread spent during that tick (much less than the lag: the process was waiting
    for a CPU, not working; on a busy machine that is the machine, not the worker)."""
    loop = asyncio.get_running_loop()
    with open(path, "a", buffering=1) as out:
        worst, worst_cpu, window_end = 0.0, 0.0, loop.time() + window_s
        while True:
            before, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(tick_s)
            late = loop.time() - before - tick_s
            if late > worst:
                worst, worst_cpu = late, time.thread_time() - cpu
            if loop.time() >= window_end:
                out.write(f"{time.time():.3f} {worst * 1e3:.3f} {worst_cpu * 1e3:.3f}\n")
                worst, worst_cpu, window_end = 0.0, 0.0, loop.time() + window_s


def _child(argv: Sequence[str]) -> int:
    from cloud_service.config import Config
    from cloud_service.server import Server

    ap = argparse.ArgumentParser(prog="python -m bench.bench_fuzz --child")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--broker", required=True)
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--lag-file", required=True)
    ap.add_argument("--max-payload", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = Config(artifacts=Path(args.artifacts), broker=args.broker, prefix=args.prefix,
                    group=args.prefix, threads=1, metrics_interval_s=0,
                    max_payload=args.max_payload)

    async def main() -> None:
        server = Server(config, on_started=lambda _s: print("fuzz worker ready", flush=True))
        monitor = asyncio.create_task(_lag_monitor(Path(args.lag_file)), name="lag-monitor")
        try:
            await server.serve()
        finally:
            monitor.cancel()

    asyncio.run(main())
    return 0


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --- the bench -----------------------------------------------------------------------------


def _digits_split(root: Path) -> Path:
    from splitter import split_model, zoo

    out = root / "digits_relu3"
    split_model(zoo.digits_cnn_path(), ["relu3"], out, num_samples=4)
    return out


def run_fuzz(*, messages: int = 10000, seed: int = 0, valid_every: int = 20,
             artifacts: str | Path | None = None, broker_url: str | None = None,
             max_payload: int | None = None) -> dict[str, Any]:
    """Run the fuzz (see the module docstring); the report as a dict.

    ``artifacts``: one split directory (default: the digits CNN split at ``relu3``, made
    here). ``broker_url``: a broker speaking MQTT 5 (default: a private mosquitto).
    """
    from simulators.support.broker import MosquittoBroker
    from splitinfer.manifest import Manifest, find_split_dirs
    from splitinfer.wire import DEFAULT_MAX_PAYLOAD

    if messages < 1:
        raise BadInputError(f"--messages {messages}: expected at least 1")
    if valid_every < 0:
        raise BadInputError(f"--valid-every {valid_every}: expected 0 (none) or more")
    limit = max_payload or DEFAULT_MAX_PAYLOAD
    with tempfile.TemporaryDirectory(prefix="splitinfer-fuzz-") as tmp:
        work = Path(tmp)
        if artifacts is None:
            split_dir = _digits_split(work)
        else:
            dirs = find_split_dirs(artifacts)
            if len(dirs) != 1:
                raise BadInputError(f"--artifacts {artifacts}: expected one split directory, "
                                    f"found {len(dirs)}")
            split_dir = dirs[0]
        manifest = Manifest.load(split_dir)
        broker = None
        url = broker_url
        if url is None:
            # The worker is the target: this broker lets through payloads over the
            # worker's limit (the shipped config refuses them itself), so that the
            # worker's own refusal is exercised too.
            room = 2 * limit + 64 * 1024
            broker = MosquittoBroker(extra_config=(f"message_size_limit {2 * limit}",
                                                   f"max_packet_size {room}"))
            broker.start()
            url = broker.url
        try:
            # An outside broker may close the connection of a client that sends more
            # than its own limit: no oversize messages then.
            kinds = schedule(messages, valid_every, seed,
                             exclude=("oversize",) if broker is None else ())
            report = _run(url, split_dir, manifest, work, kinds, seed=seed, max_payload=limit)
        finally:
            if broker is not None:
                broker.close()
    report.update({"split_id": manifest.split_id, "seed": seed,
                   "broker": "external" if broker_url else "mosquitto (private, loopback)"})
    return report


def _spawn_worker(url: str, split_dir: Path, prefix: str, work: Path, max_payload: int
                  ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    log_path, lag_path = work / "worker.log", work / "lag.txt"
    cmd = [sys.executable, "-m", "bench.bench_fuzz", "--child", "--broker", url,
           "--artifacts", str(split_dir), "--prefix", prefix, "--lag-file", str(lag_path),
           "--max-payload", str(max_payload)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while "fuzz worker ready" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise StartupError("fuzz worker did not start: "
                               f"{log_path.read_text(errors='replace')[-800:]}")
        time.sleep(0.05)
    return proc, log_path, lag_path


def _run(url: str, split_dir: Path, manifest: Any, work: Path, kinds: list[str], *, seed: int,
         max_payload: int) -> dict[str, Any]:
    import onnxruntime as ort

    from cloud_service.registry import session_options

    gen = FuzzGenerator.for_manifest(manifest, seed=seed, max_payload=max_payload)
    tail = ort.InferenceSession(str(manifest.resolve(split_dir, "tail")), session_options(1),
                                providers=["CPUExecutionProvider"])
    outputs = [spec.name for spec in manifest.outputs]

    def expect(arrays: Mapping[str, Array]) -> list[Array]:
        return [np.asarray(o) for o in tail.run(outputs, dict(arrays))]

    prefix = f"fuzz{os.getpid()}"
    proc, log_path, lag_path = _spawn_worker(url, split_dir, prefix, work, max_payload)
    try:
        report = asyncio.run(_drive(url, prefix, gen, expect, outputs, proc, kinds))
        report["crashes"] = 0 if proc.poll() is None else 1
        report["worker_exit"] = proc.returncode
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    start, end = report.pop("_window")
    sent = report.pop("_sent")
    stalls = []
    for line in lag_path.read_text().splitlines():
        when, ms, cpu_ms = (float(x) for x in line.split())
        if start <= when <= end + 0.5:
            stalls.append((ms, cpu_ms, when))
    worst = max(stalls, default=(0.0, 0.0, 0.0))
    report["max_stall_ms"] = round(worst[0], 3)
    report["max_stall_cpu_ms"] = round(worst[1], 3)  # the loop thread's CPU in that stall
    report["max_stall_cpu_bound_ms"] = round(max((min(ms, cpu) for ms, cpu, _ in stalls),
                                                 default=0.0), 3)
    # the worst windows, with the kinds sent during them and the half second before
    report["worst_stalls"] = [
        {"ms": round(ms, 3), "cpu_ms": round(cpu, 3), "kinds": dict(Counter(
            k for t, k in sent if when - LAG_WINDOW_S - 0.5 <= t <= when))}
        for ms, cpu, when in sorted(stalls, reverse=True)[:5]]
    worker_log = log_path.read_text(errors="replace").splitlines()
    report["worker_log_lines"] = len(worker_log)
    report["worker_log_head"] = [line[:200] for line in worker_log[:8]]
    report["worker_tracebacks"] = sum(line.startswith("Traceback") for line in worker_log)
    report["pass"] = _passed(report)
    return report


@dataclass
class _Sent:
    kind: str
    sent: float
    arrays: Mapping[str, Array] | None = None


async def _drive(url: str, prefix: str, gen: FuzzGenerator,
                 expect: Callable[[Mapping[str, Array]], list[Array]], outputs: list[str],
                 worker: subprocess.Popen[bytes], kinds: list[str]) -> dict[str, Any]:
    from splitinfer.errors import WireError
    from splitinfer.mqtt import BrokerConfig
    from splitinfer.mqtt_client import open_client, reason_text
    from splitinfer.wire import decode

    client = await open_client(BrokerConfig.from_url(url), f"{prefix}-fuzzer")
    protocol = client.protocol
    if protocol != "5":
        await client.disconnect()
        raise StartupError(f"the fuzz matches answers by MQTT 5 correlation data; {url} "
                           f"speaks MQTT {protocol}")
    waiting: dict[bytes, asyncio.Future[bytes]] = {}
    replies: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    sent_kinds: Counter[str] = Counter()
    sent_at: list[tuple[float, str]] = []
    result: dict[str, Any] = {"valid_sent": 0, "valid_correct": 0, "no_reply": 0,
                              "broker_refused": 0, "valid_wrong": [], "leaky_replies": 0,
                              "leaks": []}
    rss: list[float] = []
    burst_valid_ms: list[float] = []

    async def reader() -> None:
        async for message in client.messages():
            corr = message.correlation
            fut = waiting.pop(corr, None) if corr else None
            if fut is not None and not fut.done():
                fut.set_result(message.payload)

    async def sampler() -> None:
        while True:
            value = _rss_mb(worker.pid)
            if value is not None:
                rss.append(value)
            await asyncio.sleep(0.25)

    def judge(index: int, item: _Sent, payload: bytes) -> None:
        try:
            answer = decode(payload, max_bytes=1 << 30)
        except WireError:
            replies["undecodable_reply"] += 1
            return
        code = answer.error.code if answer.error is not None else "ok"
        replies[code] += 1
        if answer.error is not None and LEAK.search(answer.error.message):
            result["leaky_replies"] += 1
            if len(result["leaks"]) < 5:
                result["leaks"].append(answer.error.message[:200])
        by_kind.setdefault(item.kind, Counter())[code] += 1
        if item.arrays is None:
            return
        want = expect(item.arrays)
        got = answer.arrays()
        ok = answer.error is None and all(
            name in got and got[name].shape == w.shape
            and np.allclose(got[name], w, rtol=1e-4, atol=1e-4)
            for name, w in zip(outputs, want, strict=True))
        if ok:
            result["valid_correct"] += 1
        elif len(result["valid_wrong"]) < 5:
            result["valid_wrong"].append({"index": index, "code": code,
                                          "msg": answer.error.message if answer.error else ""})

    window = asyncio.Semaphore(WINDOW)
    # Bytes in flight bounded too: a bounded broker drops what exceeds its per-client
    # queue (max_queued_bytes), which would read as lost replies here.
    in_flight = {"bytes": 0}
    drained = asyncio.Condition()
    byte_window = gen.max_payload + 1024 * 1024
    request_topic = f"{prefix}/v1/req/{MODEL_TOPIC}/fuzz"
    reply_topic = f"{prefix}/v1/res/fuzz"

    def build(index: int, kind: str) -> tuple[bytes, Mapping[str, Array] | None]:
        rid = f"fz{index:07d}"
        if kind == "valid":
            return gen.valid(rid)
        if kind == "flood_burst":
            return gen.flat_flood(rid, count=gen.max_payload), None
        return gen.make(kind, rid), None

    async def one(index: int, kind: str, payload: bytes,
                  arrays: Mapping[str, Array] | None) -> None:
        sent_kinds[kind] += 1
        sent_at.append((time.time(), kind))
        item = _Sent(kind, time.perf_counter(), arrays)
        corr = str(index).encode()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        waiting[corr] = fut
        try:
            code = await asyncio.wait_for(client.publish(
                request_topic, payload, qos=1, response_topic=reply_topic, correlation=corr),
                REPLY_TIMEOUT_S)
            refusal = reason_text(code) if code is not None and code >= 0x80 else ""
        except Exception as exc:  # e.g. the broker closed the connection: no PUBACK
            refusal = repr(exc)
        if refusal:  # e.g. PUBACK 0x95: a packet over the broker's message_size_limit
            log.info("message %d (%s) not accepted by the broker: %s", index, kind, refusal)
            waiting.pop(corr, None)
            result["broker_refused"] += 1
            return
        if arrays is not None:
            result["valid_sent"] += 1
        try:
            answer = await asyncio.wait_for(fut, REPLY_TIMEOUT_S)
        except asyncio.TimeoutError:
            waiting.pop(corr, None)
            if kind == "oversize":  # a broker whose message_size_limit is the worker's
                result["broker_refused"] += 1
                return
            result["no_reply"] += 1
            by_kind.setdefault(kind, Counter())["no_reply"] += 1
            return
        if kind == "valid" and index > 0 and kinds[index - 1] == "flood_burst":
            burst_valid_ms.append((time.perf_counter() - item.sent) * 1e3)
        judge(index, item, answer)

    async def paced(index: int, kind: str, payload: bytes,
                    arrays: Mapping[str, Array] | None) -> None:
        try:
            await one(index, kind, payload, arrays)
        finally:
            window.release()
            async with drained:
                in_flight["bytes"] -= len(payload)
                drained.notify_all()

    tasks: set[asyncio.Task[None]] = set()
    background = [asyncio.create_task(reader(), name="fuzz-reader"),
                  asyncio.create_task(sampler(), name="fuzz-rss")]
    try:
        await client.subscribe(f"{prefix}/v1/res/+", qos=1)
        for i in range(20):  # warm-up: sessions and caches, before RSS and stalls count
            payload, _arrays = gen.valid(f"warm{i}")
            fut = asyncio.get_running_loop().create_future()
            waiting[b"warm%d" % i] = fut
            await client.publish(request_topic, payload, qos=1, response_topic=reply_topic,
                                 correlation=b"warm%d" % i)
            await asyncio.wait_for(fut, 60)
        await asyncio.sleep(0.5)
        rss_start = _rss_mb(worker.pid)
        rss.clear()
        t_start, wall0 = time.time(), time.perf_counter()
        for index, kind in enumerate(kinds):
            if index % 64 == 0 and worker.poll() is not None:
                log.error("the worker died (exit %s) at message %d", worker.returncode, index)
                break  # a crash: what is in flight times out, nothing more is sent
            payload, arrays = build(index, kind)
            await window.acquire()
            size = len(payload)
            async with drained:
                while in_flight["bytes"] and in_flight["bytes"] + size > byte_window:
                    await drained.wait()
                in_flight["bytes"] += size
            task = asyncio.create_task(paced(index, kind, payload, arrays),
                                       name=f"fuzz-{index}")
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*list(tasks))
        wall = time.perf_counter() - wall0
        t_end = time.time()
        await asyncio.sleep(1.0)  # let the worker settle before the last RSS reading
        rss_end = _rss_mb(worker.pid)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await client.disconnect()
    kinds_count = {k: v for k, v in sorted(sent_kinds.items()) if k != "valid"}
    result.update({
        "messages": sum(sent_kinds.values()), "kinds": kinds_count,
        "replies": dict(sorted(replies.items())),
        "internal": replies.get("internal", 0), "rss_start_mb": _round(rss_start),
        "rss_end_mb": _round(rss_end), "rss_peak_mb": _round(max(rss, default=None)),
        "rss_growth_mb": _round(rss_end - rss_start if rss_start and rss_end else None),
        "burst_valid_ms": round(max(burst_valid_ms), 3) if burst_valid_ms else None,
        "replies_by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "wall_s": round(wall, 3), "mqtt_protocol": protocol, "_window": (t_start, t_end),
        "_sent": sent_at,
    })
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _passed(r: Mapping[str, Any]) -> bool:
    return (r["internal"] == TARGETS["internal"] and r["crashes"] == TARGETS["crashes"]
            and r["no_reply"] == TARGETS["no_reply"]
            and r["leaky_replies"] == TARGETS["leaky_replies"]
            and r["max_stall_ms"] <= TARGETS["max_stall_ms"]
            and r["rss_growth_mb"] is not None
            and r["rss_growth_mb"] <= TARGETS["rss_growth_mb"]
            and r["valid_correct"] == r["valid_sent"] and len(r["kinds"]) >= 12)


def _print(r: Mapping[str, Any]) -> None:
    def line(label: str, value: Any, target: str, ok: bool) -> None:
        print(f"  {label:<24} {value!s:>12}   target {target:<12} {'ok' if ok else 'MISSED'}")

    print(f"fuzz: {r['messages']} messages of {len(r['kinds'])} kinds, seed {r['seed']}, "
          f"split {r['split_id']}, {r['wall_s']} s, MQTT {r['mqtt_protocol']}, {r['broker']}")
    print("  replies  " + ", ".join(f"{k} {v}" for k, v in r["replies"].items()))
    line("internal replies", r["internal"], "0", r["internal"] == 0)
    line("crashes", r["crashes"], "0", r["crashes"] == 0)
    line("no reply", r["no_reply"], "0", r["no_reply"] == 0)
    line("replies leaking internals", r["leaky_replies"], "0", r["leaky_replies"] == 0)
    for text in r["leaks"][:3]:
        print(f"    e.g. {text!r}")
    line("longest loop stall ms", r["max_stall_ms"], "<= 50", r["max_stall_ms"] <= 50)
    growth = r["rss_growth_mb"]
    line("worker RSS growth MB", growth, "<= 20", growth is not None and growth <= 20)
    print(f"  {'':<24} (RSS start {r['rss_start_mb']} MB, end {r['rss_end_mb']} MB, "
          f"peak {r['rss_peak_mb']} MB)")
    line("valid answered right", f"{r['valid_correct']}/{r['valid_sent']}", "all",
         r["valid_correct"] == r["valid_sent"])
    line("kinds", len(r["kinds"]), ">= 12", len(r["kinds"]) >= 12)
    if r.get("burst_valid_ms") is not None:
        print(f"  a valid request sent right behind {BURST} back-to-back floods of the largest "
              f"size answered in {r['burst_valid_ms']} ms")
    print(f"  worker log: {r['worker_log_lines']} lines, {r['worker_tracebacks']} tracebacks")
    print(f"  {'PASS' if r['pass'] else 'FAIL'}")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fuzz", help="hostile messages against a real worker: reply codes, "
                       "internal errors, crashes, event-loop stall, RSS",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=10000,
                   help="messages to send, valid ones included (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default %(default)s)")
    p.add_argument("--valid-every", type=int, default=20,
                   help="every K-th message is a valid request checked against onnxruntime "
                   "(default %(default)s; 0 = none)")
    p.add_argument("--artifacts", help="one split directory (default: the digits CNN split "
                   "at relu3, made in a temporary directory)")
    p.add_argument("--broker", help="an MQTT 5 broker URL (default: a private mosquitto)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    report = run_fuzz(messages=args.messages, seed=args.seed, valid_every=args.valid_every,
                      artifacts=args.artifacts, broker_url=args.broker)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    if "--child" in sys.argv[1:]:
        sys.exit(_child(sys.argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m bench.bench_fuzz")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    parsed = parser.parse_args(["fuzz", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
