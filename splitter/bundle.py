"""``splitinfer bundle``: every candidate split of one model, in one folder, verified.

The bundle is what the planner, the profiler, the adaptive device and the worker share:
one split directory per candidate cut (each a normal ``split`` output, verified), the two
baselines ``edge_only/`` and ``cloud_only/`` and, for an image input, one more cloud-only
directory per input codec (``cloud_only_jpeg90/``, ``cloud_only_png/``), described by
``bundle.json`` (:mod:`splitinfer.bundle`).

Which cuts (``--cuts``):

- ``auto`` (default): up to :data:`AUTO_CUTS` Pareto-useful cuts. A cut is dropped when
  another candidate (the baselines included) sends fewer bytes per sample AND leaves less
  compute on the head: it can never be faster wherever the device is slower than the
  worker. In a quantized model only int8 cuts are candidates (4x fewer bytes than the
  float tensor beside them, and bit-exact). Multi-tensor cuts (inside residual blocks, up
  to ``--max-tensors``) compete on the same terms: they stay where cheaper. The strict
  front comes first (no other cut with no more bytes and no more head compute); a cut
  that only ties a shallower one on bytes (more compute on the device, less on a loaded
  worker) fills in when that front is short. The choice is spread over the depth of the
  model: farthest-point sampling in (head FLOPs share, log bytes), seeded with the two
  baselines, so the candidates differ from each other and from the baselines.
- ``K``: the K best by that same rule.
- ``NAME,NAME,…``: these cuts (tensor names as ``inspect`` lists them; a multi-tensor cut
  joins its tensors with ``+``: ``a+b``).

The codecs' accuracy cost is measured over the samples (``--samples``, else generated)
and written beside each codec directory in ``bundle.json``: ``agreement`` (share of
samples with the uncompressed model's answer), ``match`` (``argmax`` or ``allclose``),
``raw_bytes_per_sample``. Rebuilding a bundle into the same folder removes the split
directories of the previous bundle that the new one no longer has (a worker would serve
them), and nothing else.

Wire compression (``--compression auto|zstd|lz4|none``, default none): every split that
sends raw tensors (the cuts and the raw ``cloud_only``) gets it in its manifest, ``auto``
measured per split on the samples (``splitter.split``); ``bundle.json`` then lists each
such split's ``compression`` and ``compressed_bytes_per_request`` (its ``bytes_per_sample``
stays the raw size the planner's other figures use).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitinfer.cli import env_default
from splitinfer.errors import EXIT_OK

if TYPE_CHECKING:
    import numpy as np

    from splitinfer.bundle import Bundle, BundleSplit
    from splitter.cuts import Cut

__all__ = ["AUTO_CUTS", "register", "run_bundle", "build_bundle", "select_cuts", "pareto",
           "BundleResult"]

AUTO_CUTS = 5
_SHARE_EPS = 1e-3  # 0.1% of the model's FLOPs
_OURS = re.compile(r"^(cut_\w+|edge_only|cloud_only(_\w+)?)$")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from splitter.cli import _add_input_shape, add_compression

    p = subparsers.add_parser(
        "bundle", help="write every candidate split of a model (+ baselines) into one folder",
        description="Write one verified split directory per candidate cut, edge_only/, "
        "cloud_only/ and (image inputs) one cloud_only directory per input codec, and "
        "DIR/bundle.json listing them with their bytes per sample and head FLOPs share.")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="the bundle folder")
    p.add_argument("--cuts", default=env_default("--cuts", "auto"),
                   metavar="auto|K|NAME,…",
                   help=f"auto: up to {AUTO_CUTS} Pareto-useful cuts spread over the depth "
                   "(default); K: the K best by that rule; or tensor names, one cut each "
                   "(a+b: a cut of two tensors)")
    p.add_argument("--max-tensors", type=int, default=3, metavar="K",
                   help="consider cuts of at most K crossing tensors (default 3)")
    p.add_argument("--samples", metavar="FILE.npz", default=env_default("--samples"),
                   help="inputs to verify on and to measure the codecs with (default: "
                   "generated)")
    p.add_argument("--num-samples", type=int, default=16, metavar="N",
                   help="generated samples when --samples is not given (default 16)")
    p.add_argument("--input-codec", metavar="raw,jpeg:90,png", default=None,
                   help="cloud_only input codecs (default: raw,jpeg:90 for an image input, "
                   "raw otherwise)")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="verification tolerance, as for split (default 1e-5)")
    p.add_argument("--name", metavar="MODEL", help="model name for the split ids (default: "
                   "the file's stem)")
    p.add_argument("--seed", type=int, default=0, help="seed for generated samples")
    _add_input_shape(p, "for the costs and generated samples (--samples imply them)")
    add_compression(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_bundle)


@dataclass(frozen=True)
class BundleResult:
    bundle: Bundle
    path: Path  # bundle.json
    considered: int  # candidate cuts (after the int8 preference)
    pareto: int  # of which not dominated

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.path), "dir": str(self.path.parent),
                "considered": self.considered, "pareto": self.pareto,
                **self.bundle.to_dict()}


def run_bundle(args: argparse.Namespace) -> int:
    from splitter.cli import _bytes, _shapes

    result = build_bundle(args.model, args.out, cuts=args.cuts, samples=args.samples,
                          num_samples=args.num_samples, codecs=args.input_codec,
                          input_shapes=_shapes(args.model, args.input_shape),
                          tolerance=args.tolerance, model_name=args.name, seed=args.seed,
                          max_tensors=args.max_tensors, compression=args.compression)
    if args.json:
        print(json.dumps(result.to_dict()))
        return EXIT_OK
    rows = [("dir", "kind", "split_id", "bytes/sample", "head FLOPs", "codec", "agreement")]
    for s in result.bundle:
        agreement = s.extra.get("agreement")
        rows.append((s.dir, s.kind, s.split_id,
                     _bytes(s.bytes_per_sample),
                     "?" if s.head_flops_share is None else f"{100 * s.head_flops_share:.1f}%",
                     s.input_codec if s.kind == "cloud_only" else "",
                     "" if agreement is None else f"{100 * agreement:.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"bundle {result.path} ({result.bundle.model}): {len(result.bundle)} splits; "
          f"{result.pareto} of {result.considered} candidate cuts not dominated")
    for i, row in enumerate(rows):
        print("  ".join(c.rjust(w) if j in (3, 4, 6) else c.ljust(w)
                        for j, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return EXIT_OK


# -- which cuts -----------------------------------------------------------------------------

def _point(cut: Cut) -> tuple[int, float]:
    return int(cut.bytes_per_sample or 0), float(cut.head_flops_share)


def pareto(candidates: Sequence[Cut], others: Sequence[Cut] = ()) -> list[Cut]:
    """The candidates no other cut (of ``candidates`` or ``others``) dominates: fewer bytes
    AND less head compute. Of cuts at the same point (same bytes, shares within
    :data:`_SHARE_EPS`) the first is kept."""
    kept: list[Cut] = []
    pool = [*candidates, *others]
    for cut in candidates:
        b, f = _point(cut)
        if any(_point(k)[0] == b and abs(_point(k)[1] - f) <= _SHARE_EPS for k in kept):
            continue  # the same cut for the planner (a Relu after its Conv, say)
        if any(_point(o)[0] < b and _point(o)[1] < f for o in pool if o is not cut):
            continue
        kept.append(cut)
    return kept


def _weakly_dominates(o: Cut, c: Cut) -> bool:
    """``o`` sends no more bytes and leaves no more on the head (shares within
    :data:`_SHARE_EPS` count as equal: a cut whose tail is a rounding error of the model
    is the edge-only path plus a network trip), and is better in one of them."""
    (ob, of), (cb, cf) = _point(o), _point(c)
    return ob <= cb and of <= cf + _SHARE_EPS and (ob < cb or of < cf - _SHARE_EPS)


def _spread(pool: Sequence[Cut], count: int, anchors: Sequence[Cut], top: int) -> list[Cut]:
    """Farthest-point sampling in (head FLOPs share, log bytes / log max bytes)."""
    def coords(cut: Cut) -> tuple[float, float]:
        b, f = _point(cut)
        return f, math.log1p(b) / math.log1p(max(top, 1))

    placed = [coords(c) for c in anchors]
    chosen: list[Cut] = []
    left = list(pool)
    while left and len(chosen) < count:
        def gap(cut: Cut) -> float:
            x, y = coords(cut)
            return min((math.hypot(x - ax, y - ay) for ax, ay in placed), default=math.inf)
        best = max(left, key=gap)  # ties: the first, the shallower
        chosen.append(best)
        placed.append(coords(best))
        left.remove(best)
    return chosen


def select_cuts(cuts: Sequence[Cut], count: int = AUTO_CUTS) -> tuple[list[Cut], int, int]:
    """Up to ``count`` Pareto-useful cuts spread over the depth (see the module docstring).

    ``cuts``: an inspection's cuts, baselines included. Never a dominated cut (another
    with fewer bytes AND less head compute). First from the strict front (no other cut
    with no more bytes and no more compute); cuts that only tie a shallower one on bytes
    (same bytes, more compute on the device: less on a loaded worker) fill in when that
    front is shorter than ``count``. Returns (chosen cuts in depth order, how many
    candidates, how many of them not dominated).
    """
    if count < 1:
        from splitinfer.errors import BadInputError

        raise BadInputError(f"--cuts {count}: expected at least 1 cut")
    splits = [c for c in cuts if c.kind == "split" and c.bytes_per_sample is not None]
    if any(c.quantized for c in splits):
        splits = [c for c in splits if c.quantized]
    baselines = [c for c in cuts if c.kind != "split" and c.bytes_per_sample is not None]
    front = pareto(splits, baselines)
    primary = [c for c in front
               if not any(_weakly_dominates(o, c) for o in [*front, *baselines] if o is not c)]
    top = max([_point(c)[0] for c in [*front, *baselines]] or [1])
    chosen = _spread(primary, count, baselines, top)
    if len(chosen) < count:
        rest = [c for c in front if c not in primary]
        chosen += _spread(rest, count - len(chosen), [*baselines, *chosen], top)
    chosen.sort(key=lambda c: c.index)
    return chosen, len(splits), len(front)


def _named_cuts(text: str, cuts: Sequence[Cut]) -> list[tuple[str, list[str], Cut | None]]:
    """``a,b+c`` -> [(dir, names, the inspected cut if listed)]."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part or part in ("cloud_only", "edge_only"):
            continue  # the baselines are always in the bundle
        names = [n.strip() for n in part.split("+") if n.strip()]
        match = next((c for c in cuts if set(c.names) == set(names)), None)
        if match is not None and match.kind != "split":
            continue
        folder = f"cut_{match.index:02d}" if match is not None else "cut_" + re.sub(
            r"[^A-Za-z0-9_]+", "_", "_".join(names))[:60]
        out.append((folder, names, match))
    return out


