"""Wire compression of int8 cuts, measured: ratio and added latency per codec.

For each model (the trained digits CNN, and MobileNetV2 and ResNet-18 of the zoo with
seeded random weights at ``--resolution``, quantized to static int8 QDQ on smooth images),
take the single-tensor int8 cuts at about 1/5, 1/2 and 4/5 of the cut list, split each
(``splitter.split_model``), run its head on the samples (batch 1, as a device sends), and
measure on what the head sends:

- ``ratio``: raw bytes / mean bytes the encoder sends (tensors that a codec does not
  shrink by 5 % go raw, :func:`splitinfer.compression.worth_sending`);
- ``c`` / ``d``: median µs to compress / decompress one request's tensors;
- ``added``: what compression adds end to end on the CPUs, ``wire.encode`` of the request
  with the codec + ``wire.decode`` of it, minus the same without (median µs per request);
- ``saved 4g``: the send time the saved bytes are worth on the reference 4g uplink
  (5.85 Mbit/s), and whether the codec pays (:func:`splitinfer.compression.pays`);
- ``auto``: what ``splitinfer split --compression auto`` keeps.

The figures of docs/wire.md ("Compression") come from this script. Run::

    splitinfer bench compression            # or python -m bench.bench_compression
    splitinfer bench compression --json --models digits_cnn
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "MODELS"]

MODELS = ("digits_cnn", "mobilenet_v2", "resnet18")
POSITIONS = (0.2, 0.5, 0.8)  # where in the int8 cut list the measured cuts sit


def _model(name: str, out: Path, resolution: int, samples: int) -> tuple[Path, Any]:
    """(the int8 model, its input samples {name: array}) for ``name``."""
    import numpy as np

    from splitter import zoo
    from splitter.quantize import quantize_static

    if name == "digits_cnn":
        images, _ = zoo.digits_test_set()
        int8 = quantize_static(zoo.digits_cnn_path(), zoo.digits_calibration_path(),
                               out / "digits_int8.onnx")
        return int8, {"image": np.ascontiguousarray(images[:samples])}
    from bench.bench_planner import smooth_images

    images = smooth_images(max(samples, 8), resolution)
    make = zoo.mobilenet_v2 if name == "mobilenet_v2" else zoo.resnet18
    fp32 = make(out / f"{name}.onnx", resolution=resolution)
    int8 = quantize_static(fp32, {"input": images[:8]}, out / f"{name}_int8.onnx")
    return int8, {"input": images[:samples]}


def _int8_cuts(model: Path) -> list[str]:
    from splitter import list_cuts

    cuts = [c for c in list_cuts(model, max_tensors=1)
            if c.kind == "split" and c.quantized and len(c.tensors) == 1]
    picked = dict.fromkeys(cuts[min(len(cuts) - 1, int(p * len(cuts)))].tensors[0].name
                           for p in POSITIONS)
    return list(picked)


def _added_us(manifest: Any, requests: Sequence[Sequence[Any]], codec: str,
              repeats: int) -> float:
    """Median µs that ``codec`` adds to wire.encode + wire.decode of one request."""
    from splitinfer.wire import REQUEST, Envelope, WireTensor, decode, encode

    def once(cut: Sequence[Any], how: str | None) -> float:
        env = Envelope(kind=REQUEST, request_id="0" * 32, device_id="bench-dev",
                       split_id=manifest.split_id, deadline=time.time() + 10,
                       tensors=[WireTensor(s.name, a, s.quantization)
                                for s, a in zip(manifest.cut, cut, strict=True)])
        t0 = time.perf_counter()
        decode(encode(env, compression=how))
        return time.perf_counter() - t0

    deltas = []
    for cut in requests:
        once(cut, codec)  # warm-up
        for _ in range(repeats):
            deltas.append(once(cut, codec) - once(cut, None))
    return statistics.median(deltas) * 1e6


def measure_cut(model: Path, cut: str, samples: Any, out: Path, *,
                repeats: int = 5) -> dict[str, Any]:
    """Every installed codec on what the head of ``model`` cut at ``cut`` sends."""
    from splitinfer import compression
    from splitter import split_model
    from splitter.split import cut_arrays, measure_compression

    result = split_model(model, [cut], out, samples=samples, compression="auto")
    m = result.manifest_obj
    names = [s.name for s in m.cut]
    arrays = [[r[n] for n in names]
              for r in cut_arrays(result.head, samples, list(m.inputs), names)]
    raw = [[a.tobytes() for a in r] for r in arrays]
    row: dict[str, Any] = {"cut": cut, "dtype": m.cut[0].dtype,
                           "raw_bytes": len(raw[0][0]) if raw else 0,
                           "auto": m.compression, "codecs": {}}
    for codec in compression.supported():
        c = compression.measure(codec, raw, repeats=repeats)
        saved_s = (c.raw_bytes - c.compressed_bytes) * 8 / compression.REFERENCE_UPLINK_BPS
        row["codecs"][codec] = {
            "ratio": round(c.ratio, 3), "compressed_bytes": c.compressed_bytes,
            "compress_us": round(c.compress_ms * 1e3, 1),
            "decompress_us": round(c.decompress_ms * 1e3, 1),
            "added_us": round(_added_us(m, arrays, codec, repeats), 1),
            "saved_4g_ms": round(saved_s * 1e3, 2), "pays": c.pays()}
    row["auto_measured"] = measure_compression(raw, "auto")["choice"]
    return row


def run(models: Sequence[str] = MODELS, *, resolution: int = 96, samples: int = 8,
        repeats: int = 5, work: Path | None = None) -> dict[str, Any]:
    """The measurement document: machine, settings and one row per (model, cut)."""
    import os
    import platform

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        root = work or Path(tmp)
        for name in models:
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            model, data = _model(name, folder, resolution, samples)
            for i, cut in enumerate(_int8_cuts(model)):
                row = measure_cut(model, cut, data, folder / f"cut{i}", repeats=repeats)
                rows.append({"model": name, **row})
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "resolution": resolution, "samples": samples, "repeats": repeats, "rows": rows}


def format_table(doc: dict[str, Any]) -> str:
    """The docs/wire.md table: one row per cut, zstd-1 and lz4 side by side."""
    codecs = sorted({c for r in doc["rows"] for c in r["codecs"]},
                    key=lambda c: ("zstd", "lz4").index(c) if c in ("zstd", "lz4") else 9)
    head = ["model", "cut (int8 tensor)", "raw B"]
    for c in codecs:
        head += [f"{c} ratio", f"{c} c / d µs", f"{c} added µs"]
    head += ["saved on 4g (zstd)", "auto"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    for r in doc["rows"]:
        cells = [r["model"], f"`{r['cut']}`", f"{r['raw_bytes']:,}"]
        for c in codecs:
            m = r["codecs"].get(c)
            cells += ([f"{m['ratio']:.2f}", f"{m['compress_us']:g} / {m['decompress_us']:g}",
                       f"{m['added_us']:g}"] if m else ["", "", ""])
        z = r["codecs"].get("zstd")
        cells += [f"{z['saved_4g_ms']:.2f} ms" if z else "", r["auto"] or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("compression", help="wire compression of int8 cuts: ratio and added "
                       "latency per codec", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated, of " + ", ".join(MODELS) + " (default: all)")
    p.add_argument("--resolution", type=int, default=96,
                   help="input side of the zoo models (default %(default)s)")
    p.add_argument("--samples", type=int, default=8, help="requests measured per cut "
                   "(default %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per request (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the document as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from bench.cli import model_list
    from splitinfer.errors import BadInputError

    models = model_list(args.models, MODELS)
    if min(args.samples, args.repeats, args.resolution) < 1:
        raise BadInputError("--samples, --repeats and --resolution must be >= 1")
    doc = run(models, resolution=args.resolution, samples=args.samples, repeats=args.repeats)
    print(json.dumps(doc, indent=2) if args.json else format_table(doc))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bench_compression")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    parsed = parser.parse_args(["compression", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
