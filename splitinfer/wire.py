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
declared shape before decompressing it. Decoding checks every size before touching
data and wraps the received bytes with :func:`numpy.frombuffer` (no further copy; the
arrays are read-only). No pickle, no ext types, no code on the wire.
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


def _tensor_to_wire(t: WireTensor) -> dict[str, Any]:
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
    if t.quantization is not None:
        entry["q"] = [float(t.quantization.scale), int(t.quantization.zero_point)]
    return entry


def encode(env: Envelope) -> bytes:
    """Serialize an envelope; raises WireError for values the contract cannot carry."""
    body: dict[str, Any] = {
        "v": VERSION, "k": env.kind, "id": env.request_id, "dev": env.device_id,
        "split": env.split_id, "dl": float(env.deadline), "ts": env.timestamps,
        "t": [_tensor_to_wire(t) for t in env.tensors],
    }
    if env.reply_to:
        body["rt"] = env.reply_to
    if env.error is not None:
        body["err"] = {"code": env.error.code, "msg": env.error.message}
    try:
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode envelope {env.request_id!r}: {exc}") from exc


def _field(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind):
        raise WireError(f"envelope field {key!r} ({what}) missing or of type "
                        f"{type(value).__name__}")
    return value


def _decode_images(entry: Mapping[str, Any], name: str, dtype_name: str, shape: list[int],
                   codecs: Mapping[str, ImageCodec], split_id: str) -> np.ndarray[Any, Any]:
    codec_name = _field(entry, "c", str, "image codec")
    codec = codecs.get(name)
    if codec is None:
        raise WireError(f"tensor {name!r}: sent as {codec_name!r} images, but split "
                        f"{split_id!r} declares no input codec for it; send raw bytes",
                        code=ErrorCode.BAD_TENSOR)
    if codec_name != codec.codec:
        raise WireError(f"tensor {name!r}: sent as {codec_name!r} images, split {split_id!r} "
                        f"declares {codec.codec!r}", code=ErrorCode.BAD_TENSOR)
    images = _field(entry, "b", list, "encoded images")
    if len(images) > _MAX_IMAGES or not all(isinstance(b, bytes) for b in images):
        raise WireError(f"tensor {name!r}: 'b' must be an array of at most {_MAX_IMAGES} "
                        "bin (one encoded image per sample)")
    return codec.decode(images, shape, dtype_name, max_bytes=MAX_DECODED_BYTES)


def _tensor_from_wire(entry: Any, index: int, codecs: Mapping[str, ImageCodec] | None = None,
                      split_id: str = "") -> WireTensor:
    if not isinstance(entry, dict):
        raise WireError(f"tensor #{index}: expected a map, got {type(entry).__name__}")
    name = _field(entry, "n", str, "tensor name")
    dtype_name = _field(entry, "d", str, "dtype name")
    if dtype_name not in DTYPES:
        raise WireError(f"tensor {name!r}: unsupported dtype {dtype_name!r}; expected one of "
                        f"{sorted(DTYPES)}", code=ErrorCode.BAD_TENSOR)
    shape = _field(entry, "s", list, "shape")
    if len(shape) > _MAX_DIMS or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WireError(f"tensor {name!r}: bad shape {shape!r}; expected up to {_MAX_DIMS} "
                        "non-negative ints", code=ErrorCode.BAD_TENSOR)
    codec = None
    if "c" in entry:
        array = _decode_images(entry, name, dtype_name, shape, codecs or {}, split_id)
        codec = (codecs or {})[name]
    else:
        data = _field(entry, "b", bytes, "raw tensor bytes")
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise WireError(f"tensor {name!r}: {len(data)} bytes for {dtype_name} "
                            f"{tuple(shape)}, expected {expected}", code=ErrorCode.BAD_TENSOR)
        array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape)
        if _BIG_ENDIAN_HOST and dtype.itemsize > 1:
            array = array.astype(dtype)  # native order for the runtimes (a copy, only there)
    quant = None
    q = entry.get("q")
    if q is not None:
        if not (isinstance(q, list) and len(q) == 2 and isinstance(q[0], (int, float))
                and isinstance(q[1], int)):
            raise WireError(f"tensor {name!r}: quantization must be [scale, zero_point], got "
                            f"{q!r}", code=ErrorCode.BAD_TENSOR)
        try:
            quant = Quantization(scale=float(q[0]), zero_point=int(q[1]))
        except ValueError as exc:
            raise WireError(f"tensor {name!r}: {exc}", code=ErrorCode.BAD_TENSOR) from exc
    return WireTensor(name=name, array=array, quantization=quant, codec=codec)


