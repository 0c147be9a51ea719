"""The adaptive edge agent (EdgeAgent.from_bundle) through a real mosquitto and real worker.

The bundle is built here with the real splitter: the digits CNN cut at ``relu1`` and at
``pool``, plus ``cloud_only`` and ``edge_only``. The device is emulated slow (its heads
sleep as the fleet's ``--speed`` does), so the cloud is worth using on loopback; the worker
is ``cloud_service.server.Server`` in a thread serving every tail of the bundle. Answers
must equal the full model's whichever split (or the local fallback) served them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from cloud_service.config import Config
from cloud_service.server import Server
from edge_agent import AgentConfig, EdgeAgent, HeadRuntime, load_head
from edge_agent.adaptive import PolicyConfig
from edge_agent.bundle_agent import BundleAgent
from simulators.support.broker import MosquittoBroker
from splitinfer import ort_config
from splitinfer.bundle import Bundle, BundleSplit
from splitinfer.manifest import Manifest, sha256_file
from splitter import list_cuts, split_model, zoo

pytestmark = pytest.mark.integration

Array = np.ndarray[Any, Any]
TIMEOUT_S = 1.5
CUTS = {"cut_relu1": ["relu1"], "cut_pool": ["pool"], "cloud_only": "cloud_only",
        "edge_only": "edge_only"}


class SlowHead:
    """A head that takes at least ``floor_s`` (a slower device, as the fleet's --speed)."""

    def __init__(self, head: HeadRuntime, floor_s: float) -> None:
        self._head, self._floor = head, floor_s

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._head.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._head.output_names

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        t0 = time.perf_counter()
        out = self._head.run(inputs)
        time.sleep(max(0.0, self._floor - (time.perf_counter() - t0)))
        return out


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adaptive-bundle")
    model = zoo.digits_cnn_path()
    shares = {c.kind if c.kind != "split" else c.tensors[0].name: c.head_flops_share
              for c in list_cuts(model)}
    entries = []
    for name, cut in CUTS.items():
        result = split_model(model, cut, root / name, model_name="digits_cnn")
        m = result.manifest_obj
        entries.append(BundleSplit(split_id=m.split_id, dir=name, kind=m.kind,
                                   bytes_per_sample=m.bytes_per_sample,
                                   head_flops_share=shares[cut if isinstance(cut, str)
                                                           else cut[0]]))
    Bundle(model="digits_cnn", source_sha256=sha256_file(model), splits=tuple(entries),
           root=root).save()
    return root


@pytest.fixture(scope="module")
def images() -> Array:
    x, _ = zoo.digits_test_set()
    return np.ascontiguousarray(x[:12])


def full_model(x: Array) -> Array:
    session = ort.InferenceSession(str(zoo.digits_cnn_path()),
                                   ort_config.apply(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"image": x})[0])


def slow_heads(bundle_dir: Path, seconds: float) -> dict[str, HeadRuntime]:
    """Every head of the bundle, each taking at least ``seconds`` x its FLOPs share (the
    whole model: ``seconds``), as a device ~``seconds`` / 50 us slower than this box."""
    bundle = Bundle.load(bundle_dir)
    heads: dict[str, HeadRuntime] = {}
    for s in bundle:
        if s.kind == "cloud_only":
            continue
        manifest = bundle.manifest(s)
        heads[s.split_id] = SlowHead(load_head(manifest, bundle.path(s), threads=1),
                                     seconds * (s.head_flops_share or 0.0))
    return heads


class Worker:
    """The cloud worker, started and stopped by the test while its loop runs."""

    def __init__(self, url: str, prefix: str, artifacts: Path) -> None:
        self.url, self.prefix, self.artifacts = url, prefix, artifacts
        self.server: Server | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.server = Server(Config(artifacts=self.artifacts, broker=self.url,
                                    prefix=self.prefix, group="", threads=1,
                                    metrics_interval_s=0, reconnect_min_s=0.05,
                                    reconnect_max_s=0.3, drain_timeout_s=2))
        self.thread = self.server.start_in_thread(30)

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(30)
            assert not self.thread.is_alive(), "worker did not stop"
        self.server = self.thread = None


