"""Input codecs (splitinfer.imagecodec): specs, round trips, the manifest field, and the
wire decoder against hostile images."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import msgpack
import numpy as np
import pytest
from PIL import Image

from splitinfer.errors import BadInputError, ErrorCode, ManifestError, WireError
from splitinfer.imagecodec import CodecSpec, ImageCodec, image_layout, make_codec, parse_spec
from splitinfer.manifest import FileRef, Manifest, TensorSpec
from splitinfer.wire import REQUEST, Envelope, WireTensor, decode, encode

Array = np.ndarray[Any, Any]


def smooth(n: int, h: int, w: int, c: int, seed: int = 0) -> Array:
    """Smooth float images in [0, 1] (gradients plus a blob): what JPEG is made for."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, c, h, w), dtype=np.float32)
    for i in range(n):
        for ch in range(c):
            a, b, cx, cy = rng.uniform(0, 1, 4)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) * 20)
            out[i, ch] = np.clip(0.3 * a + 0.3 * b * xx + 0.4 * blob, 0, 1)
    return out


@pytest.mark.parametrize(("text", "want"), [
    ("raw", CodecSpec("raw")), ("png", CodecSpec("png")), ("jpeg", CodecSpec("jpeg", 90)),
    ("JPEG:75", CodecSpec("jpeg", 75)), ("jpeg:1", CodecSpec("jpeg", 1)),
])
def test_parse_spec(text: str, want: CodecSpec) -> None:
    assert parse_spec(text) == want
    assert parse_spec(str(want)) == want


@pytest.mark.parametrize("text", ["jpeg:0", "jpeg:101", "jpeg:q", "webp", "png:3", ""])
def test_parse_spec_refuses(text: str) -> None:
    with pytest.raises(BadInputError, match="expected raw, png, jpeg or jpeg:Q"):
        parse_spec(text)


@pytest.mark.parametrize(("shape", "dtype", "fragment"), [
    (["N", 4, 8, 8], "float32", "1 or 3 channels"),
    (["N", 8, 8], "uint8", "4 dims"),
    (["N", 3, 8, 8], "int32", "uint8 or float"),
])
def test_not_an_image(shape: list[Any], dtype: str, fragment: str) -> None:
    with pytest.raises(BadInputError, match=fragment):
        image_layout(shape, dtype)


def test_png_uint8_is_exact_both_layouts() -> None:
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, (3, 10, 12, 3), dtype=np.uint8)
    codec = make_codec("png", "x", "uint8", ["N", 10, 12, 3])
    assert codec is not None and codec.layout == "NHWC"
    np.testing.assert_array_equal(codec.decode(codec.encode(nhwc), list(nhwc.shape), "uint8"),
                                  nhwc)
    nchw = rng.integers(0, 256, (2, 1, 9, 7), dtype=np.uint8)
    gray = make_codec("png", "x", "uint8", ["N", 1, 9, 7])
    assert gray is not None and gray.layout == "NCHW" and gray.channels == 1
    np.testing.assert_array_equal(gray.decode(gray.encode(nchw), list(nchw.shape), "uint8"),
                                  nchw)


