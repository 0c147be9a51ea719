"""Any number of samples, no worker, baselines: the agent against a real mosquitto.

* a split whose files are fixed at batch 1 (or 4) takes 10 samples in one call — and in
  ``edge run`` — fed as requests of that size; a dynamic batch still goes as one request;
* with no worker the broker's PUBACK says "no matching subscribers" (MQTT 5) and the call
  fails at once with :class:`NoSubscriberError`; ``edge run`` stops at the first request no
  worker answers, within 2 x the request timeout on MQTT 3.1.1 too;
* ``cloud_only`` (no head) and ``edge_only`` (no tail, no broker) give the full model's
  answer;
* a device id that is no topic level is refused at construction (exit 2 from the CLI).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_edge import (
    baseline_dir,
    dynamic_model,
    fixed_batch_model,
    run_full,
    split_at_pool,
)
from test_edge_integration import worker

from cloud_service.registry import Registry
from edge_agent import AgentConfig, EdgeAgent, SplitClient
from simulators.support.broker import MosquittoBroker, free_port
from splitinfer.cli import main as cli_main
from splitinfer.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    BadInputError,
    DeadlineExceeded,
    NoSubscriberError,
)

pytestmark = pytest.mark.integration

Array = np.ndarray[Any, Any]
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model files and their splits: batch fixed at 1 and 4, and dynamic, each cut at p1."""
    root = tmp_path_factory.mktemp("edge-batches")
    out: dict[str, Path] = {}
    for name, batch in (("b1", 1), ("b4", 4)):
        out[f"{name}.onnx"] = fixed_batch_model(root / f"{name}.onnx", batch)
        out[name] = split_at_pool(out[f"{name}.onnx"], root / "splits" / name, batch)
    out["dyn.onnx"] = dynamic_model(root / "dyn.onnx")
    out["dyn"] = split_at_pool(out["dyn.onnx"], root / "splits" / "dyn", None)
    out["cloud_only"] = baseline_dir(out["b1.onnx"], root / "splits" / "cloud_only",
                                     "cloud_only", name="b1")
    out["edge_only"] = baseline_dir(out["dyn.onnx"], root / "edge" / "edge_only", "edge_only")
    return out


@pytest.fixture(scope="module")
def registry(models: dict[str, Path]) -> Registry:
    return Registry.load(models["b1"].parent, threads=1)


@pytest.fixture(scope="module")
def x() -> Array:
    return np.random.default_rng(7).random((10, 3, 8, 8)).astype(np.float32)


def agent_for(split: Path, url: str, prefix: str, **config: Any) -> EdgeAgent:
    return EdgeAgent.from_artifacts(split, threads=1, config=AgentConfig(
        device_id="batches-1", broker=url, prefix=prefix, **config))


@pytest.mark.parametrize(("split", "requests"), [("b1", 10), ("b4", 3), ("dyn", 1),
                                                 ("cloud_only", 10)])
def test_any_number_of_samples(mosquitto: MosquittoBroker, models: dict[str, Path],
                               registry: Registry, x: Array, topic_prefix: str, split: str,
                               requests: int) -> None:
    """10 samples in one call: fixed batches go as requests of their size (the last one of
    batch 4 padded), in order; a dynamic batch as one request; cloud_only sends the inputs."""
    source = models["dyn.onnx" if split == "dyn" else "b4.onnx" if split == "b4" else
                    "b1.onnx"]

    async def main() -> tuple[Array, int, int]:
        async with agent_for(models[split], mosquitto.url, topic_prefix) as agent:
            result = await agent.infer({"x": x})
            return result.outputs["y"], result.requests, agent.counters.published

    with worker(mosquitto.url, topic_prefix, registry):
        got, sent, published = asyncio.run(main())
    assert (sent, published) == (requests, requests)
    assert got.shape == (10, 10)
    assert float(np.abs(got - run_full(source, x)).max()) <= TOL


def test_split_client_and_edge_run_take_ten_samples_at_batch_one(
        mosquitto: MosquittoBroker, models: dict[str, Path], registry: Registry, x: Array,
        topic_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, x=x, label=np.arange(10))
    config = AgentConfig(device_id="batches-2", broker=mosquitto.url, prefix=topic_prefix)
    with worker(mosquitto.url, topic_prefix, registry):
        with SplitClient(models["b1"], config=config, threads=1) as client:
            result = client.infer(x[:3])
        code = cli_main(["edge", "run", "--broker", mosquitto.url, "--artifacts",
                         str(models["b1"]), "--input", str(inp), "--output", str(out),
                         "--prefix", topic_prefix, "--concurrency", "4", "--json"])
    captured = capsys.readouterr()
    want = run_full(models["b1.onnx"], x)
    assert result.requests == 3
    assert float(np.abs(result.outputs["y"] - want[:3]).max()) <= TOL
    assert code == EXIT_OK, captured.err
    assert captured.err.count("ignoring ['label']") == 1
    summary = json.loads(captured.out)
    assert (summary["samples"], summary["requests"], summary["ok"], summary["batch_size"]) == \
        (10, 10, 10, 1)
    with np.load(out) as data:
        assert float(np.abs(data["y"] - want).max()) <= TOL


