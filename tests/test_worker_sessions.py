"""Persistent sessions, heartbeats and fencing with real ``splitinfer cloud serve`` worker
processes on a real mosquitto (the fixture's, on a free loopback port).

No timing assertions: waits are generous bounds; the measured times are printed (``-s``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_cloud_support import TinySplit, make_split, request_payload

from cloud_service.config import Config
from cloud_service.server import Server
from simulators.support.broker import EmbeddedBroker, MosquittoBroker
from splitinfer.topics import Topics
from splitinfer.wire import decode

NO_MATCHING_SUBSCRIBERS = 16


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> TinySplit:
    return make_split(tmp_path_factory.mktemp("sessions"), "tiny-s", seed=11)


class Device:
    """A paho MQTT 5 client on its own thread: sends requests, records PUBACK reason
    codes, results by request id and every worker status."""

    def __init__(self, broker: MosquittoBroker, topics: Topics) -> None:
        self.topics = topics
        self.lock = threading.Lock()
        self.results: dict[str, list[Any]] = {}
        self.statuses: dict[str, list[dict[str, Any]]] = {}
        self.pubacks: dict[int, int] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"dev-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._message
        self.client.on_publish = self._published
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(f"{topics.prefix}/v1/res/+", qos=1)
        self.client.subscribe(topics.worker_status_filter(), qos=1)

    def _message(self, _c: Any, _u: Any, message: Any) -> None:
        with self.lock:
            worker = self.topics.parse_worker_status(message.topic)
            if worker is not None:
                if message.payload:
                    self.statuses.setdefault(worker, []).append(json.loads(message.payload))
                return
            env = decode(message.payload)
            self.results.setdefault(env.request_id, []).append(env)

    def _published(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self.lock:
            self.pubacks[mid] = reason.value

    def send(self, split: TinySplit, device: str = "d1", seed: int = 0) -> tuple[str, int]:
        rid, payload = request_payload(split, split.sample(seed=seed), device_id=device,
                                       deadline=time.time() + 60)
        info = self.client.publish(self.topics.request("tiny", device), payload, qos=1)
        return rid, info.mid

    def puback(self, mid: int, timeout: float = 10) -> int:
        wait_until(lambda: mid in self.pubacks, timeout, "PUBACK")
        return self.pubacks[mid]

    def status(self, worker: str) -> dict[str, Any] | None:
        with self.lock:
            seen = self.statuses.get(worker)
            return seen[-1] if seen else None

    def answered(self, rids: list[str]) -> bool:
        with self.lock:
            return all(r in self.results for r in rids)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Seconds it took; fails the test past ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture()
def spawn(mosquitto: MosquittoBroker, split: TinySplit, topic_prefix: str, tmp_path: Path
          ) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a worker process; its log goes to tmp_path/<id>-<n>.log."""
    procs: list[subprocess.Popen[str]] = []
    group = f"g{topic_prefix}"

    def start(worker_id: str, *extra: str, query: str = "") -> subprocess.Popen[str]:
        env = {**os.environ, "SPLITINFER_ARTIFACTS": str(split.directory),
               "SPLITINFER_BROKER": mosquitto.url + query, "SPLITINFER_PREFIX": topic_prefix,
               "SPLITINFER_THREADS": "1", "SPLITINFER_GROUP": group}
        log = tmp_path / f"{worker_id}-{len(procs)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "splitinfer.cli", "-v", "cloud", "serve",
                 "--worker-id", worker_id, "--metrics-interval", "0", *extra],
                env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_persistent_session_survives_kill9(
        mosquitto: MosquittoBroker, split: TinySplit, topic_prefix: str,
        spawn: Callable[..., subprocess.Popen[str]], protocol: str) -> None:
    topics = Topics(topic_prefix)
    device = Device(mosquitto, topics)
    wid = f"w-{topic_prefix}"
    flags = ("--heartbeat", "0.2", "--fence-after", "0", "--session-expiry", "60")
    query = f"?protocol={protocol}"
    try:
        proc = spawn(wid, *flags, query=query)
        wait_until(lambda: (device.status(wid) or {}).get("state") == "online", 60,
                   "first heartbeat")
        first = device.status(wid)
        assert first is not None and first["session"] == "persistent"
        rid, _ = device.send(split)
        wait_until(lambda: device.answered([rid]), 20, "first answer")

        proc.kill()  # kill -9: no DISCONNECT; the broker publishes the will
        proc.wait(10)
        wait_until(lambda: (device.status(wid) or {}).get("state") == "offline", 20, "will")
        will = device.status(wid)
        assert will is not None and will["session"] == "persistent"
        queued = [device.send(split, seed=i) for i in range(5)]
        codes = {device.puback(mid) for _, mid in queued}
        assert codes == {0}  # mosquitto queues for the absent persistent session: "Success"

        again = spawn(wid, *flags, query=query)  # the same id within the session expiry
        took = wait_until(lambda: device.answered([r for r, _ in queued]), 60,
                          "queued requests answered after the restart")
        print(f"\nMQTT {protocol}: queued while down, answered {took:.2f} s after the "
              "restart began")
        assert all(len(device.results[r]) == 1 for r, _ in queued)
        again.send_signal(signal.SIGTERM)  # and the session goes with a graceful exit
        assert again.wait(30) == 0
        _, mid = device.send(split)
        assert device.puback(mid) == NO_MATCHING_SUBSCRIBERS
    finally:
        device.close()


