"""Decoding under one budget: hostile payloads are refused before anything is built, every
malformed input is a WireError (bad_message / bad_tensor) naming the field, and no message
names a Python class or echoes a library's words."""

from __future__ import annotations

import contextlib
import math
import re
import tracemalloc
from collections.abc import Callable
from functools import partial
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulators.fuzz_messages import KINDS, FuzzGenerator
from splitinfer.errors import ErrorCode, WireError
from splitinfer.manifest import Quantization
from splitinfer.wire import REQUEST, Envelope, WireTensor, decode, encode, peek_reply_address

MiB = 1024 * 1024


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1, "k": "req", "id": "rid", "dev": "d", "split": "s", "dl": 0.0,
        "ts": {"sent": 1.0},
        "t": [{"n": "x", "d": "float32", "s": [2, 3], "b": bytes(24)}]}
    body.update(changes)
    return body


def _tensor(**changes: Any) -> dict[str, Any]:
    return _body(t=[{**_body()["t"][0], **changes}])


def _pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _with_raw(key: str, raw: bytes) -> bytes:
    """A valid envelope with ``raw`` (any bytes) as the value of one more key."""
    body = _body()
    return bytes((0x80 | (len(body) + 1),)) + b"".join(
        _pack(k) + _pack(v) for k, v in body.items()) + _pack(key) + raw


def _refused(payload: bytes, code: ErrorCode, fragment: str, **kw: Any) -> str:
    with pytest.raises(WireError) as info:
        decode(payload, **kw)
    assert info.value.code == code, info.value.message
    assert re.search(fragment, info.value.message), info.value.message
    return info.value.message


def _peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    with contextlib.suppress(WireError):
        fn()
    _size, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


# --- the issue's payloads -----------------------------------------------------------------

# dc001e + 30 x (dc0040 + 64 x (dc0040 + 64 x (dc0040 + 64 x 90))): 8.2 MB, 7.9 M arrays
_LEVEL = bytes.fromhex("dc0040") + 64 * b"\x90"
_ISSUE_BOMB = bytes.fromhex("dc001e") + 30 * (
    bytes.fromhex("dc0040") + 64 * (bytes.fromhex("dc0040") + 64 * _LEVEL))


def test_the_issue_payloads_cost_nothing() -> None:
    assert len(_ISSUE_BOMB) == 8_238_813
    inner = _ISSUE_BOMB[3:3 + len(_ISSUE_BOMB) // 30]
    flood = b"\xdd" + (8 * MiB - 600).to_bytes(4, "big") + b"\x90" * (8 * MiB - 600)
    cases = [
        (_ISSUE_BOMB, "must be a msgpack map, got array"),
        (_with_raw("x", b"\xdc\x00\x01" + inner), "nested deeper than 5"),
        (_with_raw("t", flood), "an array of 8388008 entries at byte \\d+; at most 1024"),
    ]
    for payload, fragment in cases:
        assert len(payload) <= 8 * MiB
        _refused(payload, ErrorCode.BAD_MESSAGE, fragment)
        # nothing proportional to the claims is built: a few KB, not 1.2 GB
        assert _peak_bytes(partial(decode, payload)) < 64 * 1024
        assert _peak_bytes(partial(peek_reply_address, payload)) < 64 * 1024
        assert peek_reply_address(payload) == ("", "")


def test_the_budget_is_for_the_whole_message() -> None:
    # every container small, all of them together over the budget
    wide = b"\xdc\x00\x10" + 16 * (b"\xdc\x03\xe8" + b"\xc0" * 1000)
    _refused(_with_raw("x", wide), ErrorCode.BAD_MESSAGE, "more than 4096 values")
    many = b"\xdc\x02\x58" + 600 * b"\x90"  # 600 empty arrays
    _refused(_with_raw("x", many), ErrorCode.BAD_MESSAGE, "more than 512 maps and arrays")
    deep = _with_raw("x", b"\x91" * 100_000 + b"\xc0")
    _refused(deep, ErrorCode.BAD_MESSAGE, "nested deeper than 5")
    assert _peak_bytes(lambda: decode(deep)) < 64 * 1024


def test_a_real_envelope_fits_the_budget_with_room() -> None:
    """64 tensors, every optional key, an 8-dim shape each, a full ts map."""
    quant = Quantization(0.5, -3)
    tensors = [WireTensor(f"t{i}", np.zeros((1, 1, 1, 1, 1, 1, 2, 2), np.int8), quant)
               for i in range(64)]
    env = Envelope(kind=REQUEST, request_id="r" * 256, device_id="d" * 256,
                   split_id="s" * 256, tensors=tensors, deadline=1e10, reply_to="p/v1/res/d",
                   timestamps={f"stage{i}": float(i) for i in range(63)})
    out = decode(encode(env))
    assert len(out.tensors) == 64 and out.tensors[63].quantization == quant


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"\xdb\xff\xff\xff\xffabc", "a str of 4294967295 bytes at byte \\d+; at most 65536"),
    (b"\xc6\x80\x00\x00\x00" + bytes(16), "a bin of 2147483648 bytes at byte \\d+; at most"),
    (b"\xc5\xff\xff" + bytes(10), "a bin at byte \\d+ claims 65535 bytes, 10 left"),
    (b"\xdd\xff\xff\xff\xff\xc0", "an array of 4294967295 entries"),
    (b"\xdf\xff\xff\xff\xff\xa1a\xc0", "a map of 4294967295 entries"),
    (b"\xdc\x00\x05\xc0", "an array at byte \\d+ claims 5 entries, 1 bytes left"),
    (b"\xd4\x01\x00", "an ext type at byte \\d+; ext types are not allowed"),
    (b"\xc7\x01\x05x", "ext types are not allowed"),
    (b"\xd6\xff" + bytes(4), "ext types are not allowed"),  # a msgpack timestamp
    (b"\xc1", "byte \\d+ \\(0xc1\\) starts no msgpack value"),
    (b"\x81\x01\xc0", "a map key at byte \\d+ is an int; keys must be str"),
    (b"\x81\xc4\x01k\xc0", "a map key at byte \\d+ is a bin; keys must be str"),
    (b"\xa2\xff\xfe", "a str is not valid UTF-8"),
])
def test_structure_errors_name_the_place(raw: bytes, fragment: str) -> None:
    _refused(_with_raw("x", raw), ErrorCode.BAD_MESSAGE, fragment)


