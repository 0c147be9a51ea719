"""The fuzz of issue 10, short: every generated kind against the worker, in-process (the
tiny splits: quantized, float, fixed batch) and through a real mosquitto to a worker
process (``run_fuzz``, the bench's own code). 0 ``internal``, 0 crashes, every message
answered, every valid request answered correctly. Figures (stall, RSS) are the bench's:
``splitinfer bench fuzz``."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cloud_support import TinySplit, make_split

from bench.bench_fuzz import LEAK
from cloud_service.config import Config
from cloud_service.registry import Registry
from cloud_service.worker import Incoming, Worker
from simulators.fuzz_messages import KINDS, FuzzGenerator, schedule
from splitinfer.topics import Topics
from splitinfer.wire import Envelope, decode

PREFIX = "fuzz"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinySplit]:
    root = tmp_path_factory.mktemp("fuzz-artifacts")
    return {
        "q": make_split(root, "fz-q", seed=1),
        "f": make_split(root, "fz-f", quantized=False, features=6, classes=2, seed=2),
        "fixed": make_split(root, "fz-fixed", fixed_batch=2, seed=3),
    }


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def __call__(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        self.sent.append((topic, payload, correlation))


def _fuzz_in_process(directory: Path, messages: int, seed: int
                     ) -> tuple[dict[bytes, tuple[str, dict[str, Any] | None]],
                                dict[bytes, Envelope]]:
    """Every kind into a Worker (no broker); (what was sent, the answer) by correlation."""
    registry = Registry.load(directory, threads=1)
    (tail,) = registry.values()
    gen = FuzzGenerator.for_manifest(tail.manifest, seed=seed, max_payload=MiB)
    kinds = schedule(messages, 10, seed=seed)
    topics = Topics(PREFIX)
    sent: dict[bytes, tuple[str, dict[str, Any] | None]] = {}
    pub = Recorder()

    async def main() -> None:
        worker = Worker(Config(artifacts=Path("."), prefix=PREFIX, max_payload=MiB,
                               threads=1), registry, pub)
        try:
            for i, kind in enumerate(kinds):
                arrays = None
                if kind == "valid":
                    payload, arrays = gen.valid(f"v{i}")
                elif kind == "flood_burst":
                    payload = gen.flat_flood(f"b{i}", count=MiB)
                else:
                    payload = gen.make(kind, f"m{i}")
                corr = str(i).encode()
                sent[corr] = (kind, arrays)
                worker.submit(Incoming(topics.request("tiny", "dev-f"), payload, None, corr))
                if i % 50 == 0:
                    await asyncio.sleep(0)  # let batches run now and then
            await asyncio.wait_for(worker.drain(), 60)
        finally:
            await worker.aclose()

    asyncio.run(main())
    answered = {}
    for topic, payload, corr in pub.sent:
        assert topic == topics.result("dev-f")
        assert corr is not None and corr not in answered, "one answer per message"
        answered[corr] = decode(payload)
    assert set(answered) == set(sent), "every message gets exactly one answer"
    return sent, answered


@pytest.mark.parametrize("which", ["q", "f", "fixed"])
def test_every_kind_in_process_is_answered_never_internal(
        splits: dict[str, TinySplit], which: str) -> None:
    split = splits[which]
    sent, answered = _fuzz_in_process(split.directory, 600, seed=11)
    codes: Counter[str] = Counter()
    for corr, env in answered.items():
        kind, arrays = sent[corr]
        code = env.error.code if env.error else "ok"
        codes[code] += 1
        assert code != "internal", (kind, env.error)
        assert env.error is None or not LEAK.search(env.error.message), env.error
        if arrays is not None:  # a valid request: the tail's answer for its cut
            assert env.error is None, env.error
            cut = arrays[split.manifest.cut[0].name]
            np.testing.assert_allclose(env.arrays()[split.manifest.outputs[0].name],
                                       split.expected(cut), rtol=1e-4, atol=1e-4)
    assert codes["bad_message"] and codes["bad_tensor"] and codes["ok"], codes
    assert set(codes) <= {"ok", "bad_message", "bad_tensor", "unknown_split",
                          "payload_too_large", "deadline_expired"}, codes


@pytest.fixture(scope="module")
def jpeg_answers(tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[dict[bytes, tuple[str, dict[str, Any] | None]],
                            dict[bytes, Envelope]]:
    """The fuzz against a cloud_only split whose image input travels as JPEG."""
    from splitter import split_model, zoo

    out = tmp_path_factory.mktemp("fuzz-jpeg") / "digits_jpeg90"
    split_model(zoo.digits_cnn_path(), "cloud_only", out, input_codec="jpeg:90",
                num_samples=4)
    return _fuzz_in_process(out, 400, seed=13)


def test_image_inputs_are_never_internal(
        jpeg_answers: tuple[dict[bytes, Any], dict[bytes, Envelope]]) -> None:
    sent, answered = jpeg_answers
    by_kind: Counter[str] = Counter()
    for corr, env in answered.items():
        assert env.error is None or env.error.code != "internal", (sent[corr][0], env.error)
        if sent[corr][0] == "bad_images":
            by_kind[env.error.code if env.error else "ok"] += 1
    assert by_kind["bad_tensor"] and by_kind["ok"], by_kind  # refused ones and real images


def test_image_errors_carry_no_library_text(
        jpeg_answers: tuple[dict[bytes, Any], dict[bytes, Envelope]]) -> None:
    _sent, answered = jpeg_answers
    leaks = [env.error.message for env in answered.values()
             if env.error is not None and LEAK.search(env.error.message)]
    assert not leaks, leaks[:3]


def test_the_generator_is_reproducible_and_has_the_kinds() -> None:
    assert len(KINDS) >= 12
    kinds = schedule(300, 10, seed=5)
    assert kinds == schedule(300, 10, seed=5)
    assert set(KINDS) <= set(kinds) and kinds.count("valid") >= 30
    one = FuzzGenerator("s", [("x", "float32", (1, 4), None)], seed=5)
    two = FuzzGenerator("s", [("x", "float32", (1, 4), None)], seed=5)
    for kind in sorted(KINDS):
        assert one.make(kind, "r") == two.make(kind, "r"), kind


@pytest.mark.integration
def test_short_fuzz_through_mosquitto_to_a_worker_process() -> None:
    from bench.bench_fuzz import run_fuzz

    r = run_fuzz(messages=500, seed=3, valid_every=10)
    assert r["messages"] == 500 and len(r["kinds"]) >= 12
    assert r["internal"] == 0, r["replies_by_kind"]
    assert r["crashes"] == 0 and r["worker_exit"] is None
    assert r["no_reply"] == 0, r["replies_by_kind"]
    assert r["valid_sent"] == r["valid_correct"] == 50, r["valid_wrong"]
    assert sum(r["replies"].values()) == 500 - r["broker_refused"]
    assert r["replies"].get("bad_message") and r["replies"].get("bad_tensor")
    assert r["rss_start_mb"] and r["rss_end_mb"] and r["max_stall_ms"] > 0
    assert r["worker_tracebacks"] == 0
    assert r["leaky_replies"] == 0, r["leaks"]
