"""``head.onnx`` → ``head.tflite``: the device half as a LiteRT model, verified.

``splitinfer split … --head-format tflite`` calls :func:`convert_head` after the ONNX
split is written and verified. The conversion:

1. onnx2tf turns the ONNX head into a Keras graph, the model inputs kept in their ONNX
   layout (``keep_shape_absolutely_input_names``: the device feeds what the manifest says).
2. A cut that is int8/uint8 because the head ends in ``QuantizeLinear`` (a QDQ model cut
   after a quantizer, or :func:`splitter.surgery.quantize_cut`) is converted without that
   node: onnx2tf would emulate it in float (a float32 output, and a ``ClipByValue`` the
   TFLite builtins lack); the wrapper below quantizes with the manifest's scale and zero
   point instead: ``clamp(round_half_even(x / scale) + zero_point)`` cast to the cut's
   dtype, which is what ``QuantizeLinear`` computes.
   A QDQ head (a static-int8 model, ``splitinfer quantize``) is first written in float
   arithmetic (:func:`_lower_qdq`: constant ``DequantizeLinear`` folded into float weights,
   activation ``QuantizeLinear`` → ``DequantizeLinear`` pairs as round/clamp/scale), since
   onnx2tf 1.28 gets those ops wrong; the TFLite head is then a float model (float weights:
   a larger file than the int8 ONNX head) whose int8 cut matches to a step.
3. onnx2tf gives 4-D (3-D, 5-D) outputs channels-last; which permutation each output
   took is found by running both graphs on the samples, not guessed from shapes, and the
   wrapper transposes back, so the cut crosses in the layout the ONNX tail expects.
4. ``tf.lite.TFLiteConverter`` converts the wrapper with the TFLite builtin ops only
   (LiteRT on a device has no TF "Flex" kernels). The signature's keys are ``in_<i>`` /
   ``out_<i>``; the manifest's ``head_tflite`` maps the ONNX names to them.

Verification (:func:`verify_tflite`) runs the TFLite head in LiteRT on the samples and
compares with the ONNX head: the largest difference at the cut (and, for an integer cut,
the share of elements that differ and by how many steps), then the whole split (TFLite
head → ONNX tail against ONNX head → ONNX tail): top-1 agreement for a classifier (argmax
of the first rank-2 float output), else the share of samples within 1% of the largest
magnitude. Below ``min_agreement`` the split fails (:class:`VerificationError`); a
conversion that cannot be done fails with :class:`TfliteConversionError` naming the ONNX
op or TF op and why. There is never a silent fallback to the ONNX head.

Needs the ``splitter-tflite`` extra (onnx2tf, tensorflow, tf-keras, onnx-graphsurgeon,
sng4onnx, ai-edge-litert); imported only when ``--head-format tflite`` is asked for.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from splitinfer.errors import BadInputError, SplitInferError, VerificationError
from splitinfer.manifest import Manifest, TensorSpec, TfliteRef, sha256_file

__all__ = ["TfliteConversionError", "ConvertedHead", "convert_head", "verify_tflite",
           "convert_split", "converter_versions", "SIGNATURE", "EXTRA", "TFLITE_NAME"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]

SIGNATURE = "serving_default"
TFLITE_NAME = "head.tflite"
EXTRA = "splitinfer[splitter-tflite]"
_INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767),
              "uint16": (0, 65535)}
# relative: which transposed output of onnx2tf is which ONNX output. A lowered QDQ head
# drifts more (a value on a rounding boundary flips one step and carries on: 3.6% of the
# peak on MobileNetV2 224 at block12.add); the verification's agreement is the real gate
_MATCH_TOL = 1e-3
_MATCH_TOL_QDQ = 0.25


class TfliteConversionError(SplitInferError):
    """The head cannot be converted to TFLite; the message names the op and why."""


@dataclass(frozen=True)
class _Quantizer:
    """A ``QuantizeLinear`` at the end of the head, taken off before onnx2tf."""

    float_name: str
    scale: float
    zero_point: int
    dtype: str


@dataclass(frozen=True)
class ConvertedHead:
    """What :func:`convert_head` wrote: the file and its manifest entry."""

    path: Path
    ref: TfliteRef
    seconds: float
    rewrites: Mapping[str, int]  # what :func:`_lower_qdq` rewrote before onnx2tf


def _require() -> tuple[Any, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        import onnx2tf
        import tensorflow as tf
    except ImportError as exc:
        raise BadInputError(f"--head-format tflite needs the converter: pip install "
                            f"'{EXTRA}' ({exc})") from exc
    return onnx2tf, tf


def converter_versions() -> dict[str, str]:
    """The converter's versions, for the manifest's ``versions``."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("onnx2tf", "tensorflow", "ai-edge-litert"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _static_inputs(inputs: Sequence[TensorSpec]) -> None:
    for spec in inputs:
        if any(not isinstance(d, int) for d in spec.shape[1:]):
            raise BadInputError(
                f"--head-format tflite: input {spec.name!r} has the dynamic dims "
                f"{spec.shape_text()}; TFLite needs every dim but the batch fixed: give "
                "--input-shape NAME=DIMS --fix-shapes (or --samples and --fix-shapes)")


