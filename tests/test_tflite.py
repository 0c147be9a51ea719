"""TFLite heads: real conversion (onnx2tf + tensorflow's converter), real LiteRT, the whole
split path (the agent's TfliteHead → real mosquitto → the real worker's ONNX tail).

Models: the bundled digits CNN (cut at ``pool``, its 360 bundled test digits) and a small
MobileNetV2 built in code (width 0.5, 64x64, cut at ``block12.add``) with a float cut and,
after ``splitter.surgery.quantize_cut``, an int8 one. Every answer through MQTT is checked
against the ONNX split run locally: top-1 agreement ≥ 99% and close logits.

The converter is the ``splitter-tflite`` extra (in ``dev``, so CI runs all of this); where
it is not installed the module is skipped with that reason. One test runs the agent in a
child process whose onnxruntime and onnx imports are blocked: the ``edge-tflite`` install.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

pytest.importorskip("onnx2tf", reason="the splitter-tflite extra (onnx2tf) is not installed")
pytest.importorskip("tensorflow", reason="the splitter-tflite extra (tensorflow) is not "
                    "installed")
pytest.importorskip("ai_edge_litert", reason="ai-edge-litert (edge-tflite extra) is not "
                    "installed")

from test_edge_integration import worker

from edge_agent import AgentConfig, EdgeAgent, load_head
from edge_agent.runtime import OrtHead, TfliteHead, choose_backend
from simulators.support.broker import MosquittoBroker
from splitinfer import ort_config
from splitinfer.cli import main as cli_main
from splitinfer.errors import (
    EXIT_OK,
    BadInputError,
    ManifestError,
    VerificationError,
)
from splitinfer.manifest import Manifest
from splitter import split_model, zoo
from splitter.quantize import quantize_static
from splitter.surgery import quantize_cut
from splitter.tflite import ConvertedHead, TfliteConversionError, convert_split, verify_tflite

pytestmark = pytest.mark.integration
Arrays = dict[str, np.ndarray[Any, Any]]
NAMES = ["digits", "mnv2", "mnv2_int8", "digits_qdq"]
REPO = Path(__file__).resolve().parents[1]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), ort_config.apply(ort.SessionOptions()),
                                providers=["CPUExecutionProvider"])


def onnx_split(directory: Path, feeds: Arrays) -> np.ndarray[Any, Any]:
    """The ONNX split's answer (head.onnx → tail.onnx), run here."""
    m = Manifest.load(directory)
    cut = [s.name for s in m.cut]
    acts = dict(zip(cut, _session(directory / "head.onnx").run(cut, feeds), strict=True))
    return np.asarray(_session(directory / "tail.onnx").run(None, acts)[0])


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Arrays]]:
    """name → (split directory with head.tflite, the samples it is checked on)."""
    root = tmp_path_factory.mktemp("tflite")
    digits, _ = zoo.digits_test_set()
    mnv2 = zoo.mobilenet_v2(root / "mobilenet_v2.onnx", width=0.5, resolution=64)
    x = {"input": np.random.default_rng(0).random((16, 3, 64, 64), dtype=np.float32)}
    split_model(zoo.digits_cnn_path(), "pool", root / "digits", samples={"image": digits},
                head_format="tflite")
    split_model(mnv2, "block12.add", root / "mnv2", samples=x, head_format="tflite")
    split_model(mnv2, "block12.add", root / "mnv2_int8", samples=x)
    quantize_cut(root / "mnv2_int8", calibration=x)
    convert_split(root / "mnv2_int8", samples=x)
    qdq = quantize_static(zoo.digits_cnn_path(), zoo.digits_calibration_path(),
                          root / "digits_int8.onnx")
    split_model(qdq, "pool_QuantizeLinear_Output", root / "digits_qdq",
                samples={"image": digits}, head_format="tflite")
    return {"digits": (root / "digits", {"image": digits}), "mnv2": (root / "mnv2", x),
            "mnv2_int8": (root / "mnv2_int8", x),
            "digits_qdq": (root / "digits_qdq", {"image": digits})}


