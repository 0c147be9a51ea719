from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitinfer.dtypes import DTYPES
from splitinfer.errors import BadInputError, ErrorCode, WireError
from splitinfer.manifest import Quantization
from splitinfer.topics import Topics
from splitinfer.wire import (
    REQUEST,
    Envelope,
    ErrorInfo,
    WireTensor,
    decode,
    encode,
    peek_reply_address,
)

dtypes = st.sampled_from(sorted(DTYPES))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=dtypes)
def test_roundtrip_any_tensor(data: st.DataObject, dtype: str) -> None:
    array = data.draw(hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=5,
                                                                     min_side=0, max_side=6)))
    quant = Quantization(0.5, 3) if dtype in ("int8", "uint8") else None
    env = Envelope(kind=REQUEST, request_id="r1", device_id="d1", split_id="s1",
                   tensors=[WireTensor("x", array, quant)], deadline=12.5, reply_to="a/b",
                   timestamps={"sent": 1.25})
    out = decode(encode(env))
    got = out.tensors[0]
    assert got.array.dtype == array.dtype and got.array.shape == array.shape
    assert np.array_equal(got.array, array, equal_nan=array.dtype.kind == "f")
    assert got.quantization == quant
    assert (out.request_id, out.device_id, out.split_id, out.deadline, out.reply_to) == (
        "r1", "d1", "s1", 12.5, "a/b")
    assert out.timestamps == {"sent": 1.25}


def test_decode_is_zero_copy_view() -> None:
    env = Envelope(kind=REQUEST, request_id="r", device_id="d", split_id="s",
                   tensors=[WireTensor("x", np.arange(1000, dtype=np.float32))])
    arr = decode(encode(env)).tensors[0].array
    assert not arr.flags.owndata and not arr.flags.writeable


def test_non_contiguous_input_is_sent_c_order() -> None:
    base = np.arange(24, dtype=np.int16).reshape(4, 6)
    env = Envelope(kind=REQUEST, request_id="r", device_id="d", split_id="s",
                   tensors=[WireTensor("x", base.T)])
    assert np.array_equal(decode(encode(env)).tensors[0].array, base.T)


def test_wire_bytes_are_little_endian_whatever_the_array_order() -> None:
    values = np.arange(3, dtype=np.float32)
    for array in (values, values.astype(">f4"), values.astype("<f4")):
        env = Envelope(kind=REQUEST, request_id="r", device_id="d", split_id="s",
                       tensors=[WireTensor("x", array)])
        body = msgpack.unpackb(encode(env), raw=False)
        assert body["t"][0]["d"] == "float32"
        assert bytes(body["t"][0]["b"]) == values.astype("<f4").tobytes()
        assert np.array_equal(decode(encode(env)).tensors[0].array, values)


@pytest.mark.parametrize("version", [True, 1.0, "1", 2, None])
def test_version_must_be_the_int_1(version: object) -> None:
    env = Envelope(kind=REQUEST, request_id="r", device_id="d", split_id="s")
    body = msgpack.unpackb(encode(env), raw=False)
    body["v"] = version
    with pytest.raises(WireError, match="envelope version"):
        decode(msgpack.packb(body, use_bin_type=True))


def test_error_result_roundtrip() -> None:
    req = Envelope(kind=REQUEST, request_id="r", device_id="d", split_id="s")
    res = req.result(error=ErrorInfo.of(ErrorCode.UNKNOWN_SPLIT, "no split 's'"))
    out = decode(encode(res))
    assert out.kind == "res" and out.error == ErrorInfo("unknown_split", "no split 's'")


def _good() -> bytes:
    return encode(Envelope(kind=REQUEST, request_id="rid", device_id="d", split_id="s",
                           reply_to="p/v1/res/d",
                           tensors=[WireTensor("x", np.zeros((2, 3), np.float32))]))


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        (b"\xc1garbage", ErrorCode.BAD_MESSAGE, "not a msgpack envelope"),
        (_good()[:-7], ErrorCode.BAD_MESSAGE, "not a msgpack envelope"),
        (msgpack.packb([1, 2]), ErrorCode.BAD_MESSAGE, "must be a msgpack map"),
        (msgpack.packb({"v": 99}), ErrorCode.BAD_MESSAGE, "unsupported envelope version 99"),
        (msgpack.packb({"v": 1, "k": "req", "id": "a", "dev": "d", "split": "s",
                        "t": [{"n": "x", "d": "complex64", "s": [1], "b": b"12345678"}]}),
         ErrorCode.BAD_TENSOR, "unsupported dtype 'complex64'"),
        (msgpack.packb({"v": 1, "k": "req", "id": "a", "dev": "d", "split": "s",
                        "t": [{"n": "x", "d": "float32", "s": [3], "b": b"1234"}]}),
         ErrorCode.BAD_TENSOR, "4 bytes for float32 (3,), expected 12"),
        (msgpack.packb({"v": 1, "k": "req", "id": 5, "dev": "d", "split": "s"}),
         ErrorCode.BAD_MESSAGE, "'id'"),
    ],
)
def test_bad_payloads_name_the_problem(payload: bytes, code: ErrorCode, fragment: str) -> None:
    with pytest.raises(WireError) as info:
        decode(payload)
    assert info.value.code == code
    assert fragment in str(info.value)


def test_size_limit_checked_before_parsing() -> None:
    with pytest.raises(WireError) as info:
        decode(b"\0" * 2048, max_bytes=1024)
    assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_crash(payload: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(payload)
    peek_reply_address(payload)


def test_peek_reply_address_on_bad_tensor() -> None:
    bad = msgpack.packb({"v": 1, "k": "req", "id": "rid", "rt": "p/v1/res/d", "t": "x"})
    assert peek_reply_address(bad) == ("rid", "p/v1/res/d")
    assert peek_reply_address(b"\xc1") == ("", "")


def test_topics() -> None:
    t = Topics("acme/plant1")
    assert t.request("digits", "cam-1") == "acme/plant1/v1/req/digits/cam-1"
    assert t.result("cam-1") == "acme/plant1/v1/res/cam-1"
    assert t.shared_request_filter("g") == "$share/g/acme/plant1/v1/req/+/+"
    assert t.parse_request("acme/plant1/v1/req/digits/cam-1") == ("digits", "cam-1")
    assert t.parse_request("acme/plant1/v1/res/cam-1") is None
    for bad in ("a/b", "+", "#", "", "$sys"):
        with pytest.raises(BadInputError):
            t.result(bad)
    with pytest.raises(BadInputError):
        Topics("bad/#")
