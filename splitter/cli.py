"""``splitinfer inspect | split | quantize``: thin argparse layers over the splitter API.

Registered through the ``splitinfer.commands`` entry points. This module must stay cheap to
import (``splitinfer --help`` on an edge install has no ``onnx``): the splitter itself is
imported inside each command. Errors are raised, never printed; ``splitinfer.cli`` turns a
SplitInferError into one stderr line and its exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from splitinfer.cli import env_default
from splitinfer.errors import EXIT_OK

if TYPE_CHECKING:
    from splitter.cuts import Cut, Inspection

__all__ = ["register_inspect", "register_split", "register_quantize", "format_table",
           "add_compression"]



def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _input_shape(text: str) -> tuple[str | None, tuple[int | str, ...]]:
    """``NAME=1x3x320x320`` or ``NAME=1,3,320,320`` (a bare shape: the only input).

    A dim that is not a number (``N``, ``?``) stays symbolic: ``x=Nx3x320x320`` fixes H and
    W only.
    """
    name, sep, dims_text = text.rpartition("=")
    if not sep:
        name, dims_text = "", text
    parts = [p.strip() for p in dims_text.replace(",", "x").replace("X", "x").split("x")]
    if not dims_text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected NAME=1x3x320x320 (or NAME=1,3,320,320), got {text!r}")
    dims: list[int | str] = []
    for part in parts:
        if part.lstrip("-").isdigit():
            value = int(part)
            if value < 1:
                raise argparse.ArgumentTypeError(
                    f"dims must be >= 1 (or a name such as N for a dim left dynamic), got "
                    f"{value} in {text!r}")
            dims.append(value)
        else:
            dims.append(part)
    return (name.strip() or None), tuple(dims)


def add_compression(p: argparse.ArgumentParser) -> None:
    """``--compression auto|zstd|lz4|none`` (split and bundle)."""
    p.add_argument("--compression", choices=("auto", "zstd", "lz4", "none"),
                   default=env_default("--compression", "none"),
                   help="wire compression of the cut tensors, recorded in the manifest: a "
                   "codec, or auto = run the head on the samples, measure zstd on what it "
                   "sends and keep it where it pays on a 4g uplink (the measurement goes to "
                   "the manifest's verification.compression); default none. The device and "
                   "the worker need the codec's binding (zstandard is in the edge and cloud "
                   "extras, lz4 is optional)")


def _add_input_shape(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--input-shape", type=_input_shape, action="append", default=[],
                   metavar="NAME=1x3x320x320",
                   help=f"fix an input's dims {what} (repeatable; 1,3,320,320 also works; a "
                   "name such as N keeps a dim dynamic; NAME= may be left out when the "
                   "model has one input)")


def _shapes(model: str, given: Sequence[tuple[str | None, tuple[int | str, ...]]]
            ) -> dict[str, tuple[int | str, ...]] | None:
    """Name the bare shape after the model's only input; refuse a repeated name."""
    if not given:
        return None
    from splitinfer.errors import BadInputError

    out: dict[str, tuple[int | str, ...]] = {}
    for name, dims in given:
        if name is None:
            from splitter.graph import load_model
            from splitter.verify import input_specs

            names = [s.name for s in input_specs(load_model(model))]
            if len(names) != 1:
                raise BadInputError(f"--input-shape {'x'.join(map(str, dims))}: the model has "
                                    f"{len(names)} inputs ({', '.join(names)}); expected "
                                    "NAME=DIMS")
            name = names[0]
        if name in out:
            raise BadInputError(f"--input-shape {name} given twice")
        out[name] = dims
    return out


# -- inspect --------------------------------------------------------------------------------

