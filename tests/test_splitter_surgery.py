"""splitter.surgery.quantize_cut: a float split's cut made int8, on the real digits CNN and
onnxruntime: the head sends QuantizeLinear's int8, the tail dequantizes it and runs the
float tail unchanged, the manifest describes the new files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from splitinfer.errors import BadInputError
from splitinfer.manifest import Manifest, sha256_file
from splitter import split_model, zoo
from splitter.surgery import quantize_cut
from splitter.verify import ort_session

Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def float_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("surgery") / "digits_relu3"
    split_model(zoo.digits_cnn_path(), ["relu3"], out, num_samples=4)
    return out


@pytest.fixture
def split_dir(float_split: Path, tmp_path: Path) -> Path:
    """A fresh copy per test: quantize_cut rewrites the directory in place."""
    return Path(shutil.copytree(float_split, tmp_path / "split"))


def _run(path: Path, feeds: dict[str, Array]) -> list[Array]:
    return [np.asarray(o) for o in ort_session(path).run(None, feeds)]


def test_the_cut_becomes_int8_and_the_tail_stays_the_float_tail(split_dir: Path) -> None:
    before = Manifest.load(split_dir)
    images, labels = zoo.digits_test_set()
    float_cut, = _run(split_dir / "head.onnx", {"image": images})
    float_logits, = _run(split_dir / "tail.onnx", {"relu3": float_cut})
    float_tail = (split_dir / "tail.onnx").read_bytes()

    after = quantize_cut(split_dir)

    assert after == Manifest.load(split_dir)  # what it returns is what it saved
    cut, = after.cut
    assert (cut.name, cut.dtype, cut.shape) == ("relu3.int8", "int8", before.cut[0].shape)
    assert cut.quantization is not None and cut.quantization.zero_point == 0
    scale = cut.quantization.scale
    assert after.extra["int8_cut"]["float_tensor"] == "relu3"
    assert after.head is not None and after.tail is not None
    assert after.head.sha256 == sha256_file(split_dir / "head.onnx") != before.head.sha256
    assert after.tail.sha256 == sha256_file(split_dir / "tail.onnx") != before.tail.sha256
    assert (after.inputs, after.outputs, after.split_id) == (before.inputs, before.outputs,
                                                             before.split_id)
    for half in ("head.onnx", "tail.onnx"):
        onnx.checker.check_model(onnx.load(str(split_dir / half)))

    q, = _run(split_dir / "head.onnx", {"image": images})
    assert q.dtype == np.int8 and q.shape == float_cut.shape
    cut.check(q)  # the manifest's own check, as the worker applies it
    expected_q = np.clip(np.rint(float_cut / np.float32(scale)), -128, 127)
    assert np.abs(q.astype(np.int32) - expected_q).max() <= 1
    assert (q.astype(np.int32) == expected_q).mean() > 0.99
    assert q.max() > 100  # the scale uses the range: relu3 is >= 0, so 0..127

    logits, = _run(split_dir / "tail.onnx", {"relu3.int8": q})
    # the new tail is DequantizeLinear + the old float tail, bit for bit
    dequantized = (q.astype(np.float32) * np.float32(scale)).astype(np.float32)
    reference = onnx.load_from_string(float_tail)
    via_float_tail, = ort_session(reference).run(None, {"relu3": dequantized})
    np.testing.assert_array_equal(logits, via_float_tail)
    # and the int8 cut keeps the model's answers
    assert (logits.argmax(1) == float_logits.argmax(1)).mean() >= 0.98
    assert (logits.argmax(1) == labels).mean() >= (float_logits.argmax(1) == labels).mean() - 0.02


def test_the_scale_comes_from_the_calibration_given(split_dir: Path) -> None:
    images, _ = zoo.digits_test_set()
    calib = {"image": images[:16]}
    act, = _run(split_dir / "head.onnx", calib)
    manifest = quantize_cut(split_dir, calibration=calib)
    q = manifest.cut[0].quantization
    assert q is not None
    assert q.scale == pytest.approx(float(np.abs(act).max()) / 127, rel=1e-6)
    assert manifest.extra["int8_cut"]["calibration_samples"] == 16


def test_a_cut_that_is_not_one_float32_tensor_is_refused_untouched(split_dir: Path) -> None:
    quantize_cut(split_dir)
    files = {p.name: p.read_bytes() for p in split_dir.iterdir()}
    with pytest.raises(BadInputError, match=r"one float32 cut tensor.*relu3\.int8 \(int8\)"):
        quantize_cut(split_dir)  # already int8
    assert {p.name: p.read_bytes() for p in split_dir.iterdir()} == files


def test_a_split_without_a_head_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "cloud_only"
    split_model(zoo.digits_cnn_path(), ["image"], out, num_samples=2)
    kind = Manifest.load(out).kind
    if kind == "split":
        pytest.skip("a cut at the input still makes a head here")
    with pytest.raises(BadInputError, match="no head and tail"):
        quantize_cut(out)