def _scalar(model: onnx.ModelProto, name: str) -> Array | None:
    for init in model.graph.initializer:
        if init.name == name:
            return np.asarray(numpy_helper.to_array(init))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return np.asarray(numpy_helper.to_array(attr.t))
    return None


def _lower_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A QDQ head in float arithmetic onnx2tf converts faithfully (it gets the QDQ ops
    themselves wrong: its QuantizeLinear does not saturate, and on the digits CNN 93% of
    the first conv's outputs were off):

    - ``DequantizeLinear`` of a constant (weights, biases) → the float constant,
      ``(q - zero_point) * scale`` along its ``axis``;
    - ``QuantizeLinear`` → ``DequantizeLinear`` on an activation (per-tensor constants) →
      ``(min(max(round(x / s) + zp, lo), hi) - zp) * s`` in float: what the pair computes.

    The final ``QuantizeLinear`` of an integer cut stays (:func:`_strip_quantizers` takes
    it). Returns the model and the count of each rewrite."""
    from onnx import helper

    graph = model.graph
    consts = {i.name: np.asarray(numpy_helper.to_array(i)) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = np.asarray(numpy_helper.to_array(node.attribute[0].t))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    counts = {"folded_dequantize": 0, "lowered_qdq_pairs": 0}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    removed: set[int] = set()

    def attr(node: onnx.NodeProto, name: str, default: int) -> int:
        return next((int(a.i) for a in node.attribute if a.name == name), default)

    for node in graph.node:
        if id(node) in removed:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in consts and all(
                n in consts for n in node.input[1:] if n):
            q = consts[node.input[0]].astype(np.float64)
            scale = consts[node.input[1]].astype(np.float64)
            zero = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 and \
                node.input[2] else np.zeros_like(scale)
            if scale.ndim == 1 and q.ndim > 1:
                shape = [1] * q.ndim
                shape[attr(node, "axis", 1) % q.ndim] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            value = ((q - zero) * scale).astype(np.float32)
            new_inits.append(numpy_helper.from_array(value, node.output[0]))
            counts["folded_dequantize"] += 1
            continue
        if node.op_type == "QuantizeLinear" and node.output[0] not in outputs:
            after = consumers.get(node.output[0], [])
            q_scale = consts.get(node.input[1])
            q_zero = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] \
                else np.zeros((), np.uint8)
            if after and all(n.op_type == "DequantizeLinear" and n.input[0] == node.output[0]
                             and list(n.input[1:3]) == list(node.input[1:3])  # same s, zp
                             for n in after) and q_scale is not None and q_zero is not None \
                    and q_scale.size == 1 and q_zero.size == 1 \
                    and q_zero.dtype.name in _INT_RANGE:
                low, high = _INT_RANGE[q_zero.dtype.name]
                base = node.output[0] + ".lowered"
                f32 = {"s": float(q_scale.reshape(())), "zp": float(q_zero.reshape(())),
                       "lo": float(low), "hi": float(high)}
                for key, number in f32.items():
                    new_inits.append(numpy_helper.from_array(np.array(number, np.float32),
                                                             f"{base}.{key}"))
                x = node.input[0]
                steps = [("Div", [x, f"{base}.s"]), ("Round", None), ("Add", f"{base}.zp"),
                         ("Max", f"{base}.lo"), ("Min", f"{base}.hi"), ("Sub", f"{base}.zp")]
                prev = x
                for k, (op, arg) in enumerate(steps):
                    out = f"{base}.{k}"
                    ins = arg if isinstance(arg, list) else [prev] + ([arg] if arg else [])
                    new_nodes.append(helper.make_node(op, ins, [out], name=out))
                    prev = out
                for dq in after:  # each DequantizeLinear becomes the final multiply
                    new_nodes.append(helper.make_node("Mul", [prev, f"{base}.s"],
                                                      [dq.output[0]], name=dq.output[0]))
                    removed.add(id(dq))
                counts["lowered_qdq_pairs"] += 1
                continue
        new_nodes.append(node)
    if not any(counts.values()):
        return model, counts
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    del lowered.graph.node[:]
    lowered.graph.node.extend(new_nodes)
    lowered.graph.initializer.extend(new_inits)
    used = {i for n in new_nodes for i in n.input}
    keep = [i for i in lowered.graph.initializer if i.name in used]
    del lowered.graph.initializer[:]
    lowered.graph.initializer.extend(keep)
    kept_inputs = [i for i in lowered.graph.input if i.name not in consts or i.name in used]
    del lowered.graph.input[:]
    lowered.graph.input.extend(kept_inputs)
    return lowered, counts


def _strip_quantizers(model: onnx.ModelProto, cut: Sequence[TensorSpec]
                      ) -> tuple[onnx.ModelProto, dict[str, _Quantizer]]:
    """The head with each integer cut's final ``QuantizeLinear`` taken off (its float
    input becomes the graph output), and what the wrapper must quantize."""
    producer = {o: n for n in model.graph.node for o in n.output}
    quantizers: dict[str, _Quantizer] = {}
    drop = []
    for spec in cut:
        if spec.dtype not in _INT_RANGE:
            continue
        node = producer.get(spec.name)
        op = node.op_type if node is not None else "a graph input"
        if node is None or node.op_type != "QuantizeLinear":
            raise TfliteConversionError(
                f"cut {spec.name!r} is {spec.dtype}, produced by {op}; the TFLite head can "
                "only give an integer cut made by a QuantizeLinear at the end of the head "
                "(cut after the quantizer, or float and splitter.surgery.quantize_cut)")
        scale = _scalar(model, node.input[1])
        zero = _scalar(model, node.input[2]) if len(node.input) > 2 and \
            node.input[2] else np.zeros((), np.int8)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            raise TfliteConversionError(
                f"cut {spec.name!r}: QuantizeLinear {node.name!r} has a per-channel or "
                "computed scale/zero point; the TFLite head quantizes per tensor with "
                "constants only")
        quantizers[spec.name] = _Quantizer(node.input[0], float(scale.reshape(())),
                                           int(zero.reshape(())), spec.dtype)
        drop.append(node)
    if not quantizers:
        return model, {}
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    keep = [n for n in stripped.graph.node
            if not any(n.output[0] == q.output[0] for q in drop)]
    del stripped.graph.node[:]
    stripped.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    inits = [i for i in stripped.graph.initializer if i.name in used]
    del stripped.graph.initializer[:]
    stripped.graph.initializer.extend(inits)
    outputs = []
    for out in stripped.graph.output:
        q = quantizers.get(out.name)
        outputs.append(onnx.helper.make_tensor_value_info(q.float_name, onnx.TensorProto.FLOAT,
                                                          None) if q else out)
    del stripped.graph.output[:]
    stripped.graph.output.extend(outputs)
    return stripped, quantizers


@contextlib.contextmanager
def _captured(buffer: io.StringIO) -> Any:
    """Python's and the C++ libraries' stdout/stderr (file descriptors 1 and 2) into
    ``buffer`` for the block: tensorflow's converter prints whole MLIR dumps there. The
    descriptors are the process's: other threads' output in the meantime lands there too
    (conversion is an offline, one-thread step)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            buffer.write(sink.read().decode("utf-8", "replace"))


