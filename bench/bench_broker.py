"""Broker memory under a flood while the only worker is stalled (issue 10, deliverable 5).

One device publishes QoS 1 requests of ``payload_bytes`` as fast as the broker takes them
for ``seconds`` while the only worker (a subscriber on the workers' shared filter, same
client as ``splitinfer cloud serve``: MQTT 5 through :class:`splitinfer.mqtt_client.MqttClient`)
is SIGSTOPped. The broker's RSS is sampled from ``/proc/PID/status`` throughout and printed
beside the bound its configuration implies: its RSS at the start + what one stalled
subscriber may hold (:func:`simulators.support.broker.subscriber_bound_bytes`: twice
``max_inflight_bytes`` + ``max_queued_bytes``, because mosquitto 2.0.11 holds about two
copies of each message it keeps for a subscriber that does not read — measured, its
``$SYS/broker/heap/current`` says the same — plus bookkeeping for ``max_queued_messages``)
+ a packet being read and copied (2 x ``max_packet_size``). The worker is then
resumed and counts what reaches it: everything else was dropped by the broker (its queue
for the worker was full) or refused in a PUBACK.

``unbounded=True`` runs the pre-issue-10 tuning (no byte bounds, 16 MB messages) for
comparison; there RSS grows with the flood.

Run: ``python -m bench.bench_broker [--seconds S] [--payload-kb N] [--unbounded]``
(``splitinfer bench broker-flood`` once registered in simulators/cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from simulators.support.broker import (
    MAX_INFLIGHT_BYTES,
    MAX_PACKET_SIZE,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
    MEMORY_LIMIT,
    MosquittoBroker,
    subscriber_bound_bytes,
)
from splitinfer.errors import StartupError
from splitinfer.topics import DEFAULT_GROUP, Topics

__all__ = ["run_broker_flood", "add_parser", "main", "UNBOUNDED_TUNING"]

MB = 1024 * 1024
# What docker/mosquitto/mosquitto.conf shipped before issue 10.
UNBOUNDED_TUNING = (
    "set_tcp_nodelay true",
    "max_inflight_messages 0",
    "max_queued_messages 100000",
    "max_queued_bytes 0",
    "message_size_limit 16777216",
)


def _subscriber(url: str, topic: str) -> int:
    """The stand-in worker (a child process): subscribe, say 'ready', count messages;
    print the count on SIGUSR1, print it and exit on SIGTERM."""
    from splitinfer.mqtt import BrokerConfig
    from splitinfer.mqtt_client import Message, open_client

    async def run() -> int:
        count = 0

        def counted(_message: Message) -> None:  # the worker's fast path: a callback
            nonlocal count
            count += 1

        client = await open_client(BrokerConfig.from_url(url),
                                   f"flood-w-{uuid.uuid4().hex[:6]}", on_message=counted)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"received {count}", flush=True))
        try:
            await client.subscribe(topic, qos=1)
            print("ready", flush=True)
            await stop.wait()
        finally:
            await client.disconnect()  # never raises
        print(f"received {count}", flush=True)
        return 0

    return asyncio.run(run())


class _RssSampler:
    def __init__(self, broker: MosquittoBroker, every_s: float = 0.02) -> None:
        self.broker, self.every_s = broker, every_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.broker.rss_bytes()
            if rss:
                self.peak = max(self.peak, rss)
                self.samples += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _flood(url: str, topic: str, payload_bytes: int, seconds: float,
           inflight: int) -> dict[str, Any]:
    """Publish QoS 1 messages for ``seconds``, ``inflight`` unacknowledged at most."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from splitinfer.mqtt import BrokerConfig

    cfg = BrokerConfig.from_url(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood-device",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(inflight)
    cond = threading.Condition()
    acks: dict[str, int] = {"accepted": 0, "refused": 0, "no_subscriber": 0}
    state = {"outstanding": 0, "disconnects": 0, "closing": 0}

    def on_publish(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any = None) -> None:
        value = int(getattr(reason, "value", reason) or 0)
        with cond:
            key = "refused" if value >= 0x80 else "no_subscriber" if value == 16 else "accepted"
            acks[key] += 1
            state["outstanding"] -= 1
            cond.notify_all()

    def on_disconnect(*_args: Any) -> None:
        with cond:
            if not state["closing"]:  # the broker's doing, not our own DISCONNECT
                state["disconnects"] += 1
            cond.notify_all()

    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    client.connect(cfg.host, cfg.port, keepalive=30)
    client.loop_start()
    payload = os.urandom(payload_bytes)
    published = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            with cond:
                while state["outstanding"] >= inflight and time.monotonic() < end:
                    cond.wait(0.05)
                if time.monotonic() >= end:
                    break
                state["outstanding"] += 1
            info = client.publish(topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                with cond:
                    state["outstanding"] -= 1
                    state["disconnects"] += 1
                time.sleep(0.01)
                continue
            published += 1
        with cond:  # the last PUBACKs
            deadline = time.monotonic() + 5.0
            while state["outstanding"] > 0 and time.monotonic() < deadline:
                cond.wait(0.05)
    finally:
        with cond:
            state["closing"] = 1
        client.disconnect()
        client.loop_stop()
    return {"published": published, **acks, "device_disconnects": state["disconnects"]}


def run_broker_flood(*, seconds: float = 5.0, payload_bytes: int = 1 * MB,
                     inflight: int = 64, unbounded: bool = False,
                     prefix: str = "flood") -> dict[str, Any]:
    """Flood a stalled worker's queue on a fresh mosquitto; see the module docstring.

    Keys: ``bound_mb, rss_start_mb, rss_peak_mb, rss_end_mb, published, accepted,
    dropped_or_refused`` (as CONTRACTS.md) and ``delivered`` (what reached the worker once
    resumed), ``refused`` (PUBACK >= 0x80), ``no_subscriber``, ``device_disconnects``,
    ``payload_bytes``, ``seconds``, ``tuning`` ("bounded" | "unbounded"),
    ``within_bound``, ``queue_bound_mb``, ``memory_limit_mb``, ``offered_mb``.
    """
    topics = Topics(prefix)
    broker = (MosquittoBroker(tuned=False, extra_config=UNBOUNDED_TUNING) if unbounded
              else MosquittoBroker())
    broker.start()
    worker: subprocess.Popen[str] | None = None
    try:
        time.sleep(0.2)
        rss_start = broker.rss_bytes() or 0
        worker = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_broker", "--subscriber", broker.url,
             topics.shared_request_filter(DEFAULT_GROUP)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert worker.stdout is not None
        line = worker.stdout.readline().strip()
        if line != "ready":
            raise StartupError(f"the stand-in worker did not start: {line!r} "
                               f"{worker.stderr.read() if worker.stderr else ''}")
        os.kill(worker.pid, signal.SIGSTOP)
        with _RssSampler(broker) as sampler:
            flood = _flood(broker.url, topics.request("m", "flood-device"), payload_bytes,
                           seconds, inflight)
            time.sleep(0.3)
        rss_end = broker.rss_bytes() or 0
        os.kill(worker.pid, signal.SIGCONT)
        delivered = _drain(worker)
    finally:
        if worker is not None and worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGCONT)
                worker.kill()
            worker.wait(5)
        broker.close()
    queue_bound = subscriber_bound_bytes()
    bound = rss_start + queue_bound + 2 * MAX_PACKET_SIZE
    peak = max(sampler.peak, rss_end)
    return {
        "tuning": "unbounded" if unbounded else "bounded",
        "seconds": seconds, "payload_bytes": payload_bytes,
        "bound_mb": round(bound / MB, 1) if not unbounded else None,
        "queue_bound_mb": round(queue_bound / MB, 1),
        "memory_limit_mb": round(MEMORY_LIMIT / MB) if not unbounded else None,
        "rss_start_mb": round(rss_start / MB, 1), "rss_peak_mb": round(peak / MB, 1),
        "rss_end_mb": round(rss_end / MB, 1), "rss_samples": sampler.samples,
        "published": flood["published"], "accepted": flood["accepted"],
        "refused": flood["refused"], "no_subscriber": flood["no_subscriber"],
        "delivered": delivered,
        "dropped_or_refused": max(0, flood["published"] - delivered),
        "offered_mb": round(flood["published"] * payload_bytes / MB, 1),
        "device_disconnects": flood["device_disconnects"],
        "within_bound": None if unbounded else peak <= bound,
        "limits": {"max_inflight_bytes": MAX_INFLIGHT_BYTES,
                   "max_queued_bytes": MAX_QUEUED_BYTES,
                   "max_queued_messages": MAX_QUEUED_MESSAGES,
                   "max_packet_size": MAX_PACKET_SIZE},
    }


def _drain(worker: subprocess.Popen[str], every_s: float = 0.5, cap_s: float = 60.0) -> int:
    """Let the resumed worker read what the broker kept for it (until its count stops
    growing), then stop it; its count."""
    assert worker.stdout is not None
    last, end = -1, time.monotonic() + cap_s
    while time.monotonic() < end:
        time.sleep(every_s)
        worker.send_signal(signal.SIGUSR1)
        line = worker.stdout.readline()
        if not line.startswith("received "):
            break
        count = int(line.split()[1])
        if count == last:
            break
        last = count
    worker.send_signal(signal.SIGTERM)
    try:
        out, _ = worker.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        worker.kill()
        out, _ = worker.communicate()
    counts = [int(x.split()[1]) for x in out.splitlines() if x.startswith("received ")]
    return counts[-1] if counts else max(last, 0)


def format_report(r: dict[str, Any]) -> str:
    bound = (f"bound {r['bound_mb']} MB (start + {r['queue_bound_mb']} MB for the stalled "
             f"worker + a packet; heap cap {r['memory_limit_mb']} MB)"
             if r["bound_mb"] is not None else "no bound (pre-issue-10 tuning)")
    return "\n".join([
        f"broker flood ({r['tuning']} tuning): one device, {r['payload_bytes'] // 1024} KiB "
        f"QoS 1 messages for {r['seconds']:g} s, the only worker SIGSTOPped",
        f"  broker RSS: start {r['rss_start_mb']} MB, peak {r['rss_peak_mb']} MB, end "
        f"{r['rss_end_mb']} MB; {bound}"
        + ("" if r["within_bound"] is None else
           f" -> {'within' if r['within_bound'] else 'OVER'} the bound"),
        f"  published {r['published']} ({r['offered_mb']} MB), PUBACK accepted "
        f"{r['accepted']}, refused {r['refused']}; delivered to the worker once resumed "
        f"{r['delivered']}; dropped or refused {r['dropped_or_refused']}",
    ])


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("broker-flood", help="broker RSS under a flood with the worker stalled",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=_run_cli)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=5.0, help="flood duration (default 5)")
    p.add_argument("--payload-kb", type=int, default=1024,
                   help="payload per message in KiB (default 1024)")
    p.add_argument("--inflight", type=int, default=64,
                   help="unacknowledged publishes the device keeps (default 64)")
    p.add_argument("--unbounded", action="store_true",
                   help="the pre-issue-10 tuning, for comparison")
    p.add_argument("--json", action="store_true")


def _run_cli(args: argparse.Namespace) -> int:
    result = run_broker_flood(seconds=args.seconds, payload_bytes=args.payload_kb * 1024,
                              inflight=args.inflight, unbounded=args.unbounded)
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0 if result["within_bound"] in (True, None) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--subscriber"]:
        return _subscriber(argv[1], argv[2])
    parser = argparse.ArgumentParser(prog="python -m bench.bench_broker",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    return _run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
