"""``splitinfer profile``: the profile JSON of a small bundle (the digits CNN at two cuts and
both baselines), measured with real onnxruntime sessions; timings checked through an
injected timer (no wall-clock assertions), sizes against what the real edge agent sends."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from splitinfer.bundle import Bundle, BundleSplit
from splitinfer.cli import main as cli_main
from splitinfer.errors import BadInputError
from splitinfer.imagecodec import make_codec
from splitinfer.manifest import Manifest
from splitter.planner import profile as prof

REPO = Path(__file__).resolve().parents[1]
CUTS = {"cloud_only": "cloud_only", "cut_relu1": "relu1", "cut_pool": "pool",
        "edge_only": "edge_only"}
JPEG_DIR = "cloud_only_jpeg90"
DIRS = [*CUTS, JPEG_DIR]
STAT_KEYS = {"p50", "p90", "p99", "mean", "n"}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitter import split_model, zoo

    root = tmp_path_factory.mktemp("digits_bundle")
    splits = []
    model, sha = "", ""
    for name, cut in CUTS.items():
        m = split_model(zoo.digits_cnn_path(), cut, root / name).manifest_obj
        model, sha = m.model, m.source.sha256
        splits.append(BundleSplit(m.split_id, name, m.kind, m.bytes_per_sample, None))
    # the cloud-only baseline with its input sent as JPEG (splitinfer bundle --input-codec)
    raw = Manifest.load(root / "cloud_only")
    images, _ = zoo.digits_test_set()
    spec = raw.inputs[0]
    codec = make_codec("jpeg:90", spec.name, spec.dtype, spec.shape, images[:64])
    assert codec is not None
    shutil.copytree(root / "cloud_only", root / JPEG_DIR)
    coded = replace(raw, split_id=raw.split_id + "-jpeg90", input_codec=codec.to_dict())
    coded.save(root / JPEG_DIR)
    splits.append(BundleSplit(coded.split_id, JPEG_DIR, "cloud_only", None, 0.0,
                              input_codec="jpeg:90"))
    Bundle(model=model, source_sha256=sha, splits=tuple(splits), root=root).save()
    return root


@pytest.fixture(scope="module")
def samples_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitter import zoo

    images, labels = zoo.digits_test_set()
    path = tmp_path_factory.mktemp("samples") / "digits.npz"
    np.savez(path, image=images[:12], label=labels[:12])
    return path


class StepTimer:
    """Every call is ``step`` seconds after the previous one: each timed span is one step."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _splits_by_dir(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["dir"]: s for s in doc["splits"].values()}


def test_edge_profile_schema(bundle_dir: Path, samples_npz: Path) -> None:
    doc = prof.profile(bundle_dir, "edge", samples=samples_npz)
    bundle = Bundle.load(bundle_dir)
    assert doc["format"] == "splitinfer.profile/1" and doc["side"] == "edge"
    assert doc["model"] == bundle.model and doc["source_sha256"] == bundle.source_sha256
    assert set(doc["machine"]) == {"hostname", "platform", "machine", "processor", "cpus",
                                   "onnxruntime", "python"}
    assert doc["threads"] == 1 and doc["speed"] == 1.0 and doc["samples"] == 12
    assert doc["measured_at"].endswith("Z")
    assert set(doc["splits"]) == set(bundle.ids)
    by_dir = _splits_by_dir(doc)
    for name, s in by_dir.items():
        assert s["kind"] == bundle.get(name).kind
        assert s["input_codec"] == ("jpeg:90" if name == JPEG_DIR else "raw")
        assert set(s["head_ms"]) == STAT_KEYS and set(s["encode_ms"]) == STAT_KEYS
        assert set(s["decode_ms"]) == STAT_KEYS  # the result envelope, on the device
        assert s["head_ms"]["n"] == 12
    assert by_dir["cloud_only"]["head_ms"]["p99"] == 0.0
    assert by_dir["cut_relu1"]["head_ms"]["p50"] > 0
    assert by_dir["edge_only"]["head_ms"]["p50"] > 0
    assert by_dir["edge_only"]["request_bytes"] == 0 == by_dir["edge_only"]["cut_bytes"]
    for name in ("cloud_only", "cut_relu1", "cut_pool"):  # raw: the cut's own bytes
        m = Manifest.load(bundle_dir / name)
        assert by_dir[name]["cut_bytes"] == m.bytes_per_sample
        assert by_dir[name]["request_bytes"] > by_dir[name]["cut_bytes"]
    # JPEG: the encoded images' bytes, one per sample, as the codec makes them
    coded = Manifest.load(bundle_dir / JPEG_DIR)
    codec = coded.codec_for("image")
    assert codec is not None
    images = np.load(samples_npz)["image"]
    jpeg = [len(codec.encode(images[i:i + 1])[0]) for i in range(len(images))]
    assert by_dir[JPEG_DIR]["cut_bytes"] == round(sum(jpeg) / len(jpeg))
    assert by_dir[JPEG_DIR]["head_ms"]["p50"] == 0.0
    json.dumps(doc)  # plain JSON all through


