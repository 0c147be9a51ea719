"""Chunking of encoded envelopes past a broker's maximum packet size.

A payload larger than the limit travels as chunk envelopes (msgpack maps, ``"v": 1``,
``"k": "chunk"``): ``id`` request id, ``dev`` device id, ``i`` index, ``n`` count, ``sz``
total size of the whole payload, ``h`` its blake2b-256 digest, ``dl`` the request's
deadline (epoch seconds), ``b`` this chunk's bytes. Every chunk PUBLISH, topic and MQTT
header included, fits the limit (:func:`chunk_size`). :class:`Reassembler` puts them back
together under bounded memory, checks the digest, and hands back the whole payload for
:func:`splitinfer.wire.decode`. Chunk envelopes are read under wire's decode budget.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from splitinfer import wire
from splitinfer.costmodel import mqtt_publish_bytes
from splitinfer.errors import ErrorCode, WireError

KIND = "chunk"
DIGEST_BYTES = 32
# the chunk envelope's own fields, at their largest (ids up to wire's 256 chars)
_ENVELOPE_OVERHEAD = 1 + (3 + 2) + (2 + 6) + (3 + 3 + 256 * 3) * 2 + (2 + 5) * 3 \
    + (2 + 2 + DIGEST_BYTES) + (3 + 9) + (2 + 5)
_PROPERTY_HEADROOM = 512  # MQTT 5 properties: response topic, correlation, expiry
MIN_CHUNK = 1024
_MAX_DONE = 4096
# A message without a deadline (dl = 0) is held at most this long after its first chunk.
NO_DEADLINE_TTL_S = 30.0


def _digest(payload: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(payload, digest_size=DIGEST_BYTES).digest()


def chunk_size(max_packet: int, topic: str, *, protocol: str = "5") -> int:
    """Bytes of payload one chunk may carry so its PUBLISH stays within ``max_packet``."""
    overhead = mqtt_publish_bytes(topic, 0, qos=1, protocol=protocol) + 4  # varint growth
    size = max_packet - overhead - _PROPERTY_HEADROOM - _ENVELOPE_OVERHEAD
    if size < MIN_CHUNK:
        raise WireError(f"max_packet {max_packet}: too small for chunks of at least "
                        f"{MIN_CHUNK} bytes on topic {topic!r}")
    return size


def needs_chunking(payload_len: int, max_packet: int | None, topic: str, *,
                   protocol: str = "5") -> bool:
    if not max_packet:
        return False
    return mqtt_publish_bytes(topic, payload_len, qos=1, protocol=protocol) \
        + _PROPERTY_HEADROOM > max_packet


def split(payload: bytes | bytearray | memoryview, *, request_id: str, device: str,
          deadline: float, max_packet: int, topic: str, protocol: str = "5") -> list[bytes]:
    """The chunk envelopes of ``payload`` (at least two when it needs chunking)."""
    view = memoryview(payload)
    size = chunk_size(max_packet, topic, protocol=protocol)
    count = max(1, -(-len(view) // size))
    digest = _digest(view)
    out = []
    for i in range(count):
        out.append(msgpack.packb({
            "v": wire.VERSION, "k": KIND, "id": request_id, "dev": device, "i": i,
            "n": count, "sz": len(view), "cs": size, "h": digest, "dl": float(deadline),
            "b": bytes(view[i * size:(i + 1) * size]),
        }, use_bin_type=True))
    return out


def is_chunk(payload: bytes | bytearray | memoryview) -> bool:
    """Cheap test: a msgpack map whose ``k`` is ``chunk`` (full checks in :func:`parse`)."""
    head = bytes(payload[:64])
    return b"\xa1k\xa5chunk" in head


@dataclass(frozen=True)
class Chunk:
    request_id: str
    device: str
    index: int
    count: int
    total: int
    chunk_size: int
    digest: bytes
    deadline: float
    data: bytes


def _int(body: dict[str, Any], key: str, what: str, lo: int, hi: int) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise WireError(f"chunk field {key!r} ({what}): expected an integer in [{lo}, {hi}]")
    return value


def parse(payload: bytes | bytearray | memoryview, *,
          max_payload: int = wire.DEFAULT_MAX_PAYLOAD) -> Chunk:
    """One chunk envelope, read under wire's decode budget; WireError naming the field."""
    body = wire._unpack(payload, max_payload)
    if body.get("v") != wire.VERSION:
        raise WireError(f"chunk field 'v': expected {wire.VERSION}")
    if body.get("k") != KIND:
        raise WireError(f"chunk field 'k': expected {KIND!r}")
    rid, dev = body.get("id"), body.get("dev", "")
    if not isinstance(rid, str) or not rid or len(rid) > 256:
        raise WireError("chunk field 'id': expected a non-empty str of at most 256 chars")
    if not isinstance(dev, str) or len(dev) > 256:
        raise WireError("chunk field 'dev': expected a str of at most 256 chars")
    total = _int(body, "sz", "total size", 1, 2**63)
    if total > max_payload:
        raise WireError(f"chunk field 'sz': {total} over the payload limit {max_payload}",
                        code=ErrorCode.PAYLOAD_TOO_LARGE)
    csize = _int(body, "cs", "chunk size", 1, max_payload)
    count = _int(body, "n", "chunk count", 1, max_payload)
    if count != -(-total // csize):
        raise WireError(f"chunk fields 'n'/'cs'/'sz': {count} chunks of {csize} bytes do "
                        f"not make {total} bytes")
    index = _int(body, "i", "chunk index", 0, count - 1)
    digest = body.get("h")
    if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
        raise WireError(f"chunk field 'h': expected bin of {DIGEST_BYTES} bytes")
    deadline = body.get("dl")
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool) \
            or not math.isfinite(deadline) or deadline < 0:
        raise WireError("chunk field 'dl': expected a finite number >= 0 (epoch seconds; "
                        "0 = no deadline)")
    data = body.get("b")
    want = csize if index < count - 1 else total - csize * (count - 1)
    if not isinstance(data, bytes) or len(data) != want:
        raise WireError(f"chunk field 'b': expected bin of {want} bytes")
    return Chunk(rid, dev, index, count, total, csize, digest, float(deadline), data)


