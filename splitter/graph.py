"""A read-only index over an ONNX graph: who produces and consumes what, and the types.

The splitter reasons about the top-level graph only. A node that carries subgraphs
(If, Loop, Scan) is atomic: the outer-scope tensors its subgraphs capture count as its
inputs, so a cut can never separate a node from a value its body reads.

*Constants* (initializers, and nodes that compute only from constants, such as a weight's
DequantizeLinear) never cross a cut: they are copied into whichever half reads them.

Types come from ONNX shape inference; tensors it cannot type (ops of the ``com.microsoft``
domain, used by QOperator models) are typed by one onnxruntime run of a copy of the model
that exposes them as extra outputs.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from splitinfer.dtypes import ONNX_ELEM_TYPE, canonical_dtype, from_onnx_elem_type
from splitinfer.errors import BadInputError, TensorError
from splitinfer.manifest import Dim, Quantization, TensorSpec

__all__ = ["GraphIndex", "NodeInfo", "load_model", "normalize_model", "subgraphs",
           "value_info_to_spec", "fix_input_shapes", "check_input_shapes", "InputShapes"]

InputShapes = Mapping[str, Sequence[Dim]]

log = logging.getLogger(__name__)

# Never treated as constants even when their inputs are: each run draws new values.
_NONDETERMINISTIC = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli",
})
# op_type -> (scale input, zero-point input) describing the op's (int8/uint8) output.
_QUANT_OUTPUT = {
    "QuantizeLinear": (1, 2), "DynamicQuantizeLinear": (-1, -1),
    "QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QLinearAdd": (6, 7), "QLinearMul": (6, 7),
    "QLinearSigmoid": (3, 4), "QLinearLeakyRelu": (3, 4), "QLinearAveragePool": (3, 4),
    "QLinearGlobalAveragePool": (3, 4), "QLinearSoftmax": (3, 4), "QLinearConcat": (0, 1),
    "QGemm": (6, 7),
}
# Ops whose integer output keeps the scale/zero-point of their first input.
_QUANT_PASSTHROUGH = frozenset({
    "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice",
    "Gather", "DepthToSpace", "SpaceToDepth", "Resize", "Pad",
})
_TWO_GB = 2**31
# Sizes for dynamic non-batch dims when a tensor must be materialised to learn its type.
DYNAMIC_DIM_SIZE = 32


def load_model(path: str | Path, *, load_external_data: bool = False) -> onnx.ModelProto:
    """Load an ONNX file, translating every failure into one BadInputError line.

    External data stays on disk by default: analysis needs only shapes, and the halves
    load the weights they keep (see ``extract``).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file; expected an ONNX model (.onnx)")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf DecodeError, onnx errors, OSError: all mean "unusable"
        raise BadInputError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from exc
    if model.ir_version == 0 or not model.graph.output:
        raise BadInputError(f"{path}: not an ONNX model (no IR version or no graph outputs)")
    return normalize_model(model)