def test_trailing_and_truncated_bytes() -> None:
    good = _pack(_body())
    _refused(good + b"\x00", ErrorCode.BAD_MESSAGE, "1 byte\\(s\\) after the envelope's end")
    for cut in (1, 10, len(good) // 2, len(good) - 1):
        _refused(good[:cut], ErrorCode.BAD_MESSAGE, "not a msgpack envelope: (truncated|a )")
    _refused(b"", ErrorCode.BAD_MESSAGE, "empty payload")


# --- fields -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    [2**64 - 1, 0], [0, 2**64 - 1], [2**63, 0, 2**63], [1, 2**32 + 1], [8 * MiB + 1],
    [0, 10**12], [4096, 4096],
])
def test_huge_dimensions_are_bad_tensor(shape: list[int]) -> None:
    _refused(_pack(_tensor(s=shape, b=b"")), ErrorCode.BAD_TENSOR,
             r"tensor 'x' \(t\[0\]\) field 's' \(shape\): s\[\d\] = \d+ takes the tensor past "
             "the 8388608 byte limit")


@pytest.mark.parametrize(("dim", "shown"), [
    (True, "true"), (False, "false"), (-1, "-1"), (-2**63, "-9223372036854775808"),
    (1.0, "1.0"), (math.nan, "nan"), ("2", "'2'"), (None, "nil"), ([2], "an array of 1"),
])
def test_a_dimension_is_an_int_not_a_bool(dim: Any, shown: str) -> None:
    _refused(_pack(_tensor(s=[dim, 3])), ErrorCode.BAD_TENSOR,
             re.escape(f"field 's' (shape): s[0] is {shown}; expected an int >= 0"))


def test_zero_sized_tensors_with_sane_dims_still_decode() -> None:
    out = decode(_pack(_tensor(s=[0, 64], b=b"")))
    assert out.tensors[0].array.shape == (0, 64)


@pytest.mark.parametrize("deadline", [math.nan, math.inf, -math.inf, -1.0, -1e-9, True,
                                      "soon", None, [1.0]])
def test_deadline_must_be_finite_and_not_negative(deadline: Any) -> None:
    _refused(_pack(_body(dl=deadline)), ErrorCode.BAD_MESSAGE,
             r"envelope field 'dl' \(deadline\): .*; expected a finite number >= 0")


def test_deadline_int_and_zero_are_fine() -> None:
    assert decode(_pack(_body(dl=0))).deadline == 0.0
    assert decode(_pack(_body(dl=1_800_000_000))).deadline == 1.8e9


@pytest.mark.parametrize("version", [True, False, 1.0, "1", 2, None, 2**64 - 1])
def test_version_true_is_not_1(version: Any) -> None:
    _refused(_pack(_body(v=version)), ErrorCode.BAD_MESSAGE, "unsupported envelope version")


