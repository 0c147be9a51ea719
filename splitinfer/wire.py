"""The message envelope: one msgpack map per MQTT payload, requests and results alike.

::

    {"v": 1,                      # envelope version; a decoder refuses any other
     "k": "req" | "res",          # kind
     "id": "…",                   # request id, echoed by the result
     "dev": "cam-0007",           # device id
     "split": "digits_cnn-…",     # split id (names head/tail artifacts)
     "dl": 1764345600.123,        # absolute deadline, unix seconds (0 = none)
     "rt": "splitinfer/v1/res/cam-0007",   # informational: the reply always goes to the
                                          # result topic of the request topic's device id
     "ts": {"head_start": …, "sent": …},   # stage timestamps, unix seconds, per side's clock
     "t": [{"n": "q1", "d": "int8", "s": [4, 16, 4, 4], "b": <bin>, "q": [0.02, 0]}],
     "err": {"code": "bad_tensor", "msg": "…"}}   # results only, instead of tensors

Tensors travel as raw C-order little-endian bytes (whatever the host's byte order) with
their canonical dtype name and shape; int8/uint8
tensors carry ``q = [scale, zero_point]``. An image input of a cloud_only split whose
manifest declares an ``input_codec`` travels as ``"c": "jpeg"|"png"`` and ``"b"`` an
array of bin, one encoded image per sample (:mod:`splitinfer.imagecodec`); the decoder
needs the split's codecs (``codecs=``) and checks each image's header against the
declared shape before decompressing it. A raw tensor may travel compressed:
``"z": "zstd"|"lz4"`` and ``"b"`` the compressed bytes (:mod:`splitinfer.compression`),
decompressed into exactly the byte count its shape and dtype imply, never more; a
compression this install lacks is refused naming those it has. Decoding checks every
size before touching data and wraps the received bytes with :func:`numpy.frombuffer` (no
further copy; the arrays are read-only). No pickle, no ext types, no code on the wire.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from splitinfer import compression
from splitinfer.dtypes import DTYPES, canonical_dtype
from splitinfer.errors import ErrorCode, WireError
from splitinfer.imagecodec import MAX_DECODED_BYTES, ImageCodec
from splitinfer.manifest import Quantization

_BIG_ENDIAN_HOST = sys.byteorder == "big"

__all__ = [
    "VERSION",
    "DEFAULT_MAX_PAYLOAD",
    "REQUEST",
    "RESULT",
    "WireTensor",
    "ErrorInfo",
    "Envelope",
    "encode",
    "decode",
    "new_request_id",
    "peek_reply_address",
]

VERSION = 1
REQUEST = "req"
RESULT = "res"
# mosquitto's own default message_size_limit is 256 MB; ours is tighter on purpose.
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
_MAX_TENSORS = 64
_MAX_DIMS = 8
_MAX_IMAGES = 1024  # encoded images (samples) in one codec'd tensor
# split id -> tensor name -> the codec the split's manifest declares for it
Codecs = Mapping[str, Mapping[str, ImageCodec]]


@dataclass(frozen=True)
class WireTensor:
    name: str
    array: np.ndarray[Any, Any]
    quantization: Quantization | None = None
    codec: ImageCodec | None = None  # None: raw bytes; else one encoded image per sample
    # "zstd" | "lz4": send the raw bytes compressed (splitinfer.compression), only where
    # the compressed form is smaller; None: uncompressed (or the policy encode() is given)
    compression: str | None = None


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str

    @classmethod
    def of(cls, code: ErrorCode, message: str) -> ErrorInfo:
        return cls(code=code.value, message=message)


@dataclass
class Envelope:
    kind: str
    request_id: str
    device_id: str
    split_id: str
    tensors: Sequence[WireTensor] = ()
    deadline: float = 0.0
    reply_to: str = ""
    timestamps: dict[str, float] = field(default_factory=dict)
    error: ErrorInfo | None = None

    def __post_init__(self) -> None:
        if self.kind not in (REQUEST, RESULT):
            raise WireError(f"envelope kind must be {REQUEST!r} or {RESULT!r}, got {self.kind!r}")

    def stamp(self, stage: str, when: float | None = None) -> None:
        self.timestamps[stage] = time.time() if when is None else when

    def arrays(self) -> dict[str, np.ndarray[Any, Any]]:
        return {t.name: t.array for t in self.tensors}

    def expired(self, now: float | None = None) -> bool:
        return self.deadline > 0 and (time.time() if now is None else now) > self.deadline

    def result(self, tensors: Sequence[WireTensor] = (), error: ErrorInfo | None = None,
               ) -> Envelope:
        """A result envelope answering this request (timestamps carried over)."""
        return Envelope(kind=RESULT, request_id=self.request_id, device_id=self.device_id,
                        split_id=self.split_id, tensors=tensors, deadline=self.deadline,
                        timestamps=dict(self.timestamps), error=error)


def new_request_id() -> str:
    return uuid.uuid4().hex


def _tensor_to_wire(t: WireTensor, policy: str | None = None) -> dict[str, Any]:
    array = t.array
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and _BIG_ENDIAN_HOST):
        array = array.astype(array.dtype.newbyteorder("<"))  # the wire is little-endian
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    entry: dict[str, Any] = {
        "n": t.name,
        "d": canonical_dtype(array.dtype),
        "s": list(array.shape),
    }
    if t.codec is not None:
        entry["c"] = t.codec.codec
        try:
            entry["b"] = t.codec.encode(array)
        except ValueError as exc:  # BadInputError: not the array the codec was made for
            raise WireError(f"cannot encode tensor {t.name!r} as {t.codec.spec}: {exc}",
                            code=ErrorCode.BAD_TENSOR) from exc
    else:
        entry["b"] = array.reshape(-1).view(np.uint8).data if array.size else b""
        how = t.compression or policy
        if how is not None and array.nbytes >= compression.MIN_BYTES:
            try:
                packed = compression.compress(how, entry["b"])
            except compression.CodecError as exc:
                raise WireError(f"cannot compress tensor {t.name!r}: {exc}",
                                code=ErrorCode.BAD_TENSOR) from exc
            # only where it pays its decompression: >= MIN_SAVING smaller, never bigger
            if compression.worth_sending(array.nbytes, len(packed)):
                entry["z"], entry["b"] = how, packed
    if t.quantization is not None:
        entry["q"] = [float(t.quantization.scale), int(t.quantization.zero_point)]
    return entry


def encode(env: Envelope, compression: str | None = None) -> bytes:
    """Serialize an envelope; raises WireError for values the contract cannot carry.

    ``compression`` ("zstd" | "lz4" | None): the policy for raw tensors that name none
    themselves (a caller passes its split manifest's ``compression``); a tensor is sent
    compressed only where that saves at least ``compression.MIN_SAVING`` of its raw bytes
    and it holds at least ``compression.MIN_BYTES`` (:func:`compression.worth_sending`).
    """
    body: dict[str, Any] = {
        "v": VERSION, "k": env.kind, "id": env.request_id, "dev": env.device_id,
        "split": env.split_id, "dl": float(env.deadline), "ts": env.timestamps,
        "t": [_tensor_to_wire(t, compression) for t in env.tensors],
    }
    if env.reply_to:
        body["rt"] = env.reply_to
    if env.error is not None:
        body["err"] = {"code": env.error.code, "msg": env.error.message}
    try:
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode envelope {env.request_id!r}: {exc}") from exc


# --- decoding: one budget for the whole message, checked before anything is built -------

# What a message may hold at most, all containers together. A real envelope is far below
# (one tensor: ~40 values, 5 containers; 64 tensors with every optional key: ~1,500
# values, ~260 containers; 1024 encoded images add 1024 values): the budget bounds what
# a hostile message costs to look at, whatever its containers claim.
_MAX_VALUES = 4096  # every msgpack value: scalars, str, bin, containers, map keys
_MAX_CONTAINERS = 512  # maps and arrays
_MAX_DEPTH = 5  # containers inside containers (the envelope's own need 4: t[i].s)
_MAX_MAP = 64  # entries in one map
_MAX_ARRAY = max(_MAX_TENSORS, _MAX_DIMS, _MAX_IMAGES)  # entries in one array
_MAX_STR = 64 * 1024  # bytes of one str (keys and values)
_MAX_ID = 256  # characters of id, dev and split

# What each first byte starts: _SCALAR (fixed size, _WIDTH = its size in bytes, type
# byte included), _STR / _BIN (_WIDTH = bytes of the length that follows, 0: in the type
# byte), _ARRAY / _MAP (same), _EXT, _NONE (0xc1, never used).
_SCALAR, _STR, _BIN, _ARRAY, _MAP, _EXT, _NONE = range(7)
_CLASS = bytearray([_NONE] * 256)
_WIDTH = bytearray(256)
for _b in range(256):
    if _b <= 0x7F or _b >= 0xE0 or _b in (0xC0, 0xC2, 0xC3):
        _CLASS[_b], _WIDTH[_b] = _SCALAR, 1
    elif _b <= 0x8F:
        _CLASS[_b] = _MAP
    elif _b <= 0x9F:
        _CLASS[_b] = _ARRAY
    elif _b <= 0xBF:
        _CLASS[_b] = _STR
for _b, _c, _w in ((0xCA, _SCALAR, 5), (0xCB, _SCALAR, 9), (0xCC, _SCALAR, 2),
                   (0xCD, _SCALAR, 3), (0xCE, _SCALAR, 5), (0xCF, _SCALAR, 9),
                   (0xD0, _SCALAR, 2), (0xD1, _SCALAR, 3), (0xD2, _SCALAR, 5),
                   (0xD3, _SCALAR, 9), (0xD9, _STR, 1), (0xDA, _STR, 2), (0xDB, _STR, 4),
                   (0xC4, _BIN, 1), (0xC5, _BIN, 2), (0xC6, _BIN, 4), (0xDC, _ARRAY, 2),
                   (0xDD, _ARRAY, 4), (0xDE, _MAP, 2), (0xDF, _MAP, 4),
                   *((_x, _EXT, 0) for _x in (0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7,
                                               0xD8))):
    _CLASS[_b], _WIDTH[_b] = _c, _w
_EXT_BYTES = frozenset(_b for _b in range(256) if _CLASS[_b] == _EXT)


def _type_at(first: int) -> str:
    """The msgpack type a first byte starts (for messages)."""
    if first <= 0x7F or first >= 0xE0 or 0xCC <= first <= 0xD3:
        return "int"
    if first <= 0x8F or first in (0xDE, 0xDF):
        return "map"
    if first <= 0x9F or first in (0xDC, 0xDD):
        return "array"
    if first <= 0xBF or 0xD9 <= first <= 0xDB:
        return "str"
    names = {0xC0: "nil", 0xC2: "bool", 0xC3: "bool", 0xC4: "bin", 0xC5: "bin", 0xC6: "bin",
             0xCA: "float", 0xCB: "float"}
    return names.get(first, "ext" if first in _EXT_BYTES else "no msgpack type")


def _a(kind: str) -> str:
    if kind.startswith("no "):
        return kind
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _malformed(why: str) -> WireError:
    return WireError(f"payload is not a msgpack envelope: {why}")


def _scan(data: bytes | bytearray | memoryview, max_bin: int) -> None:
    """Walk the msgpack structure of ``data`` without building anything; WireError unless
    it is one map within every limit above, with str keys, no ext and nothing after it.

    The cost is bounded by the budget, not by the payload: a container claiming more
    entries than the budget has left is refused from its header, str and bin are skipped
    by their length.
    """
    size = len(data)
    if not size:
        raise _malformed("empty payload")
    first = data[0]
    if _type_at(first) not in ("map", "ext", "no msgpack type"):  # those two: see below
        raise WireError(f"envelope must be a msgpack map, got {_type_at(first)}")
    pos = values = containers = 0
    # per open container: what is still to read in it: values of an array (> 0), or
    # key-value entries of a map (< 0, counted up to 0; each key read inline, a str)
    left = [1]
    classes, widths = _CLASS, _WIDTH
    while True:
        count = left[-1]
        if count > 0:
            left[-1] = count - 1
        elif count < 0:
            left[-1] = count + 1
            if pos >= size:
                raise _malformed(f"truncated at byte {pos}")
            first = data[pos]
            if classes[first] != _STR:
                raise _malformed(f"a map key at byte {pos} is {_a(_type_at(first))}; keys "
                                 "must be str")
            width = widths[first]
            length = (int.from_bytes(data[pos + 1:pos + 1 + width], "big") if width
                      else first & 0x1F)
            if length > _MAX_STR:
                raise _malformed(f"a str of {length} bytes at byte {pos}; at most {_MAX_STR}")
            start, pos = pos, pos + 1 + width + length
            if pos > size:
                raise _malformed(f"a str at byte {start} claims {length} bytes, "
                                 f"{max(size - start - 1 - width, 0)} left")
            values += 1
        else:
            left.pop()
            if not left:
                break
            continue
        if pos >= size:
            raise _malformed(f"truncated at byte {pos}")
        first = data[pos]
        cls = classes[first]
        values += 1
        if cls == _SCALAR:
            pos += widths[first]
            continue
        width = widths[first]
        if cls >= _EXT:
            if cls == _EXT:
                raise _malformed(f"an ext type at byte {pos}; ext types are not allowed")
            raise _malformed(f"byte {pos} (0x{first:02x}) starts no msgpack value")
        if width:
            if pos + 1 + width > size:
                raise _malformed(f"truncated at byte {pos}")
            length = int.from_bytes(data[pos + 1:pos + 1 + width], "big")
        else:
            length = first & (0x1F if cls == _STR else 0x0F)
        start, pos = pos, pos + 1 + width
        if cls <= _BIN:
            what, limit = ("str", _MAX_STR) if cls == _STR else ("bin", max_bin)
            if length > limit:
                raise _malformed(f"a {what} of {length} bytes at byte {start}; at most "
                                 f"{limit}")
            if pos + length > size:
                raise _malformed(f"a {what} at byte {start} claims {length} bytes, "
                                 f"{size - pos} left")
            pos += length
            continue
        kind = "map" if cls == _MAP else "array"
        containers += 1
        if containers > _MAX_CONTAINERS:
            raise _malformed(f"more than {_MAX_CONTAINERS} maps and arrays in one message")
        if len(left) > _MAX_DEPTH:
            raise _malformed(f"containers nested deeper than {_MAX_DEPTH} at byte {start}")
        if length > (_MAX_MAP if cls == _MAP else _MAX_ARRAY):
            raise _malformed(f"{_a(kind)} of {length} entries at byte {start}; at most "
                             f"{_MAX_MAP if cls == _MAP else _MAX_ARRAY}")
        entries = 2 * length if cls == _MAP else length
        if values + entries > _MAX_VALUES:
            raise _malformed(f"more than {_MAX_VALUES} values in one message")
        if entries > size - pos:  # every value takes at least one byte
            raise _malformed(f"{_a(kind)} at byte {start} claims {length} entries, "
                             f"{size - pos} bytes left")
        left.append(-length if cls == _MAP else length)
    if values > _MAX_VALUES:
        raise _malformed(f"more than {_MAX_VALUES} values in one message")
    if pos != size:
        raise _malformed(f"{size - pos} byte(s) after the envelope's end")


def _unpack(payload: bytes | bytearray | memoryview, max_bytes: int) -> dict[str, Any]:
    """The envelope map, after :func:`_scan` has checked the budget (WireError if not)."""
    _scan(payload, max_bytes)
    try:
        body = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, max_bin_len=max_bytes,
            max_str_len=_MAX_STR, max_array_len=_MAX_ARRAY, max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except UnicodeDecodeError:
        raise _malformed("a str is not valid UTF-8") from None
    except Exception:  # _scan has checked the structure; msgpack's own words stay out
        raise _malformed("not decodable") from None
    if not isinstance(body, dict):  # _scan saw a map
        raise WireError("envelope must be a msgpack map")
    return body


def _kind_of(value: object) -> str:
    """The msgpack type of a decoded value (for messages; never a Python class name)."""
    if value is None:
        return "nil"
    for types, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"),
                        (bytes, "bin"), (list, "array"), (dict, "map")):
        if isinstance(value, types):
            return name
    return "an unknown type"


def _show(value: object) -> str:
    """A short rendering of a hostile value: never long, never a container's content."""
    if isinstance(value, (list, dict)):
        return f"{_a(_kind_of(value))} of {len(value)}"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "nil"}[value]
    if isinstance(value, bytes):
        return f"a bin of {len(value)} bytes"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_NAMES: dict[type, str] = {str: "str", bytes: "bin", list: "array", dict: "map"}