def test_no_subscriber_fails_at_once(mosquitto: MosquittoBroker, models: dict[str, Path],
                                     x: Array, topic_prefix: str) -> None:
    """mosquitto 2 answers a QoS 1 MQTT 5 publish nobody subscribes to with reason 16."""
    async def main() -> float:
        async with agent_for(models["b1"], mosquitto.url, topic_prefix) as agent:
            assert agent.protocol == "5"
            t0 = time.perf_counter()
            with pytest.raises(NoSubscriberError) as info:
                await agent.infer({"x": x}, timeout=5.0)
            assert agent.pending == 0
            assert info.value.topic == agent.request_topic
            assert f"no worker subscribed to {agent.request_topic}" in str(info.value)
            assert "splitinfer cloud serve --broker" in str(info.value)
            return time.perf_counter() - t0

    assert asyncio.run(main()) < 1.0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_edge_run_with_no_worker_stops_at_the_first_request(
        mosquitto: MosquittoBroker, models: dict[str, Path], topic_prefix: str,
        tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str) -> None:
    """360 samples, no worker: exit 1 within 2 x the request timeout, naming the topic."""
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, x=np.zeros((360, 3, 8, 8), np.float32))
    timeout = 1.0
    t0 = time.perf_counter()
    code = cli_main(["edge", "run", "--broker", f"{mosquitto.url}?protocol={protocol}",
                     "--artifacts", str(models["b1"]), "--input", str(inp), "--output",
                     str(out), "--prefix", topic_prefix, "--device-id", "nobody-1",
                     "--timeout", str(timeout), "--concurrency", "2", "--json"])
    wall = time.perf_counter() - t0
    captured = capsys.readouterr()
    topic = f"{topic_prefix}/v1/req/b1/nobody-1"
    assert code == EXIT_FAILED, captured.err
    assert wall < 2 * timeout
    assert topic in captured.err and "stopped at the first request" in captured.err
    assert ("no matching subscribers" if protocol == "5" else "within 1 s") in captured.err
    summary = json.loads(captured.out)
    assert summary["ok"] == 0 and summary["skipped"] >= 358 and not out.exists()


def test_cloud_only_and_edge_only_give_the_full_models_answer(
        mosquitto: MosquittoBroker, models: dict[str, Path], registry: Registry, x: Array,
        topic_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def edge_only() -> tuple[Array, int, dict[str, float]]:
        # no broker listens there: an edge_only agent never connects
        agent = agent_for(models["edge_only"], f"mqtt://127.0.0.1:{free_port()}",
                          topic_prefix)
        async with agent:
            result = await agent.infer({"x": x})
            replay = await agent.infer_activation({"y": result.outputs["y"][:2]})
            assert np.array_equal(replay.outputs["y"], result.outputs["y"][:2])
            return result.outputs["y"], agent.counters.published, result.timings

    local, published, timings = asyncio.run(edge_only())
    assert published == 0 and set(timings) == {"e2e", "head"}
    np.testing.assert_array_equal(local, run_full(models["dyn.onnx"], x))
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, x=x)
    code = cli_main(["edge", "run", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                     "--artifacts", str(models["edge_only"]), "--input", str(inp),
                     "--output", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert json.loads(captured.out)["kind"] == "edge_only"
    with np.load(out) as data:
        np.testing.assert_array_equal(data["y"], local)
    config = AgentConfig(device_id="batches-3", broker=mosquitto.url, prefix=topic_prefix)
    with worker(mosquitto.url, topic_prefix, registry), \
            SplitClient(models["cloud_only"], config=config) as client:
        remote = client.infer(x[:2])
    assert remote.requests == 2 and remote.timings["head"] < 1e-3
    assert float(np.abs(remote.outputs["y"] - run_full(models["b1.onnx"], x[:2])).max()) \
        <= TOL


def test_device_id_that_is_no_topic_level(models: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BadInputError, match=r"device id 'cam\.7'"):
        AgentConfig(device_id="cam.7")
    inp = tmp_path / "in.npz"
    np.savez(inp, x=np.zeros((1, 3, 8, 8), np.float32))
    t0 = time.perf_counter()
    code = cli_main(["edge", "run", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                     "--artifacts", str(models["b1"]), "--input", str(inp), "--output",
                     str(tmp_path / "out.npz"), "--device-id", "cam.7"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and time.perf_counter() - t0 < 2.0
    assert "not usable as an MQTT topic level" in err and len(err.strip().splitlines()) == 1


def test_deadline_still_applies_with_a_worker_that_never_answers(
        mosquitto: MosquittoBroker, models: dict[str, Path], x: Array,
        topic_prefix: str) -> None:
    """A subscriber that does not answer (not a worker): the deadline, not 'no subscriber'."""
    from splitinfer.mqtt import BrokerConfig
    from splitinfer.mqtt_client import open_client

    async def main() -> None:
        silent = await open_client(BrokerConfig.from_url(mosquitto.url), "silent-sub")
        try:
            await silent.subscribe(f"{topic_prefix}/v1/req/+/+", qos=1)
            async with agent_for(models["b1"], mosquitto.url, topic_prefix) as agent:
                with pytest.raises(DeadlineExceeded, match="start one with"):
                    await agent.infer({"x": x[:1]}, timeout=0.3)
        finally:
            await silent.disconnect()

    asyncio.run(main())