def test_speed_scales_only_the_head(bundle_dir: Path) -> None:
    one = prof.profile(bundle_dir, "edge", speed=1.0, timer=StepTimer(0.001))
    four = prof.profile(bundle_dir, "edge", speed=4.0, timer=StepTimer(0.001))
    assert four["speed"] == 4.0
    for sid, s in one["splits"].items():
        f = four["splits"][sid]
        if s["kind"] == "cloud_only":
            assert f["head_ms"]["p50"] == 0.0
            continue
        for key in ("p50", "p90", "p99", "mean"):
            assert s["head_ms"][key] == pytest.approx(1.0)
            assert f["head_ms"][key] == pytest.approx(4.0 * s["head_ms"][key])
        if s["kind"] == "split":  # one step each: the device's codec work is not scaled
            assert f["encode_ms"]["p50"] == pytest.approx(1.0) == s["encode_ms"]["p50"]
            assert f["decode_ms"]["p50"] == pytest.approx(1.0) == s["decode_ms"]["p50"]
    with pytest.raises(BadInputError, match="--speed"):
        prof.profile(bundle_dir, "edge", speed=0.0)


def test_request_bytes_are_what_the_agent_sends(bundle_dir: Path, samples_npz: Path) -> None:
    """The real EdgeAgent on an in-memory broker: its payloads have the profile's size."""
    from edge_agent import AgentConfig, EdgeAgent, MemoryBroker
    from splitinfer.topics import Topics
    from splitinfer.wire import WireTensor, decode, encode

    doc = prof.profile(bundle_dir, "edge", samples=samples_npz)
    images = np.load(samples_npz)["image"]

    async def sizes(name: str) -> list[int]:
        broker = MemoryBroker()
        m = Manifest.load(bundle_dir / name)
        codec = m.codec_for("image")
        codecs = {m.split_id: {"image": codec}} if codec is not None else {}
        seen: list[int] = []
        worker = await broker.connect(client_id="worker", will=None)
        await worker.subscribe(Topics().shared_request_filter())

        async def serve() -> None:
            async for message in worker.messages():
                seen.append(len(message.payload))
                req = decode(message.payload, codecs=codecs)
                answer = req.result([WireTensor("logits", np.zeros((1, 10), np.float32))])
                await worker.publish(req.reply_to, encode(answer))

        task = asyncio.create_task(serve())
        agent = EdgeAgent.from_artifacts(bundle_dir / name, connector=broker.connect,
                                         config=AgentConfig(device_id=prof.DEVICE_ID))
        async with agent:
            for i in range(len(images)):
                await agent.infer({"image": images[i:i + 1]}, timeout=5)
        task.cancel()
        await worker.close()
        return seen

    by_dir = _splits_by_dir(doc)
    for name in ("cloud_only", "cut_relu1", "cut_pool", JPEG_DIR):
        got = asyncio.run(asyncio.wait_for(sizes(name), 30))
        assert len(got) == len(images)
        assert by_dir[name]["request_bytes"] == round(sum(got) / len(got))