def _nodes_named(model: onnx.ModelProto, op_type: str) -> str:
    names = [n.name or n.output[0] for n in model.graph.node if n.op_type == op_type]
    return ", ".join(repr(n) for n in names[:5]) or "?"


def _onnx_nodes_of(model: onnx.ModelProto, text: str, tf_ops: Sequence[str]) -> str:
    """The ONNX nodes whose Keras layers hold ``tf_ops`` (the converter's MLIR locations
    read ``model/<tensor>/<Op>@``; onnx2tf names a layer after the ONNX output)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for op in tf_ops:
        for tensor in re.findall(r"model(?:_\d+)?/([^/\"]+)/" + re.escape(op) + "@", text):
            node = producer.get(tensor)
            label = f"{node.op_type} {node.name or tensor!r}" if node else repr(tensor)
            if label not in found:
                found.append(label)
    return ", ".join(found[:5])


def _op_of(log_text: str) -> str:
    found = re.findall(r"onnx_op_name:\s*(\S+)", log_text)
    return found[-1] if found else "?"


def _run_onnx2tf(onnx2tf: Any, model: onnx.ModelProto, model_path: Path,
                 names: Sequence[str], work: Path) -> Any:
    """onnx2tf.convert, its chatter captured; a failure names the ONNX op."""
    buffer = io.StringIO()
    try:
        with _captured(buffer):
            return onnx2tf.convert(
                input_onnx_file_path=str(model_path), output_folder_path=str(work / "tf"),
                keep_shape_absolutely_input_names=list(names), disable_model_save=True,
                not_use_onnxsim=True, non_verbose=True, verbosity="error")
    except ModuleNotFoundError as exc:
        missing = str(exc.name or exc).rsplit(".", 1)[-1]
        raise TfliteConversionError(
            f"onnx2tf {converter_versions().get('onnx2tf', '?')} has no converter for the "
            f"ONNX op {missing} (node {_nodes_named(model, missing)}); cut before it or "
            "keep the ONNX head") from exc
    except (Exception, SystemExit) as exc:
        tail = " | ".join(line.strip() for line in buffer.getvalue().splitlines()[-6:]
                          if line.strip())
        raise TfliteConversionError(
            f"onnx2tf failed on the ONNX node {_op_of(buffer.getvalue())}: "
            f"{type(exc).__name__}: {exc}; onnx2tf said: {tail[-600:]}") from exc


def _keras_feeds(keras_model: Any, inputs: Sequence[TensorSpec],
                 samples: Mapping[str, Array]) -> list[Array]:
    by_name = {spec.name: samples[spec.name] for spec in inputs}
    feeds = []
    for tensor in keras_model.inputs:
        name = str(tensor.name).split(":")[0]
        if name not in by_name:
            raise TfliteConversionError(f"onnx2tf renamed the head's input to {name!r}; "
                                        f"expected one of {sorted(by_name)}")
        feeds.append(by_name[name])
    return feeds


def _match_outputs(got: Sequence[Array], want: Mapping[str, Array], *,
                   tolerance: float = _MATCH_TOL
                   ) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """ONNX output name → (index of the Keras output, permutation back, or None)."""
    plan: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    taken: set[int] = set()
    for name, ref in want.items():
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        best: tuple[float, int, tuple[int, ...] | None] | None = None
        for k, arr in enumerate(got):
            if k in taken or arr.ndim != ref.ndim:
                continue
            for perm in itertools.permutations(range(1, ref.ndim)):
                full = (0, *perm)
                moved = np.transpose(arr, full)
                if moved.shape != ref.shape:
                    continue
                diff = float(np.abs(moved.astype(np.float64) - ref).max(initial=0.0)) / scale
                if best is None or diff < best[0]:
                    best = (diff, k, None if full == tuple(range(ref.ndim)) else full)
        if best is None or best[0] > tolerance:
            raise TfliteConversionError(
                f"the converted head's outputs match the ONNX head's {name!r} "
                f"{tuple(ref.shape)} in no layout (closest: "
                f"{'none of its shape' if best is None else f'{best[0]:.3g} relative'}); "
                "onnx2tf changed what the head computes")
        plan[name] = (best[1], best[2])
        taken.add(best[1])
    return plan


def _tf_select_ops(text: str) -> list[str]:
    found = re.findall(r"TF Select ops: ([^\n]+)", text)
    if found:
        return sorted({op.strip() for line in found for op in line.split(",") if op.strip()})
    return sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", text)))


def convert_head(head_onnx: str | Path, out_path: str | Path, *,
                 inputs: Sequence[TensorSpec], cut: Sequence[TensorSpec],
                 samples: Mapping[str, Array]) -> ConvertedHead:
    """Convert the ONNX head to ``out_path`` (``head.tflite``) with the layout, dtype and
    quantization of ``cut``; ``samples`` (model inputs, first axis = samples) decide which
    output of onnx2tf is which cut tensor. Raises TfliteConversionError (op and why) or
    BadInputError (dynamic dims, converter not installed)."""
    import time

    import onnxruntime as ort

    onnx2tf, tf = _require()
    started = time.perf_counter()
    head_onnx, out_path = Path(head_onnx), Path(out_path)
    model = onnx.load(str(head_onnx))
    _static_inputs(inputs)
    stripped, quantizers = _strip_quantizers(model, cut)
    stripped, rewrites = _lower_qdq(stripped)
    float_names = [quantizers[s.name].float_name if s.name in quantizers else s.name
                   for s in cut]
    probe = {s.name: np.ascontiguousarray(samples[s.name][:4]) for s in inputs}
    with tempfile.TemporaryDirectory(prefix="splitinfer-tflite-") as tmp:
        work = Path(tmp)
        float_head = work / "head_float.onnx"
        onnx.save(stripped, str(float_head))
        session = ort.InferenceSession(str(float_head), providers=["CPUExecutionProvider"])
        reference = dict(zip(float_names, session.run(float_names, probe), strict=True))
        keras_model = _run_onnx2tf(onnx2tf, stripped, float_head, [s.name for s in inputs],
                                   work)
        got = keras_model(_keras_feeds(keras_model, inputs, probe))
        got_list = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
        plan = _match_outputs(got_list, reference, tolerance=_MATCH_TOL_QDQ
                              if any(rewrites.values()) else _MATCH_TOL)
        function = _wrapper(tf, keras_model, inputs, cut, float_names, plan, quantizers)
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [function.get_concrete_function()], keras_model)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        buffer = io.StringIO()
        try:
            with _captured(buffer):
                flatbuffer = converter.convert()
        except Exception as exc:  # tf.lite's ConverterError and friends
            text = f"{exc}\n{buffer.getvalue()}"
            ops = _tf_select_ops(text)
            if ops:
                where = _onnx_nodes_of(stripped, text, ops)
                raise TfliteConversionError(
                    f"TFLite has no builtin kernel for the TF op(s) {', '.join(ops)} that "
                    f"onnx2tf made of {head_onnx.name}"
                    + (f" (from the ONNX node(s) {where})" if where else "")
                    + "; LiteRT on a device runs builtins only (no Flex/TF Select), so this "
                    "head cannot run there") from exc
            first = next((ln for ln in str(exc).splitlines() if "error" in ln.lower()),
                         str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise TfliteConversionError(f"the TFLite converter failed on {head_onnx.name}: "
                                        f"{first[:400]}") from exc
    out_path.write_bytes(flatbuffer)
    ref = TfliteRef(path=out_path.name, sha256=sha256_file(out_path), signature=SIGNATURE,
                    inputs={s.name: f"in_{i}" for i, s in enumerate(inputs)},
                    outputs={s.name: f"out_{i}" for i, s in enumerate(cut)})
    return ConvertedHead(out_path, ref, time.perf_counter() - started, rewrites)


def _wrapper(tf: Any, keras_model: Any, inputs: Sequence[TensorSpec],
             cut: Sequence[TensorSpec], float_names: Sequence[str],
             plan: Mapping[str, tuple[int, tuple[int, ...] | None]],
             quantizers: Mapping[str, _Quantizer]) -> Any:
    """A tf.function: the manifest's inputs (batch dynamic) → the cut, ONNX layout."""
    order = [str(t.name).split(":")[0] for t in keras_model.inputs]
    specs = [tf.TensorSpec([None, *s.shape[1:]], tf.as_dtype(s.dtype), name=f"in_{i}")
             for i, s in enumerate(inputs)]
    position = {s.name: i for i, s in enumerate(inputs)}

    def body(*args: Any) -> dict[str, Any]:
        result = keras_model([args[position[name]] for name in order])
        outs = list(result) if isinstance(result, (list, tuple)) else [result]
        named = {}
        for i, (spec, fname) in enumerate(zip(cut, float_names, strict=True)):
            index, perm = plan[fname]
            y = outs[index]
            if perm is not None:
                y = tf.transpose(y, perm)
            q = quantizers.get(spec.name)
            if q is not None:
                low, high = _INT_RANGE[q.dtype]
                y = tf.round(y / q.scale) + float(q.zero_point)  # round half to even
                y = tf.minimum(tf.maximum(y, float(low)), float(high))
                y = tf.cast(y, tf.as_dtype(q.dtype))
            named[f"out_{i}"] = y
        return named

    return tf.function(body, input_signature=specs)