def test_float_png_loses_only_the_uint8_step() -> None:
    x = smooth(4, 16, 16, 3) * np.array([2.0, 1.0, 0.5], np.float32)[:, None, None] - 1.0
    codec = make_codec("png", "x", "float32", ["N", 3, 16, 16], x)
    assert codec is not None and codec.scale is not None and codec.offset is not None
    np.testing.assert_allclose(codec.offset, x.min(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(codec.scale, np.float32) * 255, np.ptp(x, axis=(0, 2, 3)),
                               rtol=1e-5)
    y = codec.decode(codec.encode(x), list(x.shape), "float32")
    assert y.dtype == np.float32 and y.shape == x.shape
    step = np.asarray(codec.scale, np.float32)[None, :, None, None]
    assert (np.abs(y - x) <= step / 2 + 1e-6).all()


def test_jpeg_quality_trades_bytes_for_error() -> None:
    x = smooth(4, 32, 32, 3).transpose(0, 2, 3, 1).copy()  # NHWC float
    errors, sizes = [], []
    for quality in (20, 95):
        codec = make_codec(f"jpeg:{quality}", "x", "float32", ["N", 32, 32, 3], x)
        assert codec is not None and codec.layout == "NHWC"
        images = codec.encode(x)
        assert len(images) == 4 and all(b[:2] == b"\xff\xd8" for b in images)  # JPEG SOI
        sizes.append(sum(map(len, images)))
        errors.append(float(np.abs(codec.decode(images, list(x.shape), "float32") - x).mean()))
    assert sizes[0] < sizes[1] and errors[0] > errors[1]
    assert errors[1] < 0.02


def test_float_codec_needs_samples() -> None:
    with pytest.raises(BadInputError, match="give samples"):
        make_codec("jpeg", "x", "float32", ["N", 3, 8, 8])
    assert make_codec("raw", "x", "float32", ["N", 3, 8, 8]) is None


# -- the manifest ---------------------------------------------------------------------------

def _manifest(kind: str = "cloud_only", codec: dict[str, Any] | None = None) -> Manifest:
    spec = TensorSpec("image", "float32", ("N", 1, 8, 8))
    out = TensorSpec("logits", "float32", ("N", 10))
    ref = FileRef("m.onnx", "0" * 64)
    return Manifest(split_id="m-00000000-00000000-jpeg90", model="m", source=ref,
                    head=None if kind == "cloud_only" else ref, tail=ref, inputs=(spec,),
                    cut=(spec,) if kind == "cloud_only" else (out,), outputs=(out,),
                    kind=kind, input_codec=codec)


CODEC = ImageCodec("jpeg", "image", "NCHW", 1, "float32", 90, (1 / 255,), (0.0,))


def test_manifest_round_trip_with_codec() -> None:
    m = _manifest(codec=CODEC.to_dict())
    back = Manifest.from_dict(m.to_dict())
    assert back == m and back.input_codec == CODEC.to_dict()
    assert back.codec_for("image") == CODEC and back.codec_for("other") is None
    plain = _manifest()
    assert "input_codec" not in plain.to_dict() and plain.codec_for("image") is None


@pytest.mark.parametrize(("kind", "codec", "fragment"), [
    ("split", CODEC.to_dict(), "only a cloud_only split"),
    ("cloud_only", {**CODEC.to_dict(), "input": "nope"}, "not a model input"),
    ("cloud_only", {**CODEC.to_dict(), "channels": 3, "scale": [1, 1, 1],
                    "offset": [0, 0, 0]}, "channel"),
    ("cloud_only", {**CODEC.to_dict(), "quality": 0}, "quality"),
    ("cloud_only", {k: v for k, v in CODEC.to_dict().items() if k != "scale"}, "scale"),
])
def test_manifest_refuses_bad_codecs(kind: str, codec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment):
        _manifest(kind, codec)


# -- the wire -------------------------------------------------------------------------------

SPLIT = "m-00000000-00000000-jpeg90"


def _request(x: Array, codec: ImageCodec | None = CODEC) -> bytes:
    return encode(Envelope(kind=REQUEST, request_id="r1", device_id="d", split_id=SPLIT,
                           tensors=[WireTensor("image", x, codec=codec)]))


def _tamper(payload: bytes, **entry: Any) -> bytes:
    body = msgpack.unpackb(payload)
    body["t"][0].update(entry)
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def test_wire_round_trip_with_codec() -> None:
    x = smooth(3, 8, 8, 1)
    payload = _request(x)
    body = msgpack.unpackb(payload)
    entry = body["t"][0]
    assert entry["c"] == "jpeg" and entry["s"] == [3, 1, 8, 8] and entry["d"] == "float32"
    assert isinstance(entry["b"], list) and len(entry["b"]) == 3
    env = decode(payload, codecs={SPLIT: {"image": CODEC}})
    got = env.tensors[0]
    assert got.codec == CODEC and got.array.shape == x.shape and got.array.dtype == np.float32
    assert float(np.abs(got.array - x).max()) < 0.1


def _bad(payload: bytes, fragment: str, code: ErrorCode = ErrorCode.BAD_TENSOR,
         codecs: Any = None) -> None:
    with pytest.raises(WireError, match=fragment) as info:
        decode(payload, codecs={SPLIT: {"image": CODEC}} if codecs is None else codecs)
    assert info.value.code == code


def test_codec_the_split_does_not_declare_is_refused() -> None:
    payload = _request(smooth(1, 8, 8, 1))
    _bad(payload, "declares no input codec", codecs={})
    with pytest.raises(WireError, match="declares no input codec"):
        decode(payload)  # a decoder given no codecs lets no image in
    _bad(_tamper(payload, c="webp"), "declares 'jpeg'")


def test_declared_shape_checked_against_the_header_before_decoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    def no_decoding(self: Any) -> None:
        raise AssertionError("decompressed before the header was checked")

    payload = _request(smooth(2, 8, 8, 1))
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    _bad(_tamper(payload, s=[2, 1, 16, 16]), r"is 8x8 L; the declared shape \[2, 1, 16, 16\]")
    _bad(_tamper(payload, s=[3, 1, 8, 8]), "2 image")
    _bad(_tamper(payload, s=[2, 3, 8, 8]), "3 channels")
    _bad(_tamper(payload, d="uint8"), "declared dtype uint8")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT (a decompression bomb
    shape: a huge header over a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def test_oversized_images_are_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    png = ImageCodec("png", "image", "NCHW", 1, "float32", None, (1 / 255,), (0.0,))
    codecs = {SPLIT: {"image": png}}
    payload = _request(smooth(1, 8, 8, 1), png)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    # the header claims 4000x4000 for a declared 8x8
    _bad(_tamper(payload, b=[_png_header_only(4000, 4000)]), "is 4000x4000", codecs=codecs)
    # declared and header agree, but beyond the decoded-size cap
    _bad(_tamper(payload, s=[1, 1, 60000, 60000], b=[_png_header_only(60000, 60000)]),
         "byte limit", codecs=codecs)


def test_truncated_and_garbage_images_are_refused() -> None:
    payload = _request(smooth(1, 8, 8, 1))
    good = msgpack.unpackb(payload)["t"][0]["b"][0]
    _bad(_tamper(payload, b=[good[: len(good) // 2]]), "cannot be decoded|not a readable")
    _bad(_tamper(payload, b=[b"not a jpeg at all"]), "not a readable jpeg")
    _bad(_tamper(payload, b=good), "'b'", code=ErrorCode.BAD_MESSAGE)  # a bin, not a list
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb, format="JPEG")
    _bad(_tamper(payload, b=[rgb.getvalue()]), "RGB")