def normalize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model in the form every later step (and the ONNX checker) expects.

    - Initializers also listed as graph inputs (IR < 4 files, the classic model zoo) are
      taken out of ``graph.input``: they are weights, and a half that keeps such an
      initializer must not ask for it as an input. The model computes the same (the
      initializer's value is what onnxruntime used for the absent input anyway). IR 3 requires
      every initializer to be an input, so ``ir_version`` becomes 4 then; IR 4 accepts every
      opset IR 3 did.
    - Negative dimensions (``-1``, Paddle and older TF exports) become unknown dims.

    Returns ``model`` itself when nothing needs changing, else a normalised copy.
    """
    inits = {t.name for t in model.graph.initializer}
    inits.update(t.values.name for t in model.graph.sparse_initializer)
    dup = [v for v in model.graph.input if v.name in inits]
    negative = [d for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]
                if vi.type.HasField("tensor_type")
                for d in vi.type.tensor_type.shape.dim
                if d.HasField("dim_value") and d.dim_value < 0]
    old_ir = model.ir_version < 4 and bool(inits)
    if not dup and not negative and not old_ir:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if dup:
        keep = [v for v in out.graph.input if v.name not in inits]
        del out.graph.input[:]
        out.graph.input.extend(keep)
        log.info("%d initializer(s) were also listed as graph inputs (IR %d); treated as "
                 "weights", len(dup), model.ir_version)
    if old_ir:
        out.ir_version = 4
    for vi in [*out.graph.input, *out.graph.output, *out.graph.value_info]:
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    d.ClearField("dim_value")
    return out


def _parse_dims(vi: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    return _dims(vi.type)[1]


def check_input_shapes(model: onnx.ModelProto, shapes: InputShapes) -> dict[str, tuple[Dim, ...]]:
    """Validate ``shapes`` (input name → dims) against the model's declared inputs.

    A given dim is an int (fixed for analysis) or a name (left symbolic). Names must be
    real graph inputs, ranks must match, and a dim the model fixes must be given as is.
    """
    inits = {t.name for t in model.graph.initializer}
    declared = {v.name: _parse_dims(v) for v in model.graph.input if v.name not in inits}
    out: dict[str, tuple[Dim, ...]] = {}
    for name, dims in shapes.items():
        if name not in declared:
            raise BadInputError(f"--input-shape {name}: the model has no input {name!r}; its "
                                f"inputs are {', '.join(map(repr, declared))}")
        given = tuple(dims)
        for d in given:
            if isinstance(d, int) and d < 1:
                raise BadInputError(f"--input-shape {name}: dims must be >= 1, got {d}")
        want = declared[name]
        shown = "x".join("?" if d is None else str(d) for d in want or ())
        if want is not None and len(want) != len(given):
            raise BadInputError(f"--input-shape {name}: {len(given)} dims given, the model "
                                f"input has {len(want)} ({shown})")
        for axis, (w, g) in enumerate(zip(want or (), given, strict=False)):
            if isinstance(w, int) and isinstance(g, int) and w != g:
                raise BadInputError(f"--input-shape {name}: axis {axis} is fixed to {w} by "
                                    f"the model ({shown}), got {g}")
        out[name] = given
    return out


def fix_input_shapes(model: onnx.ModelProto, shapes: InputShapes, *,
                     batch_one: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs carry ``shapes`` (ints fixed, names symbolic).

    ``batch_one``: a symbolic first dim becomes 1 (analysis counts per sample), on every
    input, given or not. Intermediate value_info is dropped so inference recomputes it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name for t in out.graph.initializer}
    for vi in out.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        given = shapes.get(vi.name)
        if given is not None:
            tt.ClearField("shape")
            for d in given:
                dim = tt.shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif d:
                    dim.dim_param = str(d)
        if batch_one and tt.HasField("shape") and tt.shape.dim and \
                not tt.shape.dim[0].HasField("dim_value"):
            tt.shape.dim[0].Clear()
            tt.shape.dim[0].dim_value = 1
    del out.graph.value_info[:]
    if batch_one:  # analysis: outputs follow the fixed inputs (inference fills them in)
        for vi in out.graph.output:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
    return out


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _captures(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes (recursively)."""
    defined = {v.name for v in graph.input}
    defined.update(t.name for t in graph.initializer)
    defined.update(t.values.name for t in graph.sparse_initializer)
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for sub in subgraphs(node):
            used |= _captures(sub)
        defined.update(node.output)
    return used - defined


def _dims(type_proto: onnx.TypeProto) -> tuple[int, tuple[Dim, ...] | None]:
    if not type_proto.HasField("tensor_type"):
        return 0, None
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))  # -1 (Paddle, old TF exports) means dynamic
        elif d.HasField("dim_param") and not d.dim_param.startswith("unk__"):
            dims.append(d.dim_param)  # "unk__N" names are inference's way of saying unknown
        else:
            dims.append(None)
    return tt.elem_type, tuple(dims)


def value_info_to_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    elem, shape = _dims(vi.type)
    if elem == 0 or shape is None:
        raise TensorError(f"tensor {vi.name!r}: the model declares no tensor type/shape")
    return TensorSpec(vi.name, from_onnx_elem_type(elem), shape)


