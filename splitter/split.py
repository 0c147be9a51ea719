"""``split_model``: cut a model file into head.onnx + tail.onnx + manifest.json, verified.

The manifest is written last, and only when verification passed (or was skipped): a split
directory with a manifest is one workers may serve, so a failed split must not leave one.
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
from splitinfer.manifest import (
    MANIFEST_NAME,
    FileRef,
    Manifest,
    TensorSpec,
    make_split_id,
    sha256_file,
)
from splitter.cuts import cut_costs, open_index, plan_cut, spec_map
from splitter.extract import build_halves, save_half
from splitter.graph import GraphIndex
from splitter.verify import check_samples, load_npz, make_samples, verify_split

__all__ = ["SplitResult", "split_model"]

log = logging.getLogger(__name__)
Samples = str | Path | Mapping[str, np.ndarray[Any, Any]] | None


@dataclass(frozen=True)
class SplitResult:
    split_id: str
    head: Path
    tail: Path
    manifest: Path
    manifest_obj: Manifest
    max_abs_diff: float | None  # None when verification was skipped
    max_rel_diff: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "split_id": self.split_id,
            "head": str(self.head),
            "tail": str(self.tail),
            "manifest": str(self.manifest),
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "verified": self.max_abs_diff is not None,
            "cut": [s.to_dict() for s in self.manifest_obj.cut],
            "bytes_per_sample": self.manifest_obj.bytes_per_sample,
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
) -> SplitResult:
    """Cut ``model`` at the tensors ``cut`` (names, or one comma-separated string).

    Raises BadInputError for a bad file, name, cut or samples, and VerificationError when
    head→tail differs from the full model by more than ``tolerance`` relative to the
    output's scale. ``external_data``: None writes the halves' weights to a side file only
    past 2 GB; True always; False never.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise BadInputError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    source = Path(model)
    index = open_index(source)
    names = _cut_names(index, cut)
    plan = plan_cut(index, names)
    # One onnxruntime typing run (if any is needed) for everything typed below.
    index.ensure_types([*index.inputs, *index.outputs, *index.live_tensors()])
    specs = spec_map(index, plan.tensors)
    inputs = tuple(index.spec(n) for n in index.inputs)
    outputs = tuple(index.spec(n) for n in index.outputs)
    data = _samples(index, inputs, samples, num_samples, seed) if verify else None

    source_sha = sha256_file(source)
    name = model_name or source.stem
    split_id = make_split_id(name, source_sha, plan.tensors)
    metadata = {"split_id": split_id, "source_sha256": source_sha, "cut": ",".join(plan.tensors)}
    head, tail = build_halves(index, plan, specs, metadata=metadata)

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create output directory {out}: {exc}") from exc
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # never leave a stale, verified-looking one
    head_path, tail_path = out / "head.onnx", out / "tail.onnx"
    side_files = {
        part: save_half(half, path, base_dir=index.base_dir, external_data=external_data)
        for part, half, path in (("head", head, head_path), ("tail", tail, tail_path))
    }
    _check_halves(source, head_path, tail_path)

    verification: dict[str, Any] = {"skipped": True}
    abs_diff = rel_diff = None
    if data is not None:
        report = verify_split(source, head_path, tail_path, data,
                              cut_specs=[specs[n] for n in plan.tensors])
        try:
            report.check(tolerance, split_id=split_id)
        except VerificationError as exc:
            raise VerificationError(f"{exc.message}; {head_path.name} and {tail_path.name} "
                                    f"are left in {out} for inspection, no manifest written",
                                    split_id=split_id) from None
        abs_diff, rel_diff = report.max_abs_diff, report.max_rel_diff
        verification = {"max_abs_diff": abs_diff, "max_rel_diff": rel_diff,
                        "samples": len(next(iter(data.values()))) if data else 0,
                        "tolerance": tolerance}
    extra: dict[str, Any] = dict(cut_costs(index, plan.tensors))
    extra["metadata_keys"] = sorted(f"splitinfer.{k}" for k in (*metadata, "part"))
    files = {p: {"path": f.name, "sha256": sha256_file(f)} for p, f in side_files.items() if f}
    if files:
        extra["external_data"] = files
    manifest = Manifest(
        split_id=split_id,
        model=name,
        source=FileRef(source.name, source_sha),
        head=FileRef(head_path.name, sha256_file(head_path)),
        tail=FileRef(tail_path.name, sha256_file(tail_path)),
        inputs=inputs,
        cut=tuple(specs[n] for n in plan.tensors),
        outputs=outputs,
        opsets={o.domain or "": int(o.version) for o in index.model.opset_import},
        versions={"splitinfer": splitinfer.__version__, "onnx": onnx.__version__,
                  "onnxruntime": ort.__version__},
        verification=verification,
        extra=extra,
    )
    manifest_path = manifest.save(out)
    log.info("split %s written to %s", split_id, out)
    return SplitResult(split_id, head_path, tail_path, manifest_path, manifest, abs_diff,
                       rel_diff)


def _cut_names(index: GraphIndex, cut: Sequence[str] | str) -> list[str]:
    if isinstance(cut, str):
        raw = cut.strip()
        if raw in index.producer or raw in index.input_vi:  # a name that holds a comma
            return [raw]
        return [part.strip() for part in raw.split(",") if part.strip()]
    return [str(c).strip() for c in cut]


def _samples(index: GraphIndex, inputs: Sequence[TensorSpec], samples: Samples,
             num_samples: int, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    if samples is None:
        return make_samples(index.model, num_samples, seed)
    if isinstance(samples, Mapping):
        return check_samples(samples, inputs)
    return load_npz(samples, inputs)


def _check_halves(source: Path, head: Path, tail: Path) -> None:
    """Run the ONNX checker on the halves when the source itself passes it."""
    try:
        onnx.checker.check_model(str(source))
    except Exception as exc:  # custom domains etc.: the source is out of the checker's reach
        log.debug("source fails the ONNX checker (%s); halves not checked", exc)
        return
    for part in (head, tail):
        try:
            onnx.checker.check_model(str(part))
        except Exception as exc:
            raise SplitInferError(f"{part} fails the ONNX checker: {exc}") from exc
