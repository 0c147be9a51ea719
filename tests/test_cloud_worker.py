"""Registry and worker core without a broker: the publisher is a fake that records."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from test_cloud_support import TinySplit, make_split, request_payload

from cloud_service.config import Config
from cloud_service.metrics import ErrorLog, Metrics, render_prometheus
from cloud_service.registry import Registry, Tail
from cloud_service.worker import Incoming, Job, ReplyAddress, Worker, reply_address
from splitinfer.errors import BadInputError, ErrorCode, ManifestError, StartupError, TensorError
from splitinfer.manifest import Manifest, Quantization
from splitinfer.topics import Topics
from splitinfer.wire import decode

PREFIX = "unit"
TOPICS = Topics(PREFIX)


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinySplit]:
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "q": make_split(root, "tiny-q", seed=1),
        "f": make_split(root, "tiny-f", quantized=False, features=6, classes=2, seed=2),
        "fixed": make_split(root, "tiny-fixed", fixed_batch=1, seed=3),
        "odd": make_split(root, "tiny-odd", batch_last_output=True, seed=4),
    }


@pytest.fixture(scope="module")
def registry(splits: dict[str, TinySplit]) -> Registry:
    return Registry.load(next(iter(splits.values())).directory.parent, threads=1)


class FakePublish:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def __call__(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        self.sent.append((topic, payload, correlation))

    def answers(self) -> dict[str, Any]:
        return {decode(p).request_id: (t, decode(p), c) for t, p, c in self.sent}


def run_worker(registry: Registry, body: Callable[[Worker], Coroutine[Any, Any, None]],
               **config: Any) -> tuple[FakePublish, Worker]:
    pub = FakePublish()

    async def main() -> Worker:
        cfg = Config(artifacts=Path("."), prefix=PREFIX, **config)
        worker = Worker(cfg, registry, pub)
        try:
            await body(worker)
            await asyncio.wait_for(worker.drain(), 20)
        finally:
            await worker.aclose()
        return worker

    return pub, asyncio.run(main())


def msg(split: TinySplit | str, array: np.ndarray[Any, Any], device: str = "dev-1",
        **kw: Any) -> tuple[str, Incoming]:
    rid, payload = request_payload(split, array, device_id=device, **kw)
    return rid, Incoming(TOPICS.request("tiny", device), payload)


# --- registry ---------------------------------------------------------------------------


def test_registry_loads_every_split(registry: Registry, splits: dict[str, TinySplit]) -> None:
    assert set(registry) == {s.split_id for s in splits.values()}
    assert registry["tiny-fixed"].fixed_batch == 1 and not registry["tiny-fixed"].batchable
    assert registry["tiny-q"].batchable


def test_registry_single_split_dir_and_failures(tmp_path: Path) -> None:
    one = make_split(tmp_path, "one")
    assert list(Registry.load(one.directory)) == ["one"]
    broken = make_split(tmp_path, "broken")
    (broken.directory / "tail.onnx").write_bytes(b"changed")
    reg = Registry.load(tmp_path)
    assert list(reg) == ["one"] and "sha256" in reg.failed[str(broken.directory)]
    with pytest.raises(StartupError, match="no servable split"):
        Registry.load(broken.directory)
    with pytest.raises(StartupError, match="does not exist"):
        Registry.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StartupError, match="no servable split"):
        Registry.load(empty)


def test_tail_must_match_its_manifest(tmp_path: Path) -> None:
    split = make_split(tmp_path, "m")
    data = json.loads((split.directory / "manifest.json").read_text())
    data["cut"][0]["name"] = "other"
    (split.directory / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="differ from the manifest's cut"):
        Tail.open(split.directory)


def test_missing_gpu_provider_falls_back_with_a_warning(
        splits: dict[str, TinySplit], caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    q = splits["q"]
    with caplog.at_level("WARNING", logger="cloud_service.registry"):
        tail = Tail.open(q.directory, providers=["CUDAExecutionProvider",
                                                 "CPUExecutionProvider"])
    assert tail.session.get_providers() == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider" in r.getMessage() and "not available" in r.getMessage()
               for r in caplog.records)
    out = tail.run([q.sample(2)])
    assert out[0].shape[0] == 2


def test_prepare_names_expected_and_got(registry: Registry, splits: dict[str, TinySplit]
                                        ) -> None:
    from splitinfer.wire import decode as dec

    tail = registry["tiny-q"]
    q = splits["q"]
    good = dec(request_payload(q, q.sample(3))[1])
    assert tail.prepare(good).samples == 3
    cases: dict[str, np.ndarray[Any, Any]] = {
        "expected dtype int8, got float32": q.sample(2).astype(np.float32),
        "expected shape (N, 4), got (2, 5)": np.zeros((2, 5), np.int8),
        "expected 2 dims": np.zeros((2, 4, 1), np.int8),
        "at least one sample": np.zeros((0, 4), np.int8),
    }
    for match, array in cases.items():
        with pytest.raises(TensorError, match=match.replace("(", r"\(").replace(")", r"\)")):
            tail.prepare(dec(request_payload(q, array)[1]))
    with pytest.raises(TensorError, match=r"expected \['cut'\], got \['x'\]"):
        tail.prepare(dec(request_payload(q, q.sample(), name="x")[1]))
    with pytest.raises(TensorError, match=r"expected quantization \[0.05, 3\], got \[0.1, 3\]"):
        tail.prepare(dec(request_payload(q, q.sample(),
                                         quantization=Quantization(0.1, 3))[1]))


# --- worker -----------------------------------------------------------------------------


def test_batched_answers_are_each_requests_own(registry: Registry,
                                               splits: dict[str, TinySplit]) -> None:
    sent: dict[str, tuple[TinySplit, np.ndarray[Any, Any]]] = {}

    async def body(worker: Worker) -> None:
        for i in range(40):
            split = splits[("q", "f", "fixed", "odd")[i % 4]]
            array = split.sample(1 + i % 3 if split is not splits["fixed"] else 1, seed=i)
            rid, m = msg(split, array, device=f"d{i}")
            sent[rid] = (split, array)
            worker.submit(m)

    pub, worker = run_worker(registry, body, max_batch=8, max_delay_ms=5)
    answers = pub.answers()
    assert set(answers) == set(sent)
    for rid, (split, array) in sent.items():
        topic, env, _ = answers[rid]
        assert env.error is None, env.error
        assert topic == TOPICS.result(env.device_id)
        expected = split.expected(array)
        got = env.arrays()["logits"]
        if split is splits["odd"]:
            expected = expected.T
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert {"sent", "recv", "batched", "tail_start", "tail_end", "reply"} <= set(
            env.timestamps)
    snap = worker.metrics.snapshot()
    assert snap["answered"] == 40 and snap["errors_total"] == 0
    assert snap["mean_batch_size"] > 1  # the 40 arrived together
    assert not registry["tiny-odd"].batchable  # learnt that its outputs are not batch-first


def test_lone_requests_run_on_the_loop_and_answer_the_same(
        registry: Registry, splits: dict[str, TinySplit], monkeypatch: pytest.MonkeyPatch
) -> None:
    q = splits["q"]
    tail = registry["tiny-q"]
    real_run = tail.run
    ran_on: list[str] = []

    def recording_run(feeds: Any) -> Any:
        ran_on.append(threading.current_thread().name)
        return real_run(feeds)

    monkeypatch.setattr(tail, "run", recording_run)
    arrays = [q.sample(1 + i % 2, seed=i) for i in range(4)]

    def lone(inline: bool) -> tuple[dict[str, Any], Worker]:
        async def body(worker: Worker) -> None:
            for i, array in enumerate(arrays):
                _, m = msg(q, array, device=f"d{i}")
                worker.submit(m)
                while worker.accepted:  # one at a time, far apart (20 ms > 1.5 tail runs)
                    await asyncio.sleep(0.001)
                await asyncio.sleep(0.02)

        pub, worker = run_worker(registry, body, inline=inline)
        return pub.answers(), worker

    ran_on.clear()
    queued, w_queued = lone(False)
    assert all(name.startswith("tail-") for name in ran_on) and w_queued.metrics.inline == 0
    ran_on.clear()
    inlined, w_inline = lone(True)
    assert ran_on == ["MainThread"] * 4 and w_inline.metrics.inline == 4
    assert w_inline.metrics.snapshot()["answered"] == 4
    by_device = {env.device_id: env.arrays()["logits"] for _, env, _ in inlined.values()}
    for _, env, _ in queued.values():  # bit-exact with the queued path
        np.testing.assert_array_equal(by_device[env.device_id], env.arrays()["logits"])
        assert env.error is None


def test_requests_arriving_together_queue_and_batch(registry: Registry,
                                                    splits: dict[str, TinySplit]) -> None:
    q = splits["q"]

    async def body(worker: Worker) -> None:
        for i in range(20):  # all in one go: 0 s apart, under the 2 ms batching delay
            worker.submit(msg(q, q.sample(seed=i), device=f"d{i}")[1])

    _, worker = run_worker(registry, body, max_batch=8)
    snap = worker.metrics.snapshot()
    assert snap["answered"] == 20
    # Only the first could go past the queue, and the second when the first's inline run
    # held the loop past the batching delay (a loaded machine: the next arrival is
    # stamped after it, as a socket's backlog would be); the rest queue and batch.
    assert worker.metrics.inline <= 2
    assert snap["mean_batch_size"] > 1


def test_fixed_batch_tail_answers_any_sample_count(tmp_path: Path) -> None:
    """A tail fixed at batch 2 runs 1, 3 and 5 samples in chunks (the last one padded)."""
    split = make_split(tmp_path, "tiny-fixed2", fixed_batch=2, seed=5)
    reg = Registry.load(split.directory, threads=1)
    assert reg["tiny-fixed2"].fixed_batch == 2
    sent: dict[str, np.ndarray[Any, Any]] = {}

    async def body(worker: Worker) -> None:
        for n in (1, 3, 5, 2):
            array = split.sample(n, seed=n)
            rid, m = msg(split, array, device=f"d{n}")
            sent[rid] = array
            worker.submit(m)

    pub, _ = run_worker(reg, body, max_batch=8)
    answers = pub.answers()
    assert set(answers) == set(sent)
    for rid, array in sent.items():
        env = answers[rid][1]
        assert env.error is None, env.error
        got = env.arrays()["logits"]
        assert got.shape[0] == array.shape[0]
        np.testing.assert_allclose(got, split.expected(array), rtol=1e-5, atol=1e-5)


def test_fast_path_answers_and_falls_back_when_the_connection_goes(
        registry: Registry, splits: dict[str, TinySplit]) -> None:
    """publish_nowait: a PUBACK future per answer; a failed one is sent again the slow way."""
    from splitinfer.errors import TransportError

    q = splits["q"]
    pub = FakePublish()
    fast: list[tuple[str, bytes, bytes | None, asyncio.Future[None]]] = []
    rids = []

    def publish_nowait(topic: str, payload: bytes,
                       correlation: bytes | None) -> asyncio.Future[None] | None:
        if len(fast) == 3:
            return None  # "not connected": the slow path from the start
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fast.append((topic, payload, correlation, future))
        return future

    async def main() -> Worker:
        cfg = Config(artifacts=Path("."), prefix=PREFIX, max_batch=1)
        worker = Worker(cfg, registry, pub, publish_nowait=publish_nowait)
        try:
            for i in range(4):
                rid, m = msg(q, q.sample(seed=i), device=f"d{i}")
                rids.append(rid)
                worker.submit(m)
            # The slow answer's task leaves the in-flight set by a done callback, one loop
            # turn after it counted the answer: wait for both.
            for _ in range(2000):
                if (len(fast) == 3 and pub.sent and worker.metrics.answered == 1
                        and worker.metrics.in_flight() == 3):
                    break
                await asyncio.sleep(0.005)
            assert worker.metrics.answered == 1 and worker.metrics.in_flight() == 3  # PUBACKs due
            fast[0][3].set_result(None)  # acknowledged
            fast[1][3].set_exception(TransportError("lost"))  # sent again via publish
            fast[2][3].set_result(None)
            await asyncio.wait_for(worker.drain(), 20)
        finally:
            await worker.aclose()
        return worker

    worker = asyncio.run(main())
    fast_rids = {decode(p).request_id for _, p, _, _ in fast}
    slow_rids = set(pub.answers())
    assert fast_rids | slow_rids == set(rids) and len(fast_rids) == 3
    assert slow_rids == {decode(fast[1][1]).request_id} | (set(rids) - fast_rids)
    assert worker.metrics.answered == 4 and worker.metrics.in_flight() == 0
    assert worker.metrics.reply_failures == 0


def test_bad_messages_answered_with_their_code(registry: Registry,
                                               splits: dict[str, TinySplit]) -> None:
    q = splits["q"]
    expected: dict[str, ErrorCode] = {}
    corr_of: dict[str, bytes] = {}

    async def body(worker: Worker) -> None:
        good_rid, good = msg(q, q.sample(2))
        rid, m = msg(q, q.sample().astype(np.float32))
        expected[rid] = ErrorCode.BAD_TENSOR
        rid2, m2 = msg("no-such-split", q.sample())
        expected[rid2] = ErrorCode.UNKNOWN_SPLIT
        rid3, m3 = msg(q, q.sample(), deadline=time.time() - 1)
        expected[rid3] = ErrorCode.DEADLINE_EXPIRED
        _rid4, m4 = msg(q, q.sample())
        truncated = Incoming(m4.topic, m4.payload[: len(m4.payload) // 2])
        # half a msgpack map: no request id readable → answered on the device's topic
        bad_body = msgpack.packb({"v": 1, "k": "req", "id": "rid-5", "rt": TOPICS.result("x"),
                                  "t": "not-a-list"})
        expected["rid-5"] = ErrorCode.BAD_MESSAGE
        corr_of[good_rid] = b"corr-good"
        for item in (Incoming(good.topic, good.payload, TOPICS.result("dev-1"), b"corr-good"),
                     m, m2, m3, truncated, Incoming(TOPICS.request("tiny", "x"), bad_body),
                     Incoming(TOPICS.request("tiny", "big"), b"\0" * (2 * 1024 * 1024)),
                     Incoming("not/a/request/topic", b"garbage")):
            worker.submit(item)
        expected[good_rid] = ErrorCode.INTERNAL  # placeholder: checked separately below

    pub, worker = run_worker(registry, body, max_payload=1024 * 1024)
    answers = pub.answers()
    for rid, code in expected.items():
        _topic, env, corr = answers[rid]
        if code is ErrorCode.INTERNAL:
            assert env.error is None and corr == b"corr-good"
            continue
        assert env.error is not None and env.error.code == code.value, (rid, env.error)
    # The truncated and the oversized payload carry no readable id: answered by topic.
    by_topic = {t: decode(p) for t, p, _ in pub.sent if not decode(p).request_id}
    assert by_topic[TOPICS.result("dev-1")].error.code == "bad_message"  # type: ignore[union-attr]
    assert by_topic[TOPICS.result("big")].error.code == "payload_too_large"  # type: ignore[union-attr]
    snap = worker.metrics.snapshot()
    assert snap["unanswerable"] == 1  # "garbage" on a topic that names no device
    assert snap["answered"] == 1 and snap["received"] == 8
    assert snap["errors"]["bad_message"] == 3


def test_overloaded_and_shutting_down(registry: Registry, splits: dict[str, TinySplit],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    q = splits["q"]
    tail = registry["tiny-q"]
    gate = threading.Event()
    real_run = tail.run

    def held_run(feeds: Any) -> Any:
        gate.wait(10)
        return real_run(feeds)

    monkeypatch.setattr(tail, "run", held_run)
    codes: list[str] = []

    async def body(worker: Worker) -> None:
        for i in range(12):
            rid, m = msg(q, q.sample(), device=f"d{i}")
            codes.append(rid)
            worker.submit(m)
            while i == 0 and worker.metrics.queue_depth():  # the first one is running
                await asyncio.sleep(0.001)
        worker.close()
        rid, m = msg(q, q.sample())
        codes.append(rid)
        worker.submit(m)
        gate.set()

    # inline=False: the first request must wait on a tail thread, not on the loop
    pub, _ = run_worker(registry, body, max_batch=1, queue_size=4, inline=False)
    answers = pub.answers()
    got = [answers[r][1].error.code if answers[r][1].error else None for r in codes]
    assert got[:5] == [None] * 5  # one running, four queued
    assert got[5:12] == ["overloaded"] * 7
    assert got[12] == "shutting_down"


def test_reply_address_rules() -> None:
    req = TOPICS.request("m", "cam-7")
    assert reply_address(TOPICS, Incoming(req, b"")) == ReplyAddress(TOPICS.result("cam-7"))
    # The request topic (ACL-bound to the sender) decides: a device cannot aim results at
    # another device through the MQTT 5 response topic or the envelope's rt.
    assert reply_address(TOPICS, Incoming(req, b"", TOPICS.result("gw"), b"c")) == \
        ReplyAddress(TOPICS.result("cam-7"), b"c")
    assert reply_address(TOPICS, Incoming(req, b"", None, b"c"), TOPICS.result("gw")) == \
        ReplyAddress(TOPICS.result("cam-7"), b"c")
    # Off the request topics (never delivered by the subscription) a claimed result
    # topic is the only address there is.
    assert reply_address(TOPICS, Incoming("x/y", b""), TOPICS.result("gw")) == \
        ReplyAddress(TOPICS.result("gw"))
    # A response topic outside the result namespace is not trusted.
    assert reply_address(TOPICS, Incoming(req, b""), "elsewhere/x") == \
        ReplyAddress(TOPICS.result("cam-7"))
    assert reply_address(TOPICS, Incoming("x/y", b""), "unit/v1/res/a/b") is None


def test_metrics_render_and_error_log(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    m.received = 5
    m.error(ErrorCode.BAD_TENSOR)
    m.batch(3, 4, 0.01)
    text = render_prometheus(m, labels={"worker": 'w"1'})
    assert 'splitinfer_worker_received_total{worker="w\\"1"} 5' in text
    assert 'splitinfer_worker_errors_total{worker="w\\"1",code="bad_tensor"} 1' in text
    assert "# TYPE splitinfer_worker_queue_depth gauge" in text
    assert m.snapshot()["mean_batch_size"] == 4

    now = [0.0]
    import logging

    elog = ErrorLog(logging.getLogger("t"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        assert elog.report("bad_tensor", "x %d", 1)
        assert not elog.report("bad_tensor", "x %d", 2)
        assert elog.report("bad_message", "y")
        now[0] = 11
        assert elog.report("bad_tensor", "x %d", 3)
    assert "1 more bad_tensor" in caplog.text


def test_config_validation() -> None:
    bad: dict[str, Any]
    for bad in ({"max_batch": 0}, {"group": "a/b"}, {"broker": "http://x"},
                {"max_delay_ms": -1}, {"prefix": "#"}, {"threads": -1}):
        with pytest.raises(BadInputError):
            Config(artifacts=Path("."), **bad)
    with pytest.raises(BadInputError, match=r"CUDAExecutionProviderr.*unknown to onnxruntime"):
        Config(artifacts=Path("."), providers=("CUDAExecutionProviderr",))
    # A known provider this onnxruntime lacks is not a config error: the tail warns and
    # runs without it (test_missing_gpu_provider_falls_back_with_a_warning).
    assert Config(artifacts=Path("."), providers=("CUDAExecutionProvider",)).providers == (
        "CUDAExecutionProvider",)
    assert Config(artifacts=Path("."), group="").subscription() == "splitinfer/v1/req/+/+"
    assert Config(artifacts=Path("."), group="g").subscription() == \
        "$share/g/splitinfer/v1/req/+/+"


# --- baselines: edge-only and cloud-only splits (manifest "kind") --------------------

_HAS_KIND = "kind" in getattr(Manifest, "__dataclass_fields__", {})
needs_kind = pytest.mark.skipif(not _HAS_KIND, reason="Manifest.kind has not landed yet "
                                "(splitinfer/manifest.py, issue 8 shared contract)")


def _rekind(split: TinySplit, kind: str) -> None:
    path = split.directory / "manifest.json"
    data = json.loads(path.read_text())
    data["kind"] = kind
    if kind == "edge_only":  # the whole model on the device: no tail, nothing crosses
        data["tail"] = None
        data["cut"] = data["outputs"]
    else:  # cloud_only: no head; the device sends the model's inputs, the tail is it all
        data["head"] = None
        data["inputs"] = data["cut"]
        (split.directory / "head.onnx").unlink()
    path.write_text(json.dumps(data))


@needs_kind
def test_edge_only_split_is_skipped_with_one_info_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_split(tmp_path, "served")
    edge = make_split(tmp_path, "edge")
    _rekind(edge, "edge_only")
    (edge.directory / "tail.onnx").unlink()
    with caplog.at_level("INFO", logger="cloud_service.registry"):
        reg = Registry.load(tmp_path, threads=1)
    assert list(reg) == ["served"] and not reg.failed
    lines = [r.getMessage() for r in caplog.records if "edge" in r.getMessage()
             and "edge-only" in r.getMessage()]
    assert len(lines) == 1, lines
    with pytest.raises(StartupError, match="edge-only"):
        Registry.load(edge.directory)


@needs_kind
def test_cloud_only_split_is_served_like_any_other(tmp_path: Path) -> None:
    split = make_split(tmp_path, "cloud", quantized=False)
    _rekind(split, "cloud_only")
    reg = Registry.load(tmp_path, threads=1)
    assert list(reg) == ["cloud"]
    x = split.sample(3, seed=5)

    async def body(worker: Worker) -> None:
        worker.submit(msg(split, x, request_id="r-cloud")[1])

    pub, _ = run_worker(reg, body)
    (_topic, answer, _corr), = pub.answers().values()
    assert answer.error is None
    np.testing.assert_allclose(answer.tensors[0].array, split.expected(x), rtol=1e-6)


def test_only_short_known_runs_go_past_the_queue(registry: Registry,
                                                 splits: dict[str, TinySplit],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud_service import worker as worker_module

    tail = registry["tiny-q"]
    job = Job(*_job_parts(splits["q"], tail))
    monkeypatch.setattr(tail, "sample_s", 0.0)  # never run: measured on a tail thread first
    assert not Worker._short_run(job)
    monkeypatch.setattr(tail, "sample_s", worker_module.INLINE_MAX_S / 2)
    assert Worker._short_run(job)
    monkeypatch.setattr(tail, "sample_s", worker_module.INLINE_MAX_S * 2)  # would hold the loop
    assert not Worker._short_run(job)


def _job_parts(split: TinySplit, tail: Any) -> tuple[Any, ...]:
    _, payload = request_payload(split, split.sample(), device_id="d1")
    env = decode(payload)
    return env, tail.prepare(env), ReplyAddress(TOPICS.result("d1")), time.time(), None, tail