def test_graceful_exit_ends_the_session(
        mosquitto: MosquittoBroker, split: TinySplit, topic_prefix: str,
        spawn: Callable[..., subprocess.Popen[str]]) -> None:
    topics = Topics(topic_prefix)
    device = Device(mosquitto, topics)
    wid = f"w-{topic_prefix}"
    try:
        proc = spawn(wid, "--heartbeat", "0.2", "--fence-after", "0")
        wait_until(lambda: (device.status(wid) or {}).get("state") == "online", 60,
                   "first heartbeat")
        rid, _ = device.send(split)
        wait_until(lambda: device.answered([rid]), 20, "first answer")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        states = [s["state"] for s in device.statuses[wid]]
        assert "draining" in states
        wait_until(lambda: (device.status(wid) or {}).get("state") == "offline", 10, "goodbye")
        assert device.status(wid)["session"] == "clean"  # type: ignore[index]
        _, mid = device.send(split)
        # No session is left holding a share: MQTT 5 tells the device at once.
        assert device.puback(mid) == NO_MATCHING_SUBSCRIBERS
    finally:
        device.close()


def test_a_stopped_replica_is_fenced_and_comes_back(
        mosquitto: MosquittoBroker, split: TinySplit, topic_prefix: str,
        spawn: Callable[..., subprocess.Popen[str]]) -> None:
    topics = Topics(topic_prefix)
    device = Device(mosquitto, topics)
    low, high = f"a-{topic_prefix}", f"b-{topic_prefix}"
    heartbeat, fence_after = 0.3, 1.5
    flags = ("--heartbeat", str(heartbeat), "--fence-after", str(fence_after))

    def state(wid: str) -> dict[str, Any]:
        return device.status(wid) or {}

    def burst(n: int, tag: str) -> list[str]:
        return [device.send(split, device=f"{tag}{i % 4}", seed=i)[0] for i in range(n)]

    try:
        procs = {wid: spawn(wid, *flags) for wid in (low, high)}
        wait_until(lambda: all(state(w).get("state") == "online" for w in (low, high)), 60,
                   "both online")
        rids = burst(20, "warm")
        wait_until(lambda: device.answered(rids), 30, "both serving")

        procs[high].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        took = wait_until(lambda: state(high).get("fenced_by") == low, 30,
                          "the stopped replica fenced by the other")
        print(f"\nSIGSTOPped replica fenced after {took:.2f} s (fence_after {fence_after} s, "
              f"heartbeat {heartbeat} s)")
        rids = burst(20, "after")  # none of them may go to the stopped one any more
        wait_until(lambda: device.answered(rids), 30, "answered by the live replica alone")
        time.sleep(max(0.0, stopped_at + 4 * fence_after - time.monotonic()))  # stay stopped

        procs[high].send_signal(signal.SIGCONT)
        back = wait_until(lambda: state(high).get("state") == "online"
                          and "fenced_by" not in state(high), 30, "the woken replica beats")
        print(f"woken replica online again after {back:.2f} s")
        # Waking up, it must not take its own 20 s of silence for its peer's.
        time.sleep(2 * fence_after)
        assert "fenced_by" not in state(low) and state(low)["state"] == "online"
        # Now the lowest id stops: the woken one (the only live one left) fences it, which
        # needs its subscriptions back.
        procs[low].send_signal(signal.SIGSTOP)
        wait_until(lambda: state(low).get("fenced_by") == high, 30, "fenced the other way")
        rids = burst(20, "last")
        wait_until(lambda: device.answered(rids), 30, "answered by the woken replica")
        procs[low].send_signal(signal.SIGCONT)
        assert all(len(v) == 1 for v in device.results.values())  # one answer each
    finally:
        device.close()


# amqtt leaves the socket of the MQTT 5 CONNECT it rejects for the GC to close.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_persistent_session_on_a_broker_without_mqtt5(
        embedded_broker: EmbeddedBroker, split: TinySplit, topic_prefix: str) -> None:
    """protocol=auto falls back to 3.1.1: the session options follow (clean_session=False)."""
    cfg = Config(artifacts=split.directory, broker=embedded_broker.url, prefix=topic_prefix,
                 group="", threads=1, metrics_interval_s=0, worker_id=f"w-{topic_prefix}")
    server = Server(cfg)
    thread = server.start_in_thread()
    try:
        assert server.protocol == "3.1.1"
    finally:
        server.should_exit = True
        thread.join(30)
    assert server.drained_cleanly
