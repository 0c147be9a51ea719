"""Print docs/models.md's table rows from a real run over splitter.zoo.REAL_MODELS.

    python bench/models_table.py [--all] [NAME ...]
    python bench/models_table.py --int8 [--activations uint8] [NAME ...]

Per model: inspect at its concrete input shape, split + verify an even sample of the
single-tensor cuts (up to 6; every one with ``--all``), 2 multi-tensor cuts (20 with
``--all``) and both baselines, and count FLOPs with onnx-tool (2 x its MACs) beside ours.

``--int8``: the int8 table's rows instead: quantize (QDQ, 8 random calibration samples,
int8 activations unless ``--activations uint8``), split at an even sample of up to 8
QuantizeLinear-output cuts and count those whose head→tail output equals the whole int8
model's bit for bit. Every onnxruntime session here is the splitter's verification, which
applies ``splitinfer.ort_config`` like every other side.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from splitter import inspect_model, split_model, zoo


def _even(items: list[Any], k: int) -> list[Any]:
    if k <= 0 or not items:
        return []
    picks = np.linspace(0, len(items) - 1, min(k, len(items))).round().astype(int)
    return [items[int(i)] for i in dict.fromkeys(picks.tolist())]


def _onnx_tool_flops(path: Path, shapes: dict[str, tuple[int, ...]]) -> int | None:
    try:
        import onnx_tool  # type: ignore[import-untyped]  # no stubs

        model = onnx_tool.Model(str(path), {"verbose": False})
        with contextlib.redirect_stdout(io.StringIO()):
            model.graph.shape_infer({k: np.zeros(v, np.float32) for k, v in shapes.items()})
            model.graph.profile()
        macs = model.graph.macs
        return 2 * int(macs[0] if isinstance(macs, list | tuple | np.ndarray) else macs)
    except Exception:  # a counter that cannot read a model leaves a blank cell
        return None


def row(name: str, work: Path, *, every: bool = False) -> str:
    entry = zoo.REAL_MODELS[name]
    path = entry.path()
    proto = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    shapes = dict(entry.input_shape)
    found = inspect_model(path, input_shapes=shapes, max_tensors=2)
    splits = [c for c in found.cuts if c.kind == "split"]
    single = [c for c in splits if len(c.tensors) == 1]
    multi = [c for c in splits if len(c.tensors) > 1]
    chosen = ([c for c in found.cuts if c.kind != "split"]
              + (single if every else _even(single, 6)) + _even(multi, 20 if every else 2))
    rng = np.random.default_rng(0)
    samples = {k: rng.uniform(*entry.ranges.get(k, (0.0, 1.0)), v).astype(np.float32)
               for k, v in shapes.items()}
    worst = 0.0
    for cut in chosen:
        where = work / f"{name}-{cut.index}"
        result = split_model(path, list(cut.names), where, samples=samples)
        worst = max(worst, result.max_rel_diff or 0.0)
        shutil.rmtree(where)
    theirs = _onnx_tool_flops(path, shapes)
    shape = "; ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())
    wheel, _, version = entry.spec.partition("==")
    return (f"| {name} | {wheel}=={version} | `{entry.member.rsplit('/', 1)[-1]}` | "
            f"{entry.exporter} | {proto.ir_version}/{opset} | {shape} | "
            f"{len(single)} / {len(multi)} | {len(chosen)} | {worst:.1e} | "
            f"{found.total_params:,} | {found.total_flops / 1e6:,.1f} | "
            f"{'' if theirs is None else f'{theirs / 1e6:,.1f}'} |")


def int8_row(name: str, work: Path, activations: str = "int8", k: int = 8) -> str:
    from splitinfer.errors import VerificationError
    from splitter.quantize import quantize_static

    entry = zoo.REAL_MODELS[name]
    shapes = dict(entry.input_shape)

    def draw(n: int, seed: int) -> dict[str, np.ndarray[Any, Any]]:
        rng = np.random.default_rng(seed)
        return {key: rng.uniform(*entry.ranges.get(key, (0.0, 1.0)),
                                 dims if n == 1 else (n, *dims[1:])).astype(np.float32)
                for key, dims in shapes.items()}

    try:
        q = quantize_static(entry.path(), draw(8, 1), work / f"{name}_int8.onnx",
                            activations=activations)
    except Exception as exc:  # a model the quantizer cannot take: say so in the row
        why = str(exc).splitlines()[0].rsplit(": ", 1)[-1]
        return f"| {name} | - | not quantized ({why}) |"
    listed = inspect_model(q, input_shapes=shapes, max_tensors=1).cuts
    int8 = [c for c in listed if c.quantized and c.kind == "split"]
    chosen = _even(int8, k)
    off: list[str] = []
    for cut in chosen:
        where = work / f"{name}-q{cut.index}"
        try:
            result = split_model(q, list(cut.names), where, samples=draw(1, 0))
            diff = float(result.max_abs_diff or 0.0)
        except VerificationError:
            diff = float("inf")
        if diff:
            off.append(f"`{cut.names[0]}` off by {diff:.2g}")
        shutil.rmtree(where, ignore_errors=True)
    exact = len(chosen) - len(off)
    return (f"| {name} | {len(int8)} | {exact} / {len(chosen)} "
            f"{'exact' if not off else '(' + '; '.join(off) + ')'} |")


def main(argv: list[str]) -> None:
    every = "--all" in argv
    int8 = "--int8" in argv
    activations = "int8"
    if "--activations" in argv:
        activations = argv[argv.index("--activations") + 1]
        argv = [a for a in argv if a not in ("--activations", activations)]
    names = [a for a in argv if a not in ("--all", "--int8")] or list(zoo.REAL_MODELS)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # onnxruntime's shape pre-processing writes into the cwd
        try:
            for name in names:
                line = (int8_row(name, Path(tmp), activations) if int8
                        else row(name, Path(tmp), every=every))
                print(line, flush=True)
        finally:
            os.chdir(cwd)


if __name__ == "__main__":
    main(sys.argv[1:])