def _field(body: Mapping[str, Any], key: str, kind: type, what: str,
           where: str = "envelope") -> Any:
    """``body[key]`` if it is of ``kind`` (str, bytes, list or dict), else WireError."""
    if key not in body:
        raise WireError(f"{where} field {key!r} ({what}) is missing; expected "
                        f"{_NAMES[kind]}")
    value = body[key]
    if not isinstance(value, kind):
        raise WireError(f"{where} field {key!r} ({what}): expected {_NAMES[kind]}, got "
                        f"{_kind_of(value)}")
    return value


def _text(body: Mapping[str, Any], key: str, what: str) -> str:
    value: str = _field(body, key, str, what)
    if len(value) > _MAX_ID:
        raise WireError(f"envelope field {key!r} ({what}): {len(value)} characters; "
                        f"expected at most {_MAX_ID}")
    return value


def _shape(entry: Mapping[str, Any], where: str, itemsize: int, max_bytes: int) -> list[int]:
    """``s``, checked before any arithmetic on it: ints (not bool) 0 ≤ d, and the
    non-zero dimensions' product at most what ``max_bytes`` holds (numpy cannot even
    represent some shapes whose product is 0, e.g. ``[2**64 - 1, 0]``)."""
    shape: list[int] = _field(entry, "s", list, "shape", where)
    if len(shape) > _MAX_DIMS:
        raise WireError(f"{where} field 's' (shape): {len(shape)} dims; expected at most "
                        f"{_MAX_DIMS}", code=ErrorCode.BAD_TENSOR)
    limit = max_bytes // max(itemsize, 1)
    product = 1
    for i, d in enumerate(shape):
        if type(d) is not int or d < 0:
            raise WireError(f"{where} field 's' (shape): s[{i}] is {_show(d)}; expected an "
                            "int >= 0", code=ErrorCode.BAD_TENSOR)
        product *= max(d, 1)
        if product > limit:
            raise WireError(f"{where} field 's' (shape): s[{i}] = {d} takes the tensor past "
                            f"the {max_bytes} byte limit", code=ErrorCode.BAD_TENSOR)
    return shape


