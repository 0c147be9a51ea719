"""Static int8 quantization with onnxruntime, shaped so the int8 tensors become cut points.

The activations are QInt8 QDQ: every quantized activation is a ``QuantizeLinear`` whose
int8 output feeds the next ``DequantizeLinear``. Cutting a model right there sends a
quarter of the fp32 bytes and adds no error at all: the tail dequantizes exactly the int8
values the unsplit model would have dequantized. Weights are QInt8, per channel by default.

Calibration data is an ``.npz`` (or a mapping): one array per model input, keyed by input
name, first axis = samples. It is checked against the model before onnxruntime sees it,
so a wrong key, dtype or shape is one line naming what was expected, not a traceback from
deep inside the calibrator.
"""

from __future__ import annotations

import logging
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from splitinfer.dtypes import from_onnx_elem_type
from splitinfer.errors import BadInputError

__all__ = ["FORMATS", "CALIBRATE_METHODS", "quantize_static", "load_calibration"]

log = logging.getLogger(__name__)

FORMATS = ("qdq", "qoperator")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile", "distribution")
# Samples per calibration run: enough to amortise session overhead, small enough that
# a 224x224 model's intermediate tensors stay within a few hundred MB.
_CALIB_BATCH = 16

# Ops left in float. Softmax: int8 probabilities lose resolution (1/255 steps) for no
# speed-up, and onnxruntime's fused QLinearSoftmax (a lookup table) differs by one step
# from DequantizeLinear→Softmax→QuantizeLinear, which is what a tail starting right
# before it runs, so a cut there would no longer be exact.
_KEEP_FLOAT = frozenset({"Softmax"})

Arrays = Mapping[str, npt.NDArray[Any]]
Dim = int | str | None


def _input_specs(model: Any) -> dict[str, tuple[str, tuple[Dim, ...]]]:
    """Graph inputs that are not initializers: name → (canonical dtype, shape)."""
    initializers = {init.name for init in model.graph.initializer}
    specs: dict[str, tuple[str, tuple[Dim, ...]]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0  # -1: dynamic
            else (d.dim_param or None)
            for d in tensor.shape.dim
        )
        specs[value.name] = (from_onnx_elem_type(tensor.elem_type), shape)
    return specs


def _fmt(shape: tuple[Dim, ...]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def load_calibration(
    data: str | Path | Arrays, specs: Mapping[str, tuple[str, tuple[Dim, ...]]]
) -> dict[str, npt.NDArray[Any]]:
    """Read and check calibration arrays against the model inputs ``specs``.

    Raises BadInputError naming the first problem: a missing or extra key, a wrong dtype,
    a shape that does not match the model input (first axis = samples), differing sample
    counts, no samples, or non-finite values.
    """
    arrays = _read_arrays(data)
    label = str(data) if isinstance(data, (str, Path)) else "calibration data"
    expected = ", ".join(f"{n} {dt}{_fmt(s)}" for n, (dt, s) in specs.items())
    missing = [name for name in specs if name not in arrays]
    extra = sorted(name for name in arrays if name not in specs)
    if missing:
        raise BadInputError(f"{label}: missing key(s) {missing}; expected one array per "
                            f"model input: {expected}")
    if extra:  # labels and the like: the calibrator reads the model inputs only
        log.warning("%s: ignoring %s (not model inputs; the model reads %s)", label,
                    ", ".join(map(repr, extra)), ", ".join(map(repr, specs)))
        arrays = {k: v for k, v in arrays.items() if k in specs}
    counts = set()
    for name, (dtype, shape) in specs.items():
        array = arrays[name]
        if array.dtype.name != dtype:
            raise BadInputError(f"{label}: {name!r} has dtype {array.dtype.name}, expected "
                                f"{dtype} (model input {name} {dtype}{_fmt(shape)})")
        sample_shape = shape[1:] if shape else ()
        if array.ndim != len(shape) or any(
            isinstance(want, int) and want != got
            for want, got in zip(sample_shape, array.shape[1:], strict=False)
        ):
            raise BadInputError(
                f"{label}: {name!r} has shape {list(array.shape)}, expected "
                f"[samples,{','.join('?' if d is None else str(d) for d in sample_shape)}] "
                f"for model input {name} {dtype}{_fmt(shape)}")
        if array.shape[0] == 0:
            raise BadInputError(f"{label}: {name!r} holds no samples; expected at least one "
                                "along the first axis")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadInputError(f"{label}: {name!r} contains NaN or infinity; calibration "
                                "needs finite values")
        counts.add(array.shape[0])
    if len(counts) > 1:
        raise BadInputError(f"{label}: inputs hold different sample counts "
                            f"{ {n: int(a.shape[0]) for n, a in arrays.items()} }; expected "
                            "the same number of samples for every input")
    return dict(arrays)


def _read_arrays(data: str | Path | Arrays) -> dict[str, npt.NDArray[Any]]:
    if not isinstance(data, (str, Path)):
        return {str(k): np.asarray(v) for k, v in data.items()}
    path = Path(data)
    if not path.is_file():
        raise BadInputError(f"{path}: no such calibration file; expected an .npz with one "
                            "array per model input")
    if not zipfile.is_zipfile(path):
        raise BadInputError(f"{path}: not an .npz archive; expected one array per model "
                            "input, keyed by input name (numpy.savez)")
    try:
        # allow_pickle=False: a calibration file must never be able to run code.
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable .npz ({exc}); expected one array per "
                            "model input, keyed by input name") from exc