# -- the bundle -----------------------------------------------------------------------------

def build_bundle(model: str | Path, out_dir: str | Path, *, cuts: str | int = "auto",
                 samples: str | Path | Mapping[str, np.ndarray[Any, Any]] | None = None,
                 num_samples: int = 16, codecs: str | Sequence[str] | None = None,
                 input_shapes: Mapping[str, tuple[Any, ...]] | None = None,
                 tolerance: float = 1e-5, model_name: str | None = None, seed: int = 0,
                 max_tensors: int = 3, compression: str | None = None) -> BundleResult:
    """Write the bundle (see the module docstring); returns it with the selection counts.

    ``compression`` (``auto``, ``zstd``, ``lz4``, ``none``): each split's wire compression,
    as ``split_model`` takes it; never on edge_only (sends nothing) nor on a cloud_only
    split with an image codec (already compressed)."""
    from splitinfer.bundle import Bundle, BundleSplit
    from splitinfer.errors import BadInputError
    from splitinfer.imagecodec import parse_spec
    from splitinfer.manifest import sha256_file
    from splitter.cuts import inspect_model, open_index
    from splitter.split import _load_samples, codec_input, shapes_from_samples, split_model
    from splitter.verify import make_samples

    source = Path(model)
    index = open_index(source, input_shapes=input_shapes)
    data = _load_samples(index.model, samples)
    if data is not None and not input_shapes:
        input_shapes = shapes_from_samples(index.model, data) or None
        if input_shapes:
            index = open_index(source, input_shapes=input_shapes)
    if data is None:
        unknown = index.unknown_dims()
        if unknown:  # the costs (and the cut choice) would count them as 1
            dims = ", ".join(f"{d['tensor']}[{d['axis']}]" + (f" ({d['name']})" if d["name"]
                                                             else "") for d in unknown)
            raise BadInputError(f"{source}: input dims {dims} are symbolic; give "
                                "--input-shape (e.g. NAME=1x3x224x224) or --samples so that "
                                "bytes and FLOPs are those of the inputs the device sends")
        data = make_samples(index.analysis_model, num_samples, seed)
    inspection = inspect_model(index, max_tensors=max_tensors)
    listed = inspection.cuts
    text = str(cuts).strip()
    considered = front = 0
    if text == "auto" or text.isdigit():
        chosen, considered, front = select_cuts(listed, AUTO_CUTS if text == "auto"
                                                else int(text))
        if not chosen:
            unsized = ", ".join(inspection.unsized_tensors[:5])
            raise BadInputError(f"{source}: no cut to choose from" + (
                f" (sizes unknown: {unsized}; give --input-shape)" if unsized else ""))
        wanted: list[tuple[str, list[str], Cut | None]] = [
            (f"cut_{c.index:02d}", list(c.names), c) for c in chosen]
    else:  # in depth order, as auto's; cuts inspect does not list go last
        wanted = sorted(_named_cuts(text, listed),
                        key=lambda w: w[2].index if w[2] is not None else len(listed))

    if codecs is None:
        try:
            codec_input(inspection.inputs)
            specs = [parse_spec("raw"), parse_spec("jpeg:90")]
        except BadInputError:
            specs = [parse_spec("raw")]
    else:
        parts = codecs.split(",") if isinstance(codecs, str) else list(codecs)
        specs = list({str(s): s for s in (parse_spec(p) for p in parts if p.strip())}.values())
        if not any(s.codec == "raw" for s in specs):
            specs.insert(0, parse_spec("raw"))  # cloud_only/ is always there

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {"samples": data, "tolerance": tolerance,
                              "model_name": model_name, "input_shapes": input_shapes}
    entries: list[BundleSplit] = []
    by_kind = {c.kind: c for c in listed if c.kind != "split"}

    def add(folder: str, cut: Sequence[str] | str, *, info: Cut | None, codec: Any = None
            ) -> None:
        plain = folder != "edge_only" and codec is None
        result = split_model(source, cut, out / folder, input_codec=codec,
                             compression=compression if plain else None, **common)
        m = result.manifest_obj
        analysis = m.extra.get("analysis") or {}
        bps = analysis.get("bytes_per_sample", m.bytes_per_sample)
        head, total = m.extra.get("head_flops"), m.extra.get("total_flops")
        share = (info.head_flops_share if info is not None else
                 (head / total if isinstance(head, int) and total else None))
        if m.kind == "cloud_only":
            share = 0.0
        elif m.kind == "edge_only":
            share = 1.0
        extra: dict[str, Any] = {"cut": [s.name for s in m.cut],
                                 "quantized": all(s.quantization is not None for s in m.cut),
                                 "max_abs_diff": result.max_abs_diff}
        measured = m.verification.get("compression")
        if measured:  # what the manifest's codec sends, per request, on the samples
            extra["compression"] = m.compression
            sent = measured["codecs"].get(m.compression or "")
            extra["compressed_bytes_per_request"] = (sent["compressed_bytes"] if sent
                                                     else measured["raw_bytes"])
        cost = m.verification.get("input_codec")
        if cost:
            bps = cost["bytes_per_sample"]
            extra.update(agreement=cost["agreement"], match=cost["match"],
                         raw_bytes_per_sample=cost["raw_bytes_per_sample"],
                         codec_samples=cost["samples"])
        entries.append(BundleSplit(split_id=m.split_id, dir=folder, kind=m.kind,
                                   bytes_per_sample=bps, head_flops_share=share,
                                   input_codec=str(cost["codec"]) if cost else "raw",
                                   extra=extra))

    add("edge_only", "edge_only", info=by_kind.get("edge_only"))
    for folder, names, info in wanted:
        add(folder, names, info=info)
    for spec in specs:
        folder = "cloud_only" if spec.codec == "raw" else f"cloud_only_{spec.suffix}"
        add(folder, "cloud_only", info=by_kind.get("cloud_only"),
            codec=None if spec.codec == "raw" else spec)

    _remove_stale(out, {e.dir for e in entries})
    bundle = Bundle(model=model_name or source.stem, source_sha256=sha256_file(source),
                    splits=tuple(entries), root=out)
    path = bundle.save(out)
    return BundleResult(bundle, path, considered, front)


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Split folders of a previous bundle here that this one does not list (a worker
    walking the folder would serve them)."""
    from splitinfer.bundle import BUNDLE_NAME, Bundle
    from splitinfer.errors import ManifestError

    if not (out / BUNDLE_NAME).is_file():
        return
    try:
        old = {s.dir for s in Bundle.load(out)}
    except ManifestError:
        return
    for folder in sorted(old - keep):
        path = out / folder
        if _OURS.match(folder) and path.is_dir() and (path / "manifest.json").is_file():
            shutil.rmtree(path)
