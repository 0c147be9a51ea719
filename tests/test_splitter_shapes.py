"""Models as users bring them: IR 3 files, -1 and symbolic dims, the two baselines.

Built in code with ``onnx.helper`` (the classic model-zoo layout: IR 3, opset 7/8, every
initializer also a graph input) or the ONNX text syntax, then inspected, split at every
listed cut and verified.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitinfer import ort_config
from splitinfer.cli import main
from splitinfer.errors import BadInputError, ManifestError
from splitinfer.manifest import FileRef, Manifest, TensorSpec
from splitter import inspect_model, list_cuts, split_model, zoo
from splitter.cli import _input_shape

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.uniform(-0.5, 0.5, shape).astype(np.float32), name)


def ir3_model(opset: int) -> onnx.ModelProto:
    """conv → relu → pool → conv + skip → GAP → flatten → gemm, weights listed as inputs."""
    inits = [_w("w1", 4, 3, 3, 3), _w("b1", 4), _w("w2", 4, 4, 3, 3), _w("wf", 10, 4),
             _w("bf", 10)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    # Pre-IR-4 files declare every initializer as a graph input too.
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims))
               for t in inits]
    graph = helper.make_graph(nodes, "zoo_ir3", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def dynamic_model(batch: str | int = "N", hw: tuple[int | str, int | str] = ("h", "w"),
                  minus_one: bool = False) -> onnx.ModelProto:
    """conv(stride 2) → relu → GAP → flatten → matmul with symbolic (or -1) H and W."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "wm"], ["y"]),
    ]
    dims: list[int | str] = [batch, 3, *hw]
    graph = helper.make_graph(
        nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        initializer=[_w("w1", 8, 3, 3, 3), _w("wm", 8, 5)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if minus_one:  # Paddle-style: dim_value -1 instead of a name
        for vi in (*model.graph.input, *model.graph.output):
            for d in vi.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.Clear()
                    d.dim_value = -1
    return model


def _run(path: Path | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), ort_config.apply(ort.SessionOptions()),
                                providers=["CPUExecutionProvider"])
    return list(sess.run(None, feeds))


# -- IR 3 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [7, 8])
def test_ir3_model_zoo_file_splits_at_every_cut(opset: int, tmp_path: Path) -> None:
    src = tmp_path / f"ir3_op{opset}.onnx"
    onnx.save(ir3_model(opset), str(src))
    cuts = list_cuts(src)
    kinds = [c.kind for c in cuts]
    assert kinds[0] == "cloud_only" and kinds[-1] == "edge_only" and "split" in kinds
    assert cuts[0].names == ("x",)  # weights are not inputs to cut at
    assert inspect_model(src).total_params == 108 + 4 + 144 + 40 + 10
    x = RNG.random((1, 3, 8, 8), dtype=np.float32)
    ref = _run(src, {"x": x})[0]
    for cut in cuts:
        out = tmp_path / f"cut{cut.index}"
        result = split_model(src, list(cut.names), out, num_samples=3)  # runs the checker
        assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
        assert result.kind == cut.kind
        for half in (result.head, result.tail):
            if half is not None:
                proto = onnx.load(str(half))
                onnx.checker.check_model(proto)
                assert proto.ir_version == 4
                assert not {i.name for i in proto.graph.input} & {
                    t.name for t in proto.graph.initializer}
        mid = {"x": x} if result.head is None else dict(zip(
            [o.name for o in onnx.load(str(result.head)).graph.output],
            _run(result.head, {"x": x}), strict=True))
        crossing = [s.name for s in result.manifest_obj.cut]
        got = mid["y"] if result.tail is None else _run(
            result.tail, {n: mid[n] for n in crossing})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# -- baselines --------------------------------------------------------------------------------

def test_baselines_by_alias_and_by_name(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(ir3_model(8), str(src))
    for at, kind in (("cloud_only", "cloud_only"), ("x", "cloud_only"),
                     ("edge_only", "edge_only"), ("y", "edge_only")):
        out = tmp_path / f"{at}"
        result = split_model(src, at, out, num_samples=2)
        m = Manifest.load(out)
        assert m.kind == kind == result.kind
        data = json.loads((out / "manifest.json").read_text())
        assert data["kind"] == kind
        if kind == "cloud_only":
            assert data["head"] is None and m.head is None and m.tail is not None
            assert m.cut == m.inputs
            assert not (out / "head.onnx").exists() and (out / "tail.onnx").exists()
            assert m.extra["head_flops"] == 0
        else:
            assert data["tail"] is None and m.tail is None and m.head is not None
            assert [s.name for s in m.cut] == ["y"] and m.bytes_per_sample == 0
            assert data["bytes_per_sample"] == 0
            assert m.extra["head_flops"] == m.extra["total_flops"] > 0
        assert m.verification["max_abs_diff"] <= 1e-6
    # one directory re-used for another kind keeps no stale half
    split_model(src, "cloud_only", tmp_path / "same", verify=False)
    split_model(src, "edge_only", tmp_path / "same", verify=False)
    assert not (tmp_path / "same" / "tail.onnx").exists()


def test_manifest_kind_validation_and_old_manifests(tmp_path: Path) -> None:
    spec = TensorSpec("x", "float32", ("N", 3))
    out = TensorSpec("y", "float32", ("N", 2))
    ref = FileRef("f.onnx", "0" * 64)
    base = dict(split_id="m-1", model="m", source=ref, inputs=(spec,), outputs=(out,))
    with pytest.raises(ManifestError, match="cloud_only split has no head"):
        Manifest(**base, head=ref, tail=ref, cut=(spec,), kind="cloud_only")  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match="exactly the model inputs"):
        Manifest(**base, head=None, tail=ref, cut=(out,), kind="cloud_only")  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match="edge_only split has no tail"):
        Manifest(**base, head=ref, tail=ref, cut=(out,), kind="edge_only")  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match="unknown kind"):
        Manifest(**base, head=ref, tail=ref, cut=(out,), kind="both")  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match="both a head and a tail"):
        Manifest(**base, head=None, tail=ref, cut=(out,))  # type: ignore[arg-type]
    m = Manifest(**base, head=ref, tail=ref, cut=(out,))  # type: ignore[arg-type]
    data = m.to_dict()
    del data["kind"]  # a manifest written before kinds existed
    assert Manifest.from_dict(data).kind == "split"
    cloud = Manifest(**base, head=None, tail=ref, cut=(spec,), kind="cloud_only")  # type: ignore[arg-type]
    assert Manifest.from_dict(cloud.to_dict()) == cloud
    with pytest.raises(ManifestError, match="has no head file"):
        cloud.resolve(tmp_path, "head")


