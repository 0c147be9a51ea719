"""Splits for the edge agent's sample-count and baseline tests, built in code.

* :func:`fixed_batch_model`: ``models_text.chain`` with its batch dimension fixed (1 by
  default), as many exported detectors and classifiers are;
* :func:`baseline_dir`: a ``cloud_only`` split (no head; the tail is the whole model; the
  cut is the model inputs) or an ``edge_only`` one (the head is the whole model; no tail;
  the cut is the model outputs), written the way the shared contract describes them.

Not a conftest: tests import what they use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import models_text
import numpy as np
import onnx
import onnxruntime as ort

from simulators.fleet_support import run_in_batches
from splitinfer.manifest import MANIFEST_FORMAT, sha256_file
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
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return run_in_batches(session, {"x": x})[0]


def _specs(values: Any) -> list[dict[str, Any]]:
    out = []
    for value in values:
        shape: list[Any] = []
        for dim in value.type.tensor_type.shape.dim:
            shape.append(dim.dim_value if dim.HasField("dim_value") else
                         (dim.dim_param or None))
        out.append({"name": value.name, "dtype": "float32", "shape": shape})
    return out


def baseline_dir(model: Path, out: Path, kind: str, name: str | None = None) -> Path:
    """A ``cloud_only`` or ``edge_only`` split directory of ``model`` (float32 I/O)."""
    proto = onnx.load(str(model))
    out.mkdir(parents=True, exist_ok=True)
    inputs, outputs = _specs(proto.graph.input), _specs(proto.graph.output)
    source = sha256_file(model)
    shutil.copyfile(model, out / model.name)
    file = "tail.onnx" if kind == "cloud_only" else "head.onnx"
    shutil.copyfile(model, out / file)
    ref = {"path": file, "sha256": sha256_file(out / file)}
    cut = inputs if kind == "cloud_only" else outputs
    manifest = {
        "format": MANIFEST_FORMAT, "kind": kind,
        "split_id": f"{name or model.stem}-{source[:8]}-{kind.replace('_', '')}",
        "model": name or model.stem,
        "source": {"path": model.name, "sha256": source},
        "head": None if kind == "cloud_only" else ref,
        "tail": ref if kind == "cloud_only" else None,
        "inputs": inputs, "cut": cut, "outputs": outputs,
        "bytes_per_sample": 0 if kind == "edge_only" else 3 * 8 * 8 * 4,
        "opsets": {"": 17}, "versions": {}, "verification": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
