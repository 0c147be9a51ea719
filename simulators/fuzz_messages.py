"""Hostile MQTT payloads for a worker: many kinds of structured mutations of a valid request.

:class:`FuzzGenerator` makes each kind in :data:`KINDS` for one split's cut (wrong types,
huge / negative / bool dimensions, dtype and size mismatches, nesting bombs, flat element
floods, huge str/bin claims, truncated msgpack, ext types, bad version / kind / deadline /
timestamps / quantization / codec / id fields, random bytes, …); :func:`schedule` orders
them, valid requests interleaved. Every choice comes from a seed. Used by
``splitinfer bench fuzz`` (:mod:`bench.bench_fuzz`) and the tests.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

__all__ = ["FuzzGenerator", "KINDS", "BURST", "schedule"]

Array = np.ndarray[Any, Any]
Body = dict[str, Any]
BURST = 10  # flat floods of the largest size sent back to back, then one valid request


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _map_header(n: int) -> bytes:
    return bytes((0x80 | n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    return (b"\xdc" + n.to_bytes(2, "big")) if n < 65536 else (b"\xdd" + n.to_bytes(4, "big"))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height over one tiny IDAT (a bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8,
                                                                0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


# --- the generator -------------------------------------------------------------------------


@dataclass
class FuzzGenerator:
    """Hostile payloads of every kind in :data:`KINDS` for one split's cut.

    ``cut`` is the split's cut as (name, dtype, concrete shape, [scale, zero_point] or
    None); every choice comes from ``seed``, so a run is reproducible.
    """

    split_id: str
    cut: Sequence[tuple[str, str, tuple[int, ...], list[float | int] | None]]
    seed: int = 0
    max_payload: int = 8 * 1024 * 1024
    # tensor name -> the split's image codec (splitinfer.imagecodec.ImageCodec), for the
    # image kinds; without one they fall back to bad_codec
    codecs: Mapping[str, Any] = field(default_factory=dict)
    rng: random.Random = field(init=False)
    np_rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.np_rng = np.random.default_rng(self.seed)

    @classmethod
    def for_manifest(cls, manifest: Any, *, seed: int = 0,
                     max_payload: int = 8 * 1024 * 1024) -> FuzzGenerator:
        """For a :class:`~splitinfer.manifest.Manifest`'s cut (one sample; symbolic dims 1)."""
        cut = []
        for spec in manifest.cut:
            shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
            q = spec.quantization
            cut.append((spec.name, spec.dtype, (1, *shape[1:]) if shape else shape,
                        [float(q.scale), int(q.zero_point)] if q is not None else None))
        codecs = {spec.name: c for spec in manifest.cut
                  if (c := manifest.codec_for(spec.name)) is not None}
        return cls(manifest.split_id, cut, seed=seed, max_payload=max_payload, codecs=codecs)

    # valid material ---------------------------------------------------------------------

    def arrays(self) -> dict[str, Array]:
        """Random cut tensors that the tail accepts (one sample)."""
        out = {}
        for name, dtype, shape, _q in self.cut:
            if np.dtype(dtype).kind == "f":
                out[name] = np.abs(self.np_rng.normal(0, 2, shape)).astype(dtype)
            elif dtype == "bool":
                out[name] = self.np_rng.integers(0, 2, shape).astype(bool)
            else:
                info = np.iinfo(np.dtype(dtype))
                out[name] = self.np_rng.integers(max(info.min, -128), min(info.max, 127) + 1,
                                                 shape).astype(dtype)
        return out

    def body(self, rid: str, arrays: Mapping[str, Array] | None = None) -> Body:
        arrays = self.arrays() if arrays is None else arrays
        tensors = []
        for name, dtype, _shape, q in self.cut:
            a = np.ascontiguousarray(arrays[name]).astype(np.dtype(dtype).newbyteorder("<"))
            entry: dict[str, Any] = {"n": name, "d": dtype, "s": list(a.shape),
                                     "b": a.tobytes()}
            if q is not None:
                entry["q"] = list(q)
            tensors.append(entry)
        return {"v": 1, "k": "req", "id": rid, "dev": "fuzz", "split": self.split_id,
                "dl": 0.0, "ts": {"sent": 1764590400.0}, "t": tensors}

    def valid(self, rid: str) -> tuple[bytes, dict[str, Array]]:
        arrays = self.arrays()
        return _pack(self.body(rid, arrays)), arrays

    # helpers ----------------------------------------------------------------------------

    def _pick(self, options: Sequence[Any]) -> Any:
        return options[self.rng.randrange(len(options))]

    def _tensor(self, body: Body) -> dict[str, Any]:
        return body["t"][self.rng.randrange(len(body["t"]))]  # type: ignore[no-any-return]

    def _any_value(self) -> Any:
        return self._pick([None, True, False, 0, -1, 2**64 - 1, -2**63, 1.5, math.nan,
                           math.inf, "", "x" * self.rng.randrange(1, 300), b"", b"\x00" * 7,
                           [], [1, 2], [[[]]], {}, {"a": 1}, {"n": {"n": None}}])

    def _with_raw(self, body: Body, key: str, raw: bytes) -> bytes:
        """``body`` packed with ``raw`` (any bytes) as the value of ``key`` (added last)."""
        rest = {k: v for k, v in body.items() if k != key}
        return _map_header(len(rest) + 1) + b"".join(
            _pack(k) + _pack(v) for k, v in rest.items()) + _pack(key) + raw

    def _room(self, body: Body, margin: int = 64) -> int:
        return self.max_payload - len(_pack(body)) - margin

    # the kinds --------------------------------------------------------------------------

    def random_bytes(self, rid: str) -> bytes:
        data = self.rng.randbytes(self.rng.randrange(0, 600))
        return (bytes((0x80 | self.rng.randrange(16),)) + data) if self.rng.random() < 0.5 \
            else data

    def truncated(self, rid: str) -> bytes:
        p = _pack(self.body(rid))
        return p[:self.rng.randrange(len(p))]

    def byte_flip(self, rid: str) -> bytes:
        p = bytearray(_pack(self.body(rid)))
        for _ in range(self.rng.randrange(1, 9)):
            p[self.rng.randrange(len(p))] = self.rng.randrange(256)
        return bytes(p)

    def trailing_bytes(self, rid: str) -> bytes:
        return _pack(self.body(rid)) + self.rng.randbytes(self.rng.randrange(1, 64))

    def wrong_type(self, rid: str) -> bytes:
        body = self.body(rid)
        if self.rng.random() < 0.5:
            body[self._pick(["v", "k", "id", "dev", "split", "dl", "ts", "t", "rt", "err"])] = \
                self._any_value()
        else:
            self._tensor(body)[self._pick(["n", "d", "s", "b", "q", "c"])] = self._any_value()
        return _pack(body)

    def missing_field(self, rid: str) -> bytes:
        body = self.body(rid)
        if self.rng.random() < 0.5:
            body.pop(self._pick(["v", "k", "id", "dev", "split", "t"]))
        else:
            self._tensor(body).pop(self._pick(["n", "d", "s", "b"]))
        return _pack(body)

    def huge_dim(self, rid: str) -> bytes:
        body = self.body(rid)
        t = self._tensor(body)
        big = self._pick([2**64 - 1, 2**63, 2**63 - 1, 2**32 + 1, 2**31, 10**12,
                          self.max_payload + 1])
        t["s"] = self._pick([[big, 0], [0, big], [big, 0, big], [1, big], [big] * 8,
                             [*t["s"][:-1], big]])
        t["b"] = b"" if 0 in t["s"] or self.rng.random() < 0.5 else t["b"]
        return _pack(body)

    def negative_dim(self, rid: str) -> bytes:
        body = self.body(rid)
        t = self._tensor(body)
        t["s"] = [self._pick([-1, -2**63, -64]) if self.rng.random() < 0.5 else d
                  for d in t["s"]] + ([-1] if self.rng.random() < 0.3 else [])
        if all(d >= 0 for d in t["s"]):
            t["s"][0] = -1
        return _pack(body)

    def bool_dim(self, rid: str) -> bytes:
        body = self.body(rid)
        t = self._tensor(body)
        t["s"] = [True if d == 1 else d for d in t["s"]] if self.rng.random() < 0.5 else \
            [self._pick([True, False]), *t["s"][1:]]
        if not any(isinstance(d, bool) for d in t["s"]):
            t["s"] = [True, *t["s"]]
        return _pack(body)

    def odd_dim(self, rid: str) -> bytes:
        body = self.body(rid)
        t = self._tensor(body)
        i = self.rng.randrange(len(t["s"]))
        t["s"][i] = self._pick([float(t["s"][i]), math.nan, math.inf, str(t["s"][i]), None,
                                [t["s"][i]], {"d": 1}, b"\x01"])
        return _pack(body)

    def bad_rank(self, rid: str) -> bytes:
        body = self.body(rid)
        t = self._tensor(body)
        n = self._pick([0, 9, 64, 1000])
        t["s"] = [1] * n
        t["b"] = t["b"][:np.dtype(t["d"]).itemsize]
        return _pack(body)

    def dtype_mismatch(self, rid: str) -> bytes:
        body = self.body(rid)
        t = self._tensor(body)
        t["d"] = self._pick(["float16", "float64", "int8", "uint8", "int64", "bool", "uint64",
                             "complex64", "float8", "", "FLOAT32", "object"])
        if t["d"] in ("float16", "float64", "int8", "uint8", "int64", "bool", "uint64") \
                and self.rng.random() < 0.5:  # bytes that fit the claimed dtype
            t["b"] = bytes(int(np.prod(t["s"])) * np.dtype(t["d"]).itemsize)
        return _pack(body)

    def size_mismatch(self, rid: str) -> bytes:
        body = self.body(rid)
        t = self._tensor(body)
        t["b"] = self._pick([t["b"][:-1], t["b"] + b"\0", b"", t["b"] * 2, t["b"][:1]])
        return _pack(body)

    def nesting_bomb(self, rid: str) -> bytes:
        body = self.body(rid)
        choice = self.rng.randrange(5)
        if choice == 0:  # the payload, scaled to fit (outer count, fan-out)
            outer, fan = self.rng.randrange(1, 31), self._pick([16, 32, 64])
            level = _array_header(fan) + fan * b"\x90"
            inner = _array_header(fan) + fan * (_array_header(fan) + fan * level)
            bomb = b"\xdc" + outer.to_bytes(2, "big") + outer * inner
            while len(bomb) > self._room(body):
                outer //= 2
                bomb = b"\xdc" + max(outer, 1).to_bytes(2, "big") + max(outer, 1) * inner
            return bomb if self.rng.random() < 0.2 else self._with_raw(body, "x", bomb)
        if choice == 1:  # a deep chain of one-element arrays
            depth = self._pick([6, 100, 1000, 100_000])
            return self._with_raw(body, self._pick(["x", "t", "ts"]),
                                  b"\x91" * depth + b"\xc0")
        if choice == 2:  # deep maps
            depth = self._pick([6, 50, 5000])
            return self._with_raw(body, "x", b"\x81\xa1a" * depth + b"\xc0")
        if choice == 3:  # wide and shallow: each container small, all of them too many
            rows, width = self._pick([(16, 1000), (64, 64), (600, 1)])
            wide = _array_header(rows) + rows * (_array_header(width) + b"\xc0" * width)
            return self._with_raw(body, "x", wide)
        # nested inside a tensor entry: s = [[[[...]]]]
        t = self._tensor(body)
        t["s"] = [[[[[[1]]]]]]
        return _pack(body)

    def flat_flood(self, rid: str, count: int | None = None) -> bytes:
        body = self.body(rid)
        room = self._room(body)
        n = min(count or self._pick([1000, 10_000, 100_000, 1_000_000]), room - 8)
        element: bytes = self._pick([b"\x90", b"\xc0", b"\x80", b"\x00"])
        key = self._pick(["t", "x", "ts", "s"])
        if key == "s":  # the flood as a tensor's shape
            self._tensor(body)["s"] = []
            packed = _pack(body)
            i = packed.index(_pack("s") + b"\x90") + 2  # the empty shape's byte
            return packed[:i] + _array_header(n) + element * n + packed[i + 1:]
        return self._with_raw(body, key, _array_header(n) + element * n)

    def big_claim(self, rid: str) -> bytes:
        body = self.body(rid)
        raw: bytes = self._pick([
            b"\xdb\xff\xff\xff\xff" + b"abc",  # str 32 claiming 4 GiB
            b"\xc6\x80\x00\x00\x00" + b"\0" * 16,  # bin 32 claiming 2 GiB
            b"\xdd\xff\xff\xff\xff\xc0",  # array 32 claiming 4 G entries
            b"\xdf\xff\xff\xff\xff\xa1a\xc0",  # map 32 claiming 4 G entries
            b"\xda\xff\xff" + b"x" * 100,  # str 16 claiming 65535, 100 there
            _pack("y" * 70_000),  # a real str over the 64 KiB limit
            b"\xc5\xff\xff" + b"\0" * 10,  # bin 16 claiming more than is left
        ])
        key = self._pick(["id", "x", "b", "dev"])
        if key == "b":
            t = self._tensor(body)
            t["b"] = b"\x00"
            packed = _pack(body)
            i = packed.index(_pack("b") + b"\xc4\x01\x00")
            return packed[:i + 2] + raw + packed[i + 5:]
        return self._with_raw(body, key, raw)

    def ext_type(self, rid: str) -> bytes:
        body = self.body(rid)
        value = self._pick([msgpack.ExtType(1, b"x"), msgpack.ExtType(0, b"\0" * 8),
                            msgpack.Timestamp(0), msgpack.ExtType(5, b"\0" * 300),
                            msgpack.ExtType(127, b"")])
        where = self._pick(["dl", "x", "s", "b", "ts"])
        if where in ("s", "b"):
            self._tensor(body)[where] = [value] if where == "s" else value
        elif where == "ts":
            body["ts"] = {"sent": value}
        else:
            body[where] = value
        return _pack(body)

    def non_str_key(self, rid: str) -> bytes:
        body = self.body(rid)
        bad = self._pick([1, -1, 1.5, b"v", True, None])
        target: dict[Any, Any] = body if self.rng.random() < 0.5 else self._tensor(body)
        target[bad] = 1
        return _pack(body)

    def bad_utf8(self, rid: str) -> bytes:
        body = self.body("\u00e9" * 4)
        packed = _pack(body)
        i = packed.index("\u00e9".encode())
        bad: bytes = self._pick([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0", b"\xe2\x82"])
        return packed[:i] + bad + packed[i + 2:]

    def bad_version(self, rid: str) -> bytes:
        body = self.body(rid)
        body["v"] = self._pick([True, False, 0, 2, 99, 1.0, "1", None, -1, 2**64 - 1, [1]])
        return _pack(body)

    def bad_kind(self, rid: str) -> bytes:
        body = self.body(rid)
        body["k"] = self._pick(["res", "", "REQ", "request", 1, None, b"req"])
        if body["k"] == "res" and self.rng.random() < 0.5:
            body["err"] = {"code": "internal", "msg": "forged"}
        return _pack(body)

    def bad_deadline(self, rid: str) -> bytes:
        body = self.body(rid)
        body["dl"] = self._pick([math.nan, math.inf, -math.inf, -1.0, -1e-9, -2**63, True,
                                 False, "soon", None, b"\0", [1.0]])
        return _pack(body)

    def bad_timestamps(self, rid: str) -> bytes:
        body = self.body(rid)
        body["ts"] = self._pick([{"sent": math.nan}, {"sent": math.inf}, {"sent": True},
                                 {"sent": "now"}, {"sent": None}, {"sent": [1.0]},
                                 {f"k{i}": 1.0 for i in range(65)}, [1.0], "ts"])
        return _pack(body)

    def bad_quantization(self, rid: str) -> bytes:
        body = self.body(rid)
        self._tensor(body)["q"] = self._pick([
            [math.nan, 0], [math.inf, 0], [0.0, 0], [-0.5, 0], [0.1, True], [True, 0],
            [0.1, 2**64 - 1], [0.1, -2**63], [0.1, 300], [0.1, 0.5], [0.1], [0.1, 0, 0],
            "q", {"scale": 0.1}, [None, None]])
        return _pack(body)

    def bad_codec(self, rid: str) -> bytes:
        body = self.body(rid)
        t = self._tensor(body)
        t["c"] = self._pick(["jpeg", "png", "webp", "", 5, None, b"jpeg"])
        t["b"] = self._pick([[b"\xff\xd8\xff\xe0" + self.rng.randbytes(40)],
                             [b"\x89PNG\r\n\x1a\n"] * 3, t["b"], [], [1, 2], "x"])
        return _pack(body)

    def bad_images(self, rid: str) -> bytes:
        """Encoded images for a split that declares a codec: real ones (answered), and
        truncated, resized, miscounted, mislabelled or bomb-headed ones."""
        if not self.codecs:
            return self.bad_codec(rid)
        import io

        from PIL import Image

        name, codec = self._pick(sorted(self.codecs.items()))
        body = self.body(rid)
        t = next(t for t in body["t"] if t["n"] == name)
        images: list[bytes] = codec.encode(self.arrays()[name])
        t.update(c=codec.codec, b=images)
        t.pop("q", None)
        n, h, w = (t["s"][0], t["s"][2], t["s"][3]) if codec.layout == "NCHW" else \
            tuple(t["s"][:3])
        choice = self.rng.randrange(7)
        if choice == 1:
            t["b"] = [images[0][:self.rng.randrange(1, len(images[0]))]]
        elif choice == 2:  # a real image of another size
            out = io.BytesIO()
            mode = "L" if codec.channels == 1 else "RGB"
            Image.new(mode, (w + self.rng.randrange(1, 9), h)).save(
                out, format="JPEG" if codec.codec == "jpeg" else "PNG")
            t["b"] = [out.getvalue()]
        elif choice == 3:
            t["b"] = images * self._pick([0, 2, 3])
        elif choice == 4:  # the other format
            out = io.BytesIO()
            Image.new("L" if codec.channels == 1 else "RGB", (w, h)).save(
                out, format="PNG" if codec.codec == "jpeg" else "JPEG")
            t["b"] = [out.getvalue()]
        elif choice == 5:  # a decompression-bomb header, declared or not
            big = self._pick([4000, 20000, 65000])
            t["b"] = [_png_header(big, big)]
            if self.rng.random() < 0.5:
                t["s"] = [n, codec.channels, big, big] if codec.layout == "NCHW" else \
                    [n, big, big, codec.channels]
        elif choice == 6:
            t["b"] = [images[0][:20] + self.rng.randbytes(200)]
        return _pack(body)

    def bad_ids(self, rid: str) -> bytes:
        body = self.body(rid)
        key = self._pick(["id", "dev", "split", "rt"])
        if key == "id":  # never another message's id: the worker answers a duplicate once
            body[key] = self._pick([rid + "\u0000", rid + "/../#", rid + "+", "x" * 300,
                                    "x" * 65_000])
        else:
            body[key] = self._pick(["", "x" * 300, "x" * 65_000, "\u0000", "../../#", "+/+",
                                    "no-such-split", "splitinfer/v1/res/other-device"])
        return _pack(body)

    def cut_mismatch(self, rid: str) -> bytes:
        body = self.body(rid)
        t = self._tensor(body)
        choice = self.rng.randrange(6)
        if choice == 0:
            t["n"] = self._pick(["", "other", t["n"] + "x", "x" * 70])
        elif choice == 1:
            body["t"].append(copy.deepcopy(t))  # the same tensor twice
        elif choice == 2:
            body["t"] = []
        elif choice == 3:  # zero samples
            t["s"] = [0, *t["s"][1:]]
            t["b"] = b""
        elif choice == 4:  # a fixed dimension off by one (bytes to match)
            t["s"] = [*t["s"][:-1], t["s"][-1] + 1]
            t["b"] = bytes(int(np.prod(t["s"])) * np.dtype(t["d"]).itemsize)
        else:
            body["t"] = [copy.deepcopy(t) for _ in range(self._pick([2, 64, 65]))]
        return _pack(body)

    def oversize(self, rid: str) -> bytes:
        body = self.body(rid)
        pad = self.max_payload - len(_pack(body)) + self.rng.randrange(1, 1000)
        body["pad"] = b"\0" * pad
        return _pack(body)

    def make(self, kind: str, rid: str) -> bytes:
        return KINDS[kind](self, rid)


# kind -> (generator method, weight): the big kinds are rarer (each costs a few MB to send)
_KIND_TABLE: dict[str, tuple[Callable[[FuzzGenerator, str], bytes], float]] = {
    "random_bytes": (FuzzGenerator.random_bytes, 1.0),
    "truncated": (FuzzGenerator.truncated, 1.0),
    "byte_flip": (FuzzGenerator.byte_flip, 1.0),
    "trailing_bytes": (FuzzGenerator.trailing_bytes, 0.5),
    "wrong_type": (FuzzGenerator.wrong_type, 1.5),
    "missing_field": (FuzzGenerator.missing_field, 0.5),
    "huge_dim": (FuzzGenerator.huge_dim, 1.0),
    "negative_dim": (FuzzGenerator.negative_dim, 0.5),
    "bool_dim": (FuzzGenerator.bool_dim, 0.5),
    "odd_dim": (FuzzGenerator.odd_dim, 0.5),
    "bad_rank": (FuzzGenerator.bad_rank, 0.5),
    "dtype_mismatch": (FuzzGenerator.dtype_mismatch, 1.0),
    "size_mismatch": (FuzzGenerator.size_mismatch, 1.0),
    "nesting_bomb": (FuzzGenerator.nesting_bomb, 0.5),
    "flat_flood": (FuzzGenerator.flat_flood, 0.3),
    "big_claim": (FuzzGenerator.big_claim, 1.0),
    "ext_type": (FuzzGenerator.ext_type, 0.5),
    "non_str_key": (FuzzGenerator.non_str_key, 0.5),
    "bad_utf8": (FuzzGenerator.bad_utf8, 0.5),
    "bad_version": (FuzzGenerator.bad_version, 0.5),
    "bad_kind": (FuzzGenerator.bad_kind, 0.5),
    "bad_deadline": (FuzzGenerator.bad_deadline, 1.0),
    "bad_timestamps": (FuzzGenerator.bad_timestamps, 0.5),
    "bad_quantization": (FuzzGenerator.bad_quantization, 1.0),
    "bad_codec": (FuzzGenerator.bad_codec, 1.0),
    "bad_images": (FuzzGenerator.bad_images, 1.0),
    "bad_ids": (FuzzGenerator.bad_ids, 0.5),
    "cut_mismatch": (FuzzGenerator.cut_mismatch, 1.0),
    "oversize": (FuzzGenerator.oversize, 0.02),
}
KINDS: dict[str, Callable[[FuzzGenerator, str], bytes]] = {
    k: fn for k, (fn, _w) in _KIND_TABLE.items()}


def schedule(messages: int, valid_every: int, seed: int, exclude: Sequence[str] = ()
             ) -> list[str]:
    """The kind of each message ("valid" every ``valid_every``-th, a burst of the largest
    floods once, right before a valid request), reproducible from ``seed``."""
    rng = random.Random(seed ^ 0x5EED)
    names = [k for k in _KIND_TABLE if k not in exclude]
    weights = [_KIND_TABLE[k][1] for k in names]
    kinds = rng.choices(names, weights, k=messages)
    if valid_every:
        for i in range(valid_every - 1, messages, valid_every):
            kinds[i] = "valid"
    if messages >= 4 * BURST:
        at = messages // 2
        kinds[at:at + BURST] = ["flood_burst"] * BURST
        kinds[at + BURST] = "valid"
    # every kind at least once, whatever the weights (for runs of a few hundred)
    slots = [i for i, kind in enumerate(kinds) if kind not in ("valid", "flood_burst")]
    for kind, slot in zip(names, rng.sample(slots, min(len(names), len(slots))),
                          strict=False):
        kinds[slot] = kind
    return kinds
