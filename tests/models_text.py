"""Tiny ONNX graphs in the ONNX text syntax, one per shape of graph the splitter must handle.

Weights are generated (seeded) and written into the text as initializer literals, so each
graph reads as one piece of ONNX text. ``MODELS`` maps a name to a builder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.numpy_helper
import onnx.parser

__all__ = ["MODELS", "build", "save_with_external_data", "chain", "residual", "concat", "fpn",
           "two_inputs", "qdq_chain", "qoperator", "if_capture", "loop_capture", "shared_weight",
           "dynamic", "noisy"]

_HEADER = '<ir_version: 8, opset_import: ["" : 17{extra}]>'


def _init(name: str, dtype: str, shape: tuple[int, ...], seed: int, *, lo: float = -0.5,
          hi: float = 0.5) -> str:
    """An initializer literal: ``float[4,3] w = {...}`` with seeded values."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if dtype == "float":
        values = ", ".join(f"{v:.4f}" for v in rng.uniform(lo, hi, n))
    else:
        values = ", ".join(str(int(v)) for v in rng.integers(int(lo), int(hi) + 1, n))
    dims = "[" + ",".join(map(str, shape)) + "]" if shape else ""
    return f"{dtype}{dims} {name} = {{{values}}}"


def _parse(signature: str, inits: list[str], body: str, *, ms: bool = False) -> onnx.ModelProto:
    extra = ', "com.microsoft" : 1' if ms else ""
    text = f"{_HEADER.format(extra=extra)}\n{signature}\n<{', '.join(inits)}>\n{{\n{body}\n}}"
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def chain() -> onnx.ModelProto:
    """conv → relu → pool → conv → relu → GAP → flatten → gemm: single-tensor cuts only."""
    return _parse(
        "chain (float[N, 3, 8, 8] x) => (float[N, 10] y)",
        [_init("w1", "float", (4, 3, 3, 3), 1), _init("b1", "float", (4,), 2),
         _init("w2", "float", (8, 4, 3, 3), 3), _init("wf", "float", (10, 8), 4),
         _init("bf", "float", (10,), 5)],
        """
        c1 = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
        r1 = Relu(c1)
        p1 = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(r1)
        c2 = Conv<pads = [1, 1, 1, 1]>(p1, w2)
        r2 = Relu(c2)
        g = GlobalAveragePool(r2)
        f = Flatten(g)
        y = Gemm<transB = 1>(f, wf, bf)
        """)


def residual() -> onnx.ModelProto:
    """A residual block: 2-tensor cuts (skip + branch) inside it."""
    return _parse(
        "residual (float[N, 4, 6, 6] x) => (float[N, 4] y)",
        [_init("w0", "float", (4, 4, 3, 3), 11), _init("w1", "float", (4, 4, 3, 3), 12),
         _init("w2", "float", (4, 4, 1, 1), 13)],
        """
        a = Conv<pads = [1, 1, 1, 1]>(x, w0)
        r0 = Relu(a)
        b = Conv<pads = [1, 1, 1, 1]>(r0, w1)
        rb = Relu(b)
        c = Conv(rb, w2)
        s = Add(r0, c)
        rs = Relu(s)
        gp = GlobalAveragePool(rs)
        y = Flatten(gp)
        """)


def concat() -> onnx.ModelProto:
    """Two branches of different lengths joined by a Concat."""
    return _parse(
        "concat (float[N, 3, 8, 8] x) => (float[N, 6] y)",
        [_init("ws", "float", (4, 3, 3, 3), 21), _init("wa", "float", (2, 4, 1, 1), 22),
         _init("wb", "float", (4, 4, 3, 3), 23), _init("wo", "float", (6, 6, 1, 1), 24),
         _init("k", "float", (), 25)],
        """
        st = Conv<pads = [1, 1, 1, 1]>(x, ws)
        sr = Relu(st)
        a1 = Conv(sr, wa)
        a2 = Relu(a1)
        b1 = Conv<pads = [1, 1, 1, 1]>(sr, wb)
        b2 = Sigmoid(b1)
        b3 = Mul(b2, k)
        cat = Concat<axis = 1>(a2, b3)
        o = Conv(cat, wo)
        gp = GlobalAveragePool(o)
        y = Flatten(gp)
        """)