@pytest.mark.parametrize("name", NAMES)
def test_manifest_records_a_verified_tflite_head(splits: dict[str, tuple[Path, Arrays]],
                                                 name: str) -> None:
    directory, samples = splits[name]
    m = Manifest.load(directory)
    assert m.head_tflite is not None and (directory / "head.tflite").is_file()
    assert m.head is not None and m.head.path == "head.onnx"  # the ONNX head stays
    report = m.verification["tflite"]
    assert report["samples"] == len(next(iter(samples.values())))
    assert report["match"] == "argmax" and report["agreement"] >= 0.99
    assert {"onnx2tf", "tensorflow", "ai-edge-litert"} <= set(m.versions)
    cut = report["cut"][m.cut[0].name]
    if m.cut[0].quantization is not None:  # int8: at most one step off, on few elements
        assert cut["max_abs_diff"] <= 1 and cut["differing_share"] < 1e-3
    else:
        assert cut["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_tflite_head_gives_the_cut_the_tail_expects(splits: dict[str, tuple[Path, Arrays]],
                                                   name: str) -> None:
    """Layout (NCHW), dtype and quantization of the ONNX head's cut, from LiteRT."""
    directory, samples = splits[name]
    m = Manifest.load(directory)
    lite = load_head(m, directory, backend="tflite", threads=1)
    assert isinstance(lite, TfliteHead)
    feed = {k: v[:3] for k, v in samples.items()}
    want = OrtHead(directory / "head.onnx", threads=1).run(feed)
    got = lite.run(feed)
    for spec in m.cut:
        assert got[spec.name].dtype == want[spec.name].dtype == np.dtype(spec.dtype)
        assert got[spec.name].shape == want[spec.name].shape
        diff = np.abs(got[spec.name].astype(np.float64) - want[spec.name])
        assert diff.max() <= (1 if spec.quantization else 1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_whole_split_path_over_mosquitto(mosquitto: MosquittoBroker, topic_prefix: str,
                                         splits: dict[str, tuple[Path, Arrays]],
                                         name: str) -> None:
    """The agent's TFLite head → real mosquitto → the real worker's ONNX tail."""
    directory, samples = splits[name]
    m = Manifest.load(directory)
    feed = {k: v[:64] for k, v in samples.items()}
    agent = EdgeAgent.from_artifacts(directory, threads=1, head_backend="tflite",
                                     config=AgentConfig(device_id=f"lite-{name}",
                                                        broker=mosquitto.url,
                                                        prefix=topic_prefix))
    assert isinstance(agent.head, TfliteHead)

    async def main() -> np.ndarray[Any, Any]:
        async with agent:
            result = await agent.infer(feed)
            return next(iter(result.outputs.values()))

    with worker(mosquitto.url, topic_prefix, artifacts=directory):
        got = asyncio.run(main())
    want = onnx_split(directory, feed)
    assert got.shape == want.shape
    assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.99
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= (1e-4 if m.cut[0].quantization is None else 0.05) * scale


def test_edge_tflite_install_runs_a_split_without_onnxruntime(
        mosquitto: MosquittoBroker, topic_prefix: str,
        splits: dict[str, tuple[Path, Arrays]], tmp_path: Path) -> None:
    """A child process that cannot import onnxruntime (nor onnx) loads the split with the
    default backend (auto → LiteRT) and answers through the real worker."""
    directory, samples = splits["digits"]
    np.savez(tmp_path / "in.npz", image=samples["image"][:8])
    code = textwrap.dedent(f"""
        import asyncio, importlib.abc, json, sys
        import numpy as np

        class Blocked(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("onnxruntime", "onnx"):
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
                return None

        sys.meta_path.insert(0, Blocked())
        from edge_agent import AgentConfig, EdgeAgent

        agent = EdgeAgent.from_artifacts({str(directory)!r}, threads=1, config=AgentConfig(
            device_id="lite-noort", broker={mosquitto.url!r}, prefix={topic_prefix!r}))

        async def main():
            async with agent:
                result = await agent.infer(dict(np.load({str(tmp_path / "in.npz")!r})))
                return next(iter(result.outputs.values()))

        out = asyncio.run(main())
        np.save({str(tmp_path / "out.npy")!r}, out)
        print(json.dumps({{"head": type(agent.head).__name__, "loaded": sorted(
            m for m in sys.modules if m.split(".")[0] in ("onnxruntime", "onnx"))}}))
    """)
    with worker(mosquitto.url, topic_prefix, artifacts=directory):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"head": "TfliteHead", "loaded": []}
    want = onnx_split(directory, {"image": samples["image"][:8]})
    got = np.load(tmp_path / "out.npy")
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    assert np.abs(got - want).max() <= 1e-4 * float(np.abs(want).max())