def _quantization(entry: Mapping[str, Any], where: str, dtype: np.dtype[Any]
                  ) -> Quantization | None:
    q = entry.get("q")
    if q is None:
        return None
    if not (isinstance(q, list) and len(q) == 2):
        raise WireError(f"{where} field 'q' (quantization): expected an array [scale, "
                        f"zero_point], got {_show(q)}", code=ErrorCode.BAD_TENSOR)
    scale, zero = q
    if not (_number(scale) and math.isfinite(scale) and scale > 0):
        raise WireError(f"{where} field 'q' (quantization): scale {_show(scale)}; expected a "
                        "finite number > 0", code=ErrorCode.BAD_TENSOR)
    low, high = ((int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)) if dtype.kind in "iu"
                 else (-2**63, 2**63 - 1))
    if type(zero) is not int or not low <= zero <= high:
        raise WireError(f"{where} field 'q' (quantization): zero point {_show(zero)}; "
                        f"expected an int {low}..{high}", code=ErrorCode.BAD_TENSOR)
    return Quantization(scale=float(scale), zero_point=zero)


def _decode_images(entry: Mapping[str, Any], name: str, where: str, dtype_name: str,
                   shape: list[int], codecs: Mapping[str, ImageCodec], split_id: str,
                   ) -> tuple[np.ndarray[Any, Any], ImageCodec]:
    codec_name = _field(entry, "c", str, "image codec", where)
    codec = codecs.get(name)
    if codec is None:
        raise WireError(f"{where}: sent as {_show(codec_name)} images, but split "
                        f"{split_id!r} declares no input codec for it; send raw bytes",
                        code=ErrorCode.BAD_TENSOR)
    if codec_name != codec.codec:
        raise WireError(f"{where}: sent as {_show(codec_name)} images, split {split_id!r} "
                        f"declares {codec.codec!r}", code=ErrorCode.BAD_TENSOR)
    images = _field(entry, "b", list, "encoded images", where)
    if len(images) > _MAX_IMAGES or not all(isinstance(b, bytes) for b in images):
        raise WireError(f"{where} field 'b': expected an array of at most {_MAX_IMAGES} "
                        "bin (one encoded image per sample)")
    return codec.decode(images, shape, dtype_name, max_bytes=MAX_DECODED_BYTES), codec


