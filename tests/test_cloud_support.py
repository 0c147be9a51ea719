"""Helpers for the cloud worker tests (no tests here): tiny splits and raw requesters.

The tails are built with onnx.helper so their answers are known exactly:
``logits = (q - zp) * scale @ W + b`` for an int8 cut ``q``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from splitinfer.manifest import FileRef, Manifest, Quantization, TensorSpec, sha256_file
from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import MqttClient, open_client
from splitinfer.topics import Topics
from splitinfer.wire import REQUEST, Envelope, WireTensor, decode, encode

__all__ = ["TinySplit", "make_split", "request_payload", "Requester", "running"]


@contextlib.contextmanager
def running(server: Any, timeout: float = 30.0) -> Iterator[Any]:
    """A ``cloud_service.Server`` serving in a thread for the ``with`` block, then stopped
    (``should_exit``) and joined; fails when it does not stop within ``timeout``."""
    thread = server.start_in_thread(timeout)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "server did not stop"


@dataclass(frozen=True)
class TinySplit:
    directory: Path
    manifest: Manifest
    weight: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]
    quantization: Quantization | None

    @property
    def split_id(self) -> str:
        return self.manifest.split_id

    @property
    def cut(self) -> TensorSpec:
        return self.manifest.cut[0]

    def sample(self, n: int = 1, seed: int = 0) -> np.ndarray[Any, Any]:
        rng = np.random.default_rng(seed)
        shape = (n, *(d for d in self.cut.sample_shape if isinstance(d, int)))
        if self.cut.dtype == "int8":
            return rng.integers(-128, 128, shape, dtype=np.int8)
        return rng.standard_normal(shape).astype(np.float32)

    def expected(self, cut: np.ndarray[Any, Any]) -> npt.NDArray[np.float32]:
        x = cut.astype(np.float32)
        if self.quantization is not None:
            x = (x - self.quantization.zero_point) * np.float32(self.quantization.scale)
        return (x @ self.weight + self.bias).astype(np.float32)


def make_split(root: Path, name: str, *, features: int = 4, classes: int = 3,
               quantized: bool = True, fixed_batch: int | None = None, seed: int = 0,
               batch_last_output: bool = False) -> TinySplit:
    """Write ``root/name`` with head.onnx, tail.onnx and manifest.json."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((features, classes)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    quant = Quantization(scale=0.05, zero_point=3) if quantized else None
    batch: int | str = fixed_batch if fixed_batch is not None else "N"
    cut_type = TensorProto.INT8 if quantized else TensorProto.FLOAT
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)

    def save(graph: Any, path: Path) -> FileRef:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return FileRef(path=path.name, sha256=sha256_file(path))

    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
    nodes = []
    x = "cut"
    if quant is not None:
        inits += [numpy_helper.from_array(np.array(quant.scale, np.float32), "s"),
                  numpy_helper.from_array(np.array(quant.zero_point, np.int8), "zp")]
        nodes.append(helper.make_node("DequantizeLinear", ["cut", "s", "zp"], ["deq"]))
        x = "deq"
    nodes += [helper.make_node("MatMul", [x, "W"], ["mm"]),
              helper.make_node("Add", ["mm", "B"], ["logits" if not batch_last_output
                                                   else "pre"])]
    out_shape: list[int | str] = [batch, classes]
    if batch_last_output:  # outputs [classes, N]: the batch is not first
        nodes.append(helper.make_node("Transpose", ["pre"], ["logits"], perm=[1, 0]))
        out_shape = [classes, batch]
    tail = save(helper.make_graph(
        nodes, "tail", [helper.make_tensor_value_info("cut", cut_type, [batch, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
        initializer=inits), directory / "tail.onnx")
    head_nodes = [helper.make_node("Identity", ["x"], ["cut"])]
    head_inits = []
    if quant is not None:
        head_inits = [numpy_helper.from_array(np.array(quant.scale, np.float32), "s"),
                      numpy_helper.from_array(np.array(quant.zero_point, np.int8), "zp")]
        head_nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["cut"])]
    head = save(helper.make_graph(
        head_nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           [batch, features])],
        [helper.make_tensor_value_info("cut", cut_type, [batch, features])],
        initializer=head_inits), directory / "head.onnx")
    manifest = Manifest(
        split_id=name, model=f"tiny-{name}", source=FileRef("tiny.onnx", "0" * 64),
        head=head, tail=tail,
        inputs=(TensorSpec("x", "float32", (batch, features)),),
        cut=(TensorSpec("cut", "int8" if quantized else "float32", (batch, features), quant),),
        outputs=(TensorSpec("logits", "float32", tuple(out_shape)),),
        opsets={"": 17},
    )
    manifest.save(directory)
    return TinySplit(directory, manifest, weight, bias, quant)


