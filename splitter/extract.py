"""Build the head and tail ModelProtos of a checked cut, and write them to disk.

A pure core (index + plan in, two ModelProtos out) under a thin file layer that loads
the weights each half keeps, switches to external data past 2 GB and stamps provenance.
Both halves keep the source's ``ir_version``, every opset import (``com.microsoft``
included) and its local functions, so QOperator and contrib ops resolve on both sides.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
from onnx import external_data_helper, numpy_helper

import splitinfer
from splitinfer.dtypes import ONNX_ELEM_TYPE
from splitinfer.errors import BadInputError
from splitinfer.manifest import TensorSpec
from splitter.cuts import CutPlan
from splitter.graph import GraphIndex

__all__ = ["build_halves", "build_whole", "save_half", "spec_value_info", "EXTERNAL_DATA_LIMIT"]

log = logging.getLogger(__name__)
# Protobuf cannot serialise a message of 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_LIMIT = 2**31 - 2**26
_META_PREFIX = "splitinfer."


def spec_value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    shape = [d if isinstance(d, int) else (d or None) for d in spec.shape]
    return onnx.helper.make_tensor_value_info(spec.name, ONNX_ELEM_TYPE[spec.dtype], shape)


def build_halves(index: GraphIndex, plan: CutPlan, specs: Mapping[str, TensorSpec], *,
                 metadata: Mapping[str, str]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(head, tail) for ``plan``; ``specs`` types the crossing tensors."""
    cut_vi = [spec_value_info(specs[n]) for n in plan.tensors]
    head_inputs = [index.input_vi[n] for n in index.inputs]
    head = _half(index, plan.head_nodes, head_inputs, cut_vi, part="head", metadata=metadata)
    tail_outputs = [index.output_vi[n] for n in index.outputs]
    tail = _half(index, plan.tail_nodes, cut_vi, tail_outputs, part="tail", metadata=metadata)
    return head, tail


def build_whole(index: GraphIndex, *, part: str, metadata: Mapping[str, str]
                ) -> onnx.ModelProto:
    """The whole (normalised) model as one half: the tail of a cloud_only split or the head
    of an edge_only one. Every graph input stays, used or not: the cut lists them all."""
    inputs = [index.input_vi[n] for n in index.inputs]
    outputs = [index.output_vi[n] for n in index.outputs]
    return _half(index, index.order, inputs, outputs, part=part, metadata=metadata)


def _half(index: GraphIndex, nodes: Sequence[int], inputs: Sequence[onnx.ValueInfoProto],
          outputs: Sequence[onnx.ValueInfoProto], *, part: str, metadata: Mapping[str, str]
          ) -> onnx.ModelProto:
    src = index.model
    needed = [t for n in nodes for t in index.nodes[n].inputs] + [o.name for o in outputs]
    inits, const_nodes = index.const_closure(needed)
    const_order = index.kahn_order(sorted(const_nodes), lifo=False)

    graph = onnx.GraphProto()
    graph.name = f"{src.graph.name or 'graph'}_{part}"
    graph.doc_string = src.graph.doc_string
    graph.node.extend(index.nodes[n].proto for n in [*const_order, *nodes])
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    graph.initializer.extend(t for n, t in index.initializers.items() if n in inits)
    graph.sparse_initializer.extend(t for n, t in index.sparse_initializers.items()
                                    if n in inits)
    boundary = {v.name for v in inputs} | {v.name for v in outputs}
    produced = {o for n in nodes for o in index.nodes[n].outputs}
    graph.value_info.extend(v for v in src.graph.value_info
                            if v.name in produced and v.name not in boundary)

    model = onnx.ModelProto()
    model.ir_version = src.ir_version
    model.opset_import.extend(src.opset_import)
    model.functions.extend(src.functions)
    model.producer_name = "splitinfer"
    model.producer_version = splitinfer.__version__
    model.domain = src.domain
    model.model_version = src.model_version
    model.doc_string = src.doc_string
    for prop in src.metadata_props:
        if not prop.key.startswith(_META_PREFIX):
            model.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in {**metadata, "part": part}.items():
        model.metadata_props.add(key=_META_PREFIX + key, value=value)
    model.graph.CopyFrom(graph)
    log.debug("%s: %d node(s), %d constant node(s), %d initializer(s)", part, len(nodes),
              len(const_order), len(inits))
    return model


def _payload_bytes(model: onnx.ModelProto) -> int:
    """Roughly what the weights serialise to (ByteSize() re-encodes: slow, and unreliable
    past 2 GiB)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (
            len(t.int64_data) + len(t.double_data) + len(t.uint64_data))
    for node in model.graph.node:
        total += sum(len(a.t.raw_data) for a in node.attribute if a.HasField("t"))
    return total


def save_half(model: onnx.ModelProto, path: Path, *, base_dir: Path | None,
              external_data: bool | None = None) -> Path | None:
    """Write one half; return its external data file when one was written.

    ``external_data``: None = only past 2 GB, True = always, False = never.
    """
    if base_dir is not None:  # a no-op for tensors stored inline
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError) as exc:
            raise BadInputError(f"cannot read the source model's external data in "
                                f"{base_dir}: {exc}") from exc
    data_path = path.with_name(path.name + ".data")
    # onnx appends to an existing data file; a stale one would corrupt the offsets.
    data_path.unlink(missing_ok=True)
    use_external = external_data if external_data is not None else (
        _payload_bytes(model) >= EXTERNAL_DATA_LIMIT)
    if use_external:
        _to_raw_data(model)
    try:
        if use_external:
            onnx.save_model(model, str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_path.name,
                            # asked for explicitly: every weight goes out; past 2 GB: the big
                            size_threshold=0 if external_data else 1024)
        else:
            onnx.save_model(model, str(path))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot write {path}: {exc}") from exc
    return data_path if data_path.exists() else None


def _to_raw_data(model: onnx.ModelProto) -> None:
    """onnx moves only ``raw_data`` to external files; typed fields (float_data…) stay put."""
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") and tensor.data_type != onnx.TensorProto.STRING:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
