"""The edge agent against a real mosquitto (or amqtt), real onnxruntime and the real worker.

Splits come from the real splitter (digits CNN fp32 and static int8; a small MobileNetV2
and ResNet-18); the cloud worker is ``cloud_service.server.Server`` in a thread, one per
test on the test's own topic prefix. Outputs through MQTT must equal the full model run
locally: bit-exact for int8 cuts, within 1e-5 for fp32 ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from test_cloud_support import running

from cloud_service.config import Config
from cloud_service.registry import Registry
from cloud_service.server import Server
from edge_agent import AgentConfig, EdgeAgent, OrtHead, SplitClient, load_head
from simulators.support.broker import EmbeddedBroker, MosquittoBroker, free_port
from splitinfer import ort_config
from splitinfer.cli import main as cli_main
from splitinfer.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STARTUP,
    DeadlineExceeded,
    RemoteError,
    StartupError,
)
from splitinfer.manifest import Manifest
from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import open_client
from splitter import list_cuts, split_model, zoo
from splitter.quantize import quantize_static

pytestmark = pytest.mark.integration

Arrays = dict[str, np.ndarray[Any, Any]]
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/fp32`` cut at 'pool' (float32) and ``root/int8`` at its int8 QuantizeLinear."""
    root = tmp_path_factory.mktemp("edge-splits")
    int8 = quantize_static(zoo.digits_cnn_path(), zoo.digits_calibration_path(),
                           root / "digits_int8.onnx")
    split_model(zoo.digits_cnn_path(), ["pool"], root / "splits" / "fp32")
    split_model(int8, ["pool_QuantizeLinear_Output"], root / "splits" / "int8",
                model_name="digits_int8")
    return root


@pytest.fixture(scope="module")
def registry(splits: Path) -> Registry:
    return Registry.load(splits / "splits", threads=1)


@pytest.fixture(scope="module")
def images() -> np.ndarray[Any, Any]:
    x, _ = zoo.digits_test_set()
    return x[:16]


