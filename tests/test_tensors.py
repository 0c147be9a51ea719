"""splitinfer.tensors.check_tensors: the one tensor check the edge agent and the worker share.

Each fault is checked for its message (what was expected, what came) and its class, and
the device's and the worker's reading of one fault are checked to be the same text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from splitinfer.errors import BadInputError, TensorError
from splitinfer.manifest import Quantization, TensorSpec
from splitinfer.tensors import check_tensors, names_shown
from splitinfer.wire import WireTensor

Q = Quantization(0.05, 3)
SPECS = (TensorSpec("a", "float32", ("N", 4)), TensorSpec("b", "int8", ("N", 2, "W"), Q))
FIXED = (TensorSpec("a", "float32", (1, 4)),)


def good(n: int = 2) -> dict[str, np.ndarray[Any, Any]]:
    return {"a": np.zeros((n, 4), np.float32), "b": np.zeros((n, 2, 7), np.int8)}


def wire(arrays: dict[str, np.ndarray[Any, Any]], q: Quantization | None = Q
         ) -> list[WireTensor]:
    return [WireTensor(name, array, q if name == "b" else None)
            for name, array in arrays.items()]


def test_good_tensors_come_back_in_spec_order_unchanged() -> None:
    arrays = good(3)
    out = check_tensors({"b": arrays["b"], "a": arrays["a"]}, SPECS, "cut", "s1")
    assert list(out) == ["a", "b"]
    assert out["a"] is arrays["a"] and out["b"] is arrays["b"]  # no copy
    assert list(check_tensors(wire(arrays)[::-1], SPECS, "cut", "s1")) == ["a", "b"]


@pytest.mark.parametrize(("arrays", "words"), [
    ({}, ["cut of s1: expected ['a', 'b'], got []", "missing ['a', 'b']"]),
    ({**good(), "c": np.zeros(1)}, ["got ['a', 'b', 'c']", "(unexpected ['c'])"]),
    ({"a": good()["a"], "z": good()["b"]}, ["missing ['b']; unexpected ['z']"]),
])
def test_names_missing_and_unexpected(arrays: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(BadInputError) as info:
        check_tensors(arrays, SPECS, "cut", "s1")
    assert type(info.value) is BadInputError  # the caller's class: a wrong key, not a tensor
    assert info.value.split_id == "s1"
    for word in words:
        assert word in str(info.value)


def test_names_error_class_is_the_callers_and_duplicates_count() -> None:
    tensors = [*wire(good()), WireTensor("a", np.zeros((2, 4), np.float32))]
    with pytest.raises(TensorError, match=r"expected \['a', 'b'\], got \['a', 'b', 'a'\] "
                                          r"\(duplicated \['a'\]\)"):
        check_tensors(tensors, SPECS, "cut", "s1", names_error=TensorError)


def test_hostile_names_are_cut_short() -> None:
    long = "x" * 500
    many = {f"{long}{i}": np.zeros(1) for i in range(20)}
    with pytest.raises(BadInputError) as info:
        check_tensors(many, SPECS, "cut", "s1")
    text = str(info.value)
    assert long not in text and "and 12 more" in text and len(text) < 1500
    assert names_shown(["ab", "c" * 41]) == f"['ab', '{'c' * 37}...']"


@pytest.mark.parametrize(("change", "message"), [
    ({"a": np.zeros((2, 4), np.float64)},
     "cut of s1: tensor 'a': expected dtype float32, got float64"),
    ({"a": np.zeros((2, 5), np.float32)},
     "cut of s1: tensor 'a': expected shape (N, 4), got (2, 5)"),
    ({"a": np.zeros((2, 4, 1), np.float32)},
     "cut of s1: tensor 'a': expected 2 dims (N, 4), got shape (2, 4, 1)"),
    ({"b": np.zeros((2, 3, 7), np.int8)},
     "cut of s1: tensor 'b': expected shape (N, 2, W), got (2, 3, 7)"),
    ({"a": np.zeros((), np.float32)},
     "cut of s1: tensor 'a': expected shape (N, 4) (samples first), got a scalar"),
    ({"a": [[0.0] * 4] * 2},
     "cut of s1: tensor 'a' must be a numpy array, got list"),
    ({"b": np.zeros((3, 2, 7), np.int8)},
     "cut of s1: tensor 'b': expected 2 samples as the tensors before it, got 3"),
])
def test_each_fault_names_expected_and_got(change: dict[str, Any], message: str) -> None:
    arrays = {**good(), **change}
    with pytest.raises(TensorError) as info:
        check_tensors(arrays, SPECS, "cut", "s1")
    assert str(info.value) == message
    assert info.value.split_id == "s1"


def test_symbolic_dims_take_any_size_fixed_ones_do_not() -> None:
    for width in (1, 7, 300):
        check_tensors({"a": np.zeros((5, 4), np.float32),
                       "b": np.zeros((5, 2, width), np.int8)}, SPECS, "cut", "s1")
    with pytest.raises(TensorError, match=r"expected shape \(1, 4\), got \(3, 4\)"):
        check_tensors({"a": np.zeros((3, 4), np.float32)}, FIXED, "inputs", "s2")


def test_any_batch_frees_a_fixed_first_dim_only() -> None:
    out = check_tensors({"a": np.zeros((3, 4), np.float32)}, FIXED, "inputs", "s2",
                        any_batch=True)
    assert out["a"].shape == (3, 4)
    with pytest.raises(TensorError, match=r"expected shape \(N, 4\), got \(3, 5\)"):
        check_tensors({"a": np.zeros((3, 5), np.float32)}, FIXED, "inputs", "s2",
                      any_batch=True)


def test_min_samples_refuses_an_empty_batch() -> None:
    empty = good(0)
    assert check_tensors(empty, SPECS, "cut", "s1")["a"].shape == (0, 4)  # the device's
    with pytest.raises(TensorError, match="cut of s1: expected at least one sample, got an "
                                          "empty batch"):
        check_tensors(empty, SPECS, "cut", "s1", min_samples=1)


def test_quantization_is_checked_where_the_tensors_carry_it() -> None:
    assert check_tensors(wire(good(), q=None), SPECS, "cut", "s1")  # absent: the spec's
    assert check_tensors(wire(good(), q=Quantization(0.05 * (1 + 1e-8), 3)), SPECS, "cut",
                         "s1")
    with pytest.raises(TensorError, match=r"tensor 'b': expected quantization \[0.05, 3\], "
                                          r"got \[0.1, 3\]"):
        check_tensors(wire(good(), q=Quantization(0.1, 3)), SPECS, "cut", "s1")
    with pytest.raises(TensorError, match=r"expected quantization \[0.05, 3\], got \[0.05, 4"):
        check_tensors(wire(good(), q=Quantization(0.05, 4)), SPECS, "cut", "s1")
    plain = [WireTensor("a", np.zeros((2, 4), np.float32), Q)]
    with pytest.raises(TensorError, match=r"tensor 'a': the cut is not quantized \(float32\); "
                                          "expected no 'q', got one"):
        check_tensors(plain, SPECS[:1], "cut", "s1")


def test_device_and_worker_read_one_fault_the_same() -> None:
    """The same bad tensor, as a bare array (the agent) and as a wire tensor (the worker)."""
    bad = {**good(), "a": np.zeros((2, 4), np.float16)}
    messages = []
    for tensors in (bad, wire(bad)):
        with pytest.raises(TensorError) as info:
            check_tensors(tensors, SPECS, "cut tensors", "s1", min_samples=1)
        messages.append(str(info.value))
    assert messages[0] == messages[1] == ("cut tensors of s1: tensor 'a': expected dtype "
                                          "float32, got float16")


def test_no_split_id_leaves_only_what() -> None:
    with pytest.raises(TensorError, match=r"^outputs: tensor 'a': expected dtype"):
        check_tensors({"a": np.zeros((1, 4), np.int32)}, FIXED, "outputs")