def test_cloud_profile(bundle_dir: Path, samples_npz: Path) -> None:
    doc = prof.profile(bundle_dir, "cloud", samples=samples_npz, batches=(1, 4), repeats=2,
                       timer=StepTimer(0.002))
    assert doc["side"] == "cloud" and doc["threads"] == 0
    by_dir = _splits_by_dir(doc)
    assert set(by_dir["edge_only"]) == {"kind", "dir", "input_codec"}
    for name in ("cloud_only", "cut_relu1", "cut_pool", JPEG_DIR):
        s = by_dir[name]
        assert set(s["decode_ms"]) == STAT_KEYS and s["decode_ms"]["n"] == 24
        assert s["tail_ms"]["p50"] == pytest.approx(2.0)
        assert set(s["batches"]) == {"1", "4"}
        assert s["batches"]["4"]["p50_ms"] == pytest.approx(2.0)
        assert s["batches"]["4"]["throughput_rps"] == pytest.approx(2000.0)
        assert s["batches"]["1"]["throughput_rps"] == pytest.approx(500.0)
        # the result of the worker: 10 float32 logits plus the envelope
        assert 40 < s["result_bytes"] < 40 + 400


def test_single_split_folder_and_random_inputs(bundle_dir: Path, tmp_path: Path) -> None:
    doc = prof.profile(bundle_dir / "cut_pool", "edge", max_samples=5)
    (entry,) = doc["splits"].values()
    assert entry["dir"] == "cut_pool" and entry["head_ms"]["n"] == 5
    for name in ("cut_pool", "edge_only"):  # a folder of split folders, no bundle.json
        shutil.copytree(bundle_dir / name, tmp_path / "plain" / name)
    plain = prof.profile(tmp_path / "plain", "edge", max_samples=2)
    assert sorted(s["dir"] for s in plain["splits"].values()) == ["cut_pool", "edge_only"]
    assert set(plain["splits"]) == {Manifest.load(bundle_dir / n).split_id
                                    for n in ("cut_pool", "edge_only")}
    # symbolic non-batch dims need real samples
    m = Manifest.load(bundle_dir / "cut_pool")
    spec = type(m.inputs[0])(name="image", dtype="float32", shape=("N", 1, "H", 8))
    with pytest.raises(BadInputError, match=r"'H'.*--samples"):
        prof.random_samples([spec], 2)


def test_samples_errors_and_warning(bundle_dir: Path, samples_npz: Path, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    m = Manifest.load(bundle_dir / "cut_pool")
    with caplog.at_level("WARNING"):
        arrays = prof.load_samples(samples_npz, m.inputs, limit=3)
    assert list(arrays) == ["image"] and len(arrays["image"]) == 3
    assert sum("ignoring label" in r.getMessage() for r in caplog.records) == 1
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(BadInputError, match=r"\['image'\]"):
        prof.load_samples(bad, m.inputs)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((2, 1, 8, 8), np.float64))
    with pytest.raises(BadInputError, match=r"float64.*float32"):
        prof.load_samples(wrong, m.inputs)