def convert_split(directory: str | Path, *, samples: Mapping[str, Array] | None = None,
                  num_samples: int = 8, seed: int = 0, min_agreement: float = 0.99,
                  threads: int | None = None) -> Manifest:
    """Add ``head.tflite`` to the split already written in ``directory`` (e.g. after
    :func:`splitter.surgery.quantize_cut`): converted, verified on ``samples`` (default
    ``num_samples`` generated ones), the manifest rewritten with ``head_tflite``,
    ``verification.tflite`` and the converter's versions. Raises as :func:`convert_head`
    and :func:`verify_tflite`; the manifest is left as it was then."""
    from dataclasses import replace

    from splitter.verify import check_samples, make_samples

    directory = Path(directory)
    manifest = Manifest.load(directory)
    if manifest.head is None:
        raise BadInputError(f"split {manifest.split_id} in {directory}: a {manifest.kind} "
                            "split has no head to convert")
    head = manifest.resolve(directory, "head")
    tail = manifest.resolve(directory, "tail") if manifest.tail is not None else None
    if samples is None:
        data = make_samples(onnx.load(str(head)), num_samples, seed)
    else:
        data = check_samples(samples, list(manifest.inputs))
    converted = convert_head(head, directory / TFLITE_NAME, inputs=manifest.inputs,
                             cut=manifest.cut, samples=data)
    report = verify_tflite(converted, head, tail, inputs=manifest.inputs, cut=manifest.cut,
                           samples=data, min_agreement=min_agreement, threads=threads,
                           split_id=manifest.split_id)
    updated = replace(manifest, head_tflite=converted.ref,
                      verification={**manifest.verification, "tflite": report},
                      versions={**manifest.versions, **converter_versions()})
    updated.save(directory)
    return updated