def make_agent(bundle_dir: Path, url: str, prefix: str, **kwargs: Any) -> BundleAgent:
    config = AgentConfig(device_id="adaptive-1", broker=url, prefix=prefix,
                         timeout_s=TIMEOUT_S, reconnect_min_s=0.05, reconnect_max_s=0.3)
    return EdgeAgent.from_bundle(bundle_dir, config=config, link="lan", threads=1,
                                 heads=slow_heads(bundle_dir, 0.05),
                                 policy=PolicyConfig(probe_interval_s=0.3), **kwargs)


async def until_cloud(agent: EdgeAgent, x: Array, within_s: float) -> list[Any]:
    """Requests ~20/s until one is served by the cloud again (or ``within_s`` passes)."""
    results = []
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        result = await agent.infer({"image": x})
        results.append(result)
        if result.served_by == "cloud":
            return results
        await asyncio.sleep(0.05)
    return results


def check(result: Any, x: Array, want: Array, ids: set[str]) -> None:
    assert result.split_id in ids
    assert result.served_by in ("cloud", "edge")
    assert result.timings["e2e"] <= TIMEOUT_S
    np.testing.assert_allclose(result.outputs["logits"], want, rtol=1e-5, atol=1e-5)


def test_worker_stops_and_comes_back(mosquitto: MosquittoBroker, bundle_dir: Path,
                                     images: Array, topic_prefix: str) -> None:
    want = full_model(images)
    ids = set(Bundle.load(bundle_dir).ids)
    edge_id = Bundle.load(bundle_dir).of_kind("edge_only")[0].split_id
    worker = Worker(mosquitto.url, topic_prefix, bundle_dir)

    async def main() -> None:
        agent = make_agent(bundle_dir, mosquitto.url, topic_prefix)
        assert isinstance(agent, BundleAgent)
        assert len(agent.splits) == len(CUTS) and agent.policy.current != edge_id
        async with agent:
            for i in range(6):  # the cloud serves, on the split the policy chose
                result = await agent.infer({"image": images[i:i + 1]})
                check(result, images[i:i + 1], want[i:i + 1], ids)
                assert (result.served_by, result.fallback) == ("cloud", ""), result
                assert result.split_id == agent.policy.current
            await asyncio.to_thread(worker.stop)
            local = [await agent.infer({"image": images[i:i + 1]}) for i in range(6, 9)]
            for i, result in enumerate(local, 6):
                check(result, images[i:i + 1], want[i:i + 1], ids)
                assert result.served_by == "edge" and result.split_id == edge_id
                assert result.fallback == "no_worker"  # mosquitto 2: no matching subscribers
            await asyncio.to_thread(worker.start)
            again = await until_cloud(agent, images[9:10], within_s=5.0)
            assert again[-1].served_by == "cloud", agent.summary()
            for result in again:
                check(result, images[9:10], want[9:10], ids)
            summary = agent.summary()
            assert summary["served_locally"] >= 3
            assert summary["fallbacks"].get("no_worker", 0) >= 3
            assert sum(summary["splits_used"].values()) == 9 + len(again)
            assert agent.switches == [] and summary["probes"] >= 1

    worker.start()
    try:
        asyncio.run(main())
    finally:
        worker.stop()


def test_broker_cut_answers_locally_then_splits_again(fresh_mosquitto: MosquittoBroker,
                                                      bundle_dir: Path, images: Array,
                                                      topic_prefix: str) -> None:
    want = full_model(images)
    ids = set(Bundle.load(bundle_dir).ids)
    worker = Worker(fresh_mosquitto.url, topic_prefix, bundle_dir)

    async def main() -> None:
        agent = make_agent(bundle_dir, fresh_mosquitto.url, topic_prefix)
        async with agent:
            first = await agent.infer({"image": images[:1]})
            check(first, images[:1], want[:1], ids)
            assert first.served_by == "cloud"
            await asyncio.to_thread(fresh_mosquitto.stop)
            for _ in range(100):  # the agent notices the lost connection
                if not agent.connected:
                    break
                await asyncio.sleep(0.02)
            # in the outage every request is answered, locally, within its deadline
            outage = [await agent.infer({"image": images[i:i + 1]}) for i in range(1, 5)]
            for i, result in enumerate(outage, 1):
                check(result, images[i:i + 1], want[i:i + 1], ids)
                assert result.served_by == "edge" and result.fallback == "offline"
            await asyncio.to_thread(fresh_mosquitto.start)
            await agent.wait_connected(10)
            again = await until_cloud(agent, images[5:6], within_s=8.0)
            assert again[-1].served_by == "cloud", agent.summary()
            for result in again:
                check(result, images[5:6], want[5:6], ids)
            assert agent.summary()["fallbacks"].get("offline", 0) >= 4

    worker.start()
    try:
        asyncio.run(main())
    finally:
        worker.stop()


