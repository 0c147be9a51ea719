"""Print docs/models.md's table rows from a real run over splitter.zoo.REAL_MODELS.

    python bench/models_table.py [--all] [NAME ...]

Per model: inspect at its concrete input shape, split + verify an even sample of the
single-tensor cuts (up to 6; every one with ``--all``), 2 multi-tensor cuts (20 with
``--all``) and both baselines, and count FLOPs with onnx-tool (2 x its MACs) beside ours.
"""

from __future__ import annotations

import contextlib
import io
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


def main(argv: list[str]) -> None:
    every = "--all" in argv
    names = [a for a in argv if a != "--all"] or list(zoo.REAL_MODELS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(row(name, Path(tmp), every=every), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
