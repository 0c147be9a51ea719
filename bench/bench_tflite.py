"""ONNX head on onnxruntime vs TFLite head on LiteRT, on the same split.

For each split — the trained digits CNN cut at ``pool`` (its 360 bundled test digits),
MobileNetV2 of the zoo (seeded random weights, ``--resolution``, smooth images) cut at
``block12.add`` with its float cut and, after ``splitter.surgery.quantize_cut``, an int8
one, and its static-int8 QDQ model (``splitter.quantize``, 8 calibration images) cut at
``block12.add_QuantizeLinear_Output``, whose ONNX head runs onnxruntime's int8 kernels and
whose TFLite head is a float model (``splitter.tflite`` lowers the QDQ ops) — the split is
written with ``--head-format tflite`` (``splitter.tflite``) and both
heads are timed on one sample per call, as a device runs them:

- ``ort p50`` / ``lite p50``: median ms of ``OrtHead.run`` / ``TfliteHead.run`` (the
  agent's own backends), all cores (``--threads``, default every core here), each at its
  best: onnxruntime with its pool spinning while a run lasts and with it sleeping, the
  faster kept (``ort mode``); LiteRT with XNNPACK (its default CPU delegate). The two are
  timed in alternating blocks so that both see the same machine;
- ``top-1``: the share of samples where TFLite head → ONNX tail gives the ONNX split's
  class; ``max|d| cut``: the largest difference at the cut (real units; int8: steps x
  scale) and ``max|d| out`` in the logits, from ``verification.tflite``;
- ``onnx KiB`` / ``tflite KiB``: the head files; ``convert s``: onnx2tf + the converter.

Needs the ``splitter-tflite`` extra. Run::

    splitinfer bench tflite                 # or python -m bench.bench_tflite
    splitinfer bench tflite --json --models digits_cnn --runs 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "format_table", "MODELS"]

MODELS = ("digits_cnn", "mobilenet_v2", "mobilenet_v2_int8", "mobilenet_v2_qdq")
BLOCK = 10  # runs per backend before switching to the other


def _splits(models: list[str], work: Path, resolution: int, samples: int
            ) -> list[tuple[str, Path, dict[str, Any]]]:
    import numpy as np

    from bench.bench_planner import smooth_images
    from splitter import split_model, zoo
    from splitter.surgery import quantize_cut
    from splitter.tflite import convert_split

    out = []
    if "digits_cnn" in models:
        images, _ = zoo.digits_test_set()
        data = {"image": np.ascontiguousarray(images)}
        split_model(zoo.digits_cnn_path(), "pool", work / "digits", samples=data,
                    head_format="tflite")
        out.append(("digits_cnn", work / "digits", data))
    if {"mobilenet_v2", "mobilenet_v2_int8", "mobilenet_v2_qdq"} & set(models):
        model = zoo.mobilenet_v2(work / "mobilenet_v2.onnx", resolution=resolution)
        data = {"input": smooth_images(samples, resolution)}
        if "mobilenet_v2" in models:
            split_model(model, "block12.add", work / "mnv2", samples=data,
                        head_format="tflite")
            out.append(("mobilenet_v2", work / "mnv2", data))
        if "mobilenet_v2_int8" in models:
            split_model(model, "block12.add", work / "mnv2_int8", samples=data)
            quantize_cut(work / "mnv2_int8", calibration=data)
            convert_split(work / "mnv2_int8", samples=data)
            out.append(("mobilenet_v2_int8", work / "mnv2_int8", data))
        if "mobilenet_v2_qdq" in models:
            from splitter.quantize import quantize_static

            qdq = quantize_static(model, {"input": data["input"][:8]}, work / "mnv2_qdq.onnx")
            # measured whatever it reaches: the row says whether split's default gate
            # (top-1 >= 0.99) would have kept it
            split_model(qdq, "block12.add_QuantizeLinear_Output", work / "mnv2_qdq",
                        samples=data, head_format="tflite", tflite_min_agreement=0.0)
            out.append(("mobilenet_v2_qdq", work / "mnv2_qdq", data))
    return out


def _times(calls: Mapping[str, Callable[[], Any]], runs: int) -> dict[str, list[float]]:
    """ms per call of each, in alternating blocks of :data:`BLOCK` after a warm-up."""
    for call in calls.values():
        for _ in range(5):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    while min(len(t) for t in times.values()) < runs:
        for name, call in calls.items():
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                call()
                times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(name: str, directory: Path, data: dict[str, Any], *, runs: int,
            threads: int) -> dict[str, Any]:
    from edge_agent.runtime import OrtHead, TfliteHead, load_head
    from splitinfer.manifest import Manifest

    m = Manifest.load(directory)
    lite = load_head(m, directory, backend="tflite", threads=threads)
    if not isinstance(lite, TfliteHead):
        raise TypeError(f"expected a TfliteHead, got {type(lite).__name__}")
    heads = {f"ort-{mode}": OrtHead(directory / "head.onnx", threads=threads, spinning=mode)
             for mode in ("run", "off")}
    feed = {k: v[:1] for k, v in data.items()}
    runtimes: dict[str, OrtHead | TfliteHead] = {**heads, "lite": lite}
    calls: dict[str, Callable[[], Any]] = {key: partial(h.run, feed)
                                           for key, h in runtimes.items()}
    times = _times(calls, runs)
    p50 = {key: statistics.median(t) for key, t in times.items()}
    mode = min(heads, key=lambda k: p50[k])
    report = m.verification["tflite"]
    return {
        "model": name,
        "split_id": m.split_id,
        "cut": [s.to_dict() for s in m.cut],
        "threads": threads,
        "runs": runs,
        "ort_p50_ms": round(p50[mode], 4),
        "ort_p90_ms": round(_pct(times[mode], 0.9), 4),
        "ort_mode": mode.removeprefix("ort-"),
        "ort_p50_ms_by_mode": {k.removeprefix("ort-"): round(p50[k], 4) for k in heads},
        "lite_p50_ms": round(p50["lite"], 4),
        "lite_p90_ms": round(_pct(times["lite"], 0.9), 4),
        "lite_over_ort": round(p50["lite"] / p50[mode], 3),
        "top1_agreement": report["agreement"],
        "passes_split_gate": report["agreement"] >= 0.99,  # split's default minimum
        "samples": report["samples"],
        "max_abs_diff_cut": report["max_abs_diff_cut"],
        "max_abs_diff_output": report["max_abs_diff_output"],
        "cut_detail": report["cut"],
        "onnx_bytes": report["onnx_bytes"],
        "tflite_bytes": report["tflite_bytes"],
        "convert_s": report["convert_s"],
    }


def run(models: list[str], *, resolution: int = 224, samples: int = 64, runs: int = 100,
        threads: int | None = None) -> dict[str, Any]:
    from splitter.tflite import converter_versions

    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-tflite-") as tmp:
        rows = [measure(name, directory, data, runs=runs, threads=threads)
                for name, directory, data in _splits(models, Path(tmp), resolution, samples)]
    return {"bench": "tflite", "resolution": resolution, "threads": threads,
            "cpus": os.cpu_count(), "versions": converter_versions(), "rows": rows}


def format_table(doc: dict[str, Any]) -> str:
    header = ("model", "cut", "ort p50", "ort mode", "lite p50", "lite/ort", "top-1",
              "max|d| cut", "max|d| out", "onnx KiB", "tflite KiB", "convert s")
    lines = []
    for r in doc["rows"]:
        cut = ",".join(f"{c['name']} {c['dtype']}" for c in r["cut"])
        lines.append((r["model"], cut, f"{r['ort_p50_ms']:.3f}", r["ort_mode"],
                      f"{r['lite_p50_ms']:.3f}", f"{r['lite_over_ort']:.2f}",
                      f"{100 * r['top1_agreement']:.1f}% of {r['samples']}"
                      + ("" if r["passes_split_gate"] else " (<99%: split refuses)"),
                      f"{r['max_abs_diff_cut']:.3g}", f"{r['max_abs_diff_output']:.3g}",
                      f"{r['onnx_bytes'] / 1024:.1f}", f"{r['tflite_bytes'] / 1024:.1f}",
                      f"{r['convert_s']:.1f}"))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    head = (f"head latency, one sample per call, {doc['threads']} thread(s) of "
            f"{doc['cpus']} CPUs, ms; {versions}")
    return "\n".join([head, fmt.format(*header), *(fmt.format(*row) for row in lines)])


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tflite", help="ONNX head (onnxruntime) vs TFLite head (LiteRT) on "
                       "the same split: p50 latency, top-1 agreement, max diff, file sizes",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated, of " + ", ".join(MODELS) + " (default: all)")
    p.add_argument("--resolution", type=int, default=224,
                   help="MobileNetV2's input side (default %(default)s)")
    p.add_argument("--samples", type=int, default=64,
                   help="MobileNetV2 samples the agreement is measured on (default "
                   "%(default)s; digits: its 360 test digits)")
    p.add_argument("--runs", type=int, default=100,
                   help="timed calls per backend (default %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads of both runtimes (default 0: every core)")
    p.add_argument("--json", action="store_true", help="print the document as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from bench.cli import model_list
    from splitinfer.errors import BadInputError

    models = model_list(args.models, MODELS)
    if min(args.samples, args.runs, args.resolution) < 1 or args.threads < 0:
        raise BadInputError("--samples, --runs and --resolution must be >= 1, --threads >= 0")
    doc = run(models, resolution=args.resolution, samples=args.samples, runs=args.runs,
              threads=args.threads or None)
    print(json.dumps(doc, indent=2) if args.json else format_table(doc))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bench_tflite")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    parsed = parser.parse_args(["tflite", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
