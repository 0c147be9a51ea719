"""``splitinfer bundle``: the folder, bundle.json, the cut choice, and a codec'd cloud_only
request end to end (edge agent -> real mosquitto -> real worker serving the bundle)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fixtures_models import digits_int8, models_dir  # noqa: F401
from test_cloud_support import running

from cloud_service.config import Config
from cloud_service.registry import Registry
from cloud_service.server import Server
from edge_agent import AgentConfig, EdgeAgent
from splitinfer import ort_config
from splitinfer.bundle import Bundle
from splitinfer.cli import main as cli_main
from splitinfer.errors import EXIT_OK, BadInputError
from splitinfer.manifest import Manifest, TensorSpec
from splitter import zoo
from splitter.bundle import build_bundle, select_cuts
from splitter.cuts import Cut, inspect_model

Arrays = dict[str, np.ndarray[Any, Any]]


@pytest.fixture(scope="module")
def images() -> np.ndarray[Any, Any]:
    x, _ = zoo.digits_test_set()
    return x[:48]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, digits_int8: Path,  # noqa: F811
               images: np.ndarray[Any, Any]) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "digits_int8"
    build_bundle(digits_int8, out, samples={"image": images}, codecs="raw,jpeg:90,png",
                 model_name="digits_int8")
    return out


def test_bundle_folder(bundle_dir: Path, digits_int8: Path) -> None:  # noqa: F811
    data = json.loads((bundle_dir / "bundle.json").read_text())
    assert data["format"] == "splitinfer.bundle/1" and data["model"] == "digits_int8"
    bundle = Bundle.load(bundle_dir)
    kinds = [s.kind for s in bundle]
    assert kinds.count("split") >= 3 and kinds.count("edge_only") == 1
    dirs = {s.dir for s in bundle}
    assert {"edge_only", "cloud_only", "cloud_only_jpeg90", "cloud_only_png"} <= dirs
    for s in bundle:
        m = bundle.manifest(s)  # split_id in bundle.json == the manifest's
        assert m.kind == s.kind and m.verification.get("max_abs_diff") == 0.0  # verified
        assert s.head_flops_share is not None and 0.0 <= s.head_flops_share <= 1.0
        if s.kind == "split":
            assert s.extra["quantized"] and s.bytes_per_sample == m.bytes_per_sample
    assert len(set(bundle.ids)) == len(bundle)
    edge, raw = bundle.get("edge_only"), bundle.get("cloud_only")
    assert (edge.bytes_per_sample, edge.head_flops_share) == (0, 1.0)
    assert raw.bytes_per_sample == 256 and raw.input_codec == "raw"
    for folder, codec in (("cloud_only_jpeg90", "jpeg:90"), ("cloud_only_png", "png")):
        s = bundle.get(folder)
        assert s.input_codec == codec and s.split_id != raw.split_id
        assert 0.9 <= s.extra["agreement"] <= 1.0 and s.extra["match"] == "argmax"
        assert s.extra["raw_bytes_per_sample"] == 256 and s.bytes_per_sample
        assert bundle.manifest(s).input_codec is not None


def test_auto_picks_no_dominated_cut(bundle_dir: Path, digits_int8: Path) -> None:  # noqa: F811
    cuts = inspect_model(digits_int8).cuts
    bundle = Bundle.load(bundle_dir)
    chosen = [s for s in bundle if s.kind == "split"]
    others = [c for c in cuts if c.bytes_per_sample is not None]
    for s in chosen:
        assert s.bytes_per_sample is not None and s.head_flops_share is not None
        dominating = [c.names for c in others
                      if c.bytes_per_sample is not None and c.bytes_per_sample < s.bytes_per_sample
                      and c.head_flops_share < s.head_flops_share]
        assert not dominating, f"{s.dir} is dominated by {dominating}"


def _cut(index: int, nbytes: int, share: float, quantized: bool = True,
         kind: str = "split") -> Cut:
    spec = TensorSpec(f"t{index}", "int8" if quantized else "float32", ("N", nbytes))
    return Cut(index=index, tensors=(spec,), bytes_per_sample=nbytes, head_flops_share=share,
               head_params_share=share, quantized=quantized, kind=kind)


def test_select_cuts_rule() -> None:
    cuts = [_cut(0, 1000, 0.0, False, "cloud_only"),
            _cut(1, 4000, 0.1, False),   # float: ignored in a quantized model
            _cut(2, 500, 0.2), _cut(3, 600, 0.3),  # 3: dominated by 2
            _cut(4, 250, 0.5), _cut(5, 250, 0.55),  # 5: ties 4 on bytes, fill-in only
            _cut(6, 100, 0.8), _cut(7, 2000, 0.4),  # 7: dominated by the cloud_only baseline
            _cut(8, 10, 0.9), _cut(9, 0, 1.0, False, "edge_only")]
    chosen, considered, front = select_cuts(cuts, 3)
    assert considered == 7 and front == 5  # 2, 4, 5, 6, 8
    assert [c.index for c in chosen] == sorted(c.index for c in chosen)
    assert {c.index for c in chosen} <= {2, 4, 6, 8} and len(chosen) == 3
    everything, _, _ = select_cuts(cuts, 10)
    assert {c.index for c in everything} == {2, 4, 5, 6, 8}
    with pytest.raises(BadInputError):
        select_cuts(cuts, 0)


def test_named_cuts_json_and_stale_dirs(tmp_path: Path, images: np.ndarray[Any, Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    np.savez(tmp_path / "s.npz", image=images[:8])
    args = ["bundle", str(zoo.digits_cnn_path()), "-o", str(out), "--samples",
            str(tmp_path / "s.npz"), "--cuts", "relu3,pool", "--json"]
    assert cli_main(args) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert {"bundle", "dir", "model", "source_sha256", "splits"} <= set(report)
    by_cut = {tuple(s["cut"]): s for s in report["splits"]}
    assert by_cut[("relu3",)]["bytes_per_sample"] == 256
    assert by_cut[("pool",)]["bytes_per_sample"] == 2048
    assert [s["dir"] for s in report["splits"]] == ["edge_only", "cut_05", "cut_08",
                                                     "cloud_only", "cloud_only_jpeg90"]
    assert cli_main([*args[:-3], "--cuts", "relu3", "--input-codec", "raw"]) == EXIT_OK
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["cloud_only", "cut_08",
                                                                  "edge_only"]


def test_worker_serves_every_tail_and_decodes_codec_requests(
        bundle_dir: Path, digits_int8: Path, images: np.ndarray[Any, Any],  # noqa: F811
        mosquitto: Any, topic_prefix: str) -> None:
    bundle = Bundle.load(bundle_dir)
    registry = Registry.load(bundle_dir, threads=1)
    tails = {s.split_id for s in bundle if s.kind != "edge_only"}
    assert set(registry) == tails  # edge_only skipped, every other tail served
    jpeg, png = bundle.get("cloud_only_jpeg90"), bundle.get("cloud_only_png")
    assert set(registry.codecs) == {jpeg.split_id, png.split_id}

    session = ort.InferenceSession(str(digits_int8), ort_config.apply(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    x = images[:6]

    async def ask(folder: str) -> np.ndarray[Any, Any]:
        agent = EdgeAgent.from_artifacts(bundle_dir / folder, threads=1, config=AgentConfig(
            device_id="dev-codec", broker=mosquitto.url, prefix=topic_prefix))
        async with agent:
            result = await agent.infer({"image": x})
        return np.asarray(result.outputs["logits"])

    config = Config(artifacts=bundle_dir, broker=mosquitto.url, prefix=topic_prefix,
                    threads=1, metrics_interval_s=0, drain_timeout_s=5)
    with running(Server(config, registry=registry)):
        got = {folder: asyncio.run(ask(folder))
               for folder in ("cloud_only_jpeg90", "cloud_only_png", "cloud_only")}
    for folder, answer in got.items():
        manifest = Manifest.load(bundle_dir / folder)
        codec = manifest.codec_for("image")
        seen = x if codec is None else codec.decode(codec.encode(x), list(x.shape), "float32")
        want = session.run(None, {"image": seen})[0]
        np.testing.assert_allclose(answer, want, rtol=0, atol=1e-5)  # the decoded image's
    raw_answer = got["cloud_only"]
    assert not np.array_equal(got["cloud_only_jpeg90"], raw_answer)  # jpeg is lossy


def test_symbolic_dims_need_input_shape(tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(zoo.mobilenet_v2(tmp_path / "m.onnx", width=0.35, resolution=32)))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    del model.graph.value_info[:]
    onnx.save(model, tmp_path / "sym.onnx")
    with pytest.raises(BadInputError, match="symbolic; give --input-shape"):
        build_bundle(tmp_path / "sym.onnx", tmp_path / "b")
    name = model.graph.input[0].name
    result = build_bundle(tmp_path / "sym.onnx", tmp_path / "b", cuts="2",
                          input_shapes={name: ("N", 3, 48, 48)}, num_samples=4)
    raw = result.bundle.get("cloud_only")
    assert raw.bytes_per_sample == 3 * 48 * 48 * 4
    assert len(result.bundle.of_kind("split")) == 2
    assert result.bundle.manifest("cloud_only_jpeg90").cut[0].shape[2:] == ("H", "W")


def test_split_input_codec_cli(tmp_path: Path, images: np.ndarray[Any, Any],
                               capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "s.npz", image=images[:16])
    base = ["split", str(zoo.digits_cnn_path()), "--samples", str(tmp_path / "s.npz")]
    assert cli_main([*base, "--at", "cloud_only", "-o", str(tmp_path / "png"),
                     "--input-codec", "png", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["split_id"].endswith("-png") and report["input_codec"]["codec"] == "png"
    cost = report["codec_cost"]
    assert cost["agreement"] == 1.0 and cost["samples"] == 16
    assert 0 < cost["bytes_per_sample"] < cost["raw_bytes_per_sample"] == 256
    assert Manifest.load(tmp_path / "png").codec_for("image") is not None
    assert cli_main([*base, "--at", "relu3", "-o", str(tmp_path / "x"),
                     "--input-codec", "jpeg"]) == 2
    assert "only the cloud_only baseline" in capsys.readouterr().err