def register_inspect(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "inspect", help="list every valid cut of an ONNX model",
        description="List every valid cut in topological order: the crossing tensors, their "
        "dtype and shape, bytes per sample (batch excluded) and the head side's share of "
        "FLOPs and parameters. Cuts where 2+ tensors cross are listed too.")
    p.add_argument("model", help="the ONNX model file")
    # String defaults go through ``type`` too, so a bad environment value is a usage error.
    p.add_argument("--max-tensors", type=int, default=env_default("--max-tensors", "3"),
                   metavar="K", help="list cuts with at most K crossing tensors (default 3)")
    p.add_argument("--dequantized", action="store_true",
                   help="in int8 QDQ models also list the float DequantizeLinear outputs "
                   "(4x the bytes of the int8 cut before them; may not split exactly)")
    _add_input_shape(p, "for the costs and bytes (symbolic and -1 dims)")
    p.add_argument("--samples", metavar="FILE.npz", default=env_default("--samples"),
                   help="--json: inputs to measure each cut's compressed bytes on (one array "
                   "per model input, first axis = samples; default: generated)")
    p.add_argument("--num-samples", type=int, default=env_default("--num-samples", "8"),
                   metavar="N", help="--json: requests the compressed bytes are measured on "
                   "(default 8)")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="--json: skip running the model to measure each cut's compressed "
                   "bytes (the 'compressed' entries are then null)")
    p.add_argument("--json", action="store_true", help="print one JSON object; each cut "
                   "has 'compressed': raw and compressed bytes per request for each codec, "
                   "measured on the samples, and the codec --compression auto would keep")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from splitter.cuts import inspect_model, open_index

    shapes = _shapes(args.model, args.input_shape)
    samples = None
    index = open_index(args.model, input_shapes=shapes)
    if args.json and args.measure and args.samples is not None:
        from splitter.split import _load_samples, shapes_from_samples

        samples = _load_samples(index.model, args.samples)
        if samples is not None and not shapes:
            implied = shapes_from_samples(index.model, samples)
            if implied:  # the costs at the samples' dims, as split and bundle take them
                index = open_index(args.model, input_shapes=implied)
    result = inspect_model(index, max_tensors=args.max_tensors, dequantized=args.dequantized)
    if args.json:
        doc = {"model": args.model, **result.to_dict()}
        if args.measure:
            from splitter.wirebytes import measure_cuts

            if args.num_samples < 1:
                from splitinfer.errors import BadInputError

                raise BadInputError(f"--num-samples {args.num_samples}: expected >= 1")
            per_cut, summary = measure_cuts(index, result.cuts, samples,
                                            num_samples=args.num_samples)
            for cut, measured in zip(doc["cuts"], per_cut, strict=True):
                cut["compressed"] = measured
            doc["compression"] = summary
        print(json.dumps(doc))
    else:
        print(_summary(args.model, result))
        print(format_table(result.cuts))
    return EXIT_OK


def _shape(shape: Sequence[Any]) -> str:
    return "(" + ",".join("?" if d is None else str(d) for d in shape) + ")"


def _bytes(n: int | None) -> str:
    if n is None:
        return "dynamic"
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def _summary(model: str, result: Inspection) -> str:
    ins = ", ".join(f"{s.name} {s.dtype}{_shape(s.shape)}" for s in result.inputs)
    outs = ", ".join(f"{s.name} {s.dtype}{_shape(s.shape)}" for s in result.outputs)
    splits = sum(1 for c in result.cuts if c.kind == "split")
    text = (f"{model}: inputs {ins} → outputs {outs}\n"
            f"{result.total_flops:,} FLOPs per sample, {result.total_params:,} parameters, "
            f"{splits} valid cut(s) + the cloud_only and edge_only baselines\n")
    if result.unknown_dims:
        dims = ", ".join(f"{d['tensor']}[{d['axis']}]" + (f" ({d['name']})" if d["name"] else "")
                         for d in result.unknown_dims)
        text += (f"unknown dims {dims}: FLOPs count them as 1 and bytes are 'dynamic' where "
                 "they matter; give --input-shape for real figures\n")
    return text


def format_table(cuts: Sequence[Cut]) -> str:
    """An aligned table, one row per crossing tensor (a cut's later rows leave idx blank)."""
    header = ("idx", "tensors", "dtype", "shape", "bytes/sample", "head FLOPs", "head params",
              "int8", "baseline")
    rows: list[tuple[str, ...]] = []
    for cut in cuts:
        for i, spec in enumerate(cut.tensors):
            first = i == 0
            rows.append((
                str(cut.index) if first else "",
                spec.name,
                spec.dtype,
                _shape(spec.shape),
                _bytes(cut.bytes_per_sample) if first else "",
                f"{100 * cut.head_flops_share:.1f}%" if first else "",
                f"{100 * cut.head_params_share:.1f}%" if first else "",
                ("yes" if cut.quantized else "") if first else "",
                (cut.kind if cut.kind != "split" else "") if first else "",
            ))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    right = {0, 4, 5, 6}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# -- split ----------------------------------------------------------------------------------

