"""``split_model``: cut a model file into head.onnx + tail.onnx + manifest.json, verified.

Two cuts are the baselines every split is judged against, written the same way:
``cloud_only`` (the cut is the graph input: no head, ``tail.onnx`` is the whole model) and
``edge_only`` (the cut is the graph output: ``head.onnx`` is the whole model, no tail).

The manifest is written last, and only when verification passed (or was skipped): a split
directory with a manifest is one workers may serve, so a failed split must not leave one.

A cloud_only split may send its image input JPEG/PNG-encoded (``input_codec``, see
:mod:`splitinfer.imagecodec`): its own split id (the raw one + ``-jpeg90``), the codec in
the manifest, and what it costs measured on the samples (:func:`measure_codec`:
``verification.input_codec`` = bytes per sample after encoding and the share of samples
whose answer matches the uncompressed model's).

Wire compression (``compression``, :mod:`splitinfer.compression`): ``"zstd"``/``"lz4"``
sets the manifest's ``compression`` to that codec; ``"auto"`` runs the head on the samples,
measures the codecs of :data:`~splitinfer.compression.AUTO_CODECS` on its outputs (the
cut tensors a device sends, batch 1 unless the files fix another) and keeps the one that
pays on the reference link, or none; ``"none"`` / None leaves the manifest uncompressed.

Head format (``head_format``): ``"tflite"`` also converts the head to ``head.tflite``
(:mod:`splitter.tflite`, the ``splitter-tflite`` extra), records it as the manifest's
``head_tflite`` and its comparison with the ONNX head on the samples as
``verification.tflite``; a conversion that fails, or agrees on fewer than
``tflite_min_agreement`` of the samples, fails the split (no manifest written).
The measurement is written to ``verification.compression``
(:func:`splitinfer.compression.report`: raw and compressed bytes per request, codec
times, whether each pays, the choice). Give real ``samples``: generated inputs are
noise, and so is how well their activations compress.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import splitinfer
from splitinfer.errors import BadInputError, SplitInferError, VerificationError
from splitinfer.imagecodec import CodecSpec, ImageCodec, image_layout, make_codec, parse_spec
from splitinfer.manifest import (
    MANIFEST_NAME,
    Dim,
    FileRef,
    Manifest,
    TensorSpec,
    make_split_id,
    sha256_file,
)
from splitter.cuts import cut_costs, plan_cut
from splitter.extract import build_halves, build_whole, save_half
from splitter.graph import GraphIndex, InputShapes, load_model
from splitter.tflite import TFLITE_NAME
from splitter.verify import (
    batches,
    check_samples,
    input_specs,
    load_npz,
    make_samples,
    ort_session,
    verify_split,
)

__all__ = ["SplitResult", "split_model", "cut_kind", "shapes_from_samples", "measure_codec",
           "codec_input", "COMPRESSION_CHOICES", "HEAD_FORMATS", "cut_arrays", "cut_requests",
           "measure_compression"]

log = logging.getLogger(__name__)
Samples = str | Path | Mapping[str, np.ndarray[Any, Any]] | None
COMPRESSION_CHOICES = ("auto", "zstd", "lz4", "none")
HEAD_FORMATS = ("onnx", "tflite")
MAX_COMPRESSION_SAMPLES = 16  # requests the codecs are measured on


@dataclass(frozen=True)
class SplitResult:
    split_id: str
    head: Path | None  # None for a cloud_only split
    tail: Path | None  # None for an edge_only split
    manifest: Path
    manifest_obj: Manifest
    max_abs_diff: float | None  # None when verification was skipped
    max_rel_diff: float | None

    @property
    def kind(self) -> str:
        return self.manifest_obj.kind

    def to_dict(self) -> dict[str, Any]:
        return {
            "split_id": self.split_id,
            "kind": self.kind,
            "head": str(self.head) if self.head is not None else None,
            "tail": str(self.tail) if self.tail is not None else None,
            "manifest": str(self.manifest),
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "verified": self.max_abs_diff is not None,
            "cut": [s.to_dict() for s in self.manifest_obj.cut],
            "bytes_per_sample": self.manifest_obj.bytes_per_sample,
            **({"input_codec": self.manifest_obj.input_codec,
                "codec_cost": self.manifest_obj.verification.get("input_codec")}
               if self.manifest_obj.input_codec else {}),
            "compression": self.manifest_obj.compression,
            **({"compression_measured": self.manifest_obj.verification["compression"]}
               if "compression" in self.manifest_obj.verification else {}),
            **({"analysis": self.manifest_obj.extra["analysis"]}
               if "analysis" in self.manifest_obj.extra else {}),
            **({"head_tflite": self.manifest_obj.head_tflite.path,
                "tflite": self.manifest_obj.verification.get("tflite")}
               if self.manifest_obj.head_tflite is not None else {}),
        }


def split_model(
    model: str | Path,
    cut: Sequence[str] | str,
    out_dir: str | Path,
    *,
    samples: Samples = None,
    num_samples: int = 8,
    tolerance: float = 1e-5,
    verify: bool = True,
    model_name: str | None = None,
    seed: int = 0,
    external_data: bool | None = None,
    input_shapes: InputShapes | None = None,
    fix_shapes: bool = False,
    input_codec: str | CodecSpec | None = None,
    compression: str | None = None,
    head_format: str = "onnx",
    tflite_min_agreement: float = 0.99,
) -> SplitResult:
    """Cut ``model`` at the tensors ``cut`` (names, or one comma-separated string).

    ``cut`` may also name a baseline: the graph inputs (or ``"cloud_only"``) or the graph
    outputs (or ``"edge_only"``). ``input_shapes`` (input name → dims) fixes dynamic dims
    for the costs and the generated samples; ``samples`` imply them when not given. The
    artifacts keep the model's dynamic dims unless ``fix_shapes``.

    Raises BadInputError for a bad file, name, cut or samples, and VerificationError when
    head→tail differs from the full model by more than ``tolerance`` relative to the
    output's scale. ``external_data``: None writes the halves' weights to a side file only
    past 2 GB; True always; False never. ``input_codec`` (``raw``, ``png``, ``jpeg:Q``;
    cloud_only only) sends the image input encoded; its float range and its cost come from
    the samples (generated ones when none are given). ``compression`` (``auto``, ``zstd``,
    ``lz4``, ``none``/None): the manifest's wire compression (module docstring).
    ``head_format`` ``"tflite"``: also ``head.tflite``, verified (module docstring).
    """
    codec_spec = parse_spec(input_codec) if isinstance(input_codec, str) else input_codec
    if codec_spec is not None and codec_spec.codec == "raw":
        codec_spec = None
    mode = _compression_mode(compression)
    if head_format not in HEAD_FORMATS:
        raise BadInputError(f"--head-format {head_format!r}: expected one of "
                            f"{', '.join(HEAD_FORMATS)}")
    if not 0.0 <= tflite_min_agreement <= 1.0:
        raise BadInputError(f"--tflite-min-agreement must be in [0, 1], got "
                            f"{tflite_min_agreement!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise BadInputError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    source = Path(model)
    proto = load_model(source)
    data = _load_samples(proto, samples) if verify or samples is not None else None
    if data is not None and not input_shapes:
        input_shapes = shapes_from_samples(proto, data)
    if fix_shapes and not input_shapes:
        raise BadInputError("--fix-shapes needs --input-shape (or --samples) to know which "
                            "dims to fix")
    index = GraphIndex(proto, base_dir=source.parent, input_shapes=input_shapes,
                       fix_shapes=fix_shapes)
    names = _cut_names(index, cut)
    kind = cut_kind(index, names)
    if codec_spec is not None and kind != "cloud_only":
        raise BadInputError(f"--input-codec {codec_spec}: only the cloud_only baseline sends "
                            f"its input encoded; this cut is a {kind} (use --at cloud_only)")
    if mode not in (None, "auto") and kind == "edge_only":
        raise BadInputError(f"--compression {mode}: an edge_only split sends nothing to "
                            "compress (use auto or none)")
    if mode not in (None, "auto") and codec_spec is not None:
        raise BadInputError(f"--compression {mode} with --input-codec {codec_spec}: the image "
                            "codec already compresses the input; use one or the other")
    if kind == "edge_only" or codec_spec is not None:
        mode = None  # auto: nothing (else) to compress
    if head_format == "tflite" and kind == "cloud_only":
        raise BadInputError("--head-format tflite: a cloud_only split has no head to convert "
                            "(the device sends its inputs)")
    # One onnxruntime typing run (if any is needed) for everything typed below.
    index.ensure_types([*index.inputs, *index.outputs, *index.live_tensors()])
    inputs = tuple(index.artifact_spec(n) for n in index.inputs)
    outputs = tuple(index.artifact_spec(n) for n in index.outputs)
    if kind == "cloud_only":
        cut_names: tuple[str, ...] = tuple(index.inputs)
    elif kind == "edge_only":
        cut_names = tuple(index.outputs)
    else:
        plan = plan_cut(index, names)
        cut_names = plan.tensors
    specs = {n: index.artifact_spec(n) for n in cut_names}
    if (verify or codec_spec is not None or mode is not None or head_format == "tflite") \
            and data is None:
        data = make_samples(index.analysis_model, num_samples, seed)
    codec = None
    if codec_spec is not None and data is not None:
        target = codec_input(list(inputs))
        codec = make_codec(codec_spec, target.name, target.dtype, target.shape,
                           data.get(target.name))

    source_sha = sha256_file(source)
    name = model_name or source.stem
    split_id = make_split_id(name, source_sha, cut_names)
    if codec is not None:
        split_id = f"{split_id}-{codec.spec.suffix}"
    metadata = {"split_id": split_id, "source_sha256": source_sha, "cut": ",".join(cut_names),
                "kind": kind}
    if kind == "split":
        head, tail = build_halves(index, plan, specs, metadata=metadata)
        halves: dict[str, onnx.ModelProto] = {"head": head, "tail": tail}
    else:
        part = "tail" if kind == "cloud_only" else "head"
        halves = {part: build_whole(index, part=part, metadata=metadata)}

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create output directory {out}: {exc}") from exc
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # never leave a stale, verified-looking one
    (out / TFLITE_NAME).unlink(missing_ok=True)  # nor a head.tflite of another cut
    paths = {"head": out / "head.onnx", "tail": out / "tail.onnx"}
    for part, path in paths.items():
        if part not in halves:  # a baseline has one file; a stale other half would mislead
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".data").unlink(missing_ok=True)
    side_files = {
        part: save_half(half, paths[part], base_dir=index.base_dir, external_data=external_data)
        for part, half in halves.items()
    }
    head_path = paths["head"] if "head" in halves else None
    tail_path = paths["tail"] if "tail" in halves else None
    _check_halves(source, [p for p in (head_path, tail_path) if p is not None])

    verification: dict[str, Any] = {"skipped": True}
    abs_diff = rel_diff = None
    if verify and data is not None:
        report = verify_split(source, head_path, tail_path, data,
                              cut_specs=[specs[n] for n in cut_names] if kind == "split"
                              else ())
        try:
            report.check(tolerance, split_id=split_id)
        except VerificationError as exc:
            left = " and ".join(p.name for p in (head_path, tail_path) if p is not None)
            raise VerificationError(f"{exc.message}; {left} left in {out} for inspection, "
                                    "no manifest written", split_id=split_id) from None
        abs_diff, rel_diff = report.max_abs_diff, report.max_rel_diff
        verification = {"max_abs_diff": abs_diff, "max_rel_diff": rel_diff,
                        "samples": len(next(iter(data.values()))) if data else 0,
                        "tolerance": tolerance}
    if codec is not None and data is not None:
        verification["input_codec"] = measure_codec(source, codec, data, list(inputs))
    chosen: str | None = None
    if mode is not None and data is not None:
        requests = cut_requests(head_path, data, list(inputs), cut_names)
        measured = measure_compression(requests, mode)
        chosen = measured["choice"]
        verification["compression"] = measured
        log.info("split %s: compression %s (%s)", split_id, chosen or "none", mode)
    tflite_ref = None
    versions = {"splitinfer": splitinfer.__version__, "onnx": onnx.__version__,
                "onnxruntime": ort.__version__}
    if head_format == "tflite" and head_path is not None and data is not None:
        tflite_ref, verification["tflite"] = _tflite_head(
            head_path, tail_path, out, inputs, [specs[n] for n in cut_names], data,
            tflite_min_agreement, split_id)
        from splitter.tflite import converter_versions

        versions.update(converter_versions())
    extra: dict[str, Any] = dict(cut_costs(index, cut_names))
    if index.input_shapes:
        analysed = [index.spec(n).bytes_per_sample() for n in cut_names]
        extra["analysis"] = {
            "input_shapes": {k: list(v) for k, v in index.input_shapes.items()},
            "fixed_in_artifacts": fix_shapes,
            "bytes_per_sample": 0 if kind == "edge_only" else (
                None if None in analysed else sum(b for b in analysed if b is not None)),
            "cut": [index.spec(n).to_dict() for n in cut_names],
        }
    extra["metadata_keys"] = sorted(f"splitinfer.{k}" for k in (*metadata, "part"))
    files = {p: {"path": f.name, "sha256": sha256_file(f)} for p, f in side_files.items() if f}
    if files:
        extra["external_data"] = files
    manifest = Manifest(
        split_id=split_id,
        model=name,
        source=FileRef(source.name, source_sha),
        head=FileRef(head_path.name, sha256_file(head_path)) if head_path else None,
        tail=FileRef(tail_path.name, sha256_file(tail_path)) if tail_path else None,
        inputs=inputs,
        cut=tuple(specs[n] for n in cut_names),
        outputs=outputs,
        opsets={o.domain or "": int(o.version) for o in index.model.opset_import},
        versions=versions,
        verification=verification,
        extra=extra,
        kind=kind,
        input_codec=codec.to_dict() if codec is not None else None,
        compression=chosen,
        head_tflite=tflite_ref,
    )
    manifest_path = manifest.save(out)
    log.info("split %s (%s) written to %s", split_id, kind, out)
    return SplitResult(split_id, head_path, tail_path, manifest_path, manifest, abs_diff,
                       rel_diff)


CLOUD_ONLY, EDGE_ONLY = "cloud_only", "edge_only"


def _tflite_head(head: Path, tail: Path | None, out: Path, inputs: Sequence[TensorSpec],
                 cut: Sequence[TensorSpec], data: Mapping[str, np.ndarray[Any, Any]],
                 min_agreement: float, split_id: str) -> tuple[Any, dict[str, Any]]:
    """``head.tflite`` converted and verified (:mod:`splitter.tflite`): its manifest entry
    and ``verification.tflite``. A failure leaves the files for inspection, no manifest."""
    from splitter.tflite import TfliteConversionError, convert_head, verify_tflite

    try:
        converted = convert_head(head, out / TFLITE_NAME, inputs=inputs, cut=cut,
                                 samples=data)
        report = verify_tflite(converted, head, tail, inputs=inputs, cut=cut, samples=data,
                               min_agreement=min_agreement, split_id=split_id)
    except (TfliteConversionError, VerificationError) as exc:
        raise type(exc)(f"{exc.message}; the ONNX split is left in {out}, no manifest "
                        "written", split_id=split_id) from exc
    log.info("split %s: head.tflite %d bytes, agreement %.4f (%s), max|diff| at the cut %.3g",
             split_id, report["tflite_bytes"], report["agreement"], report["match"],
             report["max_abs_diff_cut"])
    return converted.ref, report


def _compression_mode(compression: str | None) -> str | None:
    """``auto`` or a codec (checked installed here), None for ``none``/None."""
    from splitinfer.compression import supported

    if compression is None or compression == "none":
        return None
    if compression not in COMPRESSION_CHOICES:
        raise BadInputError(f"--compression {compression!r}: expected one of "
                            f"{', '.join(COMPRESSION_CHOICES)}")
    if compression != "auto" and compression not in supported():
        raise BadInputError(f"--compression {compression}: its binding is not installed here "
                            f"(installed: {list(supported()) or 'none'}); pip install "
                            f"{'zstandard' if compression == 'zstd' else 'lz4'}")
    return compression


def cut_arrays(head: Path | None, samples: Mapping[str, np.ndarray[Any, Any]],
               inputs: Sequence[TensorSpec], cut_names: Sequence[str], *,
               limit: int = MAX_COMPRESSION_SAMPLES) -> list[dict[str, np.ndarray[Any, Any]]]:
    """The cut tensors of each request a device would send for ``samples``: the head's
    outputs (``head`` None: the inputs, a cloud_only split), one request per sample, or
    per fixed batch when the files fix one; at most ``limit`` requests."""
    from splitinfer.batches import padded_chunks

    session = ort_session(head, what=str(head)) if head is not None else None
    shapes = ({str(i.name): list(i.shape) for i in session.get_inputs()} if session is not None
              else {s.name: list(s.shape) for s in inputs})
    fixed = next((d[0] for d in shapes.values() if d and isinstance(d[0], int) and d[0] > 0),
                 1)
    feeds = padded_chunks({n: samples[n] for n in shapes}, fixed)[:limit]
    out: list[dict[str, np.ndarray[Any, Any]]] = []
    for feed in feeds:
        values = dict(zip(cut_names, session.run(list(cut_names), feed), strict=True)) \
            if session is not None else feed
        out.append({n: np.ascontiguousarray(values[n]) for n in cut_names})
    return out


def cut_requests(head: Path | None, samples: Mapping[str, np.ndarray[Any, Any]],
                 inputs: Sequence[TensorSpec], cut_names: Sequence[str], *,
                 limit: int = MAX_COMPRESSION_SAMPLES) -> list[list[bytes]]:
    """The raw bytes of :func:`cut_arrays`, per request in ``cut_names`` order."""
    return [[r[n].tobytes() for n in cut_names]
            for r in cut_arrays(head, samples, inputs, cut_names, limit=limit)]


def measure_compression(requests: Sequence[Sequence[bytes]], mode: str) -> dict[str, Any]:
    """The codecs on ``requests`` (:func:`splitinfer.compression.report`) and the choice:
    ``auto`` keeps what pays among :data:`~splitinfer.compression.AUTO_CODECS`; a named
    codec is kept as asked (a warning when it does not pay on these samples)."""
    from splitinfer.compression import AUTO_CODECS, report, supported

    candidates = [c for c in AUTO_CODECS if c in supported()] if mode == "auto" else [mode]
    measured = report(requests, candidates)
    if mode != "auto":
        if not measured["codecs"][mode]["pays"]:
            log.warning("--compression %s does not pay on these samples (%s); kept as asked",
                        mode, measured["codecs"][mode])
        measured["choice"] = mode
    return {"mode": mode, **measured}


def codec_input(inputs: Sequence[TensorSpec]) -> TensorSpec:
    """The model input an image codec applies to: the first image-like one."""
    reasons = []
    for spec in inputs:
        try:
            image_layout(spec.shape, spec.dtype, name=spec.name)
            return spec
        except BadInputError as exc:
            reasons.append(exc.message)
    raise BadInputError("no model input is an image an input codec can carry: "
                        + "; ".join(reasons))


def measure_codec(model: str | Path, codec: ImageCodec, samples: Mapping[str, Any],
                  inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """What ``codec`` costs on ``samples``: encoded bytes per sample and agreement.

    ``agreement``: the share of samples whose answer through the codec matches the
    uncompressed model's: the argmax of the first output for a classifier (first output
    of rank 2 with 2+ classes), else every value within 1% of the sample's largest
    magnitude (at least 1) — the ``"match"`` key says which.
    """
    images = codec.encode(np.asarray(samples[codec.input]))
    decoded = codec.decode(images, list(samples[codec.input].shape), codec.dtype)
    coded = {**samples, codec.input: decoded}
    session = ort_session(model, what=str(model))
    first = session.get_outputs()[0].name
    refs, gots = [], []
    for ref_feed, coded_feed in zip(batches(samples, inputs), batches(coded, inputs),
                                    strict=True):
        refs.append(np.asarray(session.run([first], ref_feed)[0]))
        gots.append(np.asarray(session.run([first], coded_feed)[0]))
    ref, got = np.concatenate(refs), np.concatenate(gots)
    classifier = ref.ndim == 2 and ref.shape[1] > 1 and ref.dtype.kind == "f"
    if classifier:
        same = ref.argmax(axis=1) == got.argmax(axis=1)
    else:
        flat_ref = ref.reshape(len(ref), -1).astype(np.float64)
        flat_got = got.reshape(len(got), -1).astype(np.float64)
        bound = 0.01 * np.maximum(1.0, np.abs(flat_ref).max(axis=1, initial=0.0))
        same = (np.abs(flat_got - flat_ref).max(axis=1, initial=0.0) <= bound)
    raw = samples[codec.input]
    return {
        "codec": str(codec.spec),
        "samples": len(same),
        "bytes_per_sample": round(sum(len(b) for b in images) / max(len(images), 1)),
        "raw_bytes_per_sample": int(raw[0].nbytes) if len(raw) else 0,
        "agreement": float(same.mean()) if len(same) else None,
        "match": "argmax" if classifier else "allclose",
        "max_abs_diff": float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0,
    }


def cut_kind(index: GraphIndex, names: Sequence[str]) -> str:
    """"cloud_only" for the graph inputs (or that alias), "edge_only" for the graph
    outputs (or that alias), else "split"."""
    wanted = set(names)
    known = set(index.producer) | set(index.input_vi)
    if wanted == {CLOUD_ONLY} and CLOUD_ONLY not in known:
        return CLOUD_ONLY
    if wanted == {EDGE_ONLY} and EDGE_ONLY not in known:
        return EDGE_ONLY
    consumed = {n for n in index.inputs if n in index.consumers or n in index.outputs}
    if wanted and (wanted == set(index.inputs) or wanted == consumed):
        return CLOUD_ONLY
    if wanted and wanted == set(index.outputs):
        return EDGE_ONLY
    return "split"


def shapes_from_samples(model: onnx.ModelProto, data: Mapping[str, np.ndarray[Any, Any]]
                        ) -> dict[str, tuple[Dim, ...]]:
    """Input shapes the sample arrays imply: their dims where the model leaves one open
    (the first axis, the samples, stays the model's)."""
    shapes: dict[str, tuple[Dim, ...]] = {}
    for spec in input_specs(model):
        arr = data.get(spec.name)
        if arr is None or arr.ndim != len(spec.shape) or not spec.shape:
            continue
        dims: list[Dim] = [spec.shape[0] if spec.shape[0] is not None else "N"]
        dims += [d if isinstance(d, int) else int(g)
                 for d, g in zip(spec.shape[1:], arr.shape[1:], strict=True)]
        if tuple(dims[1:]) != tuple(spec.shape[1:]):
            shapes[spec.name] = tuple(dims)
    return shapes


def _cut_names(index: GraphIndex, cut: Sequence[str] | str) -> list[str]:
    if isinstance(cut, str):
        raw = cut.strip()
        if raw in index.producer or raw in index.input_vi:  # a name that holds a comma
            return [raw]
        return [part.strip() for part in raw.split(",") if part.strip()]
    return [str(c).strip() for c in cut]


def _load_samples(model: onnx.ModelProto, samples: Samples
                  ) -> dict[str, np.ndarray[Any, Any]] | None:
    if samples is None:
        return None
    inputs = input_specs(model)
    if isinstance(samples, Mapping):
        return check_samples(samples, inputs)
    return load_npz(samples, inputs)


def _check_halves(source: Path, parts: Sequence[Path]) -> None:
    """Run the ONNX checker on the halves when the source itself passes it."""
    try:
        onnx.checker.check_model(str(source))
    except Exception as exc:  # custom domains etc.: the source is out of the checker's reach
        log.debug("source fails the ONNX checker (%s); halves not checked", exc)
        return
    for part in parts:
        try:
            onnx.checker.check_model(str(part))
        except Exception as exc:
            raise SplitInferError(f"{part} fails the ONNX checker: {exc}") from exc
