"""Wire compression end to end: real splitter, real mosquitto, real worker, real agent.

The model is a small int8 "segmentation" net (uint8 activations after ReLU, a uint8 map
out) whose answer is as big as its cut, so both directions have something to compress.
Its split (``--compression zstd`` in the manifest) runs through ``cloud_service.Server``
and an ``EdgeAgent``; a plain subscriber on ``{prefix}/v1/#`` records every payload on
the wire. Outputs must equal the unsplit model's bit for bit, and both payloads must be
compressed and smaller than the raw bytes they carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cloud_support import running

from cloud_service.config import Config
from cloud_service.registry import Registry
from cloud_service.server import Server
from edge_agent import AgentConfig, EdgeAgent
from simulators.support.broker import MosquittoBroker
from splitinfer import compression, ort_config
from splitinfer.errors import BadInputError
from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import open_client
from splitter import split_model

pytestmark = pytest.mark.integration

Array = np.ndarray[Any, Any]
CHANNELS, SIDE = 8, 32
CUT_BYTES = CHANNELS * SIDE * SIDE  # uint8 per sample, the answer's size too


def seg_model(path: Path) -> Path:
    """x float[N,3,32,32] -> conv+relu -> uint8 q (the cut) -> 1x1 conv+relu -> uint8 y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (CHANNELS, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, CHANNELS).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.3, (CHANNELS, CHANNELS, 1, 1))
                                .astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.uint8), "z"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
        helper.make_node("Conv", ["d", "w2"], ["c2"]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("QuantizeLinear", ["r2", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "seg", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                     ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", CHANNELS, SIDE, SIDE])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def seg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the unsplit model, the splits folder holding its zstd split at 'q')."""
    root = tmp_path_factory.mktemp("compression-e2e")
    model = seg_model(root / "seg.onnx")
    result = split_model(model, ["q"], root / "splits" / "seg", compression="zstd",
                         tolerance=0)
    assert result.manifest_obj.compression == "zstd"
    return model, root / "splits"


@pytest.fixture(scope="module")
def images() -> Array:
    return np.random.default_rng(1).normal(size=(3, 3, SIDE, SIDE)).astype(np.float32)


def unsplit(model: Path, x: Array) -> Array:
    session = ort.InferenceSession(str(model), ort_config.apply(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    out: Array = session.run(None, {"x": x})[0]
    return out


@contextlib.asynccontextmanager
async def sniffer(url: str, prefix: str, expect: int
                  ) -> AsyncIterator[list[tuple[str, bytes]]]:
    """Every request and result payload published under ``prefix`` while inside; on exit,
    waits (up to 10 s) for ``expect`` of each to have arrived."""
    seen: list[tuple[str, bytes]] = []
    client = await open_client(BrokerConfig.from_url(url), f"sniff-{prefix[-8:]}")
    await client.subscribe(f"{prefix}/v1/#", qos=1)

    async def read() -> None:
        async for message in client.messages():
            if "/v1/req/" in message.topic or "/v1/res/" in message.topic:
                seen.append((message.topic, message.payload))

    task = asyncio.create_task(read())
    try:
        yield seen
        for _ in range(200):  # our copy of the last answer may trail the agent's
            if min(sum(f"/v1/{k}/" in t for t, _ in seen) for k in ("req", "res")) >= expect:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.disconnect()


def distinct(seen: list[tuple[str, bytes]], kind: str) -> list[bytes]:
    """The ``kind`` ("req" / "res") payloads seen, a re-sent copy counted once."""
    return list(dict.fromkeys(p for t, p in seen if f"/v1/{kind}/" in t))


def tensors_of(payload: bytes) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = msgpack.unpackb(payload)["t"]
    return entries


def worker(url: str, prefix: str, registry: Registry) -> contextlib.AbstractContextManager[Any]:
    return running(Server(Config(artifacts=Path("."), broker=url, prefix=prefix,
                                 group="splitinfer-workers", threads=1, metrics_interval_s=0,
                                 reconnect_min_s=0.05, reconnect_max_s=0.5,
                                 drain_timeout_s=5), registry=registry))


def agent(splits: Path, url: str, prefix: str) -> EdgeAgent:
    return EdgeAgent.from_artifacts(splits / "seg", threads=1, config=AgentConfig(
        device_id="zdev-1", broker=url, prefix=prefix))


def run_calls(splits: Path, url: str, prefix: str, x: Array, overrides: list[str | None]
              ) -> tuple[list[Array], list[tuple[str, bytes]]]:
    async def main() -> tuple[list[Array], list[tuple[str, bytes]]]:
        async with sniffer(url, prefix, len(overrides)) as seen, \
                agent(splits, url, prefix) as a:
            outs = [(await a.infer({"x": x}, compression=o)).outputs["y"] for o in overrides]
        return outs, seen

    with worker(url, prefix, Registry.load(splits, threads=1)):
        return asyncio.run(main())


def test_compressed_request_and_answer_are_bit_exact_and_smaller(
        mosquitto: MosquittoBroker, seg: tuple[Path, Path], images: Array,
        topic_prefix: str) -> None:
    model, splits = seg
    (got,), seen = run_calls(splits, mosquitto.url, topic_prefix, images, [None])
    want = unsplit(model, images)
    assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    requests, results = distinct(seen, "req"), distinct(seen, "res")
    assert len(requests) == 1 and len(results) == 1
    raw = len(images) * CUT_BYTES
    (q,), (y,) = tensors_of(requests[0]), tensors_of(results[0])
    assert q["z"] == "zstd" and y["z"] == "zstd"
    # both payloads, envelope and all, are well under the raw bytes they carry
    assert len(requests[0]) < 0.8 * raw and len(results[0]) < 0.8 * raw
    assert len(q["b"]) == len(compression.compress("zstd", unsplit_cut(splits, images)))


def unsplit_cut(splits: Path, x: Array) -> bytes:
    """The head's output, as the device computes it (what the request carries)."""
    session = ort.InferenceSession(str(splits / "seg" / "head.onnx"),
                                   ort_config.apply(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    out: Array = session.run(None, {"x": x})[0]
    return out.tobytes()


@pytest.mark.skipif("lz4" not in compression.supported(), reason="python-lz4 not installed")
def test_per_request_override_and_the_answer_follows_the_request(
        mosquitto: MosquittoBroker, seg: tuple[Path, Path], images: Array,
        topic_prefix: str) -> None:
    model, splits = seg
    outs, seen = run_calls(splits, mosquitto.url, topic_prefix, images, ["none", "lz4"])
    want = unsplit(model, images)
    for out in outs:
        np.testing.assert_array_equal(out, want)
    requests = [tensors_of(p)[0] for p in distinct(seen, "req")]
    results = [tensors_of(p)[0] for p in distinct(seen, "res")]
    assert len(requests) == len(results) == 2
    # "none": raw both ways (the device may not read any codec); "lz4": lz4 both ways
    assert [r.get("z") for r in requests] == [None, "lz4"]
    assert sorted(str(r.get("z")) for r in results) == ["None", "lz4"]
    assert len(requests[0]["b"]) == len(images) * CUT_BYTES > len(requests[1]["b"])


def test_an_override_the_device_cannot_send_is_refused_before_the_head(
        seg: tuple[Path, Path]) -> None:
    _, splits = seg

    async def main() -> None:
        a = agent(splits, "mqtt://127.0.0.1:1", "never")
        with pytest.raises(BadInputError, match="expected 'none' or a codec"):
            a.compression_for(a.split_state(), "gzip")

    asyncio.run(main())


def test_a_manifest_codec_missing_on_the_device_goes_raw(
        seg: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import edge_agent.client as client

    _, splits = seg
    a = agent(splits, "mqtt://127.0.0.1:1", "never")
    state = a.split_state()
    assert a.compression_for(state) == "zstd"
    monkeypatch.setattr(client, "supported_codecs", lambda: ("lz4",))
    with caplog.at_level(logging.WARNING, logger="edge_agent.client"):
        assert a.compression_for(state) is None
        assert a.compression_for(state) is None
    warned = [r for r in caplog.records if "not installed here" in r.getMessage()]
    assert len(warned) == 1  # once per split, not per request
    assert a.compression_for(state, "lz4") == "lz4"
    with pytest.raises(BadInputError, match="installed here"):
        a.compression_for(state, "zstd")
