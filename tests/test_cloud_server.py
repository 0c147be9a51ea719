"""The worker against a real mosquitto (and amqtt), with real onnxruntime tails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from test_cloud_support import Requester, TinySplit, make_split, request_payload, running

from cloud_service.config import Config
from cloud_service.registry import Registry
from cloud_service.server import Server
from simulators.support.broker import EmbeddedBroker, MosquittoBroker, free_port
from splitinfer.cli import main as cli_main
from splitinfer.errors import ErrorCode, StartupError
from splitinfer.mqtt_client import open_client
from splitinfer.topics import Topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, TinySplit]]:
    root = tmp_path_factory.mktemp("cloud-artifacts")
    splits = {"a": make_split(root, "split-a", seed=1),
              "b": make_split(root / "nested", "split-b", quantized=False, features=6,
                              classes=2, seed=2)}
    return root, splits


def config(url: str, root: Path, prefix: str, **kw: Any) -> Config:
    kw.setdefault("threads", 1)
    kw.setdefault("metrics_interval_s", 0)
    return Config(artifacts=root, broker=url, prefix=prefix, **kw)


def eventually(check: Any, timeout: float = 5.0) -> None:
    """Answers reach a device before the worker has its PUBACK: counters lag a little."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def serving(cfg: Config) -> contextlib.AbstractContextManager[Server]:
    return running(Server(cfg))