@dataclass(frozen=True)
class NodeInfo:
    index: int  # position in graph.node
    proto: onnx.NodeProto
    inputs: tuple[str, ...]  # explicit inputs + outer-scope captures of its subgraphs
    outputs: tuple[str, ...]
    const: bool

    @property
    def label(self) -> str:
        return self.proto.name or f"{self.proto.op_type}#{self.index}"


class GraphIndex:
    """Producers, consumers, constants, liveness, a topological order and types."""

    def __init__(self, model: onnx.ModelProto, *, base_dir: str | Path | None = None,
                 input_shapes: InputShapes | None = None, fix_shapes: bool = False) -> None:
        """``input_shapes`` (input name → dims) fixes dims for analysis (``types``);
        ``fix_shapes`` also writes them into the model the halves are cut from."""
        model = normalize_model(model)
        shapes = check_input_shapes(model, input_shapes or {})
        if fix_shapes and shapes:
            model = fix_input_shapes(model, shapes)
        self.model = model
        self.input_shapes = shapes
        self.analysis_model = fix_input_shapes(model, shapes, batch_one=True) if shapes \
            else model
        self._analysis_vi = {v.name: v for v in self.analysis_model.graph.input}
        self.base_dir = Path(base_dir) if base_dir is not None else None
        graph = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.sparse_initializers = {t.values.name: t for t in graph.sparse_initializer}
        init_names = set(self.initializers) | set(self.sparse_initializers)
        # Old IR versions list initializers among the inputs; those are constants here.
        self.inputs: list[str] = [v.name for v in graph.input if v.name not in init_names]
        self.input_vi = {v.name: v for v in graph.input}
        self.outputs: list[str] = [v.name for v in graph.output]
        self.output_vi = {v.name: v for v in graph.output}

        self.nodes: list[NodeInfo] = []
        self.producer: dict[str, int] = {}
        const_tensors = set(init_names)
        for i, node in enumerate(graph.node):
            inputs = [n for n in node.input if n]
            for sub in subgraphs(node):
                inputs.extend(sorted(_captures(sub)))
            eff = tuple(dict.fromkeys(inputs))
            is_const = (
                node.op_type not in _NONDETERMINISTIC
                and not any(True for _ in subgraphs(node))
                and all(n in const_tensors for n in eff)
            )
            outs = tuple(n for n in node.output if n)
            self.nodes.append(NodeInfo(i, node, eff, outs, is_const))
            for name in outs:
                self.producer[name] = i
            if is_const:
                const_tensors.update(outs)
        self.const_tensors = frozenset(const_tensors)
        self.consumers: dict[str, list[int]] = {}
        for info in self.nodes:
            for name in info.inputs:
                self.consumers.setdefault(name, []).append(info.index)
        self._check_defined()
        self.order = self._topological_order()
        self.live = self._live_nodes()
        self.order = [i for i in self.order if i in self.live]
        self.position = {n: p for p, n in enumerate(self.order)}
        self.types = self._infer_types(self.analysis_model)
        self.declared_types = self._infer_types(model) if shapes else self.types
        self._ort_tried: set[str] = set()

    # -- structure -------------------------------------------------------------------------

    def _check_defined(self) -> None:
        known = set(self.inputs) | set(self.const_tensors) | set(self.producer)
        for info in self.nodes:
            missing = [n for n in info.inputs if n not in known]
            if missing:
                raise BadInputError(
                    f"node {info.label!r} ({info.proto.op_type}) reads {missing[0]!r}, which no "
                    "graph input, initializer or node defines; the model is malformed"
                )
        undefined = [n for n in self.outputs if n not in known]
        if undefined:
            raise BadInputError(f"graph output {undefined[0]!r} is never computed")

    def _topological_order(self) -> list[int]:
        """The file's node order when it is topological (ONNX requires it), else Kahn's."""
        avail = set(self.inputs) | set(self.const_tensors)
        ok = True
        for info in self.nodes:
            if info.const:
                continue
            if any(n not in avail for n in info.inputs):
                ok = False
                break
            avail.update(info.outputs)
        candidates = [i.index for i in self.nodes if not i.const]
        if ok:
            return candidates
        log.info("node order is not topological; sorting")
        return self.kahn_order(candidates, lifo=False)

    def kahn_order(self, nodes: Sequence[int], *, lifo: bool, reverse: bool = False
                   ) -> list[int]:
        """A topological order of ``nodes``: FIFO (breadth-first) or LIFO (depth-first)."""
        members = set(nodes)
        indeg = {n: 0 for n in nodes}
        succ: dict[int, list[int]] = {n: [] for n in nodes}
        for n in nodes:
            for name in self.nodes[n].inputs:
                p = self.producer.get(name)
                if p is not None and p in members:
                    indeg[n] += 1
                    succ[p].append(n)
        ready = [n for n in nodes if indeg[n] == 0]
        out: list[int] = []
        counter = 0
        heap: list[tuple[int, int]] = []
        sign = -1 if reverse else 1

        def push(n: int) -> None:
            nonlocal counter
            counter += 1
            # FIFO: earliest readied first; LIFO: latest readied first (finish a branch).
            key = -counter if lifo else counter
            heapq.heappush(heap, (key, sign * n))

        for n in ready:
            push(n)
        while heap:
            _, sn = heapq.heappop(heap)
            n = sign * sn
            out.append(n)
            for m in succ[n]:
                indeg[m] -= 1
                if indeg[m] == 0:
                    push(m)
        if len(out) != len(nodes):
            raise BadInputError("the graph has a cycle; expected a DAG")
        return out

    def _live_nodes(self) -> set[int]:
        """Non-constant nodes that contribute to some graph output."""
        live: set[int] = set()
        stack = list(self.outputs)
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen or name in self.const_tensors:
                continue
            seen.add(name)
            p = self.producer.get(name)
            if p is not None and p not in live:
                live.add(p)
                stack.extend(self.nodes[p].inputs)
        dead = sum(1 for i in self.nodes if not i.const and i.index not in live)
        if dead:
            log.info("%d node(s) feed no graph output; they are dropped from both halves", dead)
        return live

    def live_tensors(self) -> set[str]:
        """Every tensor a live node produces."""
        return {n for i in self.order for n in self.nodes[i].outputs}

    def is_graph_input(self, name: str) -> bool:
        return name in self.input_vi and name not in self.const_tensors

    def cut_candidates(self) -> set[str]:
        """Every tensor that could cross a cut: non-constant, live, reaching an output."""
        names = {n for i in self.live for n in self.nodes[i].outputs}
        names.update(n for n in self.inputs if n in self.consumers or n in self.outputs)
        return {n for n in names if n in self.consumers or n in self.outputs}

    def const_closure(self, names: Iterable[str]) -> tuple[set[str], set[int]]:
        """Initializers and constant nodes needed to materialise ``names``' constants."""
        inits: set[str] = set()
        nodes: set[int] = set()
        stack = [n for n in names if n in self.const_tensors]
        while stack:
            name = stack.pop()
            if name in self.initializers or name in self.sparse_initializers:
                inits.add(name)
                continue
            p = self.producer[name]
            if p not in nodes:
                nodes.add(p)
                stack.extend(self.nodes[p].inputs)
        return inits, nodes

    # -- types -----------------------------------------------------------------------------
    # Two views. ``types`` is the analysis view: with ``input_shapes`` the model is inferred
    # at those concrete input dims (symbolic batch = 1) and the gaps are observed with one
    # onnxruntime run at that size, so FLOPs and bytes are those of real tensors.
    # ``declared_types`` is the model as it is (dynamic dims stay dynamic): what the split
    # artifacts promise. Without ``input_shapes`` both are the same dict.

    def _infer_types(self, model: onnx.ModelProto) -> dict[str, tuple[int, tuple[Dim, ...] | None]]:
        types: dict[str, tuple[int, tuple[Dim, ...] | None]] = {}
        if model.ByteSize() >= _TWO_GB:
            model = _without_large_data(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as exc:  # inference is best effort; onnxruntime fills the gaps
            log.warning("ONNX shape inference failed (%s); types come from onnxruntime", exc)
            inferred = model
        g = inferred.graph
        for vi in [*g.value_info, *g.input, *g.output]:
            elem, shape = _dims(vi.type)
            if elem:
                types[vi.name] = (elem, shape)
        # Subgraph tensors are typed too, for the FLOPs of nodes that hold subgraphs.
        stack = [sub for node in g.node for sub in subgraphs(node)]
        while stack:
            sub = stack.pop()
            for vi in [*sub.value_info, *sub.input, *sub.output]:
                elem, shape = _dims(vi.type)
                if elem:
                    types.setdefault(vi.name, (elem, shape))
            stack.extend(s for node in sub.node for s in subgraphs(node))
        for name, tensor in self.initializers.items():
            types.setdefault(name, (tensor.data_type, tuple(int(d) for d in tensor.dims)))
        return types

    def _known(self, name: str) -> bool:
        elem, shape = self.types.get(name, (0, None))
        if not elem or shape is None:
            return False
        # At concrete input shapes every dim of a real tensor is knowable: observe the rest.
        return not self.concrete or all(isinstance(d, int) for d in shape)

    @property
    def concrete(self) -> bool:
        """The analysis view has every input dim fixed (so every tensor can be measured)."""
        if not self.input_shapes:
            return False
        for name in self.inputs:
            shape = _dims(self._analysis_vi[name].type)[1]
            if shape is None or not all(isinstance(d, int) for d in shape):
                return False
        return True

    def ensure_types(self, names: Iterable[str]) -> None:
        """Type ``names`` that shape inference left open with one onnxruntime run."""
        missing = [n for n in dict.fromkeys(names)
                   if not self._known(n) and n not in self._ort_tried]
        if not missing:
            return
        self._ort_tried.update(missing)
        from splitter.verify import make_samples, ort_session  # runtime-only dependency

        probe = onnx.ModelProto()
        probe.CopyFrom(self.analysis_model)
        declared = {v.name for v in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in missing
                                  if n not in declared)
        try:
            sess = ort_session(probe, base_dir=self.base_dir, optimize=False)
            feeds = make_samples(self.analysis_model, 1, seed=0)
            first = _first_batch(feeds, [self._analysis_vi[n] for n in self.inputs])
            values = sess.run(missing, first)
            meta = {o.name: o.shape for o in sess.get_outputs()}
        except Exception as exc:  # best effort: untyped tensors are reported where used
            log.warning("could not type %d tensor(s) with onnxruntime: %s", len(missing), exc)
            return
        dynamic_batch = self._dynamic_batch()
        for name, value in zip(missing, values, strict=True):
            if not isinstance(value, np.ndarray):
                continue
            try:
                elem = ONNX_ELEM_TYPE[canonical_dtype(value.dtype)]
            except TensorError:
                continue
            shape = tuple(int(d) for d in value.shape) if self.concrete else \
                _merge_shape(meta.get(name), value.shape, dynamic_batch)
            self.types[name] = (elem, shape)
        log.debug("typed %d tensor(s) with onnxruntime", len(missing))

    def _dynamic_batch(self) -> bool:
        for name in self.inputs:
            shape = _dims(self._analysis_vi[name].type)[1]
            if shape and not isinstance(shape[0], int):
                return True
        return False

    def spec(self, name: str) -> TensorSpec:
        """The TensorSpec of a tensor in the analysis view (quantization filled when known)."""
        self.ensure_types([name])
        elem, shape = self.types.get(name, (0, None))
        if not elem or shape is None:
            raise TensorError(f"tensor {name!r}: cannot determine its dtype and shape "
                              "(neither ONNX shape inference nor onnxruntime could)")
        try:
            dtype = from_onnx_elem_type(elem)
        except TensorError as exc:
            raise TensorError(f"tensor {name!r}: {exc}; it cannot cross the wire") from None
        quant = self.quantization(name) if dtype in ("int8", "uint8", "int16", "uint16") else None
        return TensorSpec(name, dtype, shape, quant)

    def artifact_spec(self, name: str) -> TensorSpec:
        """The TensorSpec split artifacts declare: the model's own dims (dynamic stay so)."""
        spec = self.spec(name)
        if self.declared_types is self.types:
            return spec
        if name in self.input_vi and name in self.inputs:
            declared = _dims(self.input_vi[name].type)[1]
        else:
            declared = self.declared_types.get(name, (0, None))[1]
        if declared is None or len(declared) != len(spec.shape):
            # Inference could not say which dims follow the input's: leave them all open.
            declared = tuple(None for _ in spec.shape)
        return TensorSpec(name, spec.dtype, declared, spec.quantization)

    def shape(self, name: str) -> tuple[Dim, ...] | None:
        return self.types.get(name, (0, None))[1]

    def unknown_dims(self) -> list[dict[str, Any]]:
        """Non-batch dims of the graph inputs that the analysis view leaves symbolic."""
        out: list[dict[str, Any]] = []
        for name in self.inputs:
            shape = _dims(self._analysis_vi[name].type)[1]
            for axis, d in enumerate(shape or ()):
                if axis > 0 and not isinstance(d, int):
                    out.append({"tensor": name, "axis": axis, "name": d})
        return out

    # -- constants and quantization ------------------------------------------------------------

    def const_value(self, name: str) -> np.ndarray[Any, Any] | None:
        """The value of a small constant (initializer or Constant node), else None."""
        base = str(self.base_dir) if self.base_dir else ""
        if name in self.initializers:
            try:
                return numpy_helper.to_array(self.initializers[name], base_dir=base)
            except Exception:  # external data not reachable: treat as unknown
                return None
        p = self.producer.get(name)
        if p is None or self.nodes[p].proto.op_type != "Constant":
            return None
        for attr in self.nodes[p].proto.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t, base_dir=base)
            if attr.name in ("value_float", "value_int"):
                return np.asarray(onnx.helper.get_attribute_value(attr))
        return None

    def quantization(self, name: str) -> Quantization | None:
        """Per-tensor scale/zero-point of an integer tensor produced by a quantizing op."""
        for _ in range(64):  # bounded walk back through pass-through ops
            p = self.producer.get(name)
            if p is None:
                return None
            node = self.nodes[p].proto
            if node.op_type in _QUANT_PASSTHROUGH and node.input:
                name = node.input[0]
                continue
            si, zi = _QUANT_OUTPUT.get(node.op_type, (-1, -1))
            if si < 0 or si >= len(node.input) or not node.input[si]:
                return None
            scale = self.const_value(node.input[si])
            zp_name = node.input[zi] if zi < len(node.input) else ""
            zp = self.const_value(zp_name) if zp_name else np.zeros(1, np.int64)
            if scale is None or zp is None or scale.size != 1 or zp.size != 1:
                return None  # per-channel or computed at run time: not representable
            try:
                return Quantization(float(scale.reshape(())), int(zp.reshape(())))
            except TensorError:
                return None
        return None


