"""A 1 MiB and a 400 KB fp32 activation cross a mosquitto with ``max_packet_size 131072``
bit-exact through the normal ``edge run`` / ``cloud serve`` path: requests and results
chunked (the broker drops any packet over the limit, tests/test_chunks.py shows it)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from test_cloud_support import TinySplit, make_split
from test_edge_integration import agent_for, worker

from cloud_service.registry import Registry
from simulators.support.broker import MosquittoBroker, mosquitto_binary

pytestmark = pytest.mark.integration
LIMIT = 131072
FEATURES = 4  # fp32 values per sample: 16 bytes of activation per sample
SIZES = [1024 * 1024, 400_000]


@pytest.fixture(scope="module")
def strict_mosquitto() -> Iterator[MosquittoBroker]:
    if not mosquitto_binary():
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does)")
    broker = MosquittoBroker(extra_config=(f"max_packet_size {LIMIT}",))
    broker.start()
    yield broker
    broker.close()


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> TinySplit:
    """Head: identity on fp32 (N, 4), so N samples make a 16 N byte activation."""
    return make_split(tmp_path_factory.mktemp("chunk-mosq"), "tiny-big", quantized=False,
                      features=FEATURES, classes=3, seed=7)


def _run(path: Path, feeds: dict[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    out: np.ndarray[Any, Any] = ort.InferenceSession(str(path), opts).run(None, feeds)[0]
    return out


def _reference(split: TinySplit, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The unsplit answer: head then tail, here, with onnxruntime."""
    cut = _run(split.directory / "head.onnx", {"x": x})
    return _run(split.directory / "tail.onnx", {"cut": cut})


@pytest.mark.parametrize("nbytes", SIZES)
def test_big_activation_crosses_a_strict_mosquitto_bit_exact(
        strict_mosquitto: MosquittoBroker, split: TinySplit, topic_prefix: str,
        nbytes: int) -> None:
    """In process (the classes ``edge run`` and ``cloud serve`` run): chunk counters."""
    cut = np.random.default_rng(3).standard_normal(
        (nbytes // (4 * FEATURES), FEATURES)).astype(np.float32)
    assert cut.nbytes == nbytes > LIMIT
    registry = Registry.load(split.directory.parent, threads=1)
    url = strict_mosquitto.url

    async def main() -> Any:
        async with agent_for(split.directory, url, topic_prefix,
                             device_id=f"chunky-{nbytes}") as agent:
            result = await agent.infer_activation({"cut": cut}, timeout=30)
            return result, agent.chunk_stats.reassembled

    with worker(url, topic_prefix, registry) as server:
        assert server.max_packet_size == LIMIT  # the CONNACK's Maximum Packet Size
        result, reassembled = asyncio.run(main())
        assert server.worker is not None
        stats, answer_chunks = server.worker.chunk_stats, server.worker.chunks_sent
    want = _run(split.directory / "tail.onnx", {"cut": cut})
    got = next(iter(result.outputs.values()))
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert stats.reassembled == 1 and stats.dropped == 0  # the request came in chunks
    assert reassembled == 1 and answer_chunks >= want.nbytes // LIMIT + 1  # so did the answer


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitinfer.cli", *args]


def test_edge_run_and_cloud_serve_through_a_strict_mosquitto(
        strict_mosquitto: MosquittoBroker, split: TinySplit, topic_prefix: str,
        tmp_path: Path) -> None:
    """The commands themselves, as a user runs them: one request per file, each
    activation over the broker's limit; OUT.npz equals the unsplit model's bytes."""
    url = strict_mosquitto.url
    env = {**os.environ, "SPLITINFER_THREADS": "1"}
    log = (tmp_path / "serve.log").open("w")  # a file: a full pipe would stall the worker
    serve = subprocess.Popen(
        _cli("cloud", "serve", "--artifacts", str(split.directory), "--broker", url,
             "--prefix", topic_prefix, "--threads", "1"),
        env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert serve.stdout is not None
        ready, _, _ = select.select([serve.stdout], [], [], 60)
        assert ready, "cloud serve printed no ready line within 60 s"
        line = serve.stdout.readline()
        assert f"max packet {LIMIT} bytes" in line, line
        for nbytes in SIZES:
            samples = nbytes // (4 * FEATURES)
            x = np.random.default_rng(nbytes).standard_normal(
                (samples, FEATURES)).astype(np.float32)
            inp, out = tmp_path / f"in-{nbytes}.npz", tmp_path / f"out-{nbytes}.npz"
            np.savez(inp, x=x)
            run = subprocess.run(
                _cli("edge", "run", "--broker", url, "--prefix", topic_prefix,
                     "--artifacts", str(split.directory), "--input", str(inp),
                     "--output", str(out), "--batch-size", str(samples), "--timeout", "30",
                     "--threads", "1", "--device-id", f"cli-{nbytes}", "--json"),
                env=env, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            summary = json.loads(run.stdout)
            assert (summary["samples"], summary["batch_size"]) == (samples, samples)
            assert summary["counters"]["errors"] == {}
            want = _reference(split, x)
            with np.load(out) as got:
                logits = got["logits"]
            assert logits.dtype == want.dtype and logits.tobytes() == want.tobytes()
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.communicate()
        log.close()
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()