def decode(payload: bytes | bytearray | memoryview, *,
           max_bytes: int = DEFAULT_MAX_PAYLOAD, codecs: Codecs | None = None) -> Envelope:
    """Parse and validate one envelope. Every failure is a WireError naming the problem.

    ``codecs`` (split id -> tensor name -> codec, from the manifests served) is what lets
    image-encoded tensors in; without it, or for a split or tensor it does not name, they
    are refused (``bad_tensor``).
    """
    size = len(payload)
    if size > max_bytes:
        raise WireError(f"payload of {size} bytes exceeds the limit of {max_bytes} bytes",
                        code=ErrorCode.PAYLOAD_TOO_LARGE)
    try:
        body = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, max_bin_len=max_bytes,
            max_str_len=64 * 1024, max_array_len=max(_MAX_TENSORS, _MAX_DIMS, _MAX_IMAGES),
            max_map_len=64, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise WireError(f"payload is not a msgpack envelope ({size} bytes): "
                        f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(body, dict):
        raise WireError(f"envelope must be a msgpack map, got {type(body).__name__}")
    version = body.get("v")
    if type(version) is not int or version != VERSION:  # not True, not 1.0: exactly int 1
        raise WireError(f"unsupported envelope version {version!r}; expected the int {VERSION}")
    kind = _field(body, "k", str, "kind")
    if kind not in (REQUEST, RESULT):
        raise WireError(f"envelope kind must be {REQUEST!r} or {RESULT!r}, got {kind!r}")
    raw_tensors = body.get("t", [])
    if not isinstance(raw_tensors, list) or len(raw_tensors) > _MAX_TENSORS:
        raise WireError(f"envelope field 't' (tensors) must be a list of at most "
                        f"{_MAX_TENSORS} tensors")
    timestamps = body.get("ts", {})
    if not isinstance(timestamps, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) for k, v in timestamps.items()
    ):
        raise WireError("envelope field 'ts' must map stage names to unix times")
    deadline = body.get("dl", 0.0)
    if not isinstance(deadline, (int, float)):
        raise WireError(f"envelope field 'dl' (deadline) must be a number, got {deadline!r}")
    error = None
    err = body.get("err")
    if err is not None:
        if not isinstance(err, dict):
            raise WireError("envelope field 'err' must be a map with 'code' and 'msg'")
        error = ErrorInfo(code=str(err.get("code", ErrorCode.INTERNAL.value)),
                          message=str(err.get("msg", "")))
    reply_to = body.get("rt", "")
    request_id = _field(body, "id", str, "request id")
    device_id = _field(body, "dev", str, "device id")
    split_id = _field(body, "split", str, "split id")
    split_codecs = codecs.get(split_id) if codecs is not None else None
    return Envelope(
        kind=kind,
        request_id=request_id,
        device_id=device_id,
        split_id=split_id,
        tensors=tuple(_tensor_from_wire(e, i, split_codecs, split_id)
                      for i, e in enumerate(raw_tensors)),
        deadline=float(deadline),
        reply_to=reply_to if isinstance(reply_to, str) else "",
        timestamps={k: float(v) for k, v in timestamps.items()},
        error=error,
    )


def peek_reply_address(payload: bytes | bytearray | memoryview, *,
                       max_bytes: int = DEFAULT_MAX_PAYLOAD) -> tuple[str, str]:
    """Best effort (request id, reply topic) from a payload that failed :func:`decode`.

    Returns empty strings for what cannot be read. Never raises.
    """
    if len(payload) > max_bytes:
        return "", ""
    try:
        body = msgpack.unpackb(payload, raw=False, max_bin_len=max_bytes, max_ext_len=0)
    except Exception:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    rid, rt = body.get("id", ""), body.get("rt", "")
    return (rid if isinstance(rid, str) else "", rt if isinstance(rt, str) else "")