def test_unreachable_broker_at_start_answers_locally(bundle_dir: Path, images: Array,
                                                     topic_prefix: str) -> None:
    from simulators.support.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    want = full_model(images[:2])

    async def main() -> None:
        agent = make_agent(bundle_dir, url, topic_prefix)
        async with agent:
            result = await agent.infer({"image": images[:2]})
            assert result.served_by == "edge" and result.fallback == "offline"
            np.testing.assert_allclose(result.outputs["logits"], want, rtol=1e-5, atol=1e-5)

    asyncio.run(main())


def test_pinned_split_serves_every_request(mosquitto: MosquittoBroker, bundle_dir: Path,
                                           images: Array, topic_prefix: str) -> None:
    bundle = Bundle.load(bundle_dir)
    pinned = bundle.get("cloud_only").split_id
    want = full_model(images)
    worker = Worker(mosquitto.url, topic_prefix, bundle_dir)

    async def main() -> None:
        agent = make_agent(bundle_dir, mosquitto.url, topic_prefix, split="cloud_only")
        async with agent:
            results = await asyncio.gather(*(agent.infer({"image": images[i:i + 1]})
                                             for i in range(len(images))))
        for i, result in enumerate(results):
            assert result.split_id == pinned and result.served_by == "cloud"
            np.testing.assert_allclose(result.outputs["logits"], want[i:i + 1], rtol=1e-5,
                                       atol=1e-5)
        assert agent.switches == []

    worker.start()
    try:
        asyncio.run(main())
    finally:
        worker.stop()


def test_a_bundle_split_id_is_its_manifest(bundle_dir: Path) -> None:
    bundle = Bundle.load(bundle_dir)
    for s in bundle:
        assert Manifest.load(bundle.path(s)).split_id == s.split_id


def test_cli_adaptive_and_pinned(mosquitto: MosquittoBroker, bundle_dir: Path, images: Array,
                                 topic_prefix: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from splitinfer.cli import main as cli_main
    from splitinfer.errors import EXIT_BAD_INPUT, EXIT_OK

    inp = tmp_path / "in.npz"
    np.savez(inp, image=images[:5])
    want = full_model(images[:5])
    bundle = Bundle.load(bundle_dir)
    common = ["edge", "run", "--broker", mosquitto.url, "--artifacts", str(bundle_dir),
              "--prefix", topic_prefix, "--input", str(inp), "--threads", "1", "--json"]
    worker = Worker(mosquitto.url, topic_prefix, bundle_dir)
    worker.start()
    try:
        for extra, name in ((["--adaptive", "--link", "4g"], "adaptive"),
                            (["--split", "cut_pool"], "pinned")):
            out = tmp_path / f"{name}.npz"
            code = cli_main([*common, "--output", str(out), *extra])
            captured = capsys.readouterr()
            assert code == EXIT_OK, captured.err
            summary = json.loads(captured.out)
            adaptive = summary["adaptive"]
            assert sum(adaptive["splits_used"].values()) == 5 == summary["ok"]
            assert set(adaptive["splits_used"]) <= set(bundle.ids)
            with np.load(out) as got:
                np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)
        assert adaptive["splits_used"] == {bundle.get("cut_pool").split_id: 5}
        assert adaptive["served_locally"] == 0 and adaptive["pinned"] is not None
    finally:
        worker.stop()
    # no worker at all: the run still answers every sample (locally) and exits 0
    out = tmp_path / "alone.npz"
    code = cli_main([*common, "--output", str(out), "--adaptive", "--timeout", "1"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    with np.load(out) as got:
        np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)
    # --adaptive needs a bundle
    code = cli_main([*common, "--output", str(out), "--adaptive", "--artifacts",
                     str(bundle_dir / "cut_pool")])
    assert code == EXIT_BAD_INPUT
    assert "not a bundle" in capsys.readouterr().err