def _merge_shape(meta: Any, observed: tuple[int, ...], dynamic_batch: bool
                 ) -> tuple[Dim, ...]:
    """Prefer onnxruntime's declared (symbolic) shape; fall back on the observed one."""
    if isinstance(meta, list) and len(meta) == len(observed):
        out: list[Dim] = []
        for d, seen in zip(meta, observed, strict=True):
            if (isinstance(d, int) and d >= 0) or (isinstance(d, str)
                                                   and not d.startswith("unk__")):
                out.append(d)
            else:
                out.append(None if d is None or isinstance(d, str) else seen)
        return tuple(out)
    if dynamic_batch and observed:
        return (None, *observed[1:])
    return tuple(observed)


def _first_batch(samples: dict[str, np.ndarray[Any, Any]], inputs: Sequence[onnx.ValueInfoProto]
                 ) -> dict[str, np.ndarray[Any, Any]]:
    from splitter.verify import batches  # runtime-only dependency

    specs = [value_info_to_spec(v) for v in inputs]
    return next(iter(batches(samples, specs)))


def _without_large_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy small enough for shape inference: big initializers keep dims, lose bytes."""
    small = onnx.ModelProto()
    small.CopyFrom(model)
    for tensor in small.graph.initializer:
        if tensor.ByteSize() > 1 << 20:
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", "stripped-for-shape-inference"
    return small