@pytest.mark.parametrize("ts", [{"sent": math.nan}, {"sent": math.inf}, {"sent": True},
                                {"sent": "now"}, [1.0]])
def test_timestamps_are_finite_numbers(ts: Any) -> None:
    _refused(_pack(_body(ts=ts)), ErrorCode.BAD_MESSAGE, "envelope field 'ts' \\(timestamps\\)")


@pytest.mark.parametrize(("q", "fragment"), [
    ([math.nan, 0], "scale nan; expected a finite number > 0"),
    ([0.0, 0], "scale 0.0"), ([-1.0, 0], "scale -1.0"), ([True, 0], "scale true"),
    ([0.5, True], "zero point true; expected an int -128..127"),
    ([0.5, 128], "zero point 128; expected an int -128..127"),
    ([0.5, 2**64 - 1], "zero point 18446744073709551615"),
    ([0.5, 0.5], "zero point 0.5"), ([0.5], "expected an array \\[scale, zero_point\\]"),
    ("q", "expected an array \\[scale, zero_point\\], got 'q'"),
])
def test_quantization_is_checked(q: Any, fragment: str) -> None:
    _refused(_pack(_tensor(d="int8", s=[2, 3], b=bytes(6), q=q)), ErrorCode.BAD_TENSOR,
             "field 'q' \\(quantization\\): " + fragment)


def test_ids_are_bounded() -> None:
    for key in ("id", "dev", "split"):
        _refused(_pack(_body(**{key: "x" * 257})), ErrorCode.BAD_MESSAGE,
                 f"envelope field '{key}' .*: 257 characters; expected at most 256")
    assert decode(_pack(_body(id="x" * 256))).request_id == "x" * 256


def test_fields_of_the_wrong_msgpack_type_are_named() -> None:
    msg = _refused(_pack(_tensor(b=bytes(24).hex())), ErrorCode.BAD_MESSAGE,
                   "field 'b'")
    assert msg == "tensor 'x' (t[0]) field 'b' (raw tensor bytes): expected bin, got str"
    _refused(_pack(_body(id=5)), ErrorCode.BAD_MESSAGE,
             "envelope field 'id' \\(request id\\): expected str, got int")
    _refused(_pack(_body(t=[5])), ErrorCode.BAD_MESSAGE, "tensor t\\[0\\]: expected a map, got int")
    _refused(_pack({k: v for k, v in _body().items() if k != "split"}), ErrorCode.BAD_MESSAGE,
             "envelope field 'split' \\(split id\\) is missing; expected str")
    _refused(_pack(_body(err={"code": 1})), ErrorCode.BAD_MESSAGE,
             "error field 'code' \\(error code\\): expected str, got int")


# --- property: whatever comes in, only WireError goes out, in msgpack words ---------------

# Words of Python and of msgpack-python a message must never carry.
_LEAKS = re.compile(r"Error\b|Exception|NoneType|\bdict\b|\blist\b|\btuple\b|bytes object|"
                    r"Traceback|ExtraData|OutOfData|FormatError|StackError|unpack|<class")

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=6),
    max_leaves=30)


def _check(payload: bytes) -> None:
    try:
        decode(payload, max_bytes=MiB)
    except WireError as exc:
        assert exc.code in (ErrorCode.BAD_MESSAGE, ErrorCode.BAD_TENSOR,
                            ErrorCode.PAYLOAD_TOO_LARGE), exc.code
        assert not _LEAKS.search(exc.message), exc.message
        assert len(exc.message) < 400, exc.message
    rid, rt = peek_reply_address(payload, max_bytes=MiB)
    assert isinstance(rid, str) and isinstance(rt, str)


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(["v", "k", "id", "dev", "split", "dl", "ts", "t", "rt", "err",
                            "n", "d", "s", "b", "q", "c"]), value=_values)
def test_any_value_in_any_field(key: str, value: Any) -> None:
    body = _tensor(**{key: value}) if key in "ndsbqc" else _body(**{key: value})
    _check(_pack(body))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_bytes(data: st.DataObject) -> None:
    good = bytearray(_pack(_body()))
    for _ in range(data.draw(st.integers(1, 8))):
        good[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    _check(bytes(good))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_fuzz_kind_is_refused_cleanly(kind: str) -> None:
    """The bench's generator, every kind, many draws: WireError or a decodable envelope."""
    gen = FuzzGenerator("s", [("x", "float32", (1, 64), None), ("y", "int8", (1, 4), [0.5, 1])],
                        seed=7, max_payload=MiB)
    for i in range(40):
        _check(gen.make(kind, f"r{i}"))