def test_split_cli_head_format_tflite(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    out = tmp_path / "split"
    code = cli_main(["split", str(zoo.digits_cnn_path()), "--at", "relu3", "-o", str(out),
                     "--head-format", "tflite", "--num-samples", "12", "--json"])
    assert code == EXIT_OK
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["head_tflite"].endswith("head.tflite")
    assert printed["tflite"]["agreement"] >= 0.99 and printed["tflite"]["samples"] == 12
    m = Manifest.load(out)
    assert m.head_tflite is not None and m.head_tflite.inputs == {"image": "in_0"}
    assert m.head_tflite.outputs == {"relu3": "out_0"}


def test_backend_choice_and_stale_files(splits: dict[str, tuple[Path, Arrays]],
                                        tmp_path: Path) -> None:
    directory, _ = splits["digits"]
    m = Manifest.load(directory)
    assert choose_backend(m, "auto") == "onnx"  # onnxruntime is installed here
    assert isinstance(load_head(m, directory, backend="onnx"), OrtHead)
    with pytest.raises(BadInputError, match="expected one of auto, onnx, tflite"):
        choose_backend(m, "tflight")
    plain = split_model(zoo.digits_cnn_path(), "pool", tmp_path / "plain", num_samples=2)
    with pytest.raises(ManifestError, match="has no TFLite head"):
        load_head(plain.manifest_obj, tmp_path / "plain", backend="tflite")
    # a head.tflite that is not the one the manifest names
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in directory.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    blob = bytearray((copy / "head.tflite").read_bytes())
    blob[-1] ^= 0xFF
    (copy / "head.tflite").write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="does not match the manifest"):
        load_head(Manifest.load(copy), copy, backend="tflite")
    # head_tflite must map exactly the inputs and the cut
    data = json.loads((copy / "manifest.json").read_text())
    data["head_tflite"]["outputs"] = {"relu3": "out_0"}
    with pytest.raises(ManifestError, match="head_tflite: outputs maps"):
        Manifest.from_dict(data)


def test_quantize_cut_drops_the_float_tflite_head(tmp_path: Path) -> None:
    out = tmp_path / "s"
    split_model(zoo.digits_cnn_path(), "pool", out, num_samples=4, head_format="tflite")
    m = quantize_cut(out)
    assert m.head_tflite is None and "tflite" not in m.verification
    assert not (out / "head.tflite").exists()


def _int8_from_cast(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Cast", ["r"], ["c"], to=onnx.TensorProto.INT8, name="to_int8"),
        helper.make_node("Cast", ["c"], ["f"], to=onnx.TensorProto.FLOAT, name="to_float"),
        helper.make_node("Neg", ["f"], ["y"], name="neg"),
    ], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_conversion_failures_name_the_op_and_leave_no_manifest(tmp_path: Path) -> None:
    model = _int8_from_cast(tmp_path / "cast.onnx")
    out = tmp_path / "cast"
    with pytest.raises(TfliteConversionError, match="produced by Cast") as info:
        split_model(model, "c", out, num_samples=4, head_format="tflite")
    assert "no manifest written" in str(info.value)
    assert not (out / "manifest.json").exists() and (out / "head.onnx").exists()
    with pytest.raises(BadInputError, match="cloud_only split has no head"):
        split_model(model, "cloud_only", tmp_path / "co", num_samples=2, head_format="tflite")