def test_inspect_json_lists_the_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(ir3_model(8), str(src))
    assert main(["inspect", str(src), "--json"]) == 0
    cuts = json.loads(capsys.readouterr().out)["cuts"]
    assert cuts[0]["kind"] == "cloud_only" and cuts[0]["head_flops_share"] == 0
    assert cuts[-1]["kind"] == "edge_only" and cuts[-1]["head_flops_share"] == 1
    assert cuts[-1]["bytes_per_sample"] == 0
    assert {c["kind"] for c in cuts[1:-1]} == {"split"}
    assert main(["split", str(src), "--at", "edge_only", "-o", str(tmp_path / "e")]) == 0
    text = capsys.readouterr().out
    assert "(edge_only)" in text and "tail:     none" in text


# -- dynamic dims -----------------------------------------------------------------------------

def test_minus_one_dims_inspect_and_split(tmp_path: Path) -> None:
    src = tmp_path / "paddle.onnx"
    onnx.save(dynamic_model(batch=-1, hw=(-1, -1), minus_one=True), str(src))
    result = inspect_model(src)  # used to fail: negative dimension in (-1, 3, '?', '?')
    assert result.inputs[0].shape == (None, 3, None, None)
    assert [(d["axis"], d["name"]) for d in result.unknown_dims] == [(2, None), (3, None)]
    split = split_model(src, ["r1"], tmp_path / "s", input_shapes={"x": (1, 3, 16, 16)})
    assert split.max_abs_diff is not None and split.max_abs_diff <= 1e-5


def test_symbolic_hw_without_and_with_input_shape(tmp_path: Path) -> None:
    src = tmp_path / "det.onnx"
    onnx.save(dynamic_model(), str(src))
    plain = inspect_model(src)
    assert [(d["tensor"], d["axis"], d["name"]) for d in plain.unknown_dims] == [
        ("x", 2, "h"), ("x", 3, "w")]
    by_name = {c.names: c for c in plain.cuts}
    assert by_name[("r1",)].bytes_per_sample is None  # depends on h, w
    assert by_name[("f",)].bytes_per_sample == 8 * 4  # after the pooling: known
    fixed = inspect_model(src, input_shapes={"x": (1, 3, 320, 320)})
    assert fixed.unknown_dims == ()
    cut = {c.names: c for c in fixed.cuts}[("r1",)]
    assert cut.tensors[0].shape == (1, 8, 160, 160)
    assert cut.bytes_per_sample == 8 * 160 * 160 * 4
    conv = 2 * 8 * 160 * 160 * 27
    assert cut.head_flops == conv + 8 * 160 * 160  # + the Relu
    assert fixed.total_flops == conv + 2 * 8 * 160 * 160 + 2 * 8 * 5
    assert fixed.to_dict()["input_shapes"] == {"x": [1, 3, 320, 320]}