def _batches(arrays: Arrays, specs: Mapping[str, tuple[str, tuple[Dim, ...]]]
             ) -> Iterator[dict[str, npt.NDArray[Any]]]:
    count = next(iter(arrays.values())).shape[0]
    # A model whose batch dim is pinned (e.g. 1) gets batches of exactly that size.
    fixed = {s[0] for _, s in specs.values() if s and isinstance(s[0], int)}
    step = fixed.pop() if len(fixed) == 1 else _CALIB_BATCH
    for start in range(0, count - step + 1 if fixed else count, step):
        yield {name: np.ascontiguousarray(a[start:start + step]) for name, a in arrays.items()}


def _reader(arrays: Arrays, specs: Mapping[str, tuple[str, tuple[Dim, ...]]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _NpzReader(CalibrationDataReader):  # type: ignore[misc]  # untyped base
        def __init__(self) -> None:
            self._it = _batches(arrays, specs)

        def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
            return next(self._it, None)

    return _NpzReader()


def _load_model(model: str | Path) -> Any:
    import onnx

    path = Path(model)
    if not path.is_file():
        raise BadInputError(f"{path}: no such model file; expected an .onnx file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, ValueError, … for a bad file
        raise BadInputError(f"{path}: not a readable ONNX model: {exc}") from exc
    from splitter.graph import normalize_model

    return normalize_model(proto)


def quantize_static(
    model: str | Path,
    calibration: str | Path | Arrays,
    out_path: str | Path,
    *,
    fmt: str = "qdq",
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    input_shapes: Mapping[str, Any] | None = None,
    activations: str = "int8",
) -> Path:
    """Quantize ``model`` to int8 with ``calibration`` data; write and return ``out_path``.

    The model is normalised first (IR < 4 initializers-as-inputs, ``-1`` dims).
    ``input_shapes`` (input name → dims) fixes dynamic dims while the quantizer's
    pre-processing infers shapes (per-channel weights need them); the calibration arrays'
    shapes are used the same way when not given. The written model keeps the source's
    dynamic input and output dims. ``activations``: "int8" (default) or "uint8". On x86,
    onnxruntime (1.32 at least) runs int8 activations by rewriting each Q→DQ pair to uint8
    first; a tail whose input is an int8 cut has no such pair, runs its first op in float
    and may differ from the unsplit model by a quantization step. uint8 activations need
    no rewrite, so every int8 cut is exact there.

    ``fmt="qdq"`` (default) keeps the fp32 ops between QuantizeLinear/DequantizeLinear
    pairs, which is what makes the int8 activations cut points; ``"qoperator"`` writes
    QLinearConv & co. instead.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    methods = {
        "minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
    }
    activation_types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if activations not in activation_types:
        raise BadInputError(f"unknown activation type {activations!r}; expected int8 or uint8")
    if fmt not in formats:
        raise BadInputError(f"unknown quantization format {fmt!r}; expected one of {FORMATS}")
    if calibrate_method not in methods:
        raise BadInputError(f"unknown calibration method {calibrate_method!r}; expected one of "
                            f"{CALIBRATE_METHODS}")
    import onnx

    from splitter.graph import check_input_shapes, fix_input_shapes

    source = _upgrade_opset(_load_model(model), model)
    shapes = check_input_shapes(source, input_shapes or {})
    specs = _input_specs(source)
    arrays = load_calibration(calibration, specs)
    if not shapes:  # the calibration arrays say what sizes the model sees
        shapes = {n: (s[0] if s[0] is not None else "N", *arrays[n].shape[1:])
                  for n, (_, s) in specs.items()
                  if s and arrays[n].ndim == len(s) and any(d is None for d in s[1:])}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="splitinfer-quant-") as tmp:
        normalised = Path(tmp) / "source.onnx"
        onnx.save(fix_input_shapes(source, shapes) if shapes else source, str(normalised))
        prepared = _pre_process(normalised, Path(tmp) / "prepared.onnx")
        excluded = _name_nodes(prepared, Path(tmp) / "named.onnx", _KEEP_FLOAT)
        prepared = Path(tmp) / "named.onnx"
        extra_options = {
            # Keep Relu/Clip as their own ops only where needed: with asymmetric int8
            # activations onnxruntime folds them into the producer's quantization range,
            # so a Conv→Relu output is one QuantizeLinear with the full [-128,127] range.
            "ActivationSymmetric": False,
            # One QuantizeLinear per tensor, shared by all consumers (not one pair per
            # consumer): a branching activation still crosses the cut as one int8 tensor.
            "DedicatedQDQPair": False,
        }
        log.info("quantizing %s (%s, per_channel=%s, %s, %d samples)", model, fmt,
                 per_channel, calibrate_method, next(iter(arrays.values())).shape[0])
        try:
            ort_quantize_static(
                str(prepared), str(out), _reader(arrays, specs),
                quant_format=formats[fmt], per_channel=per_channel,
                activation_type=activation_types[activations], weight_type=QuantType.QInt8,
                calibrate_method=methods[calibrate_method],
                calibration_providers=["CPUExecutionProvider"],
                nodes_to_exclude=excluded,
                extra_options=extra_options,
            )
        except BadInputError:
            raise
        except Exception as exc:  # onnxruntime raises bare Exception/RuntimeError types
            raise BadInputError(f"{model}: onnxruntime could not quantize it: {exc}") from exc
    if shapes:
        _restore_dims(source, out)
    return out


# Per-channel DequantizeLinear (its ``axis``) needs opset 13; onnxruntime's quantizer
# writes it whatever the model's opset, so older models are converted first.
_MIN_OPSET = 13


def _upgrade_opset(proto: Any, model: str | Path) -> Any:
    import onnx
    from onnx import version_converter

    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version >= _MIN_OPSET:
        return proto
    try:
        upgraded = version_converter.convert_version(proto, _MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter lacks adapters for some ops
        raise BadInputError(f"{model}: opset {version} is older than the {_MIN_OPSET} that int8 "
                            f"quantization needs, and converting it failed: {exc}") from exc
    log.info("%s: opset %d converted to %d for quantization", model, version, _MIN_OPSET)
    return upgraded


def _restore_dims(source: Any, out: Path) -> None:
    """Give the quantized model the source's (dynamic) input and output dims back; the
    intermediate shapes inferred at the fixed size go too."""
    import onnx

    proto = onnx.load(str(out))
    declared = {v.name: v for v in [*source.graph.input, *source.graph.output]}
    for vi in [*proto.graph.input, *proto.graph.output]:
        if vi.name in declared:
            vi.type.CopyFrom(declared[vi.name].type)
    del proto.graph.value_info[:]
    onnx.save(proto, str(out))


def _name_nodes(model: Path, out: Path, keep_float: frozenset[str]) -> list[str]:
    """Give every node a unique name (the quantizer selects nodes by name); write ``out``.

    Returns the names of the nodes to leave in float: ops in ``keep_float``.
    """
    import onnx

    proto = onnx.load(str(model))
    taken = {node.name for node in proto.graph.node if node.name}
    excluded = []
    for index, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
        if node.op_type in keep_float:
            excluded.append(node.name)
    onnx.save(proto, str(out))
    return excluded


def _pre_process(model: Path, out: Path) -> Path:
    """Shape inference + graph optimisation (folds BatchNormalization into Conv) first.

    onnxruntime recommends it before static quantization: BN folded into Conv gets one
    QuantizeLinear instead of two, and known shapes let per-channel weights work. If the
    model defeats it (e.g. an op symbolic shape inference does not know), quantize as is.

    Symbolic shape inference runs here rather than inside ``quant_pre_process``:
    onnxruntime's ``SymbolicShapeInference.infer_shapes`` saves its partial result as
    ``sym_shape_infer_temp.onnx`` in the current directory whenever inference is
    incomplete, and takes no path for it. The same loop run here writes nothing (and no
    ``os.chdir``, which is process-wide and unsafe with threads).
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        shaped = out.with_name(out.stem + "_shaped.onnx")
        onnx.save(_symbolic_shapes(onnx.load(str(model))), str(shaped))
        quant_pre_process(str(shaped), str(out), skip_symbolic_shape=True)
    except Exception as exc:  # a pre-pass is an optimisation; its failure is not fatal
        log.warning("quantization pre-processing of %s failed (%s); quantizing as is",
                    model, exc)
        return model
    return out


def _symbolic_shapes(proto: Any) -> Any:
    """``SymbolicShapeInference.infer_shapes`` (defaults: int_max 2**31-1, no auto merge,
    no rank guessing) minus its ``sym_shape_infer_temp.onnx`` written to the cwd on
    failure: raises RuntimeError instead."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, False, False, 0)
    inference._preprocess(proto)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise RuntimeError("Incomplete symbolic shape inference")
    return inference.out_mp_