# -- verification ---------------------------------------------------------------------------

def verify_tflite(tflite: ConvertedHead, head_onnx: Path, tail_onnx: Path | None, *,
                  inputs: Sequence[TensorSpec], cut: Sequence[TensorSpec],
                  samples: Mapping[str, Array], min_agreement: float,
                  threads: int | None = None, split_id: str | None = None
                  ) -> dict[str, Any]:
    """TFLite head against the ONNX head on ``samples`` (module docstring); the report
    for ``verification.tflite``. Raises VerificationError below ``min_agreement``."""
    import onnxruntime as ort

    from splitinfer import ort_config

    run_tflite = _litert_runner(tflite.path, tflite.ref, threads)
    options = ort_config.apply(ort.SessionOptions())
    head = ort.InferenceSession(str(head_onnx), options, providers=["CPUExecutionProvider"])
    cut_names = [s.name for s in cut]
    n = len(next(iter(samples.values())))
    ref_cuts: dict[str, list[Array]] = {c: [] for c in cut_names}
    got_cuts: dict[str, list[Array]] = {c: [] for c in cut_names}
    for i in range(n):  # one sample per call, as a device runs it
        feed = {s.name: samples[s.name][i:i + 1] for s in inputs}
        for name, value in zip(cut_names, head.run(cut_names, feed), strict=True):
            ref_cuts[name].append(np.asarray(value))
        answer = run_tflite(feed)
        for name in cut_names:
            got_cuts[name].append(answer[name])
    ref_cut = {k: np.concatenate(v) for k, v in ref_cuts.items()}
    got_cut = {k: np.concatenate(v) for k, v in got_cuts.items()}
    at_cut: dict[str, Any] = {}
    for spec in cut:
        ref, got = ref_cut[spec.name], got_cut[spec.name]
        if got.dtype != ref.dtype or got.shape != ref.shape:
            raise VerificationError(
                f"TFLite head gives cut {spec.name!r} as {got.dtype.name}"
                f"{tuple(got.shape)}; the ONNX head gives {ref.dtype.name}{tuple(ref.shape)}",
                split_id=split_id)
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        entry: dict[str, Any] = {"max_abs_diff": float(diff.max(initial=0.0))}
        if spec.quantization is not None:
            entry["max_abs_diff_real"] = entry["max_abs_diff"] * spec.quantization.scale
        if spec.dtype in _INT_RANGE:
            entry["differing_share"] = float((diff > 0).mean()) if diff.size else 0.0
        at_cut[spec.name] = entry
    if tail_onnx is not None:
        tail = ort.InferenceSession(str(tail_onnx), options, providers=["CPUExecutionProvider"])
        first = tail.get_outputs()[0].name
        ref_out = np.asarray(tail.run([first], ref_cut)[0])
        got_out = np.asarray(tail.run([first], got_cut)[0])
    else:  # edge_only: the head's outputs are the model's
        first = cut_names[0]
        ref_out, got_out = ref_cut[first], got_cut[first]
    agreement, match = _agreement(ref_out, got_out)
    report = {
        "samples": n,
        "agreement": agreement,
        "match": match,
        "output": first,
        "max_abs_diff_output": float(np.abs(got_out.astype(np.float64) - ref_out).max(
            initial=0.0)),
        "cut": at_cut,
        "max_abs_diff_cut": max((e.get("max_abs_diff_real", e["max_abs_diff"])
                                 for e in at_cut.values()), default=0.0),
        "min_agreement": min_agreement,
        "tflite_bytes": tflite.path.stat().st_size,
        "onnx_bytes": head_onnx.stat().st_size,
        "convert_s": round(tflite.seconds, 3),
        **({"qdq_rewrites": dict(tflite.rewrites)} if any(tflite.rewrites.values()) else {}),
    }
    if agreement < min_agreement:
        raise VerificationError(
            f"TFLite head agrees with the ONNX split on {100 * agreement:.1f}% of {n} "
            f"sample(s) ({match} of {first}), below the {100 * min_agreement:.1f}% asked "
            f"(--tflite-min-agreement); max|diff| at the cut {report['max_abs_diff_cut']:.3g}",
            split_id=split_id)
    return report