def _tensor_from_wire(entry: Any, index: int, codecs: Mapping[str, ImageCodec] | None,
                      split_id: str, max_bytes: int) -> WireTensor:
    if not isinstance(entry, dict):
        raise WireError(f"tensor t[{index}]: expected a map, got {_kind_of(entry)}")
    name: str = _field(entry, "n", str, "tensor name", f"tensor t[{index}]")
    where = f"tensor {_show(name)} (t[{index}])"
    dtype_name = _field(entry, "d", str, "dtype name", where)
    if dtype_name not in DTYPES:
        raise WireError(f"{where}: unsupported dtype {_show(dtype_name)}; expected one of "
                        f"{sorted(DTYPES)}", code=ErrorCode.BAD_TENSOR)
    dtype = DTYPES[dtype_name]
    zcodec: str | None = None
    if "c" in entry:
        if "z" in entry:
            raise WireError(f"{where}: fields 'c' (image codec) and 'z' (compression) "
                            "together; an encoded image is sent as it is, without 'z'",
                            code=ErrorCode.BAD_TENSOR)
        shape = _shape(entry, where, dtype.itemsize, MAX_DECODED_BYTES)
        array, codec = _decode_images(entry, name, where, dtype_name, shape, codecs or {},
                                      split_id)
    else:
        codec = None
        shape = _shape(entry, where, dtype.itemsize, max_bytes)
        data = _field(entry, "b", bytes, "raw tensor bytes", where)
        expected = math.prod(shape) * dtype.itemsize
        if "z" in entry:
            zname = entry["z"]
            if zname not in compression.supported():
                raise WireError(f"{where} field 'z' (compression): {_show(zname)} is not "
                                f"supported here; expected one of "
                                f"{list(compression.supported())}",
                                code=ErrorCode.BAD_TENSOR)
            if len(data) >= expected:  # compressed only where smaller: anything else lies
                raise WireError(f"{where}: {len(data)} {zname} bytes for {dtype_name} "
                                f"{tuple(shape)}; compressed data must be smaller than the "
                                f"{expected} bytes it holds", code=ErrorCode.BAD_TENSOR)
            try:  # bounded by the exact size shape and dtype imply (itself <= max_bytes)
                data = compression.decompress(zname, data, expected)
            except compression.CodecError as exc:
                raise WireError(f"{where}: {exc}", code=ErrorCode.BAD_TENSOR) from None
            zcodec = zname
        if len(data) != expected:
            raise WireError(f"{where}: {len(data)} bytes for {dtype_name} {tuple(shape)}, "
                            f"expected {expected}", code=ErrorCode.BAD_TENSOR)
        array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape)
        if _BIG_ENDIAN_HOST and dtype.itemsize > 1:
            array = array.astype(dtype)  # native order for the runtimes (a copy, only there)
    quant = _quantization(entry, where, dtype)
    return WireTensor(name=name, array=array, quantization=quant, codec=codec,
                      compression=zcodec)