def test_cli_writes_the_profile(bundle_dir: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "edge.json"
    code = cli_main(["profile", "--artifacts", str(bundle_dir), "--side", "edge",
                     "--speed", "8", "--max-samples", "4", "-o", str(out), "--json"])
    assert code == 0
    written = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == written
    assert written["speed"] == 8.0 and len(written["splits"]) == len(DIRS)
    code = cli_main(["profile", "--artifacts", str(tmp_path / "nothing"), "--side", "cloud"])
    assert code == 2
    assert "no such folder" in capsys.readouterr().err


def test_edge_install_without_onnx(bundle_dir: Path) -> None:
    """With ``onnx`` unimportable, the module imports and the edge profile runs."""
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys

        class NoOnnx(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "onnx" or name.startswith("onnx."):
                    raise ImportError("onnx is not installed on this device (blocked)")
                return None

        sys.meta_path.insert(0, NoOnnx())
        from splitter.planner import profile
        doc = profile.profile({str(bundle_dir)!r}, "edge", max_samples=3)
        assert "onnx" not in sys.modules
        print(json.dumps({{"splits": len(doc["splits"])}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"splits": len(DIRS)}


def test_fixed_batch_splits(tmp_path: Path) -> None:
    """Halves fixed at batch 2 (a folder of split folders, no bundle.json): requests carry
    two samples, as the agent sends them; the tail is not batchable, so a batch of B
    requests runs B times, as the worker runs it."""
    from fixtures_edge import baseline_dir, fixed_batch_model, split_at_pool

    model = fixed_batch_model(tmp_path / "chain_b2.onnx", batch=2)
    split_at_pool(model, tmp_path / "plain" / "cut_p1", batch=2)
    baseline_dir(model, tmp_path / "plain" / "cloud_only", "cloud_only")
    baseline_dir(model, tmp_path / "plain" / "edge_only", "edge_only")
    edge = prof.profile(tmp_path / "plain", "edge", max_samples=5, timer=StepTimer(0.001))
    cloud = prof.profile(tmp_path / "plain", "cloud", max_samples=5, batches=(1, 3),
                         repeats=1, timer=StepTimer(0.001))
    e, c = _splits_by_dir(edge), _splits_by_dir(cloud)
    cut = Manifest.load(tmp_path / "plain" / "cut_p1")
    assert e["cut_p1"]["samples_per_request"] == 2 == c["cut_p1"]["samples_per_request"]
    assert e["cut_p1"]["head_ms"]["n"] == 3  # 5 samples in runs of 2, the last padded
    assert e["cut_p1"]["cut_bytes"] == 2 * (cut.bytes_per_sample or 0)
    for name in ("cut_p1", "cloud_only"):
        assert c[name]["batchable"] is False
        # throughput = B requests / the batch's p50 (one 1 ms step here)
        assert c[name]["batches"]["3"]["throughput_rps"] == pytest.approx(3000.0)
    assert e["edge_only"]["head_ms"]["p50"] == pytest.approx(1.0)


def test_interleave_runs_splits_round_robin() -> None:
    order: list[str] = []

    def call(name: str) -> Any:
        def run() -> str:
            order.append(name)
            return name
        return run

    times, results = prof._interleave([[call("a0"), call("a1"), call("a2")], [],
                                       [call("b0")]], StepTimer(0.5))
    assert order == ["a0", "b0", "a1", "a2"]
    assert results == [["a0", "a1", "a2"], [], ["b0"]]
    assert times == [[0.5] * 3, [], [0.5]]


def test_gap_idles_before_every_timed_span(bundle_dir: Path, samples_npz: Path) -> None:
    sleeps: list[float] = []
    timer = prof.SpacedTimer(0.25, StepTimer(0.001), sleep=sleeps.append)
    doc = prof.profile(bundle_dir, "edge", samples=samples_npz, timer=timer)
    by_dir = _splits_by_dir(doc)
    spans = sum(s[k]["n"] for s in by_dir.values() for k in ("head_ms", "encode_ms",
                                                              "decode_ms")
                if not (k == "head_ms" and s["kind"] == "cloud_only")
                and not (k != "head_ms" and s["kind"] == "edge_only"))
    assert spans == 3 * 12 + 2 * 4 * 12  # three heads; four requests encoded and answered
    assert sleeps == [0.25] * spans
    assert by_dir["cut_pool"]["head_ms"]["p50"] == pytest.approx(1.0)  # idling is not timed
    with pytest.raises(BadInputError, match="--gap-ms"):
        prof.profile(bundle_dir, "edge", gap_s=-1.0)
    assert prof.profile(bundle_dir / "cut_pool", "edge", max_samples=1,
                        gap_s=0.001)["gap_s"] == 0.001