def _one_op(path: Path, node: onnx.NodeProto, x_shape: list[Any]) -> Path:
    """x → ``node`` → ``node.output[0]`` → Relu → y."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([node, helper.make_node("Relu", [node.output[0]], ["y"],
                                                      name="relu")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(("node", "shape", "message"), [
    (helper.make_node("LpPool", ["x"], ["p"], kernel_shape=[2, 2], p=2, name="lp"),
     ["N", 2, 4, 4], "onnx2tf .* has no converter for the ONNX op LpPool \\(node 'lp'\\)"),
    (helper.make_node("Det", ["x"], ["p"], name="det"), ["N", 3, 3],
     "no builtin kernel for the TF op\\(s\\) MatrixDeterminant .*from the ONNX node\\(s\\) "
     "Det 'det'.*no Flex"),
])
def test_an_op_tflite_cannot_take_is_named(tmp_path: Path, node: onnx.NodeProto,
                                           shape: list[Any], message: str) -> None:
    model = _one_op(tmp_path / "m.onnx", node, shape)
    with pytest.raises(TfliteConversionError, match=message):
        split_model(model, "p", tmp_path / "s", num_samples=4, head_format="tflite")
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_qdq_head_is_lowered_to_float_before_onnx2tf(
        splits: dict[str, tuple[Path, Arrays]]) -> None:
    """A static-int8 QDQ head (splitinfer quantize): onnx2tf 1.28 gets its Q/DQ ops wrong
    (no saturation; 93% of the first conv's outputs off, measured), so the weights'
    DequantizeLinear are folded and the activation pairs written as float arithmetic
    first; the int8 cut then matches ONNX's on all but a few elements, by one step."""
    directory, _ = splits["digits_qdq"]
    report = Manifest.load(directory).verification["tflite"]
    assert report["qdq_rewrites"] == {"folded_dequantize": 4, "lowered_qdq_pairs": 3}
    cut = report["cut"]["pool_QuantizeLinear_Output"]
    assert cut["max_abs_diff"] <= 1 and cut["differing_share"] < 1e-4
    assert report["agreement"] == 1.0 and report["samples"] == 360


def test_verification_fails_on_a_head_that_gives_another_cut(
        splits: dict[str, tuple[Path, Arrays]]) -> None:
    """The float digits head.tflite checked as the QDQ split's head: wrong dtype at the cut."""
    float_dir, samples = splits["digits"]
    qdq_dir, _ = splits["digits_qdq"]
    lite, qdq = Manifest.load(float_dir), Manifest.load(qdq_dir)
    assert lite.head_tflite is not None
    ref = lite.head_tflite.__class__(**{**lite.head_tflite.to_dict(),
                                        "outputs": {"pool_QuantizeLinear_Output": "out_0"}})
    wrong = ConvertedHead(float_dir / "head.tflite", ref, 0.0, {})
    with pytest.raises(VerificationError, match="gives cut 'pool_QuantizeLinear_Output' as "
                       "float32"):
        verify_tflite(wrong, qdq_dir / "head.onnx", qdq_dir / "tail.onnx", inputs=qdq.inputs,
                      cut=qdq.cut, samples={"image": samples["image"][:4]}, min_agreement=0.99)


def test_bench_tflite_rows() -> None:
    """``splitinfer bench tflite`` on the digits CNN: both heads timed, the figures sane."""
    from bench.bench_tflite import format_table, run

    doc = run(["digits_cnn"], runs=20, threads=1)
    (row,) = doc["rows"]
    assert row["model"] == "digits_cnn" and row["threads"] == 1
    assert row["ort_p50_ms"] > 0 and row["lite_p50_ms"] > 0
    assert row["ort_mode"] in ("run", "off") and row["top1_agreement"] >= 0.99
    assert row["samples"] == 360 and row["max_abs_diff_cut"] < 1e-4
    assert row["tflite_bytes"] > 0 and row["onnx_bytes"] > 0
    assert "digits_cnn" in format_table(doc) and "tensorflow" in doc["versions"]


def test_dynamic_dims_need_fixed_shapes(tmp_path: Path) -> None:
    """TFLite needs every dim but the batch: --fix-shapes with --input-shape does it."""
    model = _one_op(tmp_path / "m.onnx", helper.make_node("Abs", ["x"], ["p"], name="abs"),
                    ["N", 4, "W"])
    with pytest.raises(BadInputError, match=r"dynamic dims \(N, 4, W\).*--fix-shapes"):
        split_model(model, "p", tmp_path / "dyn", num_samples=2, head_format="tflite")
    result = split_model(model, "p", tmp_path / "fixed", num_samples=4, head_format="tflite",
                         input_shapes={"x": ("N", 4, 6)}, fix_shapes=True)
    assert result.manifest_obj.head_tflite is not None
    assert result.manifest_obj.verification["tflite"]["max_abs_diff_cut"] == 0.0