def _timestamps(body: Mapping[str, Any]) -> dict[str, float]:
    ts = body.get("ts", {})
    if not isinstance(ts, dict):
        raise WireError(f"envelope field 'ts' (timestamps): expected a map, got "
                        f"{_kind_of(ts)}")
    for stage, when in ts.items():
        if not (_number(when) and math.isfinite(when)):
            raise WireError(f"envelope field 'ts' (timestamps): {_show(stage)} is "
                            f"{_show(when)}; expected a finite number (unix seconds)")
    return {k: float(v) for k, v in ts.items()}


def _deadline(body: Mapping[str, Any]) -> float:
    deadline = body.get("dl", 0.0)
    if not (_number(deadline) and math.isfinite(deadline) and deadline >= 0):
        raise WireError(f"envelope field 'dl' (deadline): {_show(deadline)}; expected a "
                        "finite number >= 0 (unix seconds, 0 = none)")
    return float(deadline)


def _error(body: Mapping[str, Any]) -> ErrorInfo | None:
    err = body.get("err")
    if err is None:
        return None
    if not isinstance(err, dict):
        raise WireError(f"envelope field 'err' (error): expected a map with 'code' and "
                        f"'msg', got {_kind_of(err)}")
    code = _field(err, "code", str, "error code", "error")
    message = err.get("msg", "")
    if not isinstance(message, str):
        raise WireError(f"error field 'msg' (error message): expected str, got "
                        f"{_kind_of(message)}")
    return ErrorInfo(code=code, message=message)


