"""A 1 MiB and a 400 KB fp32 activation cross a mosquitto with ``max_packet_size 131072``
bit-exact through the normal agent / ``cloud serve`` path: requests and results chunked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from test_cloud_support import TinySplit, make_split
from test_edge_integration import agent_for, worker

from cloud_service.registry import Registry
from edge_agent.transport import MqttTransport
from simulators.broker import MosquittoBroker, mosquitto_binary

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not hasattr(MqttTransport, "max_packet_size"),
    reason="waits for MqttTransport.max_packet_size (issue 11, the one MQTT binding)")]
LIMIT = 131072


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
    return make_split(tmp_path_factory.mktemp("chunk-mosq"), "tiny-big", quantized=False,
                      features=4, classes=3, seed=7)


def _tail(split: TinySplit, cut: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(split.directory / "tail.onnx"), opts)
    out: np.ndarray[Any, Any] = sess.run(None, {"cut": cut})[0]
    return out


@pytest.mark.parametrize("nbytes", [1024 * 1024, 400_000])
def test_big_activation_crosses_a_strict_mosquitto_bit_exact(
        strict_mosquitto: MosquittoBroker, split: TinySplit, topic_prefix: str,
        nbytes: int) -> None:
    cut = np.random.default_rng(3).standard_normal((nbytes // 16, 4)).astype(np.float32)
    registry = Registry.load(split.directory.parent, threads=1)
    url = strict_mosquitto.url

    async def main() -> Any:
        async with agent_for(split.directory, url, topic_prefix,
                             device_id=f"chunky-{nbytes}") as agent:
            assert agent._transport is not None
            assert getattr(agent._transport, "max_packet_size", None) == LIMIT
            result = await agent.infer_activation({"cut": cut}, timeout=30)
            return result, agent.chunk_stats.reassembled, agent.counters._c.chunks_sent

    with worker(url, topic_prefix, registry) as server:
        result, reassembled, sent = asyncio.run(main())
        assert server.worker is not None
        stats = server.worker.chunk_stats
    want = _tail(split, cut)
    got = next(iter(result.outputs.values()))
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert sent >= nbytes // LIMIT and reassembled == 1
    assert stats.reassembled == 1 and stats.dropped == 0