def full_model(path: Path, feeds: Arrays) -> list[np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(path), ort_config.apply(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def source_of(splits: Path, which: str) -> Path:
    return zoo.digits_cnn_path() if which == "fp32" else splits / "digits_int8.onnx"


def worker(url: str, prefix: str, registry: Registry | None = None, *,
           artifacts: Path | None = None, group: bool = True
           ) -> contextlib.AbstractContextManager[Server]:
    return running(Server(Config(artifacts=artifacts or Path("."), broker=url, prefix=prefix,
                                 group="splitinfer-workers" if group else "", threads=1,
                                 metrics_interval_s=0, reconnect_min_s=0.05,
                                 reconnect_max_s=0.5, drain_timeout_s=5),
                          registry=registry))


def agent_for(split_dir: Path, url: str, prefix: str, device_id: str = "dev-1",
              **config: Any) -> EdgeAgent:
    return EdgeAgent.from_artifacts(split_dir, threads=1, config=AgentConfig(
        device_id=device_id, broker=url, prefix=prefix, **config))


def assert_same(got: Arrays, want: list[np.ndarray[Any, Any]], exact: bool) -> None:
    for value, expected in zip(got.values(), want, strict=True):
        assert value.dtype == expected.dtype and value.shape == expected.shape
        if exact:
            np.testing.assert_array_equal(value, expected)
        else:
            assert float(np.abs(value - expected).max()) <= FP32_TOL


async def infer_all(agent: EdgeAgent, x: np.ndarray[Any, Any]) -> Arrays:
    """One 8-sample request, then one request per remaining sample, two in flight."""
    parts = [await agent.infer({"image": x[:8]})]
    parts += await asyncio.gather(*(agent.infer({"image": x[i:i + 1]})
                                    for i in range(8, len(x))))
    return {name: np.concatenate([p.outputs[name] for p in parts])
            for name in parts[0].outputs}


@pytest.mark.parametrize("which", ["fp32", "int8"])
@pytest.mark.parametrize("broker", [
    "mqtt5", "mqtt311",
    # amqtt leaves the server side of closed connections to the GC (as in test_broker)
    pytest.param("amqtt", marks=pytest.mark.filterwarnings(
        "ignore::pytest.PytestUnraisableExceptionWarning")),
])
def test_outputs_match_the_full_model(request: pytest.FixtureRequest, splits: Path,
                                      registry: Registry, images: np.ndarray[Any, Any],
                                      topic_prefix: str, which: str, broker: str) -> None:
    if broker == "amqtt":
        embedded: EmbeddedBroker = request.getfixturevalue("embedded_broker")
        # amqtt has no $share; asked for MQTT 5 it leaves the refused socket to the GC, which
        # test_broker covers, so go straight to 3.1.1 here
        url, proto, group = embedded.url + "?protocol=3.1.1", "3.1.1", False
    else:
        mosq: MosquittoBroker = request.getfixturevalue("mosquitto")
        url = mosq.url + ("?protocol=3.1.1" if broker == "mqtt311" else "")
        proto, group = ("5" if broker == "mqtt5" else "3.1.1"), True

    async def main() -> tuple[Arrays, str, dict[str, float]]:
        async with agent_for(splits / "splits" / which, url, topic_prefix) as agent:
            outputs = await infer_all(agent, images)
            timings = (await agent.infer({"image": images[:1]})).timings
            return outputs, agent.protocol, timings

    with worker(url, topic_prefix, registry, group=group):
        got, protocol, timings = asyncio.run(main())
    if broker == "amqtt":
        time.sleep(0.1)
        gc.collect()  # while this test's warning filter still applies
    assert protocol == proto
    assert_same(got, full_model(source_of(splits, which), {"image": images}),
                exact=which == "int8")
    assert {"e2e", "head", "encode", "network", "queue", "tail", "decode"} == set(timings)


ZOO: dict[str, Callable[[Path], Path]] = {
    "mobilenet_v2": lambda path: zoo.mobilenet_v2(path, width=0.5, resolution=64),
    "resnet18": lambda path: zoo.resnet18(path, width=0.25, resolution=64),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_end_to_end(mosquitto: MosquittoBroker, tmp_path: Path, topic_prefix: str,
                               name: str) -> None:
    """A cut in the middle of each standard architecture, head here, tail on the worker."""
    model = ZOO[name](tmp_path / f"{name}.onnx")
    cuts = list_cuts(model, max_tensors=1)
    cut = cuts[len(cuts) // 2]
    split_model(model, [t.name for t in cut.tensors], tmp_path / "splits" / name)
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)

    async def main() -> Arrays:
        async with agent_for(tmp_path / "splits" / name, mosquitto.url, topic_prefix) as agent:
            return (await agent.infer({"input": x})).outputs

    with worker(mosquitto.url, topic_prefix, artifacts=tmp_path / "splits"):
        got = asyncio.run(main())
    assert_same(got, full_model(model, {"input": x}), exact=False)


def test_deadline_exceeded_when_no_worker_answers(mosquitto: MosquittoBroker, splits: Path,
                                                   images: np.ndarray[Any, Any],
                                                   topic_prefix: str) -> None:
    async def main() -> float:
        # MQTT 3.1.1: no PUBACK reason ("no matching subscribers" is test_edge_batches')
        async with agent_for(splits / "splits" / "fp32", mosquitto.url + "?protocol=3.1.1",
                             topic_prefix) as agent:
            t0 = time.perf_counter()
            with pytest.raises(DeadlineExceeded, match="is a cloud worker serving"):
                await agent.infer({"image": images[:1]}, timeout=0.3)
            assert agent.pending == 0
            return time.perf_counter() - t0

    assert 0.3 <= asyncio.run(main()) < 2.0


def test_requests_and_results_skip_the_task_path(mosquitto: MosquittoBroker, splits: Path,
                                                 registry: Registry,
                                                 images: np.ndarray[Any, Any],
                                                 topic_prefix: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Over MqttTransport a request goes out by publish_nowait (no task per publish) and
    its result comes in by deliver_to (no inbox, no pump task): the async paths, made to
    fail here, are never taken; the answers still match."""
    from edge_agent.transport import MqttTransport

    async def refuse_publish(*_a: object, **_k: object) -> None:
        raise AssertionError("the task path published")

    def refuse_messages(*_a: object, **_k: object) -> None:
        raise AssertionError("the inbox path read")

    async def main() -> None:
        monkeypatch.setattr(MqttTransport, "messages", refuse_messages)  # from the start
        async with agent_for(splits / "splits" / "fp32", mosquitto.url,
                             topic_prefix) as agent:
            # presence goes out by publish() (connecting, closing); requests must not
            with monkeypatch.context() as patch:
                patch.setattr(MqttTransport, "publish", refuse_publish)
                for i in range(5):
                    result = await agent.infer({"image": images[i:i + 1]})
                    assert result.outputs and result.attempts == 1
                assert agent.pending == 0 and not agent._tasks

    with worker(mosquitto.url, topic_prefix, registry):
        asyncio.run(main())


def test_unknown_split_comes_back_as_remote_error(mosquitto: MosquittoBroker, splits: Path,
                                                  registry: Registry, tmp_path: Path,
                                                  images: np.ndarray[Any, Any],
                                                  topic_prefix: str) -> None:
    stray = tmp_path / "stray"
    shutil.copytree(splits / "splits" / "fp32", stray)
    manifest = json.loads((stray / "manifest.json").read_text())
    manifest["split_id"] = "digits_cnn-00000000-00000000"
    (stray / "manifest.json").write_text(json.dumps(manifest))

    async def main() -> None:
        async with agent_for(stray, mosquitto.url, topic_prefix) as agent:
            with pytest.raises(RemoteError) as info:
                await agent.infer({"image": images[:1]})
        assert info.value.code == "unknown_split"

    with worker(mosquitto.url, topic_prefix, registry):
        asyncio.run(main())


def test_reconnects_after_a_broker_restart(fresh_mosquitto: MosquittoBroker, splits: Path,
                                           registry: Registry, images: np.ndarray[Any, Any],
                                           topic_prefix: str) -> None:
    url = fresh_mosquitto.url
    want = full_model(zoo.digits_cnn_path(), {"image": images})

    async def main() -> tuple[Arrays, int]:
        agent = agent_for(splits / "splits" / "fp32", url, topic_prefix, timeout_s=15,
                          reconnect_min_s=0.05, reconnect_max_s=0.3)
        async with agent:
            await agent.infer({"image": images[:1]})
            restart = asyncio.create_task(asyncio.to_thread(fresh_mosquitto.restart, 0.3))
            await asyncio.sleep(0.05)  # some requests go out while the broker is down
            calls = [agent.infer({"image": images[i:i + 1]}) for i in range(len(images))]
            results = await asyncio.gather(*calls)
            await restart
            assert agent.connected and agent.pending == 0
            outputs = {"logits": np.concatenate([r.outputs["logits"] for r in results])}
            return outputs, agent.counters.reconnects

    with worker(url, topic_prefix, registry):
        got, reconnects = asyncio.run(main())
    assert reconnects >= 1
    assert_same(got, want, exact=False)


def test_fifty_agents_in_one_loop(mosquitto: MosquittoBroker, splits: Path,
                                  registry: Registry, images: np.ndarray[Any, Any],
                                  topic_prefix: str) -> None:
    split_dir = splits / "splits" / "int8"
    manifest = Manifest.load(split_dir)
    head = load_head(manifest, split_dir, threads=1)  # one session serves every agent
    want = full_model(splits / "digits_int8.onnx", {"image": images[:4]})
    threads_before = threading.active_count()

    async def main() -> tuple[list[Arrays], int]:
        agents = [EdgeAgent(manifest=manifest, head=head, config=AgentConfig(
            device_id=f"fleet-{i:02d}", broker=mosquitto.url, prefix=topic_prefix))
            for i in range(50)]
        await asyncio.gather(*(a.start() for a in agents))
        try:
            peak = threading.active_count()
            results = await asyncio.gather(*(a.infer({"image": images[:4]}) for a in agents))
            return [r.outputs for r in results], peak
        finally:
            await asyncio.gather(*(a.close() for a in agents))

    with worker(mosquitto.url, topic_prefix, registry):
        outputs, peak = asyncio.run(main())
    assert peak - threads_before < 20, "an agent must not cost a thread"
    for got in outputs:
        assert_same(got, want, exact=True)


def test_presence_is_retained_online_then_offline(mosquitto: MosquittoBroker, splits: Path,
                                                  topic_prefix: str) -> None:
    status = f"{topic_prefix}/v1/status/dev-1"

    async def retained() -> bytes:
        client = await open_client(BrokerConfig.from_url(mosquitto.url), "presence-reader")
        try:
            await client.subscribe(status, qos=1)
            message = await asyncio.wait_for(anext(aiter(client.messages())), 5)
            return bytes(message.payload)
        finally:
            await client.disconnect()

    async def main() -> tuple[bytes, bytes]:
        async with agent_for(splits / "splits" / "fp32", mosquitto.url, topic_prefix):
            online = await retained()
        return online, await retained()

    assert asyncio.run(main()) == (b"online", b"offline")


def test_blocking_split_client(mosquitto: MosquittoBroker, splits: Path, registry: Registry,
                               images: np.ndarray[Any, Any], topic_prefix: str) -> None:
    config = AgentConfig(device_id="blocking-1", broker=mosquitto.url, prefix=topic_prefix)
    with worker(mosquitto.url, topic_prefix, registry), \
            SplitClient(splits / "splits" / "int8", config=config, threads=1) as client:
        result = client.infer(images[:8])
        cut = OrtHead(splits / "splits" / "int8" / "head.onnx").run({"image": images[8:9]})
        replay = client.infer_activation(cut)
    assert_same(result.outputs, full_model(splits / "digits_int8.onnx", {"image": images[:8]}),
                exact=True)
    assert_same(replay.outputs, full_model(splits / "digits_int8.onnx",
                                           {"image": images[8:9]}), exact=True)
    assert replay.timings["head"] == 0.0


def test_cli_edge_run_json_and_output(mosquitto: MosquittoBroker, splits: Path,
                                      registry: Registry, images: np.ndarray[Any, Any],
                                      topic_prefix: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, image=images[:10], label=np.arange(10))
    with worker(mosquitto.url, topic_prefix, registry):
        code = cli_main(["edge", "run", "--broker", mosquitto.url, "--artifacts",
                         str(splits / "splits" / "fp32"), "--input", str(inp), "--output",
                         str(out), "--device-id", "cli-1", "--prefix", topic_prefix,
                         "--batch-size", "3", "--threads", "1", "--retry-s", "2",
                         "--retry-max-s", "5", "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert "ignoring ['label']" in captured.err
    summary = json.loads(captured.out)
    assert (summary["samples"], summary["requests"], summary["ok"], summary["failed"]) == \
        (10, 4, 4, 0)
    counters = summary["counters"]
    assert counters["published"] == 4 + counters["retries"] + counters["republished"]
    assert summary["attempts"] == counters["published"] and counters["duplicates"] == 0
    assert summary["protocol"] == "5" and summary["device_id"] == "cli-1"
    assert summary["outputs"] == {"logits": {"dtype": "float32", "shape": [10, 10]}}
    assert set(summary["latency_ms"]) == {"e2e", "head", "encode", "network", "queue", "tail",
                                          "decode"}
    for stage in summary["latency_ms"].values():
        assert {"p50", "p95", "p99", "n"} <= set(stage) and stage["n"] == 4
    with np.load(out) as data:
        assert data.files == ["logits"]
        assert_same({"logits": data["logits"]},
                    full_model(zoo.digits_cnn_path(), {"image": images[:10]}), exact=False)


def test_cli_edge_run_counts_failures_and_writes_nothing(
        mosquitto: MosquittoBroker, splits: Path, images: np.ndarray[Any, Any],
        topic_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, image=images[:2])
    code = cli_main(["edge", "run", "--broker", mosquitto.url + "?protocol=3.1.1",
                     "--artifacts", str(splits / "splits" / "fp32"), "--input", str(inp),
                     "--output", str(out), "--prefix", topic_prefix, "--timeout", "0.2",
                     "--concurrency", "2", "--keep-going", "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_FAILED
    summary = json.loads(captured.out)
    assert (summary["ok"], summary["failed"], summary["errors"], summary["output"]) == \
        (0, 2, {"DeadlineExceeded": 2}, None)
    assert "2 of 2 requests failed" in captured.err and not out.exists()


@pytest.mark.parametrize(("arrays", "broker", "code", "words"), [
    ({"pixels": np.zeros((2, 1, 8, 8), np.float32)}, "up", EXIT_BAD_INPUT,
     "lacks input(s) ['image']"),
    ({"image": np.zeros((2, 1, 8, 8), np.float64)}, "up", EXIT_BAD_INPUT,
     "expected dtype float32, got float64"),
    ({"image": np.zeros((2, 1, 8, 8), np.float32)}, "down", EXIT_STARTUP,
     "cannot reach the broker"),
])
def test_cli_edge_run_errors(mosquitto: MosquittoBroker, splits: Path, tmp_path: Path,
                             topic_prefix: str, capsys: pytest.CaptureFixture[str],
                             arrays: Arrays, broker: str, code: int, words: str) -> None:
    inp = tmp_path / "in.npz"
    np.savez(inp, **arrays)  # type: ignore[arg-type]  # numpy stubs match **kw to allow_pickle
    url = mosquitto.url if broker == "up" else f"mqtt://127.0.0.1:{free_port()}"
    got = cli_main(["edge", "run", "--broker", url, "--artifacts",
                    str(splits / "splits" / "fp32"), "--input", str(inp), "--output",
                    str(tmp_path / "out.npz"), "--prefix", topic_prefix])
    err = capsys.readouterr().err
    assert got == code, err
    assert words in err and err.startswith("splitinfer edge: error:")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.npz").exists()


def test_startup_error_names_the_broker(splits: Path, topic_prefix: str) -> None:
    async def main() -> None:
        with pytest.raises(StartupError, match=r"127\.0\.0\.1"):
            await agent_for(splits / "splits" / "fp32", f"mqtt://127.0.0.1:{free_port()}",
                            topic_prefix).start()

    asyncio.run(main())


def test_running_a_head_imports_neither_onnx_nor_torch(splits: Path) -> None:
    code = ("import sys, numpy as np, edge_agent, edge_agent.cli\n"
            "from edge_agent import load_head\n"
            "from splitinfer.manifest import Manifest\n"
            f"d = {str(splits / 'splits' / 'int8')!r}\n"
            "head = load_head(Manifest.load(d), d, threads=1)\n"
            "head.run({'image': np.zeros((1, 1, 8, 8), np.float32)})\n"
            "bad = [m for m in ('onnx', 'torch') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
