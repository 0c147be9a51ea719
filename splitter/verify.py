"""Sample inputs and the check that head→tail reproduces the full model.

Every ``.npz`` this tool reads holds one array per model input, keyed by input name, with
samples along the first axis. An input whose first dimension is fixed to ``B`` takes its
samples ``B`` rows at a time; one with a dynamic first dimension takes them all at once.

The tolerance is relative to the output's scale:
``max|full - head→tail| <= tolerance * max(1, max|full|)`` for every output.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from splitinfer import ort_config
from splitinfer.dtypes import from_ort_type, numpy_dtype
from splitinfer.errors import BadInputError, SplitInferError, TensorError, VerificationError
from splitinfer.manifest import TensorSpec

__all__ = [
    "OutputDiff", "VerifyReport", "verify_split", "make_samples", "load_npz", "check_samples",
    "batches", "input_specs", "ort_session",
]

log = logging.getLogger(__name__)
Array = np.ndarray[Any, Any]
DYNAMIC_DIM_SIZE = 32  # size given to dynamic non-batch dims (spatial, sequence) in samples


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Specs of the real graph inputs (initializers listed as inputs are skipped)."""
    from splitter.graph import value_info_to_spec

    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        try:
            specs.append(value_info_to_spec(vi))
        except TensorError as exc:
            raise BadInputError(f"model input {vi.name!r}: {exc}") from None
    return specs


def make_samples(model_path_or_proto: str | Path | onnx.ModelProto, n: int, seed: int, *,
                 dynamic_size: int = DYNAMIC_DIM_SIZE) -> dict[str, Array]:
    """``n`` samples per model input in ranges a typical model expects.

    float: uniform [0, 1) (normalised images); int8/uint8: their full range (raw pixels,
    quantized data); other integers: [0, 8) (small enough to be valid indices); bool: coin.
    Dynamic dims: the batch axis holds the samples, the others get ``dynamic_size``.
    """
    if n < 1:
        raise BadInputError(f"number of samples must be >= 1, got {n}")
    if isinstance(model_path_or_proto, onnx.ModelProto):
        model = model_path_or_proto
    else:
        from splitter.graph import load_model

        model = load_model(model_path_or_proto)
    rng = np.random.default_rng(seed)
    out: dict[str, Array] = {}
    for spec in input_specs(model):
        shape: list[int] = []
        for axis, dim in enumerate(spec.shape):
            if axis == 0:
                shape.append(n * dim if isinstance(dim, int) and dim > 0 else n)
            else:
                shape.append(dim if isinstance(dim, int) else dynamic_size)
        if not spec.shape:
            shape = [n]
        out[spec.name] = _random(rng, spec.dtype, tuple(shape))
    return out


def _random(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> Array:
    np_dtype = numpy_dtype(dtype)
    if dtype.startswith("float"):
        return rng.random(shape).astype(np_dtype)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype in ("int8", "uint8"):
        lo, hi = (-128, 128) if dtype == "int8" else (0, 256)
        return rng.integers(lo, hi, shape).astype(np_dtype)
    return rng.integers(0, 8, shape).astype(np_dtype)


def load_npz(path: str | Path, expected_inputs: Sequence[TensorSpec]) -> dict[str, Array]:
    """Read a samples ``.npz`` and check it against the model inputs."""
    path = Path(path)
    wanted = ", ".join(s.name for s in expected_inputs)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file; expected an .npz with one array per model "
                            f"input ({wanted}), first axis = samples")
    if not zipfile.is_zipfile(path):
        raise BadInputError(f"{path}: not an .npz archive; expected one written by numpy.savez "
                            f"with one array per model input ({wanted}), first axis = samples")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"{path}: not a readable .npz ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a zip that numpy reads otherwise
        raise BadInputError(f"{path}: not an .npz archive; expected one array per model input "
                            f"({wanted})")
    try:
        with loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"{path}: cannot read its arrays ({exc})") from exc
    return check_samples(arrays, expected_inputs, source=str(path))


