"""Static int8 quantization: QDQ layout, calibration checks, CLI, QOperator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fixtures_models import digits_int8, models_dir, run_split, session  # noqa: F401
from onnx import numpy_helper

from splitinfer.cli import main as cli_main
from splitinfer.errors import BadInputError
from splitter import list_cuts, split_model, zoo
from splitter.quantize import load_calibration, quantize_static


def _calib() -> np.ndarray[Any, Any]:
    with np.load(zoo.digits_calibration_path()) as npz:
        images: np.ndarray[Any, Any] = npz["image"]
    return images


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray[Any, Any]]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def test_default_is_int8_qdq_with_per_channel_weights(digits_int8: Path) -> None:  # noqa: F811
    model = onnx.load(str(digits_int8))
    consts = _consts(model)
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize, "no QuantizeLinear: not a QDQ model"
    for node in quantize:  # every activation is int8, never uint8
        assert consts[node.input[2]].dtype == np.int8, node.output[0]
    conv_weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] in ("w1_quantized", "w2_quantized")]
    assert len(conv_weights) == 2
    for node in conv_weights:  # one scale per output channel
        assert consts[node.input[1]].shape == (consts[node.input[0]].shape[0],)
    assert not [n for n in model.graph.node if n.domain == "com.microsoft"]


def test_per_tensor_weights(models_dir: Path) -> None:  # noqa: F811
    out = quantize_static(zoo.digits_cnn_path(), {"image": _calib()[:32]},
                          models_dir / "digits_per_tensor.onnx", per_channel=False)
    consts = _consts(onnx.load(str(out)))
    assert consts["w1_scale"].shape == ()


def test_int8_outputs_are_offered_as_quantized_cuts(digits_int8: Path) -> None:  # noqa: F811
    cuts = {tuple(t.name for t in c.tensors): c for c in list_cuts(digits_int8)}
    fp32 = {c.tensors[0].name: c for c in list_cuts(zoo.digits_cnn_path(), max_tensors=1)}
    for tensor in ("image", "relu1", "relu2", "pool", "flat", "relu3"):
        cut = cuts[(f"{tensor}_QuantizeLinear_Output",)]
        spec = cut.tensors[0]
        assert cut.quantized and spec.dtype == "int8" and spec.quantization is not None
        fp32_bytes = fp32[tensor].bytes_per_sample
        assert cut.bytes_per_sample is not None and fp32_bytes is not None
        assert cut.bytes_per_sample * 4 == fp32_bytes


def test_qoperator_model_lists_and_splits(tmp_path: Path) -> None:
    model = quantize_static(zoo.digits_cnn_path(), zoo.digits_calibration_path(),
                            tmp_path / "qop.onnx", fmt="qoperator")
    assert any(n.op_type == "QLinearConv" for n in onnx.load(str(model)).graph.node)
    cuts = list_cuts(model)
    int8 = [c for c in cuts if c.quantized and len(c.tensors) == 1]
    assert int8, "no int8 cut offered in the QOperator model"
    images, _ = zoo.digits_test_set()
    samples = {"image": images[:16]}
    full = session(model).run(None, samples)[0]
    for cut in (int8[len(int8) // 2], cuts[len(cuts) // 2]):
        result = split_model(model, [t.name for t in cut.tensors], tmp_path / f"c{cut.index}",
                             samples=samples)
        assert result.max_abs_diff == 0.0
        np.testing.assert_array_equal(run_split(result.head, result.tail, samples)[0], full)


def test_mapping_calibration_and_fixed_batch_model(tmp_path: Path) -> None:
    # A model whose batch dim is pinned to 1 is calibrated one sample at a time.
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 3] y) <float[4, 3] w = {1,0,0, 0,1,0, 0,0,1, 1,1,1}>
        { h = MatMul(x, w)  y = Relu(h) }
    """)
    src = tmp_path / "fixed.onnx"
    onnx.save(model, str(src))
    data = {"x": np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)}
    out = quantize_static(src, data, tmp_path / "fixed_int8.onnx")
    got = session(out).run(None, {"x": data["x"][:1]})[0]
    np.testing.assert_allclose(got, np.maximum(data["x"][:1] @ onnx.numpy_helper.to_array(
        model.graph.initializer[0]), 0), atol=0.1)


