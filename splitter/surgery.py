"""Graph surgery on a split that is already cut: make its float32 cut an int8 one.

:func:`quantize_cut` appends a ``QuantizeLinear`` to the head and puts a
``DequantizeLinear`` at the start of the tail, so the wire carries a quarter of the bytes.
That is what cutting a static-int8 (QDQ) model right after one of its ``QuantizeLinear``
gives (:mod:`splitter.quantize` makes such models), done on the float split instead, so
the tail's own compute stays the model's float arithmetic: the benchmarks that measure a
worker's tail (``bench batching``, the GPU tail bench) want exactly that.

The quantization is per tensor and symmetric (zero point 0); its scale is
``max|activation| / 127`` over the head's activations on a few calibration inputs
(default: :func:`splitter.verify.make_samples`, uniform [0, 1) for float inputs). The
split's ``verification`` still describes the float split; the cut's rounding adds at
most ``scale / 2`` per element before the tail (``extra["int8_cut"]`` records the scale).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer.errors import BadInputError
from splitinfer.manifest import FileRef, Manifest, Quantization, TensorSpec, sha256_file

__all__ = ["quantize_cut", "INT8_SUFFIX"]

log = logging.getLogger(__name__)

INT8_SUFFIX = ".int8"  # the int8 cut tensor is named <float cut name>.int8
_MIN_OPSET = 10  # the first with QuantizeLinear / DequantizeLinear


def quantize_cut(directory: str | Path, *, calibration: Mapping[str, Any] | None = None,
                 samples: int = 4, seed: int = 0) -> Manifest:
    """Rewrite the split in ``directory`` so its single float32 cut travels as int8.

    ``head.onnx``, ``tail.onnx`` and ``manifest.json`` are rewritten in place; the new
    manifest is returned (cut ``<name>.int8``, int8, with its :class:`Quantization`).
    ``calibration``: head inputs by name (samples along the first axis); default
    ``samples`` random ones from ``seed``. Raises :class:`BadInputError` when the split
    has no head and tail, or its cut is not exactly one float32 tensor (nothing is
    changed then).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from splitter.extract import save_half
    from splitter.verify import make_samples, ort_session

    directory = Path(directory)
    manifest = Manifest.load(directory)
    where = f"split {manifest.split_id} in {directory}"
    if manifest.kind != "split" or manifest.head is None or manifest.tail is None:
        raise BadInputError(f"{where}: a {manifest.kind} split has no head and tail to "
                            "quantize the cut between")
    if len(manifest.cut) != 1 or manifest.cut[0].dtype != "float32":
        found = ", ".join(f"{s.name} ({s.dtype})" for s in manifest.cut)
        raise BadInputError(f"{where}: expected one float32 cut tensor to quantize, found "
                            f"{found}")
    spec = manifest.cut[0]
    head_path = manifest.resolve(directory, "head")
    tail_path = manifest.resolve(directory, "tail")
    head_model = onnx.load(str(head_path))
    tail_model = onnx.load(str(tail_path))
    for label, model in (("head", head_model), ("tail", tail_model)):
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < _MIN_OPSET:
            raise BadInputError(f"{where}: the {label} uses opset {opset}; "
                                f"QuantizeLinear/DequantizeLinear need {_MIN_OPSET} or later")
    qname = spec.name + INT8_SUFFIX
    taken = {v.name for g in (head_model.graph, tail_model.graph)
             for v in (*g.input, *g.output, *g.value_info, *g.initializer)}
    taken |= {out for g in (head_model.graph, tail_model.graph) for n in g.node
              for out in n.output}
    clash = sorted(taken & {qname, f"{qname}.scale", f"{qname}.zero_point"})
    if clash:
        raise BadInputError(f"{where}: the halves already have tensor(s) {clash}; is the cut "
                            "quantized already?")

    feeds = dict(calibration) if calibration is not None else make_samples(head_model, samples,
                                                                           seed)
    head = ort_session(head_path, what=f"the head of {where}")
    activation = np.asarray(head.run([spec.name], feeds)[0], dtype=np.float32)
    peak = float(np.abs(activation).max()) if activation.size else 0.0
    if not np.isfinite(peak):
        raise BadInputError(f"{where}: the head's activation {spec.name!r} is not finite on "
                            "the calibration inputs; no int8 scale fits it")
    scale = float(np.float32(max(peak, 1e-6) / 127.0))
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{qname}.scale"),
             numpy_helper.from_array(np.array(0, np.int8), f"{qname}.zero_point")]
    dims: list[Any] = [d if isinstance(d, int) else (d or "N") for d in spec.shape]
    int8_info = helper.make_tensor_value_info(qname, TensorProto.INT8, dims)

    graph = head_model.graph
    graph.initializer.extend(inits)
    graph.node.append(helper.make_node("QuantizeLinear", [spec.name, f"{qname}.scale",
                                                         f"{qname}.zero_point"], [qname],
                                       name=f"{qname}.quantize"))
    kept = [o for o in graph.output if o.name != spec.name]
    del graph.output[:]
    graph.output.extend([*kept, int8_info])

    graph = tail_model.graph
    graph.initializer.extend(inits)
    graph.node.insert(0, helper.make_node("DequantizeLinear", [qname, f"{qname}.scale",
                                                              f"{qname}.zero_point"],
                                          [spec.name], name=f"{qname}.dequantize"))
    others = [i for i in graph.input if i.name != spec.name]
    del graph.input[:]
    graph.input.extend([int8_info, *others])

    save_half(head_model, head_path, base_dir=None)
    save_half(tail_model, tail_path, base_dir=None)
    if manifest.head_tflite is not None:  # converted from the float head: stale now
        (directory / manifest.head_tflite.path).unlink(missing_ok=True)
        log.warning("%s: %s removed (it gives the float cut); convert the int8 head with "
                    "splitter.tflite.convert_split", where, manifest.head_tflite.path)
    updated = replace(
        manifest,
        head_tflite=None,
        verification={k: v for k, v in manifest.verification.items() if k != "tflite"},
        cut=(TensorSpec(qname, "int8", spec.shape, Quantization(scale, 0)),),
        head=FileRef(manifest.head.path, sha256_file(head_path)),
        tail=FileRef(manifest.tail.path, sha256_file(tail_path)),
        extra={**manifest.extra, "int8_cut": {"float_tensor": spec.name, "scale": scale,
                                              "calibration_samples": len(activation)}})
    updated.save(directory)
    log.info("%s: cut %s is now %s (int8, scale %.6g)", where, spec.name, qname, scale)
    return updated
