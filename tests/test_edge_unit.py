"""EdgeAgent logic against the in-memory broker: no sockets, no onnxruntime, fast.

The head is a numpy function and the "worker" a task on the same loop; the real broker,
onnxruntime and the real worker are in test_edge_integration.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import msgpack
import numpy as np
import pytest

from edge_agent import (
    OFFLINE,
    ONLINE,
    AgentConfig,
    EdgeAgent,
    InferenceResult,
    LatencyStats,
    MemoryBroker,
    SplitClient,
    summarize,
)
from edge_agent.memory import topic_matches
from edge_agent.stats import percentiles, worker_stages
from splitinfer.errors import (
    BadInputError,
    DeadlineExceeded,
    ErrorCode,
    ManifestError,
    NoSubscriberError,
    RemoteError,
    StartupError,
    TensorError,
    TransportError,
    WireError,
)
from splitinfer.manifest import FileRef, Manifest, Quantization, TensorSpec
from splitinfer.topics import Topics
from splitinfer.wire import ErrorInfo, WireTensor, decode, encode

Array = np.ndarray[Any, Any]
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
Q = Quantization(scale=0.05, zero_point=3)


def make_manifest(*, quantized: bool = False) -> Manifest:
    ref = FileRef("x.onnx", "0" * 64)
    cut = (TensorSpec("q", "int8", ("N", 3), Q) if quantized
           else TensorSpec("h", "float32", ("N", 3)))
    return Manifest(
        split_id="tiny-00000000-11111111", model="tiny", source=ref, head=ref, tail=ref,
        inputs=(TensorSpec("x", "float32", ("N", 4)),), cut=(cut,),
        outputs=(TensorSpec("y", "float32", ("N", 1)),))


class NumpyHead:
    """x @ W, optionally quantized like a QuantizeLinear cut."""

    def __init__(self, manifest: Manifest) -> None:
        self.spec = manifest.cut[0]
        self.calls = 0

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("x",)

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.spec.name,)

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        self.calls += 1
        h = inputs["x"] @ W
        if self.spec.quantization is not None:
            q = self.spec.quantization
            h = np.clip(np.round(h / q.scale) + q.zero_point, -128, 127).astype(np.int8)
        return {self.spec.name: h}


def tail(h: Array, quant: Quantization | None) -> Array:
    if quant is not None:
        h = (h.astype(np.float32) - quant.zero_point) * quant.scale
    out: Array = h.sum(axis=1, keepdims=True).astype(np.float32)
    return out


@contextlib.asynccontextmanager
async def fake_worker(broker: MemoryBroker, prefix: str, *, mode: str = "ok",
                      delay: float = 0.0, client_id: str = "worker",
                      parallel: bool = False) -> AsyncIterator[list[Any]]:
    """Answers requests like a cloud worker; ``seen`` collects the decoded requests.

    ``delay`` is each request's time in the worker, one after the other (``parallel``:
    all at once, as a worker with batches or several tail threads)."""
    seen: list[Any] = []
    transport = await broker.connect(client_id=client_id, will=None)
    await transport.subscribe(Topics(prefix).shared_request_filter())
    answering: set[asyncio.Task[None]] = set()

    async def answer(message: Any) -> None:
        request = decode(message.payload)
        seen.append((message, request))
        stamps = {"recv": time.time()}
        await asyncio.sleep(delay)
        stamps["tail_start"] = time.time()
        if mode == "silent":
            return
        if mode == "garbage":  # one nobody can place, then one naming the request
            await transport.publish(request.reply_to, b"\x93not an envelope")
            await transport.publish(request.reply_to, msgpack.packb(
                {"v": 99, "id": request.request_id}))
            return
        t = request.tensors[0]
        error = {"error": ErrorInfo.of(ErrorCode.BAD_TENSOR, "cut 'h' has the wrong shape"),
                 "leaving": ErrorInfo.of(ErrorCode.SHUTTING_DOWN, "worker is shutting down"),
                 }.get(mode)
        result = request.result(
            [WireTensor("y", tail(t.array, t.quantization))] if error is None else (),
            error)
        result.timestamps.update(stamps, tail_end=time.time(), reply=time.time())
        payload = encode(result)
        await transport.publish(request.reply_to, payload)
        if mode == "twice":
            await transport.publish(request.reply_to, payload)

    async def serve() -> None:
        async for message in transport.messages():
            if parallel:
                job = asyncio.create_task(answer(message))
                answering.add(job)
                job.add_done_callback(answering.discard)
            else:
                await answer(message)

    task = asyncio.create_task(serve())
    try:
        yield seen
    finally:
        task.cancel()
        for job in answering:
            job.cancel()
        with contextlib.suppress(asyncio.CancelledError, TransportError):
            await task
        await asyncio.gather(*answering, return_exceptions=True)
        await transport.close()


def make_agent(broker: MemoryBroker, prefix: str, *, quantized: bool = False,
               device_id: str = "dev-1", **config: Any) -> EdgeAgent:
    manifest = make_manifest(quantized=quantized)
    return EdgeAgent(manifest=manifest, head=NumpyHead(manifest), connector=broker.connect,
                     config=AgentConfig(device_id=device_id, prefix=prefix, **config))


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 30))


X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)


@pytest.mark.parametrize("quantized", [False, True])
def test_round_trip_outputs_timings_and_cleanup(topic_prefix: str, quantized: bool) -> None:
    async def main() -> InferenceResult:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix) as seen, \
                make_agent(broker, topic_prefix, quantized=quantized) as agent:
            result = await agent.infer({"x": X})
            assert agent.pending == 0
            (_message, request), = seen
            cut = request.tensors[0]
            if quantized:  # the manifest's quantization travels with the int8 tensor
                assert cut.array.dtype == np.int8 and cut.quantization == Q
            else:
                assert cut.quantization is None
            return result

    result = run(main)
    expected = tail(NumpyHead(make_manifest(quantized=quantized)).run({"x": X})[
        "q" if quantized else "h"], Q if quantized else None)
    np.testing.assert_array_equal(result.outputs["y"], expected)
    assert list(result.outputs) == ["y"] and result.split_id == "tiny-00000000-11111111"
    assert list(result.timings) == ["e2e", "head", "encode", "network", "queue", "tail",
                                    "decode"]
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["e2e"] >= result.timings["head"] + result.timings["encode"]


def test_request_envelope_topics_and_mqtt5_properties(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix) as seen, \
                make_agent(broker, topic_prefix, device_id="cam-7", timeout_s=3) as agent:
            before = time.time()
            result = await agent.infer(X)  # a bare array works for a one-input model
            (message, request), = seen
            assert message.topic == f"{topic_prefix}/v1/req/tiny/cam-7"
            assert request.reply_to == f"{topic_prefix}/v1/res/cam-7"
            assert request.request_id == result.request_id
            assert request.split_id == "tiny-00000000-11111111"
            assert before + 2.5 < request.deadline <= time.time() + 3
            assert {"head_start", "head_end", "sent"} <= set(request.timestamps)
            published = [p for p in broker.published if p.topic == message.topic]
            assert published[0].qos == 1
            options = published[0].options
            assert options is not None
            assert options.response_topic == request.reply_to
            assert options.correlation == result.request_id.encode()
            assert options.expiry_s is not None and 2.5 < options.expiry_s <= 3

    run(main)


def test_mqtt311_sends_no_mqtt5_properties(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker(protocol="3.1.1")
        async with fake_worker(broker, topic_prefix), make_agent(broker, topic_prefix) as agent:
            await agent.infer(X)
            assert agent.protocol == "3.1.1"
        assert all(p.options is None for p in broker.published)

    run(main)


def test_presence_online_then_offline_and_last_will(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        status = f"{topic_prefix}/v1/status/dev-1"
        agent = make_agent(broker, topic_prefix)
        await agent.start()
        assert broker.retained[status] == ONLINE
        await agent.close()
        assert broker.retained[status] == OFFLINE
        other = make_agent(broker, topic_prefix, device_id="dev-2")
        await other.start()
        broker.drop("dev-2")  # no DISCONNECT: the broker publishes the will
        assert broker.retained[f"{topic_prefix}/v1/status/dev-2"] == OFFLINE
        await other.close()

    run(main)


@pytest.mark.parametrize(("inputs", "error", "words"), [
    ({}, BadInputError, ["expected ['x']", "missing ['x']"]),
    ({"x": X, "label": X}, BadInputError, ["unexpected ['label']"]),
    ({"x": X.astype(np.float64)}, TensorError, ["expected dtype float32, got float64"]),
    ({"x": X.reshape(4, 2)}, TensorError, ["expected shape (N, 4)", "got (4, 2)"]),
    ({"x": X[0]}, TensorError, ["expected 2 dims"]),
    ({"x": [[1.0, 2.0, 3.0, 4.0]]}, TensorError, ["must be a numpy array"]),
])
def test_bad_inputs_name_expected_and_got(topic_prefix: str, inputs: dict[str, Any],
                                          error: type[Exception], words: list[str]) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with make_agent(broker, topic_prefix) as agent:
            with pytest.raises(error) as info:
                await agent.infer(inputs)
            assert agent.pending == 0
        for word in words:
            assert word in str(info.value)

    run(main)


def test_error_result_raises_remote_error(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix, mode="error"), \
                make_agent(broker, topic_prefix) as agent:
            with pytest.raises(RemoteError) as info:
                await agent.infer(X)
            assert agent.pending == 0
        assert info.value.code == "bad_tensor"
        assert info.value.remote_message == "cut 'h' has the wrong shape"
        assert info.value.split_id == "tiny-00000000-11111111"

    run(main)


def test_undecodable_result_fails_its_request(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix, mode="garbage"), \
                make_agent(broker, topic_prefix) as agent:
            with pytest.raises(WireError, match="unsupported envelope version 99") as info:
                await agent.infer(X)
            assert agent.pending == 0
        assert info.value.code == ErrorCode.BAD_MESSAGE

    run(main)


def test_deadline_exceeded_without_a_worker(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker(protocol="3.1.1")  # no PUBACK reasons: the deadline decides
        async with make_agent(broker, topic_prefix) as agent:
            t0 = time.perf_counter()
            with pytest.raises(DeadlineExceeded) as info:
                await agent.infer(X, timeout=0.15)
            elapsed = time.perf_counter() - t0
            assert agent.pending == 0
        assert 0.15 <= elapsed < 1.0
        assert "is a cloud worker serving model 'tiny'" in str(info.value)
        assert isinstance(info.value, TimeoutError)

    run(main)


def test_duplicate_results_are_ignored(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix, mode="twice"), \
                make_agent(broker, topic_prefix) as agent:
            await agent.infer(X)
            await agent.infer(X)
            await asyncio.sleep(0.01)
            # the second answer of each is a duplicate: dropped, counted, never returned
            assert agent.counters.duplicates == 2 and agent.counters.late_results == 0
            assert agent.pending == 0

    run(main)


def test_outage_reconnects_resubscribes_and_republishes(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        agent = make_agent(broker, topic_prefix, reconnect_min_s=0.01, reconnect_max_s=0.05)
        await agent.start()
        broker.stop()  # every connection drops; the request below waits for the broker
        call = asyncio.create_task(agent.infer(X, timeout=5))
        await asyncio.sleep(0.1)
        assert not agent.connected and agent.pending == 1
        broker.start()
        await agent.wait_connected(2)
        # The worker is back only after the agent re-published: that copy reached nobody,
        # as after a real broker restart; the agent's retry must get it there.
        async with fake_worker(broker, topic_prefix) as seen:
            result = await call
        assert result.outputs["y"].shape == (2, 1)
        assert len(seen) == 1
        # first published on the new connection (no subscriber yet), then re-sent
        assert agent.counters.reconnects == 1 and agent.counters.retries >= 1
        assert result.attempts == agent.counters.published >= 2
        assert broker.retained[f"{topic_prefix}/v1/status/dev-1"] == ONLINE
        await agent.close()

    run(main)


def test_expired_requests_are_not_republished(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        agent = make_agent(broker, topic_prefix, reconnect_min_s=0.2, reconnect_max_s=0.2)
        await agent.start()
        broker.stop()
        for _ in range(200):  # let the agent notice the lost connection
            if not agent.connected:
                break
            await asyncio.sleep(0.005)
        with pytest.raises(DeadlineExceeded) as info:
            await agent.infer(X, timeout=0.1)
        assert "not connected" in str(info.value)
        broker.start()
        await agent.wait_connected(2)
        assert agent.counters.published == 0
        await agent.close()

    run(main)


def test_infer_activation_skips_the_head(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with fake_worker(broker, topic_prefix), \
                make_agent(broker, topic_prefix, quantized=True) as agent:
            assert isinstance(agent.head, NumpyHead)
            recorded = np.array([[1, 2, 3]], dtype=np.int8)
            result = await agent.infer_activation({"q": recorded})
            assert agent.head.calls == 0
            assert result.timings["head"] == 0.0
            np.testing.assert_array_equal(result.outputs["y"], tail(recorded, Q))
            with pytest.raises(TensorError, match="expected dtype int8, got float32"):
                await agent.infer_activation({"q": recorded.astype(np.float32)})
            with pytest.raises(BadInputError, match=r"missing \['q'\]"):
                await agent.infer_activation({"h": recorded})

    run(main)


def test_many_agents_share_one_loop(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        agents = [make_agent(broker, topic_prefix, device_id=f"d{i}") for i in range(200)]
        async with fake_worker(broker, topic_prefix):
            await asyncio.gather(*(a.start() for a in agents))
            results = await asyncio.gather(*(a.infer(X) for a in agents for _ in range(3)))
            await asyncio.gather(*(a.close() for a in agents))
        assert len({r.request_id for r in results}) == 600

    run(main)


def test_startup_and_lifecycle_errors(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        broker.stop()
        agent = make_agent(broker, topic_prefix)
        with pytest.raises(TransportError, match="not running"):
            await agent.infer(X)
        with pytest.raises(StartupError, match="cannot reach the broker"):
            await agent.start()
        broker.start()
        async with make_agent(broker, topic_prefix) as agent:
            pass
        with pytest.raises(StartupError):
            await agent.start()

    run(main)


def test_close_fails_pending_requests(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker(protocol="3.1.1")  # no PUBACK reasons: the deadline decides
        agent = make_agent(broker, topic_prefix)
        await agent.start()
        call = asyncio.create_task(agent.infer(X, timeout=5))
        await asyncio.sleep(0.05)
        await agent.close()
        with pytest.raises(TransportError, match="closed with the request pending"):
            await call
        assert agent.pending == 0

    run(main)


def test_head_that_disagrees_with_the_manifest() -> None:
    manifest = make_manifest()

    class Wrong(NumpyHead):
        @property
        def output_names(self) -> tuple[str, ...]:
            return ("other",)

    with pytest.raises(ManifestError, match=r"produces \['other'\]"):
        EdgeAgent(manifest=manifest, head=Wrong(manifest),
                  config=AgentConfig(device_id="d"), connector=MemoryBroker().connect)


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"device_id": "a/b"}, "device id"),
    ({"device_id": "d", "prefix": "p/#"}, "prefix"),
    ({"device_id": "d", "timeout_s": 0}, "timeouts"),
    ({"device_id": "d", "qos": 3}, "qos"),
])
def test_config_validation(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(BadInputError, match=word):
        AgentConfig(**kwargs)


def test_payload_limit_is_checked_before_sending(topic_prefix: str) -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with make_agent(broker, topic_prefix, max_payload=200) as agent:
            with pytest.raises(WireError, match="exceeds the 200 byte limit") as info:
                await agent.infer(np.zeros((64, 4), np.float32))
        assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE

    run(main)


def test_stats_percentiles_and_summary() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    p = percentiles(values)
    assert p["n"] == 100 and p["max"] == 100.0
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
    assert percentiles([]) == {"n": 0}
    stats = LatencyStats()
    stats.add({"e2e": 0.002, "head": 0.001, "custom": 0.5})
    stats.fail("deadline")
    s = stats.summary()
    assert (s["requests"], s["ok"], s["failed"], s["errors"]) == (2, 1, 1, {"deadline": 1})
    assert list(s["latency_ms"]) == ["e2e", "head", "custom"]
    assert summarize([]) == {}
    assert worker_stages({"recv": 1.0, "tail_start": 1.5, "tail_end": 2.0, "reply": 2.25}) == {
        "worker": 1.25, "queue": 0.5, "tail": 0.5}


@pytest.mark.parametrize(("pattern", "topic", "match"), [
    ("a/+/c", "a/b/c", True), ("a/#", "a/b/c", True), ("a/+", "a/b/c", False),
    ("a/b", "a/b", True), ("a/b/c", "a/b", False),
])
def test_memory_topic_matching(pattern: str, topic: str, match: bool) -> None:
    assert topic_matches(pattern, topic) is match


def test_split_client_start_failure_leaves_no_thread(topic_prefix: str) -> None:
    broker = MemoryBroker()
    broker.stop()
    client = SplitClient(agent=make_agent(broker, topic_prefix, device_id="sync-1"))
    with pytest.raises(StartupError, match="cannot reach the broker"), client:
        pass
    assert not [t for t in threading.enumerate() if t.name.startswith("split-client")]
    with pytest.raises(StartupError, match="not started"):
        client.infer(X)
    with pytest.raises(BadInputError, match="split directory"):
        SplitClient()


def test_split_client_round_trip_on_its_own_loop(topic_prefix: str) -> None:
    broker = MemoryBroker()
    with SplitClient(agent=make_agent(broker, topic_prefix, device_id="sync-2")) as client:
        loop = client._loop
        assert loop is not None
        ready = threading.Event()
        served = asyncio.run_coroutine_threadsafe(_serve_once(broker, topic_prefix, ready),
                                                  loop)
        assert ready.wait(5)  # the worker subscribed, on the client's loop
        result = client.infer(X, timeout=5)
        served.result(5)
    np.testing.assert_allclose(result.outputs["y"], tail(X @ W, None))


async def _serve_once(broker: MemoryBroker, prefix: str, ready: threading.Event) -> None:
    async with fake_worker(broker, prefix) as seen:
        ready.set()
        while not seen:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)


def test_no_matching_subscribers_fails_at_once_but_not_right_after_a_reconnect(
        topic_prefix: str) -> None:
    """MQTT 5 PUBACK reason 16: NoSubscriberError at once, naming the topic; within
    reconnect_grace_s of a reconnect the request is published again instead."""
    async def main() -> None:
        broker = MemoryBroker()
        agent = make_agent(broker, topic_prefix, reconnect_min_s=0.01, reconnect_max_s=0.05)
        async with agent:
            t0 = time.perf_counter()
            with pytest.raises(NoSubscriberError, match="no worker subscribed to") as info:
                await agent.infer(X, timeout=5)
            assert time.perf_counter() - t0 < 0.5 and agent.pending == 0
            assert info.value.topic == agent.request_topic == f"{topic_prefix}/v1/req/tiny/dev-1"
            broker.drop("dev-1")
            await asyncio.sleep(0.01)
            await agent.wait_connected(2)
            call = asyncio.create_task(agent.infer(X, timeout=5))
            await asyncio.sleep(0.1)  # some PUBACKs say "no subscribers": retried, not raised
            assert not call.done()
            async with fake_worker(broker, topic_prefix) as seen:
                result = await call
            assert result.outputs["y"].shape == (2, 1) and len(seen) == 1

    run(main)


@pytest.mark.parametrize(("batch", "samples", "requests"), [(1, 5, 5), (2, 5, 3), (2, 2, 1)])
def test_fixed_batch_calls_go_as_requests_of_that_size(topic_prefix: str, batch: int,
                                                        samples: int, requests: int) -> None:
    ref = FileRef("x.onnx", "0" * 64)
    manifest = Manifest(
        split_id="tiny-00000000-22222222", model="tiny", source=ref, head=ref, tail=ref,
        inputs=(TensorSpec("x", "float32", (batch, 4)),),
        cut=(TensorSpec("h", "float32", (batch, 3)),),
        outputs=(TensorSpec("y", "float32", (batch, 1)),))
    x = np.linspace(-1, 1, samples * 4, dtype=np.float32).reshape(samples, 4)

    async def main() -> None:
        broker = MemoryBroker()
        agent = EdgeAgent(manifest=manifest, head=NumpyHead(manifest), connector=broker.connect,
                          config=AgentConfig(device_id="dev-1", prefix=topic_prefix,
                                             chunk_concurrency=2))
        async with fake_worker(broker, topic_prefix) as seen, agent:
            result = await agent.infer(x)
        assert result.requests == requests == len(seen)
        assert all(r.tensors[0].array.shape == (batch, 3) for _, r in seen)
        np.testing.assert_allclose(result.outputs["y"], tail(x @ W, None), rtol=1e-6)

    run(main)