_SPEC = {"image": ("float32", ("N", 1, 8, 8))}


@pytest.mark.parametrize(("arrays", "expect"), [
    ({"img": np.zeros((2, 1, 8, 8), np.float32)}, "missing key(s) ['image']; expected one"),
    ({"image": np.zeros((2, 1, 8, 8))}, "'image' has dtype float64, expected float32"),
    ({"image": np.zeros((2, 8, 8), np.float32)}, "shape [2, 8, 8], expected [samples,1,8,8]"),
    ({"image": np.zeros((2, 1, 4, 8), np.float32)}, "shape [2, 1, 4, 8], expected"),
    ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "holds no samples"),
    ({"image": np.full((2, 1, 8, 8), np.nan, np.float32)}, "NaN or infinity"),
])
def test_bad_calibration_names_the_problem(arrays: dict[str, Any], expect: str) -> None:
    with pytest.raises(BadInputError) as info:
        load_calibration(arrays, _SPEC)
    message = str(info.value)
    assert expect in message and "\n" not in message


def test_bad_calibration_files(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such calibration file"):
        quantize_static(zoo.digits_cnn_path(), tmp_path / "missing.npz", tmp_path / "o.onnx")
    with pytest.raises(BadInputError, match=r"not an \.npz archive"):
        quantize_static(zoo.digits_cnn_path(), zoo.digits_cnn_path(), tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_calibration_extra_keys_are_ignored_with_one_note(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    images = np.zeros((2, 1, 8, 8), np.float32)
    with caplog.at_level("WARNING", logger="splitter.quantize"):
        got = load_calibration({"image": images, "label": np.zeros(2, np.int64)}, _SPEC)
    assert list(got) == ["image"]
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "ignoring 'label'" in notes[0]


@pytest.mark.parametrize(("kwargs", "expect"), [
    ({"fmt": "int4"}, "unknown quantization format 'int4'"),
    ({"calibrate_method": "mse"}, "unknown calibration method 'mse'"),
])
def test_bad_options(tmp_path: Path, kwargs: dict[str, str], expect: str) -> None:
    with pytest.raises(BadInputError, match=expect):
        quantize_static(zoo.digits_cnn_path(), zoo.digits_calibration_path(),
                        tmp_path / "o.onnx", **kwargs)  # type: ignore[arg-type]


def test_cli_bad_calibration_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=_calib().astype(np.float64))
    code = cli_main(["quantize", str(zoo.digits_cnn_path()), "--calibration", str(bad),
                     "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2
    assert "'image' has dtype float64, expected float32" in err and "Traceback" not in err


def test_cli_quantize_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.onnx"
    code = cli_main(["quantize", str(zoo.digits_cnn_path()), "--calibration",
                     str(zoo.digits_calibration_path()), "-o", str(out), "--json"])
    assert code == 0 and out.is_file()
    json.loads(capsys.readouterr().out)  # one machine-readable document


def test_quantize_leaves_nothing_in_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    # Two inputs whose batch dims ("N", "M") meet in an Add: onnxruntime's symbolic shape
    # inference cannot finish, and its infer_shapes then saves sym_shape_infer_temp.onnx
    # in the cwd. Quantizing must still work and leave the cwd empty.
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.random.default_rng(0).random((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[weight])
    source = tmp_path / "models" / "two_batches.onnx"
    source.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(source))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data = np.random.default_rng(1).random((32, 4), np.float32)
    out = quantize_static(source, {"x": data, "z": data}, tmp_path / "out" / "q.onnx")
    assert out.is_file()
    assert list(cwd.iterdir()) == []
    # the digits model (symbolic inference completes) leaves nothing either
    quantize_static(zoo.digits_cnn_path(), {"image": _calib()[:16]}, tmp_path / "out" / "d.onnx")
    assert list(cwd.iterdir()) == []