def test_round_trip_mqtt5_correlation_and_311(
        mosquitto: MosquittoBroker, artifacts: tuple[Path, dict[str, TinySplit]],
        topic_prefix: str) -> None:
    root, splits = artifacts
    topics = Topics(topic_prefix)
    a, b = splits["a"], splits["b"]

    async def main() -> None:
        async with Requester(mosquitto.url, topics) as v5, \
                Requester(mosquitto.url + "?protocol=3.1.1", topics) as v3:
            assert (v5.protocol, v3.protocol) == ("5", "3.1.1")
            xa, xb = a.sample(3, seed=1), b.sample(2, seed=2)
            ra, pa = request_payload(a, xa, device_id="cam-1")
            rb, pb = request_payload(b, xb, device_id="cam-2", reply_to=topics.result("cam-2"))
            await v5.send("tiny", "cam-1", pa, correlation=b"c-1")
            await v3.send("tiny", "cam-2", pb)
            await v5.wait_for([ra])
            await v3.wait_for([rb])
            np.testing.assert_allclose(v5.answers[ra].arrays()["logits"], a.expected(xa),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(v3.answers[rb].arrays()["logits"], b.expected(xb),
                                       rtol=1e-5, atol=1e-5)
            assert v5.correlations[ra] == b"c-1"
            ts = v5.answers[ra].timestamps
            assert ts["sent"] <= ts["recv"] <= ts["batched"] <= ts["tail_start"] <= \
                ts["tail_end"] <= ts["reply"]

    with serving(config(mosquitto.url, root, topic_prefix)) as server:
        assert server.protocol == "5"
        asyncio.run(main())
        eventually(lambda: server.metrics.answered == 2)


def test_malformed_input_interleaved_with_good(
        mosquitto: MosquittoBroker, artifacts: tuple[Path, dict[str, TinySplit]],
        topic_prefix: str) -> None:
    root, splits = artifacts
    topics = Topics(topic_prefix)
    a, b = splits["a"], splits["b"]
    rng = np.random.default_rng(7)

    async def main() -> tuple[int, int]:
        good: dict[str, tuple[TinySplit, np.ndarray[Any, Any]]] = {}
        bad: dict[str, ErrorCode] = {}
        async with Requester(mosquitto.url, topics) as req:
            for i in range(60):
                split = (a, b)[i % 2]
                x = split.sample(1 + i % 4, seed=i)
                rid, payload = request_payload(split, x, device_id=f"d{i % 7}")
                good[rid] = (split, x)
                await req.send("tiny", f"d{i % 7}", payload, correlation=rid.encode())
                corr = f"bad-{i}"
                kind = i % 6
                if kind == 0:
                    payload, code = rng.bytes(int(rng.integers(1, 300))), ErrorCode.BAD_MESSAGE
                elif kind == 1:
                    _, full = request_payload(a, a.sample(2))
                    payload, code = full[: len(full) // 2], ErrorCode.BAD_MESSAGE
                elif kind == 2:
                    _, payload = request_payload(a, a.sample(2).astype(np.float32))
                    code = ErrorCode.BAD_TENSOR
                elif kind == 3:
                    _, payload = request_payload(a, np.zeros((2, 9), np.int8))
                    code = ErrorCode.BAD_TENSOR
                elif kind == 4:
                    _, payload = request_payload("no-such-split", a.sample())
                    code = ErrorCode.UNKNOWN_SPLIT
                else:
                    payload = msgpack.packb({"v": 1, "k": "req", "id": "x",
                                             "blob": b"\0" * (2 * 1024 * 1024)})
                    code = ErrorCode.PAYLOAD_TOO_LARGE
                bad[corr] = code
                await req.send("tiny", f"bad{i % 5}", payload, correlation=corr.encode())
            await req.wait_for(list(good), timeout=30)
            await req.wait_for(list(bad), timeout=30)
            for rid, (split, x) in good.items():
                env = req.answers[rid]
                assert env.error is None, env.error
                np.testing.assert_allclose(env.arrays()["logits"], split.expected(x),
                                           rtol=1e-5, atol=1e-5)
            for corr, code in bad.items():
                err = req.answers[corr].error
                assert err is not None and err.code == code.value, (corr, err, code)
                assert req.correlations[corr] == corr.encode()
            return len(good), len(bad)

    # Over the worker's limit but under the broker's (which is the worker's default).
    with serving(config(mosquitto.url, root, topic_prefix, max_batch=8,
                        max_payload=1024 * 1024)) as server:
        n_good, n_bad = asyncio.run(main())
        snap = server.metrics.snapshot()
    assert snap["answered"] == n_good and snap["errors_total"] == n_bad
    assert snap["errors"]["payload_too_large"] == 10


async def _publish_load(url: str, topics: Topics, split: TinySplit, total: int, devices: int,
                        *, on_progress: Any = None) -> Requester:
    req = Requester(url, topics)
    await req.__aenter__()
    rids: list[str] = []

    async def device(d: int) -> None:
        for i in range(total // devices):
            rid, payload = request_payload(split, split.sample(seed=i), device_id=f"d{d}")
            rids.append(rid)
            await req.send("tiny", f"d{d}", payload)
            if on_progress is not None:
                await on_progress(len(rids))

    try:
        await asyncio.gather(*(device(d) for d in range(devices)))
        await req.wait_for(rids, timeout=60)
        assert all(req.answers[r].error is None for r in rids)
    finally:
        await req.__aexit__(None, None, None)
    return req


def test_group_shares_load_and_a_third_worker_joins(
        mosquitto: MosquittoBroker, artifacts: tuple[Path, dict[str, TinySplit]],
        topic_prefix: str) -> None:
    root, splits = artifacts
    topics = Topics(topic_prefix)
    group = f"g{topic_prefix}"
    cfg = config(mosquitto.url, root, topic_prefix, group=group)
    with serving(cfg) as w1, serving(config(mosquitto.url, root, topic_prefix, group=group)) \
            as w2:
        asyncio.run(_publish_load(mosquitto.url, topics, splits["a"], 1000, 8))
        eventually(lambda: w1.metrics.answered + w2.metrics.answered == 1000)
        shares = [w.metrics.answered / 1000 for w in (w1, w2)]
        assert sum(w.metrics.answered for w in (w1, w2)) == 1000
        assert all(0.4 <= s <= 0.6 for s in shares), shares

        third: list[tuple[Server, Any]] = []
        joined: list[asyncio.Event] = []

        async def join_at_half(sent: int) -> None:
            if sent < 300:
                return
            if not joined:  # the first device past 300 starts it, the others wait
                joined.append(asyncio.Event())
                server = Server(config(mosquitto.url, root, topic_prefix, group=group))
                third.append((server, await asyncio.to_thread(server.start_in_thread, 30)))
                joined[0].set()
            await joined[0].wait()

        before = w1.metrics.answered + w2.metrics.answered
        asyncio.run(_publish_load(mosquitto.url, topics, splits["a"], 600, 6,
                                  on_progress=join_at_half))
        w3, thread = third[0]
        try:
            eventually(lambda: sum(w.metrics.answered for w in (w1, w2, w3)) - before >= 600)
            after = w1.metrics.answered + w2.metrics.answered + w3.metrics.answered
            assert after - before == 600  # nothing lost, nothing answered twice
            assert w3.metrics.answered >= 30, w3.metrics.answered
        finally:
            w3.should_exit = True
            thread.join(30)


def test_should_exit_drains_what_was_accepted(
        mosquitto: MosquittoBroker, artifacts: tuple[Path, dict[str, TinySplit]],
        topic_prefix: str) -> None:
    root, splits = artifacts
    topics = Topics(topic_prefix)
    a = splits["a"]
    server = Server(config(mosquitto.url, root, topic_prefix, max_batch=4))
    thread = server.start_in_thread(30)

    async def main() -> Requester:
        async with Requester(mosquitto.url, topics) as req:
            for i in range(400):
                _, payload = request_payload(a, a.sample(seed=i), device_id=f"d{i % 4}")
                await req.send("tiny", f"d{i % 4}", payload)
                if i == 150:
                    server.should_exit = True
            await asyncio.to_thread(thread.join, 30)
            await asyncio.sleep(0.3)  # let the last answers reach us
            return req

    req = asyncio.run(main())
    assert not thread.is_alive() and server.drained_cleanly
    snap = server.metrics.snapshot()
    assert snap["received"] > 0
    # Every request the worker took got exactly one answer (a result or shutting_down).
    assert len(req.answers) == snap["received"]
    assert snap["answered"] + snap["errors"]["shutting_down"] == snap["received"]
    assert snap["answered"] > 0


def test_reconnects_after_broker_restart(
        fresh_mosquitto: MosquittoBroker, artifacts: tuple[Path, dict[str, TinySplit]],
        topic_prefix: str) -> None:
    root, splits = artifacts
    topics = Topics(topic_prefix)
    a = splits["a"]

    async def one_round_trip() -> None:
        async with Requester(fresh_mosquitto.url, topics) as req:
            rid, payload = request_payload(a, a.sample())
            await req.send("tiny", "dev-1", payload)
            await req.wait_for([rid], timeout=10)
            assert req.answers[rid].error is None

    cfg = config(fresh_mosquitto.url, root, topic_prefix, reconnect_min_s=0.05,
                 reconnect_max_s=0.2)
    with serving(cfg) as server:
        asyncio.run(one_round_trip())
        fresh_mosquitto.restart(down_for=0.5)
        deadline = time.monotonic() + 15
        while server.metrics.reconnects < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metrics.reconnects >= 1
        asyncio.run(one_round_trip())


def test_answers_wait_for_the_broker_to_come_back(
        fresh_mosquitto: MosquittoBroker, artifacts: tuple[Path, dict[str, TinySplit]],
        topic_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers ready while the broker is down go out once the worker has reconnected."""
    root, splits = artifacts
    topics = Topics(topic_prefix)
    a = splits["a"]
    registry = Registry.load(root, threads=1)
    tail = registry[a.split_id]
    tail_gate, reconnect_gate = threading.Event(), threading.Event()
    real_run = tail.run
    connects: list[float] = []

    def held_run(feeds: Any) -> Any:
        tail_gate.wait(20)
        return real_run(feeds)

    async def held_connect(*args: Any, **kwargs: Any) -> Any:
        connects.append(time.monotonic())
        while len(connects) > 1 and not reconnect_gate.is_set():  # the first goes through
            await asyncio.sleep(0.01)
        return await open_client(*args, **kwargs)

    monkeypatch.setattr(tail, "run", held_run)
    monkeypatch.setattr("cloud_service.server.open_client", held_connect)
    cfg = config(fresh_mosquitto.url, root, topic_prefix, reconnect_min_s=0.02,
                 reconnect_max_s=0.05, inline=False)  # held on a tail thread, not the loop
    server = Server(cfg, registry=registry)
    thread = server.start_in_thread(30)
    sent: dict[str, np.ndarray[Any, Any]] = {}

    async def send() -> None:
        async with Requester(fresh_mosquitto.url, topics) as req:
            for i in range(3):
                x = a.sample(seed=i)
                rid, payload = request_payload(a, x, device_id=f"d{i}")
                sent[rid] = x
                await req.send("tiny", f"d{i}", payload)

    async def collect() -> None:
        async with Requester(fresh_mosquitto.url, topics) as req:
            reconnect_gate.set()  # only now may the worker come back
            await req.wait_for(list(sent), timeout=20)
            for rid, x in sent.items():
                np.testing.assert_allclose(req.answers[rid].arrays()["logits"], a.expected(x),
                                           rtol=1e-5, atol=1e-5)

    try:
        asyncio.run(send())
        eventually(lambda: server.metrics.received == 3)
        fresh_mosquitto.stop()
        tail_gate.set()
        eventually(lambda: server.metrics.in_flight() == 3)  # answers, no broker
        fresh_mosquitto.start()
        asyncio.run(collect())
        eventually(lambda: server.metrics.answered == 3)
        assert server.metrics.reconnects == 1 and server.metrics.reply_failures == 0
    finally:
        tail_gate.set()
        reconnect_gate.set()
        server.should_exit = True
        thread.join(30)


def test_startup_errors(artifacts: tuple[Path, dict[str, TinySplit]], tmp_path: Path,
                        topic_prefix: str, mosquitto: MosquittoBroker,
                        capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = artifacts
    dead = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(StartupError, match=r"cannot (reach|connect to) broker"):
        Server(config(dead, root, topic_prefix)).start_in_thread(20)
    with pytest.raises(StartupError, match="no servable split"):
        Server(config(mosquitto.url, tmp_path, topic_prefix)).start_in_thread(20)
    assert cli_main(["cloud", "serve", "--artifacts", str(root), "--broker", dead]) == 3
    assert "cannot start" in capsys.readouterr().err
    assert cli_main(["cloud", "serve", "--artifacts", str(root), "--max-batch", "0"]) == 2


# amqtt leaves the socket of the MQTT 5 CONNECT it rejects for the GC to close.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_embedded_broker_without_group(
        embedded_broker: EmbeddedBroker, artifacts: tuple[Path, dict[str, TinySplit]],
        topic_prefix: str) -> None:
    root, splits = artifacts
    topics = Topics(topic_prefix)
    a = splits["a"]

    async def main() -> None:
        async with Requester(embedded_broker.url, topics) as req:
            x = a.sample(2)
            rid, payload = request_payload(a, x, reply_to=topics.result("dev-1"))
            await req.send("tiny", "dev-1", payload)
            await req.wait_for([rid], timeout=15)
            np.testing.assert_allclose(req.answers[rid].arrays()["logits"], a.expected(x),
                                       rtol=1e-5, atol=1e-5)

    with serving(config(embedded_broker.url, root, topic_prefix, group="")) as server:
        assert server.protocol == "3.1.1"
        asyncio.run(main())


def test_cli_sigterm_drains_and_exits_zero(
        mosquitto: MosquittoBroker, artifacts: tuple[Path, dict[str, TinySplit]],
        topic_prefix: str) -> None:
    root, splits = artifacts
    topics = Topics(topic_prefix)
    a = splits["a"]
    env = {**os.environ, "SPLITINFER_ARTIFACTS": str(root), "SPLITINFER_BROKER": mosquitto.url,
           "SPLITINFER_PREFIX": topic_prefix, "SPLITINFER_THREADS": "1",
           "SPLITINFER_GROUP": f"sig{topic_prefix}"}
    proc = subprocess.Popen([sys.executable, "-m", "splitinfer.cli", "-v", "cloud", "serve"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        async def main() -> None:
            async with Requester(mosquitto.url, topics) as req:
                rid, payload = request_payload(a, a.sample())
                deadline = time.monotonic() + 30
                while rid not in req.answers:  # resend until the worker has subscribed
                    assert time.monotonic() < deadline and proc.poll() is None
                    await req.send("tiny", "dev-1", payload)
                    with contextlib.suppress(TimeoutError):
                        await req.wait_for([rid], timeout=0.3)
                assert req.answers[rid].error is None

        asyncio.run(main())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "draining" in out and "stopped" in out


def test_a_refused_answer_is_logged_with_its_reason_and_counted(
        artifacts: tuple[Path, dict[str, TinySplit]], topic_prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The broker's ACL lets the worker read requests but not write results: MQTT 5
    PUBACK 0x87. The worker says so (with the reason) and counts the answer as failed."""
    root, splits = artifacts
    topics = Topics(topic_prefix)
    a = splits["a"]
    acl = tmp_path / "acl"
    acl.write_text("".join(f"topic {access} {topic_prefix}/v1/{tree}/#\n" for access, tree in (
        ("readwrite", "req"), ("read", "res"), ("readwrite", "probe"),
        ("readwrite", "workers"))))
    # as root mosquitto would switch to the 'mosquitto' user, which cannot read tmp_path
    broker = MosquittoBroker(extra_config=(f"acl_file {acl}",
                                           *(["user root"] if os.geteuid() == 0 else [])))
    broker.start()

    async def main() -> None:
        async with Requester(broker.url, topics) as req:
            _, payload = request_payload(a, a.sample())
            await req.send("tiny", "dev-1", payload, correlation=b"c")

    try:
        with caplog.at_level(logging.WARNING), \
                serving(config(broker.url, root, topic_prefix, group="")) as server:
            assert server.protocol == "5"
            asyncio.run(main())
            eventually(lambda: server.metrics.reply_failures == 1)
            assert server.metrics.answered == 0
    finally:
        broker.close()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "0x87 not authorized" in logged and topics.result("dev-1") in logged, logged