@dataclass
class _Partial:
    chunk: Chunk
    buf: bytearray
    expires: float  # the deadline, or first arrival + NO_DEADLINE_TTL_S without one
    have: set[int] = field(default_factory=set)


@dataclass
class ReassemblyStats:
    chunks: int = 0
    duplicates: int = 0
    reassembled: int = 0
    dropped_expired: int = 0
    dropped_memory: int = 0
    dropped_digest: int = 0
    refused: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_expired + self.dropped_memory + self.dropped_digest


class Reassembler:
    """Chunks in, whole payloads out; bounded memory per device and in total."""

    def __init__(self, *, max_per_device: int = 16 * 1024 * 1024,
                 max_total: int = 256 * 1024 * 1024,
                 max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_per_device = max_per_device
        self.max_total = max_total
        self.max_payload = max_payload
        self.clock = clock
        self.stats = ReassemblyStats()
        self._partial: dict[tuple[str, str], _Partial] = {}
        self._used: dict[str, int] = {}
        self._total = 0
        self._done: dict[tuple[str, str], float] = {}  # finished ids until their deadline

    @property
    def bytes_held(self) -> int:
        return self._total

    def _drop(self, key: tuple[str, str]) -> None:
        part = self._partial.pop(key)
        self._total -= part.chunk.total
        self._used[key[0]] -= part.chunk.total
        if not self._used[key[0]]:
            del self._used[key[0]]

    def expire(self) -> int:
        """Drop partial messages past their deadline; how many were dropped."""
        now = self.clock()
        old = [k for k, p in self._partial.items() if p.expires <= now]
        for k in old:
            self._drop(k)
        self.stats.dropped_expired += len(old)
        for k in [k for k, dl in self._done.items() if dl <= now]:
            del self._done[k]
        return len(old)

    def add(self, payload: bytes | bytearray | memoryview, *, device: str | None = None
            ) -> bytes | None:
        """Feed one chunk envelope; the whole payload once its last chunk arrives.

        ``device`` (the request topic's device id, when known) keys the memory account;
        WireError for a malformed chunk, an oversized claim or a failed digest."""
        self.expire()
        try:
            c = parse(payload, max_payload=self.max_payload)
        except WireError:
            self.stats.refused += 1
            raise
        self.stats.chunks += 1
        dev = device if device is not None else c.device
        key = (dev, c.request_id)
        now = self.clock()
        expires = c.deadline if c.deadline > 0 else now + NO_DEADLINE_TTL_S
        if c.deadline > 0 and c.deadline <= now:
            self.stats.dropped_expired += 1
            return None
        if key in self._done:
            self.stats.duplicates += 1
            return None
        part = self._partial.get(key)
        if part is None:
            if self._used.get(dev, 0) + c.total > self.max_per_device:
                self.stats.dropped_memory += 1
                raise WireError(f"chunked payload of {c.total} bytes from device {dev!r}: "
                                f"over the reassembly memory per device "
                                f"({self.max_per_device})", code=ErrorCode.PAYLOAD_TOO_LARGE)
            if self._total + c.total > self.max_total:
                self.stats.dropped_memory += 1
                raise WireError(f"chunked payload of {c.total} bytes: reassembly memory "
                                f"full ({self.max_total})", code=ErrorCode.PAYLOAD_TOO_LARGE)
            part = _Partial(c, bytearray(c.total), expires)
            self._partial[key] = part
            self._used[dev] = self._used.get(dev, 0) + c.total
            self._total += c.total
        else:
            first = part.chunk
            if (c.count, c.total, c.chunk_size, c.digest) != (
                    first.count, first.total, first.chunk_size, first.digest):
                self.stats.refused += 1
                raise WireError(f"chunk {c.index} of request {c.request_id!r}: count, size "
                                "or digest differ from its first chunk")
        if c.index in part.have:
            self.stats.duplicates += 1
            return None
        start = c.index * c.chunk_size
        part.buf[start:start + len(c.data)] = c.data
        part.have.add(c.index)
        if len(part.have) < c.count:
            return None
        self._drop(key)
        self._done[key] = part.expires
        if len(self._done) > _MAX_DONE:  # remember finished ids, boundedly
            del self._done[next(iter(self._done))]
        if _digest(part.buf) != c.digest:
            self.stats.dropped_digest += 1
            raise WireError(f"chunked payload of request {c.request_id!r}: digest mismatch")
        self.stats.reassembled += 1
        return bytes(part.buf)
