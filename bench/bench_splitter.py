"""How long the offline splitter takes on full-size models: inspect, split + verify.

    python bench/bench_splitter.py              # ResNet-18 and MobileNetV2 at 224x224, fp32
    python bench/bench_splitter.py --int8       # … and their static int8 QDQ versions

Per model it prints the number of cuts, the ``inspect`` (list_cuts) wall time, and the
split + verify wall time at a middle cut (the single-tensor cut nearest the middle of the
list), then one JSON line per model for scripts. Weights are random (zoo models): the
timings depend on the graph and the tensor sizes, not on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from splitter import list_cuts, make_samples, split_model, zoo
from splitter.quantize import quantize_static


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _middle_cut(cuts: list[Any], *, quantized: bool) -> Any:
    pool = [c for c in cuts if len(c.tensors) == 1 and (c.quantized or not quantized)]
    pool = pool or cuts
    return pool[len(pool) // 2]


def bench_model(name: str, path: Path, work: Path, *, samples: int) -> dict[str, Any]:
    quantized = "int8" in name
    cuts, inspect_s = _timed(lambda: list_cuts(path))
    cut = _middle_cut(cuts, quantized=quantized)
    names = [t.name for t in cut.tensors]
    feeds = dict(make_samples(path, samples, 0))
    result, split_s = _timed(lambda: split_model(path, names, work / f"{name}-split",
                                                 samples=feeds))
    return {
        "model": name,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "cuts": len(cuts),
        "single_tensor_cuts": sum(len(c.tensors) == 1 for c in cuts),
        "inspect_s": round(inspect_s, 3),
        "cut": names,
        "cut_bytes_per_sample": cut.bytes_per_sample,
        "split_verify_s": round(split_s, 3),
        "verify_samples": samples,
        "max_abs_diff": float(result.max_abs_diff),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int8", action="store_true", help="also quantize and bench int8 QDQ")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--samples", type=int, default=8, help="verification samples")
    parser.add_argument("--calibration-samples", type=int, default=32)
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-splitter-") as tmp:
        work = Path(tmp)
        builders: dict[str, Callable[..., Path]] = {"resnet18": zoo.resnet18,
                                                    "mobilenet_v2": zoo.mobilenet_v2}
        for name, build in builders.items():
            start = time.perf_counter()
            path = build(work / f"{name}.onnx", resolution=args.resolution)
            models = [(name, path, {"build_s": round(time.perf_counter() - start, 3)})]
            if args.int8:
                rng = np.random.default_rng(1)
                calib = {"input": rng.random((args.calibration_samples, 3, args.resolution,
                                              args.resolution), np.float32)}
                start = time.perf_counter()
                q_path = quantize_static(path, calib, work / f"{name}_int8.onnx")
                models.append((f"{name}_int8", q_path,
                               {"quantize_s": round(time.perf_counter() - start, 3)}))
            for label, model_path, extra in models:
                row = {**bench_model(label, model_path, work, samples=args.samples), **extra}
                rows.append(row)
                print(f"{label:<18} cuts {row['cuts']:>4} ({row['single_tensor_cuts']} single)"
                      f"  inspect {row['inspect_s']:7.3f} s  split+verify "
                      f"{row['split_verify_s']:7.3f} s at {row['cut']} "
                      f"({row['cut_bytes_per_sample']} B/sample, max diff "
                      f"{row['max_abs_diff']:.2g})", flush=True)
    print(f"# {os.cpu_count()} CPUs, resolution {args.resolution}, "
          f"{args.samples} verification samples, python {sys.version.split()[0]}")
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