def test_split_keeps_dynamic_dims_unless_fixed(tmp_path: Path) -> None:
    src = tmp_path / "det.onnx"
    onnx.save(dynamic_model(), str(src))
    kept = split_model(src, ["r1"], tmp_path / "kept", input_shapes={"x": (1, 3, 64, 64)})
    m = kept.manifest_obj
    assert m.inputs[0].shape == ("N", 3, "h", "w") and m.bytes_per_sample is None
    assert m.extra["analysis"]["bytes_per_sample"] == 8 * 32 * 32 * 4
    assert kept.head is not None
    other = RNG.random((2, 3, 40, 48), dtype=np.float32)  # another size still runs
    assert _run(kept.head, {"x": other})[0].shape == (2, 8, 20, 24)
    fixed = split_model(src, ["r1"], tmp_path / "fixed", input_shapes={"x": ("N", 3, 64, 64)},
                        fix_shapes=True)
    assert fixed.manifest_obj.inputs[0].shape == ("N", 3, 64, 64)
    assert fixed.manifest_obj.cut[0].shape[1:] == (8, 32, 32)
    assert fixed.manifest_obj.bytes_per_sample == 8 * 32 * 32 * 4
    with pytest.raises(BadInputError, match="needs --input-shape"):
        split_model(src, ["r1"], tmp_path / "x", fix_shapes=True)


def test_samples_imply_the_shapes(tmp_path: Path) -> None:
    src = tmp_path / "det.onnx"
    onnx.save(dynamic_model(), str(src))
    samples = {"x": RNG.random((3, 3, 24, 40), dtype=np.float32)}
    result = split_model(src, ["r1"], tmp_path / "s", samples=samples)
    analysis = result.manifest_obj.extra["analysis"]
    assert analysis["input_shapes"] == {"x": ["N", 3, 24, 40]}
    assert analysis["bytes_per_sample"] == 8 * 12 * 20 * 4
    assert result.manifest_obj.verification["samples"] == 3


@pytest.mark.parametrize(("shapes", "message"), [
    ({"z": (1, 3, 8, 8)}, "the model has no input 'z'"),
    ({"x": (1, 3, 8)}, "3 dims given, the model input has 4"),
    ({"x": (1, 4, 8, 8)}, "axis 1 is fixed to 3 by the model"),
])
def test_bad_input_shapes(shapes: dict[str, tuple[int, ...]], message: str, tmp_path: Path
                          ) -> None:
    src = tmp_path / "det.onnx"
    onnx.save(dynamic_model(), str(src))
    with pytest.raises(BadInputError, match=message):
        inspect_model(src, input_shapes=shapes)


def test_input_shape_flag_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _input_shape("x=1x3x320x320") == ("x", (1, 3, 320, 320))
    assert _input_shape("x=1,3,320,320") == ("x", (1, 3, 320, 320))
    assert _input_shape("1x3x32x32") == (None, (1, 3, 32, 32))
    assert _input_shape("in:0=Nx3x32x32") == ("in:0", ("N", 3, 32, 32))
    src = tmp_path / "det.onnx"
    onnx.save(dynamic_model(), str(src))
    assert main(["inspect", str(src), "--json", "--input-shape", "1x3x32x32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["unknown_dims"] == [] and data["input_shapes"] == {"x": [1, 3, 32, 32]}
    with pytest.raises(SystemExit) as usage:
        main(["inspect", str(src), "--input-shape", "x=1x3x0x2"])
    assert usage.value.code == 2 and "dims must be >= 1" in capsys.readouterr().err
    assert main(["inspect", str(src)]) == 0
    assert "unknown dims x[2] (h), x[3] (w)" in capsys.readouterr().out


# -- samples with extra keys ------------------------------------------------------------------

def test_split_samples_with_labels_are_accepted(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="splitter.verify"):
        result = split_model(zoo.digits_cnn_path(), ["pool"], tmp_path,
                             samples=zoo._packaged("digits_test.npz"))
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    notes = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(notes) == 1 and "'label'" in notes[0]


# -- quantize ---------------------------------------------------------------------------------

def test_quantize_dynamic_hw_model_keeps_its_dims(tmp_path: Path) -> None:
    from splitter.quantize import quantize_static

    src = tmp_path / "det.onnx"
    onnx.save(dynamic_model(), str(src))
    calib: dict[str, np.ndarray] = {"x": RNG.random((4, 3, 16, 16), dtype=np.float32),
             "label": np.zeros(4, np.int64)}  # ignored with a note
    out = quantize_static(src, calib, tmp_path / "det_int8.onnx",
                          input_shapes={"x": ("N", 3, 16, 16)})
    dims = [d.dim_param or d.dim_value
            for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "h", "w"]
    assert _run(out, {"x": RNG.random((2, 3, 24, 32), dtype=np.float32)})[0].shape == (2, 5)
    assert any(c.quantized for c in list_cuts(out, input_shapes={"x": (1, 3, 16, 16)}))


def test_ir3_model_quantizes(tmp_path: Path) -> None:
    from splitter.quantize import quantize_static

    src = tmp_path / "ir3.onnx"
    onnx.save(ir3_model(8), str(src))
    out = quantize_static(src, {"x": RNG.random((4, 3, 8, 8), dtype=np.float32)},
                          tmp_path / "ir3_int8.onnx")
    assert _run(out, {"x": RNG.random((1, 3, 8, 8), dtype=np.float32)})[0].shape == (1, 10)