def register_split(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "split", help="cut a model into head.onnx + tail.onnx + manifest.json",
        description="Cut MODEL at the named tensors, write DIR/head.onnx, DIR/tail.onnx and "
        "DIR/manifest.json, and check head→tail against the full model in onnxruntime "
        "(exit 1 when they differ beyond the tolerance).")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("--at", required=True, metavar="NAME[,NAME...]",
                   help="the crossing tensor(s), as listed by 'splitinfer inspect'; the "
                   "baselines: the graph input(s) or cloud_only (no head), the graph "
                   "output(s) or edge_only (no tail)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--samples", metavar="FILE.npz", default=env_default("--samples"),
                   help="inputs to verify on: one array per model input, keyed by name, "
                   "first axis = samples (default: generated)")
    p.add_argument("--num-samples", type=int, default=env_default("--num-samples", "8"),
                   metavar="N", help="generated samples when --samples is not given (default 8)")
    p.add_argument("--tolerance", type=_float, default=env_default("--tolerance", "1e-5"),
                   help="max|diff| <= TOL * max(1, max|reference|) per output (default 1e-5)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the head→tail check")
    p.add_argument("--name", metavar="MODEL", help="model name for the split id (default: "
                   "the file's stem)")
    p.add_argument("--seed", type=int, default=0, help="seed for generated samples")
    p.add_argument("--external-data", action="store_true", default=None,
                   help="always store weights in head.onnx.data/tail.onnx.data (default: only "
                   "past 2 GB)")
    _add_input_shape(p, "for the costs and generated samples (--samples imply them)")
    p.add_argument("--fix-shapes", action="store_true",
                   help="write the --input-shape dims into head.onnx/tail.onnx (default: "
                   "they keep the model's dynamic dims)")
    p.add_argument("--input-codec", metavar="raw|png|jpeg[:Q]", default=None,
                   help="with --at cloud_only: the device sends its image input encoded "
                   "(jpeg = jpeg:90); the split gets its own id and the manifest records "
                   "the bytes and the agreement with the uncompressed answers on the samples")
    add_compression(p)
    p.add_argument("--head-format", choices=("onnx", "tflite"),
                   default=env_default("--head-format", "onnx"),
                   help="tflite: also convert the head to DIR/head.tflite (LiteRT; needs "
                   "the splitter-tflite extra), keeping the cut's layout, dtype and "
                   "quantization, verified against the ONNX head on the samples (top-1 "
                   "agreement and max|diff| at the cut in the manifest's "
                   "verification.tflite); default onnx")
    p.add_argument("--tflite-min-agreement", type=_float,
                   default=env_default("--tflite-min-agreement", "0.99"), metavar="SHARE",
                   help="fail the split when the TFLite head's answers agree with the ONNX "
                   "split's on fewer than SHARE of the samples (default 0.99)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_split)


def run_split(args: argparse.Namespace) -> int:
    from splitter.split import split_model

    result = split_model(
        args.model, args.at, args.out, samples=args.samples, num_samples=args.num_samples,
        tolerance=args.tolerance, verify=args.verify, model_name=args.name, seed=args.seed,
        external_data=args.external_data, input_shapes=_shapes(args.model, args.input_shape),
        fix_shapes=args.fix_shapes, input_codec=args.input_codec,
        compression=args.compression, head_format=args.head_format,
        tflite_min_agreement=args.tflite_min_agreement)
    if args.json:
        print(json.dumps(result.to_dict()))
        return EXIT_OK
    m = result.manifest_obj
    cut = ", ".join(f"{s.name} {s.dtype}{_shape(s.shape)}"
                    + (" int8" if s.quantization else "") for s in m.cut)
    verified = ("not verified (--no-verify)" if result.max_abs_diff is None else
                f"verified: max|diff| {result.max_abs_diff:.3g} on "
                f"{m.verification.get('samples')} sample(s)")
    print(f"split {result.split_id} ({m.kind})\n"
          f"  cut:      {cut} ({_bytes(m.bytes_per_sample)}/sample)\n"
          f"  head:     {result.head or 'none (cloud_only: the device sends its inputs)'}\n"
          f"  tail:     {result.tail or 'none (edge_only: the device answers)'}\n"
          f"  manifest: {result.manifest}\n  {verified}")
    cost = m.verification.get("input_codec")
    if cost:
        print(f"  input codec {cost['codec']}: {_bytes(cost['bytes_per_sample'])}/sample "
              f"(raw {_bytes(cost['raw_bytes_per_sample'])}), answers agree with the "
              f"uncompressed model on {100 * (cost['agreement'] or 0):.1f}% of "
              f"{cost['samples']} sample(s) ({cost['match']})")
    measured = m.verification.get("compression")
    if measured:
        print(f"  compression: {m.compression or 'none'} ({measured['mode']}); "
              + _codecs_line(measured))
    lite = m.verification.get("tflite")
    if m.head_tflite is not None and lite:
        print(f"  head.tflite: {_bytes(lite['tflite_bytes'])} (head.onnx "
              f"{_bytes(lite['onnx_bytes'])}), converted in {lite['convert_s']:.1f} s; "
              f"TFLite head -> ONNX tail agrees with the ONNX split on "
              f"{100 * lite['agreement']:.1f}% of {lite['samples']} sample(s) "
              f"({lite['match']}), max|diff| at the cut {lite['max_abs_diff_cut']:.3g}")
    return EXIT_OK


def _codecs_line(measured: dict[str, Any]) -> str:
    """``zstd 8.0 KiB -> 4.1 KiB (1.95x, 21+9 µs, pays)`` per codec measured, per request."""
    parts = []
    for name, c in measured["codecs"].items():
        parts.append(f"{name} {_bytes(c['raw_bytes'])} -> {_bytes(c['compressed_bytes'])} "
                     f"({c['ratio']:.2f}x, {1e3 * c['compress_ms']:.0f}+"
                     f"{1e3 * c['decompress_ms']:.0f} µs, "
                     f"{'pays' if c['pays'] else 'does not pay'})")
    return (", ".join(parts) or "no codec installed") + \
        f" per request, on {measured['requests']} request(s)"


# -- quantize -------------------------------------------------------------------------------

def register_quantize(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "quantize", help="static int8 quantization with calibration data",
        description="Quantize MODEL to int8 with calibration inputs (an .npz with one array "
        "per model input, keyed by name, first axis = samples).")
    p.add_argument("model", help="the ONNX model file")
    p.add_argument("--calibration", required=True, metavar="DATA.npz",
                   help="calibration inputs")
    p.add_argument("-o", "--out", required=True, metavar="OUT.onnx", help="quantized model")
    p.add_argument("--format", choices=("qdq", "qoperator"), default="qdq",
                   help="QDQ pairs (default) or QOperator ops (QLinearConv …)")
    p.add_argument("--per-tensor", action="store_true",
                   help="one scale per weight tensor instead of per output channel")
    p.add_argument("--activations", choices=("int8", "uint8"), default="int8",
                   help="activation type (default int8; uint8 keeps every cut bit-exact on "
                   "onnxruntime builds that rewrite int8 QDQ pairs to uint8, e.g. x86)")
    _add_input_shape(p, "while shapes are inferred for quantization (default: the "
                     "calibration arrays' shapes; the output keeps its dynamic dims)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from splitter.quantize import quantize_static

    out = quantize_static(args.model, args.calibration, args.out, fmt=args.format,
                          per_channel=not args.per_tensor,
                          input_shapes=_shapes(args.model, args.input_shape),
                          activations=args.activations)
    if args.json:
        print(json.dumps({"output": str(out), "format": args.format,
                          "per_channel": not args.per_tensor}))
    else:
        print(f"quantized ({args.format}, {'per-tensor' if args.per_tensor else 'per-channel'}"
              f") → {out}", file=sys.stdout)
    return EXIT_OK
