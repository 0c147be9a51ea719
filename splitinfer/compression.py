"""Lossless compression of tensor bytes on the wire: ``zstd`` (and ``lz4`` where installed).

A tensor entry may carry ``"z": "zstd" | "lz4"``; its ``"b"`` is then the compressed raw
C-order bytes (see :mod:`splitinfer.wire`). The codecs:

- ``zstd``: one Zstandard frame at level 1, written with its content size; binding
  ``zstandard`` (maintained, C extension, wheels for x86_64 and aarch64, no dependencies).
  This is the codec the extras install: it measured the best ratio at a cost close to
  lz4's (docs/wire.md, "Compression").
- ``lz4``: one LZ4 *block* (no size prefix, the size comes from shape and dtype); binding
  ``lz4`` (python-lz4), optional: a decoder without it refuses ``lz4`` tensors naming what
  it supports.

Decompression is bounded by the exact byte count the tensor's shape and dtype imply: a zstd
frame must declare that content size in its header (checked before anything is
allocated), an lz4 block is decoded into a buffer of exactly that size, and anything else
(another size, trailing data, a corrupt frame) is refused.

Whether compression *pays* (:func:`pays`): the bytes it saves must take longer to send
over the link than compressing on one side and decompressing on the other take:
``(raw - compressed) * 8 / uplink_bps > compress_s + decompress_s``, and it must save at
least :data:`MIN_SAVING` of the raw bytes (below that the gain is noise). The reference
link is ``4g`` (5.85 Mbit/s up, :mod:`splitinfer.link`); :func:`choose` measures each
codec on a split's sample head outputs and keeps one only where it pays (what a split's
manifest ``compression`` should be set from). The encoder also never sends a compressed
form that is not smaller than the raw bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CODECS", "AUTO_CODECS", "MIN_SAVING", "MIN_BYTES", "CodecError", "supported",
           "compress", "decompress", "worth_sending", "pays", "Measurement", "measure",
           "choose", "report"]

CODECS = ("zstd", "lz4")  # what the wire format names; supported() is what this install has
# What ``--compression auto`` measures: only the codec every edge and cloud install has
# (the extras install ``zstandard``; python-lz4 is optional), so a manifest chosen on the
# splitting machine never names a codec the device or the worker lacks. lz4 is used only
# when asked for by name.
AUTO_CODECS = ("zstd",)
MIN_SAVING = 0.05  # a codec must save at least 5% of the raw bytes
# Tensors smaller than this are never compressed: a zstd frame header alone is 6-9 bytes
# and a call costs a few µs, so a saving is noise (a classifier's logits, a box list).
MIN_BYTES = 128
ZSTD_LEVEL = 1
_MAX_WINDOW = 1 << 23


class CodecError(ValueError):
    """Bytes a codec refuses (wrong size, corrupt, trailing data) or an unknown codec."""


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def _lz4() -> Any:
    try:
        import lz4.block  # type: ignore[import-untyped]
    except ImportError:
        return None
    return lz4.block


_CACHE: dict[str, Any] = {}


def _module(name: str) -> Any:
    if name not in _CACHE:
        _CACHE[name] = {"zstd": _zstd, "lz4": _lz4}[name]()
    return _CACHE[name]


_SUPPORTED: tuple[str, ...] | None = None


def supported() -> tuple[str, ...]:
    """The codecs this install can compress and decompress (found once: the decoder asks
    for every compressed tensor)."""
    global _SUPPORTED
    if _SUPPORTED is None:
        _SUPPORTED = tuple(name for name in CODECS if _module(name) is not None)
    return _SUPPORTED


def _need(name: str) -> Any:
    if name not in CODECS:
        raise CodecError(f"unknown compression {name!r}; this install supports "
                         f"{list(supported())}")
    module = _module(name)
    if module is None:
        raise CodecError(f"compression {name!r} is not installed here (its binding "
                         f"{'zstandard' if name == 'zstd' else 'lz4'} is missing); this "
                         f"install supports {list(supported())}")
    return module


# One zstd context of each kind per thread: a context is not thread-safe, and creating one
# costs ~3 µs, half the time to (de)compress a 1 KB tensor. The agent and the worker code
# on their event loop; the profiler, the fleet and tests may from other threads.
_LOCAL = threading.local()


def compress(name: str, raw: bytes | memoryview) -> bytes:
    """``raw`` compressed with codec ``name`` (CodecError if unknown or not installed)."""
    module = _need(name)
    if name == "zstd":
        cctx = getattr(_LOCAL, "zstd_c", None)
        if cctx is None:
            cctx = _LOCAL.zstd_c = module.ZstdCompressor(level=ZSTD_LEVEL,
                                                         write_content_size=True)
        return cctx.compress(raw)  # type: ignore[no-any-return]
    return module.compress(raw, store_size=False)  # type: ignore[no-any-return]


def decompress(name: str, data: bytes, expected: int) -> bytes:
    """``data`` decompressed to exactly ``expected`` bytes, never allocating more.

    CodecError for an unknown or missing codec, a zstd frame whose header does not
    declare exactly ``expected`` bytes, corrupt data, trailing data or another size.
    """
    module = _need(name)
    if expected <= 0:
        raise CodecError("an empty tensor is never compressed; send it raw")
    if name == "zstd":
        try:
            size = module.get_frame_parameters(data).content_size
        except module.ZstdError:
            raise CodecError("not a zstd frame (no readable frame header)") from None
        if size != expected:
            told = "no size" if size == module.CONTENTSIZE_UNKNOWN else f"{size} bytes"
            raise CodecError(f"the zstd frame declares {told}; the shape and dtype imply "
                             f"{expected}")
        dctx = getattr(_LOCAL, "zstd_d", None)
        if dctx is None:
            dctx = _LOCAL.zstd_d = module.ZstdDecompressor(max_window_size=_MAX_WINDOW)
        try:
            out = dctx.decompress(data, max_output_size=expected, allow_extra_data=False)
        except module.ZstdError as exc:
            raise CodecError(f"corrupt zstd data: {exc}") from None
    else:
        try:
            out = module.decompress(data, uncompressed_size=expected)
        except Exception:  # lz4.block.LZ4BlockError
            raise CodecError(f"corrupt lz4 block, or one that holds more than the "
                             f"{expected} bytes the shape and dtype imply") from None
    if len(out) != expected:
        raise CodecError(f"{name} data holds {len(out)} bytes; the shape and dtype imply "
                         f"{expected}")
    return out  # type: ignore[no-any-return]


def worth_sending(raw_bytes: int, compressed_bytes: int) -> bool:
    """The encoder's per-tensor rule: send the compressed form only where it saves at
    least :data:`MIN_SAVING` of a tensor of at least :data:`MIN_BYTES` (else the receiver
    would pay a decompression for nothing)."""
    return (raw_bytes >= MIN_BYTES
            and raw_bytes - compressed_bytes >= MIN_SAVING * raw_bytes)


REFERENCE_UPLINK_BPS = 5.85e6  # splitinfer.link PROFILES["4g"].up


def pays(raw_bytes: int, compressed_bytes: int, codec_s: float, *,
         link_bps: float = REFERENCE_UPLINK_BPS) -> bool:
    """The rule: saves >= MIN_SAVING of the bytes and more send time than ``codec_s``
    (compress + decompress seconds) costs, at ``link_bps`` bits per second."""
    saved = raw_bytes - compressed_bytes
    if raw_bytes <= 0 or saved < MIN_SAVING * raw_bytes:
        return False
    return saved * 8 / link_bps > codec_s


@dataclass(frozen=True)
class Measurement:
    """One codec on a set of tensors (totals per request, times the median of runs)."""

    codec: str
    raw_bytes: int
    compressed_bytes: int
    compress_ms: float
    decompress_ms: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(self.compressed_bytes, 1)

    def pays(self, link_bps: float = REFERENCE_UPLINK_BPS) -> bool:
        return pays(self.raw_bytes, self.compressed_bytes,
                    (self.compress_ms + self.decompress_ms) / 1e3, link_bps=link_bps)

    def to_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "raw_bytes": self.raw_bytes,
                "compressed_bytes": self.compressed_bytes, "ratio": round(self.ratio, 3),
                "compress_ms": round(self.compress_ms, 4),
                "decompress_ms": round(self.decompress_ms, 4), "pays": self.pays()}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def measure(name: str, requests: Sequence[Sequence[bytes]], *, repeats: int = 3,
            timer: Callable[[], float] = time.perf_counter) -> Measurement:
    """Codec ``name`` on ``requests`` (each: the raw bytes of its tensors): mean bytes per
    request as the encoder sends them (:func:`worth_sending`), median compress and
    decompress time per request."""
    raw_total = comp_total = 0
    c_times: list[float] = []
    d_times: list[float] = []
    for tensors in requests:
        for _ in range(max(repeats, 1)):
            c_s = d_s = 0.0
            sizes = 0
            for raw in tensors:
                if len(raw) < MIN_BYTES:  # the encoder sends these raw, untried
                    sizes += len(raw)
                    continue
                start = timer()
                packed = compress(name, raw)
                mid = timer()
                decompress(name, packed, len(raw))
                c_s, d_s = c_s + mid - start, d_s + timer() - mid
                # what the encoder sends: the compressed form only where it is worth it
                sizes += len(packed) if worth_sending(len(raw), len(packed)) else len(raw)
            c_times.append(c_s)
            d_times.append(d_s)
        raw_total += sum(len(r) for r in tensors)
        comp_total += sizes
    n = max(len(requests), 1)
    return Measurement(codec=name, raw_bytes=round(raw_total / n),
                       compressed_bytes=round(comp_total / n),
                       compress_ms=_median(c_times) * 1e3, decompress_ms=_median(d_times) * 1e3)


def choose(requests: Sequence[Sequence[bytes]], candidates: Sequence[str] | None = None, *,
           link_bps: float = REFERENCE_UPLINK_BPS, timer: Callable[[], float] = time.perf_counter
           ) -> tuple[str | None, list[Measurement]]:
    """The codec that pays and saves the most time (None if none pays), and every
    measurement taken."""
    names = list(candidates) if candidates is not None else list(supported())
    found = [measure(n, requests, timer=timer) for n in names]
    best, best_gain = None, 0.0
    for m in found:
        if not m.pays(link_bps):
            continue
        gain = ((m.raw_bytes - m.compressed_bytes) * 8 / link_bps
                - (m.compress_ms + m.decompress_ms) / 1e3)
        if gain > best_gain:
            best, best_gain = m.codec, gain
    return best, found


def report(requests: Sequence[Sequence[bytes]], candidates: Sequence[str] | None = None, *,
           link_bps: float = REFERENCE_UPLINK_BPS,
           timer: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """What each codec does to ``requests`` (each: the raw bytes of one request's tensors),
    as ``inspect --json``, ``split --json`` and the profiles print it::

        {"requests": n, "raw_bytes": mean per request, "link_bps": ...,
         "codecs": {"zstd": Measurement.to_dict(), ...}, "choice": "zstd" | None}

    ``choice`` is what :func:`choose` keeps (the codec that pays and saves the most time).
    The bytes are those the encoder sends: tensors below :data:`MIN_BYTES`, and those a
    codec does not shrink by :data:`MIN_SAVING`, count raw.
    """
    best, found = choose(requests, candidates, link_bps=link_bps, timer=timer)
    raw = round(sum(sum(len(r) for r in t) for t in requests) / max(len(requests), 1))
    return {"requests": len(requests), "raw_bytes": raw, "link_bps": link_bps,
            "codecs": {m.codec: {**m.to_dict(), "pays": m.pays(link_bps)} for m in found},
            "choice": best}