def check_samples(arrays: Mapping[str, Any], expected_inputs: Sequence[TensorSpec], *,
                  source: str = "samples", extra: str = "note") -> dict[str, Array]:
    """Validate keys, dtypes, shapes and sample counts; the message says what was expected.

    Keys that name no model input (labels, ids) are left out of the result: ``extra``
    "note" logs one warning naming them, "ignore" says nothing, "error" refuses them.
    Only a missing input is always an error.
    """
    names = [s.name for s in expected_inputs]
    missing = [n for n in names if n not in arrays]
    unused = sorted(k for k in arrays if k not in names)
    if missing or (unused and extra == "error"):
        what = []
        if missing:
            what.append(f"missing {', '.join(map(repr, missing))}")
        if unused and extra == "error":
            what.append(f"unexpected {', '.join(map(repr, unused))}")
        raise BadInputError(f"{source}: {'; '.join(what)}; expected one array per model input, "
                            f"keyed by name: {', '.join(map(repr, names))}")
    if unused and extra == "note":
        log.warning("%s: ignoring %s (not model inputs; the model reads %s)", source,
                    ", ".join(map(repr, unused)), ", ".join(map(repr, names)))
    out: dict[str, Array] = {}
    counts: dict[str, int] = {}
    for spec in expected_inputs:
        arr = np.ascontiguousarray(arrays[spec.name])
        if arr.dtype.name != spec.dtype:
            raise TensorError(f"{source}: input {spec.name!r}: expected dtype {spec.dtype}, "
                              f"got {arr.dtype.name}")
        want = ("samples", *spec.shape[1:])
        if arr.ndim != max(len(spec.shape), 1) or any(
            isinstance(w, int) and w != g for w, g in zip(spec.shape[1:], arr.shape[1:],
                                                          strict=False)
        ):
            raise TensorError(f"{source}: input {spec.name!r}: expected shape "
                              f"({', '.join(str(d) for d in want)}), got {tuple(arr.shape)}")
        rows = arr.shape[0]
        per = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else 1
        if rows == 0 or rows % max(per, 1):
            raise TensorError(f"{source}: input {spec.name!r}: {rows} rows; expected a positive "
                              f"multiple of the model's fixed batch size {per}")
        counts[spec.name] = rows // max(per, 1)
        out[spec.name] = arr
    if len(set(counts.values())) > 1:
        raise TensorError(f"{source}: inputs hold different numbers of samples: {counts}")
    return out


def batches(samples: Mapping[str, Array], specs: Sequence[TensorSpec]
            ) -> Iterator[dict[str, Array]]:
    """Feeds for a session: everything at once when every batch dim is dynamic."""
    if all(s.shape and not isinstance(s.shape[0], int) for s in specs):
        yield {s.name: samples[s.name] for s in specs}
        return
    per = {s.name: (s.shape[0] if s.shape and isinstance(s.shape[0], int) else 1) or 1
           for s in specs}
    count = min(len(samples[s.name]) // per[s.name] for s in specs) if specs else 1
    for k in range(count):
        feed = {}
        for s in specs:
            arr = samples[s.name]
            feed[s.name] = (np.asarray(arr[k]) if not s.shape  # a scalar input: 0-d array
                            else arr[k * per[s.name]:(k + 1) * per[s.name]])
        yield feed


def ort_session(model: onnx.ModelProto | str | Path, *, base_dir: Path | None = None,
                optimize: bool = True, error: type[SplitInferError] = BadInputError,
                what: str = "the model") -> ort.InferenceSession:
    """An onnxruntime CPU session; a failure becomes ``error`` naming ``what``."""
    opts = ort_config.apply(ort.SessionOptions())  # as the edge agent and the worker run
    opts.log_severity_level = 3  # keep onnxruntime's warnings off the user's terminal
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source: str | bytes
    if isinstance(model, onnx.ModelProto):
        if base_dir is not None:
            # The proto's external data paths are relative to the original file's folder.
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(base_dir))
        source = model.SerializeToString()
    else:
        source = str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's pybind errors share no useful base class
        raise error(f"onnxruntime cannot load {what}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs_diff: float
    ref_scale: float  # max(1, max|reference|)

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / self.ref_scale


@dataclass(frozen=True)
class VerifyReport:
    samples: int
    outputs: tuple[OutputDiff, ...]

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.rel_diff for o in self.outputs), default=0.0)

    def check(self, tolerance: float, *, split_id: str | None = None) -> None:
        """Raise VerificationError when an output differs beyond ``tolerance``."""
        for o in self.outputs:
            if not o.max_abs_diff <= tolerance * o.ref_scale:
                raise VerificationError(
                    f"head→tail differs from the full model on output {o.name!r}: "
                    f"max|diff| {o.max_abs_diff:.3g} > tolerance {tolerance:g} * "
                    f"max(1, max|reference|) = {tolerance * o.ref_scale:.3g}",
                    split_id=split_id,
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "outputs": {o.name: {"max_abs_diff": o.max_abs_diff, "ref_scale": o.ref_scale}
                        for o in self.outputs},
        }