def request_payload(split: TinySplit | str, array: np.ndarray[Any, Any], *,
                    device_id: str = "dev-1", request_id: str | None = None,
                    reply_to: str = "", deadline: float = 0.0, name: str = "cut",
                    quantization: Quantization | None = None) -> tuple[str, bytes]:
    split_id = split if isinstance(split, str) else split.split_id
    quant = quantization if quantization is not None else (
        split.quantization if isinstance(split, TinySplit) and array.dtype == np.int8 else None)
    rid = request_id or uuid.uuid4().hex
    env = Envelope(kind=REQUEST, request_id=rid, device_id=device_id, split_id=split_id,
                   tensors=[WireTensor(name, array, quant)], deadline=deadline,
                   reply_to=reply_to, timestamps={"sent": time.time()})
    return rid, encode(env)


@dataclass
class Requester:
    """One raw MQTT client (no edge agent) standing for many devices; collects every
    answer."""

    url: str
    topics: Topics
    client_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex[:8]}")
    answers: dict[str, Envelope] = field(default_factory=dict)  # request id -> result
    by_topic: dict[str, list[Envelope]] = field(default_factory=dict)
    correlations: dict[str, bytes | None] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    client: MqttClient | None = None
    protocol: str = ""
    _reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Requester:
        client = self.client = await open_client(BrokerConfig.from_url(self.url),
                                                 self.client_id)
        assert client.protocol is not None
        self.protocol = client.protocol
        try:
            await client.subscribe(f"{self.topics.prefix}/v1/res/+", qos=1)
        except BaseException:
            await client.disconnect()
            raise
        self._reader = asyncio.create_task(self._read(client))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self.client is not None:
            await self.client.disconnect()

    async def _read(self, client: MqttClient) -> None:
        results = f"{self.topics.prefix}/v1/res/"
        async for message in client.messages():
            if not message.topic.startswith(results):
                continue  # amqtt hands a new '…/res/+' subscriber retained heartbeats too
            env = decode(message.payload)
            corr = message.correlation
            # Keyed by request id and by correlation data: a payload the worker could
            # not read comes back without an id.
            for key in {env.request_id, corr.decode() if corr else ""} - {""}:
                self.answers[key] = env
                self.correlations[key] = corr
            self.by_topic.setdefault(message.topic, []).append(env)
            self.arrived.set()

    async def send(self, model: str, device_id: str, payload: bytes, *,
                   correlation: bytes | None = None, response_topic: str | None = None,
                   ) -> None:
        assert self.client is not None, "send() outside `async with Requester(...)`"
        reply = None
        if correlation is not None:  # MqttClient sends no properties over MQTT 3.1.1
            reply = response_topic or self.topics.result(device_id)
        await self.client.publish(self.topics.request(model, device_id), payload, qos=1,
                                  response_topic=reply, correlation=correlation)

    async def wait_for(self, keys: Sequence[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while any(k not in self.answers for k in keys):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [k for k in keys if k not in self.answers]
                raise TimeoutError(f"{len(missing)} of {len(keys)} answers missing")
            self.arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 0.5))