def decode(payload: bytes | bytearray | memoryview, *,
           max_bytes: int = DEFAULT_MAX_PAYLOAD, codecs: Codecs | None = None) -> Envelope:
    """Parse and validate one envelope. Every failure is a WireError naming the problem.

    The whole message is looked at under one budget (values, containers, depth, sizes:
    the ``_MAX_*`` constants) before msgpack builds anything; a tensor's shape is checked
    against ``max_bytes`` before any arithmetic on it. ``codecs`` (split id -> tensor name
    -> codec, from the manifests served) is what lets image-encoded tensors in; without
    it, or for a split or tensor it does not name, they are refused (``bad_tensor``).
    """
    size = len(payload)
    if size > max_bytes:
        raise WireError(f"payload of {size} bytes exceeds the limit of {max_bytes} bytes",
                        code=ErrorCode.PAYLOAD_TOO_LARGE)
    body = _unpack(payload, max_bytes)
    version = body.get("v")
    if type(version) is not int or version != VERSION:  # not True, not 1.0: exactly int 1
        raise WireError(f"unsupported envelope version {_show(version)}; expected the int "
                        f"{VERSION}")
    kind = _field(body, "k", str, "kind")
    if kind not in (REQUEST, RESULT):
        raise WireError(f"envelope field 'k' (kind): {_show(kind)}; expected {REQUEST!r} or "
                        f"{RESULT!r}")
    request_id = _text(body, "id", "request id")
    device_id = _text(body, "dev", "device id")
    split_id = _text(body, "split", "split id")
    raw_tensors = body.get("t", [])
    if not isinstance(raw_tensors, list) or len(raw_tensors) > _MAX_TENSORS:
        raise WireError(f"envelope field 't' (tensors): expected an array of at most "
                        f"{_MAX_TENSORS} tensor maps, got {_show(raw_tensors)}")
    timestamps = _timestamps(body)
    deadline = _deadline(body)
    error = _error(body)
    reply_to = body.get("rt", "")
    split_codecs = codecs.get(split_id) if codecs is not None else None
    return Envelope(
        kind=kind,
        request_id=request_id,
        device_id=device_id,
        split_id=split_id,
        tensors=tuple(_tensor_from_wire(e, i, split_codecs, split_id, max_bytes)
                      for i, e in enumerate(raw_tensors)),
        deadline=deadline,
        reply_to=reply_to if isinstance(reply_to, str) else "",
        timestamps=timestamps,
        error=error,
    )


def peek_reply_address(payload: bytes | bytearray | memoryview, *,
                       max_bytes: int = DEFAULT_MAX_PAYLOAD) -> tuple[str, str]:
    """Best effort (request id, reply topic) from a payload that failed :func:`decode`.

    Under the same budget as :func:`decode`; empty strings for what cannot be read (also
    for a payload that breaks the budget). Never raises.
    """
    if len(payload) > max_bytes:
        return "", ""
    try:
        body = _unpack(payload, max_bytes)
    except WireError:
        return "", ""
    rid, rt = body.get("id", ""), body.get("rt", "")
    return (rid if isinstance(rid, str) and len(rid) <= _MAX_ID else "",
            rt if isinstance(rt, str) else "")