def _agreement(ref: Array, got: Array) -> tuple[float, str]:
    """Top-1 for a classifier output (rank 2, 2+ classes, float), else allclose at 1%."""
    if not len(ref):
        return 1.0, "none"
    if ref.ndim == 2 and ref.shape[1] > 1 and ref.dtype.kind == "f":
        return float((ref.argmax(axis=1) == got.argmax(axis=1)).mean()), "argmax"
    flat_ref = ref.reshape(len(ref), -1).astype(np.float64)
    flat_got = got.reshape(len(got), -1).astype(np.float64)
    bound = 0.01 * np.maximum(1.0, np.abs(flat_ref).max(axis=1, initial=0.0))
    return float((np.abs(flat_got - flat_ref).max(axis=1, initial=0.0) <= bound).mean()), \
        "allclose"


def _litert_runner(path: Path, ref: TfliteRef, threads: int | None
                   ) -> Callable[[Mapping[str, Array]], dict[str, Array]]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise BadInputError(f"verifying the TFLite head needs ai-edge-litert: pip install "
                            f"'{EXTRA}' ({exc})") from exc
    interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
    runner = interpreter.get_signature_runner(ref.signature)
    back = {key: name for name, key in ref.outputs.items()}

    def run(feed: Mapping[str, Array]) -> dict[str, Array]:
        out = runner(**{ref.inputs[name]: value for name, value in feed.items()})
        return {back[key]: np.array(value) for key, value in out.items()}

    return run
