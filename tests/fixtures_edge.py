"""Splits for the edge agent's sample-count and baseline tests, built in code.

* :func:`fixed_batch_model`: ``models_text.chain`` with its batch dimension fixed (1 by
  default), as many exported detectors and classifiers are;
* :func:`baseline_dir`: a ``cloud_only`` split (no head; the tail is the whole model; the
  cut is the model inputs) or an ``edge_only`` one (the head is the whole model; no tail;
  the cut is the model outputs), as ``splitinfer split`` writes them.

Not a conftest: tests import what they use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import models_text
import numpy as np
import onnx
import onnxruntime as ort

from simulators.fleet_support import run_in_batches
from splitinfer import ort_config
from splitter import split_model

Array = np.ndarray[Any, Any]


def fixed_batch_model(path: Path, batch: int = 1) -> Path:
    """``chain`` (x: [B, 3, 8, 8] → y: [B, 10]) with B fixed at ``batch``."""
    model = models_text.chain()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    model.graph.name = f"chain_b{batch}"
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def dynamic_model(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(models_text.chain(), str(path))
    return path


def split_at_pool(model: Path, out: Path, batch: int | None) -> Path:
    """Split ``model`` after its first pool (``p1``); verification samples of ``batch``."""
    samples = None
    if batch is not None:
        samples = {"x": np.random.default_rng(1).random((batch, 3, 8, 8)).astype(np.float32)}
    split_model(model, ["p1"], out, samples=samples)
    return out


def run_full(model: Path, x: Array) -> Array:
    """The unsplit model on ``x``, at its fixed batch (padded) if it has one."""
    session = ort.InferenceSession(str(model), ort_config.apply(ort.SessionOptions()),
                                   providers=["CPUExecutionProvider"])
    return run_in_batches(session, {"x": x})[0]


def baseline_dir(model: Path, out: Path, kind: str, name: str | None = None) -> Path:
    """A ``cloud_only`` or ``edge_only`` split directory of ``model``, by the splitter."""
    dim = onnx.load(str(model)).graph.input[0].type.tensor_type.shape.dim[0]
    batch = dim.dim_value if dim.HasField("dim_value") else None
    samples = None
    if batch:
        samples = {"x": np.random.default_rng(2).random((batch, 3, 8, 8)).astype(np.float32)}
    split_model(model, kind, out, samples=samples, model_name=name)
    return out