def _ort_specs(sess: ort.InferenceSession) -> list[TensorSpec]:
    specs = []
    for arg in sess.get_inputs():
        shape = tuple(d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None)
                      for d in (arg.shape or []))
        specs.append(TensorSpec(arg.name, from_ort_type(arg.type), shape))
    return specs


def verify_split(model_path: str | Path, head_path: str | Path | None,
                 tail_path: str | Path | None, samples: Mapping[str, Array], *,
                 cut_specs: Sequence[TensorSpec] = ()) -> VerifyReport:
    """Run the full model and head→tail on ``samples``; report the largest differences.

    A baseline has one half: no head (cloud_only: the tail reads the model inputs) or no
    tail (edge_only: the head's outputs are the answer). ``cut_specs``, when given, are
    checked against what the head really emits, so a manifest can never promise a dtype
    or shape the head does not produce.
    """
    if head_path is None and tail_path is None:
        raise BadInputError("verify_split needs a head, a tail or both")
    full = ort_session(model_path, what=str(model_path))
    head = None if head_path is None else ort_session(
        head_path, error=VerificationError, what=f"the head {head_path}")
    tail = None if tail_path is None else ort_session(
        tail_path, error=VerificationError, what=f"the tail {tail_path}")
    specs = _ort_specs(full)
    checked = check_samples(samples, specs, extra="ignore")
    head_in = [a.name for a in head.get_inputs()] if head is not None else []
    tail_in = [a.name for a in tail.get_inputs()] if tail is not None else []
    out_names = [a.name for a in full.get_outputs()]
    worst: dict[str, list[float]] = {n: [0.0, 1.0] for n in out_names}
    count = 0
    for feed in batches(checked, specs):
        count += 1
        try:
            ref = dict(zip(out_names, full.run(out_names, feed), strict=True))
        except Exception as exc:
            raise BadInputError(f"the full model fails on the samples: {_first_line(exc)}"
                                ) from exc
        try:
            mid = dict(feed) if head is None else dict(zip(
                [o.name for o in head.get_outputs()],
                head.run(None, {k: feed[k] for k in head_in}), strict=True))
            got = mid if tail is None else dict(zip(
                [o.name for o in tail.get_outputs()],
                tail.run(None, {k: mid[k] for k in tail_in}), strict=True))
        except KeyError as exc:
            raise VerificationError(f"the tail needs {exc} which the head does not emit") from exc
        except Exception as exc:
            raise VerificationError(f"head→tail fails to run: {_first_line(exc)}") from exc
        for spec in cut_specs:
            try:
                spec.check(np.asarray(mid[spec.name]), batched=bool(spec.shape))
            except TensorError as exc:
                raise VerificationError(f"the head's output differs from the manifest: {exc}"
                                        ) from exc
        for name in out_names:
            if name not in got:
                raise VerificationError(f"the tail does not produce output {name!r}")
            diff, scale = _diff(name, ref[name], got[name])
            worst[name][0] = max(worst[name][0], diff)
            worst[name][1] = max(worst[name][1], scale)
    report = VerifyReport(count, tuple(OutputDiff(n, d, s) for n, (d, s) in worst.items()))
    log.info("verified on %d batch(es): max|diff| %.3g", count, report.max_abs_diff)
    return report


def _diff(name: str, ref: Any, got: Any) -> tuple[float, float]:
    """Largest |ref - got| and max(1, max|ref|); NaN where both are NaN counts as equal."""
    r, g = np.asarray(ref), np.asarray(got)
    if r.shape != g.shape:
        raise VerificationError(f"output {name!r}: full model gives shape {r.shape}, "
                                f"head→tail gives {g.shape}")
    if r.size == 0:
        return 0.0, 1.0
    if not (np.issubdtype(r.dtype, np.number) or r.dtype == np.bool_):
        return (0.0 if np.array_equal(r, g) else float("inf")), 1.0
    r64, g64 = r.astype(np.float64), g.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(r64 - g64)
    same = (r64 == g64) | (np.isnan(r64) & np.isnan(g64))
    d = np.where(same, 0.0, np.where(np.isnan(d), np.inf, d))
    finite = np.abs(r64[np.isfinite(r64)])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    return float(d.max()), scale
