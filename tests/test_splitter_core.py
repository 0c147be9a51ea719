"""The splitter core on tiny ONNX-text graphs: cut enumeration, costs, splitting, verifying.

Every listed cut of every graph in ``models_text.MODELS`` is split and verified.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import models_text as mt
import numpy as np
import onnx
import pytest

from splitinfer.errors import BadInputError, TensorError, VerificationError
from splitinfer.manifest import Manifest, TensorSpec, sha256_file
from splitter import (
    list_cuts,
    load_npz,
    make_samples,
    plan_cut,
    split_model,
    verify_split,
)
from splitter.graph import GraphIndex

CASES = [(name, cut.names) for name in mt.MODELS for cut in list_cuts(mt.MODELS[name]())]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    paths = {name: mt.build(name, d) for name in [*mt.MODELS, "noisy"]}
    ext = d / "external"
    ext.mkdir()
    paths["external"] = mt.save_with_external_data(mt.chain(), ext / "chain_ext.onnx")
    paths["external_q"] = mt.save_with_external_data(mt.qoperator(), ext / "qop_ext.onnx")
    return paths


def _disconnects(model: onnx.ModelProto, cut: set[str]) -> bool:
    """Independent check: no input→output path avoids ``cut`` (constants ignored)."""
    index = GraphIndex(model)
    reach = deque(n for n in index.inputs if n not in cut)
    seen = set(reach)
    while reach:
        t = reach.popleft()
        if t in index.outputs:
            return False
        for c in index.consumers.get(t, ()):
            for o in index.nodes[c].outputs:
                if o not in seen and o not in cut:
                    seen.add(o)
                    reach.append(o)
    return True


# -- enumeration ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(mt.MODELS))
def test_every_listed_cut_disconnects_inputs_from_outputs(name: str) -> None:
    model = mt.MODELS[name]()
    cuts = list_cuts(model)
    assert [c.index for c in cuts] == list(range(len(cuts)))
    index = GraphIndex(model)
    assert set(cuts[0].names) == set(index.inputs) and cuts[0].kind == "cloud_only"
    assert cuts[0].head_flops_share == 0.0 and cuts[0].head_flops == 0
    assert set(cuts[-1].names) == set(index.outputs) and cuts[-1].kind == "edge_only"
    assert cuts[-1].head_flops_share == 1.0 and cuts[-1].bytes_per_sample == 0
    assert [c.kind for c in cuts[1:-1]] == ["split"] * (len(cuts) - 2)
    for cut in cuts:
        assert _disconnects(model, set(cut.names)), cut.names
        assert not set(cut.names) & index.const_tensors
        assert 0.0 <= cut.head_flops_share <= 1.0 and 0.0 <= cut.head_params_share <= 1.0
        if cut.kind == "split":
            assert not set(cut.names) <= set(index.outputs)  # never an empty tail
            plan_cut(index, cut.names)  # the splitter accepts what it lists


def test_dequantized_activations_hidden_by_default() -> None:
    model = mt.MODELS["qdq_chain"]()
    shown = {n for c in list_cuts(model) for n in c.names}
    every = {n for c in list_cuts(model, dequantized=True) for n in c.names}
    hidden = every - shown
    dq_outputs = {o for node in model.graph.node if node.op_type == "DequantizeLinear"
                  for o in node.output}
    # and the float tensors inside DQ→Conv(→Relu)→Q groups (one integer kernel in onnxruntime)
    assert hidden and hidden <= dq_outputs | {"c1", "r1", "c2"} and {"c1", "r1"} <= hidden
    # the int8 tensor feeding each hidden DequantizeLinear is still offered
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in hidden:
            assert node.input[0] in shown


@pytest.mark.parametrize("name", list(mt.MODELS))
def test_every_single_tensor_cut_is_listed(name: str) -> None:
    model = mt.MODELS[name]()
    index = GraphIndex(model)
    listed = {c.names for c in list_cuts(model, max_tensors=1, dequantized=True)}
    for t in index.cut_candidates():
        if t not in index.outputs and _disconnects(model, {t}):
            assert (t,) in listed, t


def test_chain_cuts_and_costs() -> None:
    cuts = list_cuts(mt.chain())
    assert [c.names for c in cuts] == [("x",), ("c1",), ("r1",), ("p1",), ("c2",), ("r2",),
                                       ("g",), ("f",), ("y",)]
    p1 = cuts[3]
    assert p1.tensors == (TensorSpec("p1", "float32", ("N", 4, 4, 4)),)
    assert p1.bytes_per_sample == 4 * 4 * 4 * 4
    # conv1 2·256·27 + relu 256 + maxpool 64·4 | conv2 2·128·36 + relu 128 + GAP 128 + gemm 2·10·8
    total = 13824 + 256 + 256 + 9216 + 128 + 128 + 160
    assert p1.head_flops == 13824 + 256 + 256
    assert p1.head_flops_share == pytest.approx((13824 + 512) / total)
    assert p1.head_params == 108 + 4
    assert p1.head_params_share == pytest.approx(112 / 490)
    assert cuts[0].head_flops_share == 0.0
    assert cuts[-2].head_params_share == pytest.approx(400 / 490)  # the Gemm stays in the tail
    assert cuts[-1].kind == "edge_only" and cuts[-1].head_flops == total


def test_residual_lists_two_tensor_cuts_inside_the_block() -> None:
    names = {c.names for c in list_cuts(mt.residual())}
    assert {("r0", "b"), ("r0", "rb"), ("r0", "c")} <= names
    assert ("r0",) in names and ("s",) in names


def test_concat_lists_branch_pairs_and_max_tensors_filters() -> None:
    names = {c.names for c in list_cuts(mt.concat())}
    assert {("sr", "a2"), ("a2", "b3"), ("a1", "b1"), ("sr", "b3")} <= names
    assert all(len(c.names) == 1 for c in list_cuts(mt.concat(), max_tensors=1))
    with pytest.raises(BadInputError):
        list_cuts(mt.concat(), max_tensors=0)


def test_fpn_constant_is_duplicated_never_crossing(tmp_path: Path, models: dict[str, Path]
                                                    ) -> None:
    cuts = list_cuts(models["fpn"])
    assert all("two" not in c.names for c in cuts)
    assert ("m1", "p2") in {c.names for c in cuts}  # an output crossing as it is computed
    result = split_model(models["fpn"], ["m1", "p2"], tmp_path)
    for half in (result.head, result.tail):
        assert [n.op_type for n in onnx.load(str(half)).graph.node].count("Constant") == 1
    tail = onnx.load(str(result.tail))
    assert [o.name for o in tail.graph.output] == ["p1", "p2"]  # p2 passes straight through


def test_qdq_cut_is_int8_with_scale_and_four_times_cheaper() -> None:
    cuts = {c.names: c for c in list_cuts(mt.qdq_chain(), dequantized=True)}
    q1, r1 = cuts[("q1",)], cuts[("r1",)]
    assert q1.quantized and not r1.quantized
    spec = q1.tensors[0]
    assert spec.dtype == "uint8" and spec.quantization is not None
    assert spec.quantization.scale == pytest.approx(0.02) and spec.quantization.zero_point == 0
    assert cuts[("q2",)].tensors[0].quantization.zero_point == 128  # type: ignore[union-attr]
    assert r1.bytes_per_sample == 4 * q1.bytes_per_sample  # type: ignore[operator]
    assert all("w1" not in c.names for c in cuts.values())  # weight DQ is a constant


def test_qoperator_types_come_from_onnxruntime() -> None:
    cuts = {c.names: c for c in list_cuts(mt.qoperator())}
    a = cuts[("a",)].tensors[0]  # com.microsoft QLinearAdd: ONNX inference cannot type it
    assert (a.dtype, a.shape) == ("uint8", ("N", 4, 4, 4))
    assert a.quantization is not None and a.quantization.zero_point == 90
    p1 = cuts[("p1",)].tensors[0]  # uint8 MaxPool keeps its input's quantization
    assert p1.quantization is not None and p1.quantization.zero_point == 10
    assert ("p1", "c2") in cuts and all(c.quantized for c in cuts.values() if c.kind == "split")


def test_if_node_is_atomic_and_its_captures_count_as_inputs() -> None:
    names = {c.names for c in list_cuts(mt.if_capture())}
    assert ("r",) in names and ("r", "ifo") in names  # r is captured by the If branches
    assert all(n not in {"t", "e"} for c in names for n in c)
    assert ("ifo",) not in names  # y also reads r


def test_loop_body_capture_pulls_its_inputs_along(tmp_path: Path, models: dict[str, Path]
                                                   ) -> None:
    assert [c.names for c in list_cuts(mt.loop_capture())] == [("x",), ("x", "r"), ("lo",),
                                                                ("y",)]
    result = split_model(models["loop_capture"], ["x", "r"], tmp_path)
    tail = onnx.load(str(result.tail))
    assert [n.op_type for n in tail.graph.node] == ["Loop", "Sigmoid"]
    assert {t.name for t in tail.graph.initializer} == {"trips", "go", "k"}


def test_shared_initializer_goes_into_both_halves(tmp_path: Path, models: dict[str, Path]
                                                  ) -> None:
    result = split_model(models["shared_weight"], ["r"], tmp_path)
    for half in (result.head, result.tail):
        assert [t.name for t in onnx.load(str(half)).graph.initializer] == ["w"]
    assert result.manifest_obj.extra["total_params"] == 16  # counted once


def test_unsorted_node_order_is_sorted(tmp_path: Path) -> None:
    model = mt.chain()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    path = tmp_path / "reversed.onnx"
    onnx.save_model(model, str(path))
    assert [c.names for c in list_cuts(path)] == [c.names for c in list_cuts(mt.chain())]
    assert split_model(path, ["r2"], tmp_path / "out").max_abs_diff == 0.0


def test_dynamic_dims() -> None:
    cuts = {c.names: c for c in list_cuts(mt.dynamic())}
    assert cuts[("x",)].tensors[0].shape == ("N", 3, "H", "W")
    assert cuts[("c1",)].bytes_per_sample is None  # spatial dims unknown
    assert cuts[("g",)].bytes_per_sample == 8 * 4
    assert ("g", "newshape") in cuts


def test_list_cuts_accepts_path_and_proto(models: dict[str, Path]) -> None:
    assert list_cuts(models["chain"]) == list_cuts(mt.chain())
    assert list_cuts(str(models["external"])) == list_cuts(mt.chain())


# -- split + verify over every cut ------------------------------------------------------------

@pytest.mark.parametrize(("name", "cut"), CASES, ids=[f"{n}-{'+'.join(c)}" for n, c in CASES])
def test_split_verifies_at_every_listed_cut(name: str, cut: tuple[str, ...], tmp_path: Path,
                                            models: dict[str, Path]) -> None:
    result = split_model(models[name], list(cut), tmp_path, num_samples=4)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    if name == "qdq_chain" and cut in {("xq",), ("q1",), ("q2",)}:
        assert result.max_abs_diff == 0.0  # the int8 tensor crosses bit-exactly
    manifest = Manifest.load(tmp_path)
    assert manifest == result.manifest_obj
    assert tuple(s.name for s in manifest.cut) == cut
    kind = list_cuts(models[name])[[c.names for c in list_cuts(models[name])].index(cut)].kind
    assert manifest.kind == kind
    assert (result.head is None) == (kind == "cloud_only")
    assert (result.tail is None) == (kind == "edge_only")
    assert not (tmp_path / "head.onnx").exists() or result.head is not None
    source = onnx.load(str(models[name]))
    for half in (result.head, result.tail):
        if half is None:
            continue
        proto = onnx.load(str(half))
        assert proto.ir_version == source.ir_version
        assert list(proto.opset_import) == list(source.opset_import)
        assert proto.producer_name == "splitinfer"
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["splitinfer.split_id"] == result.split_id
        assert meta["splitinfer.source_sha256"] == sha256_file(models[name])


def test_split_writes_manifest_and_places_initializers(tmp_path: Path,
                                                       models: dict[str, Path]) -> None:
    result = split_model(models["chain"], "p1", tmp_path, model_name="my chain")
    data = json.loads(result.manifest.read_text())
    assert data["split_id"] == result.split_id and result.split_id.startswith("my_chain-")
    assert data["source"]["sha256"] == sha256_file(models["chain"])
    assert result.head is not None and data["head"]["sha256"] == sha256_file(result.head)
    assert data["kind"] == "split"
    assert data["cut"] == [{"name": "p1", "dtype": "float32", "shape": ["N", 4, 4, 4]}]
    assert data["inputs"][0]["name"] == "x" and data["outputs"][0]["name"] == "y"
    assert data["bytes_per_sample"] == 256 and data["opsets"] == {"": 17}
    assert set(data["versions"]) == {"splitinfer", "onnx", "onnxruntime"}
    assert data["verification"]["tolerance"] == 1e-5
    head, tail = onnx.load(str(result.head)), onnx.load(str(result.tail))
    assert {t.name for t in head.graph.initializer} == {"w1", "b1"}
    assert {t.name for t in tail.graph.initializer} == {"w2", "wf", "bf"}
    again = split_model(models["chain"], ["p1"], tmp_path / "again", verify=False,
                        model_name="my chain")
    assert again.split_id == result.split_id and again.max_abs_diff is None
    assert again.manifest_obj.verification == {"skipped": True}


def test_qoperator_split_keeps_contrib_opset_and_quantization(tmp_path: Path,
                                                               models: dict[str, Path]) -> None:
    result = split_model(models["qoperator"], ["p1", "c2"], tmp_path)
    assert result.max_abs_diff == 0.0
    assert result.manifest_obj.opsets == {"": 17, "com.microsoft": 1}
    quant = {s.name: s.quantization for s in result.manifest_obj.cut}
    assert quant["c2"] is not None and quant["c2"].zero_point == 100
    assert result.manifest_obj.bytes_per_sample == 128


def test_external_data_source_and_halves(tmp_path: Path, models: dict[str, Path]) -> None:
    result = split_model(models["external"], ["p1"], tmp_path / "inline")
    assert result.max_abs_diff == 0.0
    assert not list((tmp_path / "inline").glob("*.data"))  # small halves stay inline
    ext = split_model(models["external"], ["p1"], tmp_path / "ext", external_data=True)
    assert ext.max_abs_diff == 0.0
    assert (tmp_path / "ext" / "head.onnx.data").is_file()
    files = ext.manifest_obj.extra["external_data"]
    assert files["tail"]["sha256"] == sha256_file(tmp_path / "ext" / "tail.onnx.data")
    # A rerun into the same directory must not append to the old data files.
    again = split_model(models["external"], ["p1"], tmp_path / "ext", external_data=True)
    assert again.manifest_obj.extra["external_data"] == files


def test_external_data_switches_on_past_the_limit(tmp_path: Path, models: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import splitter.extract

    monkeypatch.setattr(splitter.extract, "EXTERNAL_DATA_LIMIT", 1000)  # stands in for 2 GB
    result = split_model(models["chain"], ["p1"], tmp_path)
    assert set(result.manifest_obj.extra["external_data"]) == {"tail"}  # head: 448 bytes
    assert result.max_abs_diff == 0.0


def test_external_data_qoperator_typed_by_onnxruntime(tmp_path: Path, models: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # external data must resolve next to the model, not the cwd
    assert list_cuts(models["external_q"]) == list_cuts(mt.qoperator())
    result = split_model(models["external_q"], ["a"], tmp_path / "out")
    assert result.max_abs_diff == 0.0
    assert result.manifest_obj.cut[0].quantization is not None


def test_verification_failure_leaves_no_manifest(tmp_path: Path, models: dict[str, Path]
                                                 ) -> None:
    split_model(models["chain"], ["p1"], tmp_path)  # an earlier, good manifest
    with pytest.raises(VerificationError, match="no manifest written") as err:
        split_model(models["noisy"], ["r"], tmp_path)
    assert err.value.split_id is not None
    assert not (tmp_path / "manifest.json").exists()


def test_verify_split_reports_per_output(tmp_path: Path, models: dict[str, Path]) -> None:
    result = split_model(models["fpn"], ["c2", "l1"], tmp_path, verify=False)
    samples = make_samples(models["fpn"], 3, seed=1)
    report = verify_split(models["fpn"], result.head, result.tail, samples)
    assert {o.name for o in report.outputs} == {"p1", "p2"}
    assert report.max_abs_diff <= 1e-5 and report.samples == 1  # dynamic batch: one run
    report.check(1e-5)


# -- bad cuts ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "cut", "message"), [
    ("chain", ["pl"], "unknown tensor 'pl'; did you mean 'p1'"),
    ("residual", ["c"], "cut {'c'} leaves a path from input 'x' to output 'y' through 'r0' "
                        "uncovered"),
    ("concat", ["a2"], "through 'sr' uncovered"),
    ("fpn", ["p2"], "from input 'x' to output 'p1' through 'm1'"),
    ("chain", ["w1"], "'w1' is an initializer"),
    ("fpn", ["two"], "computed from constants only"),
    ("if_capture", ["t"], "inside the subgraph of node"),
    ("chain", ["g", "p1"], "'p1' in cut {'g', 'p1'} is not needed past the cut"),
    ("two_inputs", ["unused"], "does not lead to any graph output"),
    ("chain", [" "], "empty cut"),
])
def test_bad_cuts_name_what_is_wrong(name: str, cut: list[str], message: str,
                                     models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as err:
        split_model(models[name], cut, tmp_path)
    assert message in str(err.value)
    assert not (tmp_path / "head.onnx").exists()


def test_bad_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not a model")
    for path, message in [(junk, "not an ONNX model"), (tmp_path / "nope.onnx", "no such file")]:
        with pytest.raises(BadInputError, match=message):
            list_cuts(path)
    with pytest.raises(BadInputError, match="tolerance"):
        split_model(junk, ["x"], tmp_path, tolerance=-1.0)


# -- samples ----------------------------------------------------------------------------------

def test_make_samples_ranges_and_dynamic_dims() -> None:
    s = make_samples(mt.dynamic(), 3, seed=0)
    assert s["x"].shape == (3, 3, 32, 32) and s["x"].dtype == np.float32
    assert s["x"].min() >= 0.0 and s["x"].max() < 1.0
    two = make_samples(mt.two_inputs(), 2, seed=0)
    assert set(two) == {"x", "m", "unused"} and two["m"].shape == (2, 4)
    assert np.array_equal(make_samples(mt.chain(), 2, seed=5)["x"],
                          make_samples(mt.chain(), 2, seed=5)["x"])


X = TensorSpec("x", "float32", ("N", 3, 8, 8))


@pytest.mark.parametrize(("arrays", "message"), [
    ({"y": np.zeros((2, 3, 8, 8), np.float32)}, "missing 'x'; expected one array per"),
    ({"x": np.zeros((2, 3, 8, 8), np.float64)}, "expected dtype float32, got float64"),
    ({"x": np.zeros((2, 3, 9, 8), np.float32)}, "expected shape (samples, 3, 8, 8), got"),
    ({"x": np.zeros((3, 8, 8), np.float32)}, "expected shape (samples, 3, 8, 8)"),
    ({"x": np.zeros((0, 3, 8, 8), np.float32)}, "0 rows"),
])
def test_load_npz_rejects_mismatches(arrays: dict[str, np.ndarray], message: str,
                                     tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(BadInputError) as err:
        load_npz(path, [X])
    assert message in str(err.value)


def test_load_npz_files(tmp_path: Path, models: dict[str, Path]) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((2, 3, 8, 8), np.float32))
    assert load_npz(good, [X])["x"].shape == (2, 3, 8, 8)
    np.save(tmp_path / "one.npy", np.ones(3))
    (tmp_path / "text.npz").write_text("hello")
    for bad, message in [(tmp_path / "one.npy", "not an .npz"), (tmp_path / "text.npz",
                         "not an .npz"), (tmp_path / "missing.npz", "no such file")]:
        with pytest.raises(BadInputError, match=message):
            load_npz(bad, [X])
    with pytest.raises(TensorError):
        split_model(models["chain"], ["p1"], tmp_path / "o", samples={"x": np.ones((2, 3))})
    result = split_model(models["chain"], ["p1"], tmp_path / "o", samples=good)
    assert result.manifest_obj.verification["samples"] == 2
    fixed = TensorSpec("x", "float32", (1, 3, 8, 8))
    assert load_npz(good, [fixed])["x"].shape[0] == 2  # samples along the fixed batch axis
    assert math.isclose(float(load_npz(good, [fixed])["x"].sum()), 2 * 3 * 64)