def fpn() -> onnx.ModelProto:
    """FPN-like: two outputs at two levels, a top-down path, a Constant used on both sides."""
    return _parse(
        "fpn (float[N, 3, 8, 8] x) => (float[N, 4, 4, 4] p1, float[N, 4, 2, 2] p2)",
        [_init("w1", "float", (4, 3, 3, 3), 31), _init("w2", "float", (8, 4, 3, 3), 32),
         _init("wl2", "float", (4, 8, 1, 1), 33), _init("wl1", "float", (4, 4, 1, 1), 34),
         _init("wt", "float", (4, 4, 2, 2), 35)],
        """
        two = Constant<value = float {2.0}>()
        c1 = Conv<pads = [1, 1, 1, 1], strides = [2, 2]>(x, w1)
        r1 = Relu(c1)
        m1 = Mul(r1, two)
        c2 = Conv<pads = [1, 1, 1, 1], strides = [2, 2]>(m1, w2)
        r2 = Relu(c2)
        p2 = Conv(r2, wl2)
        u = ConvTranspose<strides = [2, 2]>(p2, wt)
        l1 = Conv(m1, wl1)
        s1 = Add(l1, u)
        p1 = Mul(s1, two)
        """)


def two_inputs() -> onnx.ModelProto:
    """A late-used second input and an unused third one."""
    return _parse(
        "two_inputs (float[N, 8] x, float[N, 4] m, float[N, 1] unused) => (float[N, 4] y)",
        [_init("w", "float", (8, 4), 41), _init("b", "float", (4,), 42)],
        """
        h = Gemm(x, w, b)
        h1 = Relu(h)
        o = Mul(h1, m)
        y = Add(o, h1)
        """)


def qdq_chain() -> onnx.ModelProto:
    """Static QDQ int8: uint8 activations, int8 weights (per-channel for conv 1)."""
    return _parse(
        "qdq_chain (float[N, 3, 8, 8] x) => (float[N, 8] y)",
        [_init("w1q", "int8", (4, 3, 3, 3), 51, lo=-100, hi=100),
         _init("w2q", "int8", (8, 4, 3, 3), 52, lo=-100, hi=100),
         "float[4] ws1 = {0.004, 0.005, 0.003, 0.006}", "int8[4] wz1 = {0, 0, 0, 0}",
         "float ws2 = {0.004}", "int8 wz2 = {0}",
         "float s0 = {0.0039215}", "uint8 z0 = {0}", "float s1 = {0.02}", "uint8 z1 = {0}",
         "float s2 = {0.03}", "uint8 z2 = {128}"],
        """
        xq = QuantizeLinear(x, s0, z0)
        xd = DequantizeLinear(xq, s0, z0)
        w1 = DequantizeLinear<axis = 0>(w1q, ws1, wz1)
        c1 = Conv<pads = [1, 1, 1, 1]>(xd, w1)
        r1 = Relu(c1)
        q1 = QuantizeLinear(r1, s1, z1)
        d1 = DequantizeLinear(q1, s1, z1)
        w2 = DequantizeLinear(w2q, ws2, wz2)
        c2 = Conv<pads = [1, 1, 1, 1]>(d1, w2)
        q2 = QuantizeLinear(c2, s2, z2)
        d2 = DequantizeLinear(q2, s2, z2)
        g = GlobalAveragePool(d2)
        y = Flatten(g)
        """)


def qoperator() -> onnx.ModelProto:
    """QOperator int8: QLinearConv, a uint8 MaxPool, com.microsoft QLinearAdd and GAP."""
    return _parse(
        "qoperator (float[N, 3, 8, 8] x) => (float[N, 4, 1, 1] y)",
        [_init("w1q", "int8", (4, 3, 3, 3), 61, lo=-100, hi=100),
         _init("w2q", "int8", (4, 4, 3, 3), 62, lo=-100, hi=100),
         "float ws = {0.005}", "int8 wz = {0}",
         "float s0 = {0.0039215}", "uint8 z0 = {0}", "float s1 = {0.02}", "uint8 z1 = {10}",
         "float s2 = {0.03}", "uint8 z2 = {100}", "float s3 = {0.04}", "uint8 z3 = {90}",
         "float s4 = {0.01}", "uint8 z4 = {80}"],
        """
        xq = QuantizeLinear(x, s0, z0)
        c1 = QLinearConv<pads = [1, 1, 1, 1]>(xq, s0, z0, w1q, ws, wz, s1, z1)
        p1 = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(c1)
        c2 = QLinearConv<pads = [1, 1, 1, 1]>(p1, s1, z1, w2q, ws, wz, s2, z2)
        a = com.microsoft.QLinearAdd(p1, s1, z1, c2, s2, z2, s3, z3)
        g = com.microsoft.QLinearGlobalAveragePool<channels_last = 0>(a, s3, z3, s4, z4)
        y = DequantizeLinear(g, s4, z4)
        """, ms=True)


def if_capture() -> onnx.ModelProto:
    """An If whose branches capture an outer tensor (r) and an outer initializer (wv)."""
    return _parse(
        "if_capture (float[N, 4] x) => (float[N, 4] y)",
        ["float[4] wv = {1.0, 2.0, 3.0, 4.0}", "float half = {0.5}"],
        """
        r = Relu(x)
        rs = ReduceSum<keepdims = 0>(r)
        cond = Greater(rs, half)
        ifo = If(cond) <
            then_branch = g1 () => (float[N, 4] t) { t = Mul(r, wv) },
            else_branch = g2 () => (float[N, 4] e) { e = Neg(r) }>
        y = Add(ifo, r)
        """)


def loop_capture() -> onnx.ModelProto:
    """A Loop whose body captures an outer tensor (r) and an outer initializer (k)."""
    return _parse(
        "loop_capture (float[N, 4] x) => (float[N, 4] y)",
        ["int64 trips = {3}", "bool go = {1}", "float k = {0.5}"],
        """
        r = Relu(x)
        lo = Loop(trips, go, x) <body = body (int64 i, bool c, float[N, 4] acc)
            => (bool c2, float[N, 4] acc2) { c2 = Identity(c) rk = Mul(r, k)
                                              acc2 = Add(acc, rk) }>
        y = Sigmoid(lo)
        """)


def shared_weight() -> onnx.ModelProto:
    """One initializer read on both sides of most cuts: it goes into both halves."""
    return _parse(
        "shared_weight (float[N, 4] x) => (float[N, 4] y)",
        [_init("w", "float", (4, 4), 81)],
        """
        h = MatMul(x, w)
        r = Relu(h)
        y = MatMul(r, w)
        """)


def dynamic() -> onnx.ModelProto:
    """Dynamic batch and spatial dims, with a Shape→Reshape chain like torch exports."""
    return _parse(
        "dynamic (float[N, 3, H, W] x) => (float[N, 8] y)",
        [_init("w1", "float", (4, 3, 3, 3), 71), _init("w2", "float", (8, 4, 3, 3), 72),
         "int64 zero = {0}", "int64[1] eight = {8}", "int64[1] ax0 = {0}"],
        """
        c1 = Conv<pads = [1, 1, 1, 1]>(x, w1)
        r1 = Relu(c1)
        p1 = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(r1)
        c2 = Conv<pads = [1, 1, 1, 1]>(p1, w2)
        g = GlobalAveragePool(c2)
        shp = Shape(g)
        n = Gather<axis = 0>(shp, zero)
        n1 = Unsqueeze(n, ax0)
        newshape = Concat<axis = 0>(n1, eight)
        y = Reshape(g, newshape)
        """)


def noisy() -> onnx.ModelProto:
    """Adds fresh noise each run: head→tail can never match, verification must fail."""
    return _parse(
        "noisy (float[N, 4] x) => (float[N, 4] y)",
        [],
        """
        r = Relu(x)
        n = RandomUniformLike(r)
        y = Add(r, n)
        """)


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "chain": chain, "residual": residual, "concat": concat, "fpn": fpn,
    "two_inputs": two_inputs, "qdq_chain": qdq_chain, "qoperator": qoperator,
    "if_capture": if_capture, "loop_capture": loop_capture, "shared_weight": shared_weight,
    "dynamic": dynamic,
}


def build(name: str, directory: Path) -> Path:
    """Write model ``name`` to ``directory/name.onnx``."""
    path = directory / f"{name}.onnx"
    onnx.save_model(MODELS[name]() if name in MODELS else noisy(), str(path))
    return path


def save_with_external_data(model: onnx.ModelProto, path: Path) -> Path:
    """Save with every initializer in ``<name>.data`` next to the model."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for t in model.graph.initializer:  # onnx externalises raw_data only
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    if not onnx.external_data_helper.uses_external_data(
            onnx.load(str(path), load_external_data=False).graph.initializer[0]):
        raise AssertionError("test model was not saved with external data")
    return path
