"""Image codecs for the cloud-only baseline: send the model input JPEG- or PNG-encoded.

For many models and links, compressing the *input* and uploading it beats any split
(sc2bench); a planner that never considers it misleads. So a ``cloud_only`` split may
declare an ``input_codec`` in its manifest: the device encodes each sample of one image
input as one image file, the worker decodes it (:mod:`splitinfer.wire`) before the full
model. The manifest's ``input_codec`` object::

    {"codec": "jpeg", "quality": 90, "input": "image", "layout": "NCHW", "channels": 1,
     "dtype": "float32", "scale": [0.0039], "offset": [0.0]}

- ``codec``: ``jpeg`` (lossy, ``quality`` 1-100) or ``png`` (lossless for uint8).
- ``input``: the model input (a name of the manifest's ``cut``) that travels encoded; other
  inputs, if any, travel raw.
- ``layout``: ``NCHW`` or ``NHWC``; ``channels``: 1 (grayscale, ``L``) or 3 (``RGB``).
  Other channel counts (RGBA, 4-channel features), other ranks and integer dtypes but
  uint8 are refused when the codec is made: they are not images a JPEG/PNG can carry.
- ``dtype``: the input's dtype. For a float input, ``scale``/``offset`` (one per channel)
  map it to uint8 and back: ``u = clip(round((x - offset) / scale), 0, 255)``,
  ``x = u * scale + offset``. They come from the samples' per-channel min/max when the
  split is made, so values in that range lose at most ``scale / 2`` to the mapping; values
  outside are clipped. A uint8 input has neither (its pixels are sent as they are).

Spec strings (``--input-codec``): ``raw`` (no codec), ``png``, ``jpeg`` (= ``jpeg:90``),
``jpeg:Q``.

The codec is Pillow (imported inside the functions, so this module imports with numpy
only): maintained, wheels for every platform the edge runs on (armv7/aarch64 included,
libjpeg-turbo inside), reads the header of a file without decoding it (what the hostile-
input checks need) and does grayscale and RGB JPEG and PNG. simplejpeg is faster for JPEG
but has no PNG; OpenCV is a 40+ MB dependency for two functions.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitinfer.errors import BadInputError, ErrorCode, ManifestError, WireError

__all__ = ["CODECS", "LAYOUTS", "DEFAULT_JPEG_QUALITY", "MAX_DECODED_BYTES", "CodecSpec",
           "ImageCodec", "parse_spec", "image_layout", "make_codec"]

CODECS = ("jpeg", "png")
LAYOUTS = ("NCHW", "NHWC")
DEFAULT_JPEG_QUALITY = 90
# Decoded size cap per tensor (all samples together), checked before any decompression.
MAX_DECODED_BYTES = 64 * 1024 * 1024
_FLOATS = ("float16", "float32", "float64")
_MODES = {1: "L", 3: "RGB"}
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
_MAX_SIDE = 65500  # JPEG's limit; PNG allows more, no camera needs it

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class CodecSpec:
    """A parsed ``--input-codec`` entry: ``raw``, ``png`` or ``jpeg`` at ``quality``."""

    codec: str  # "raw" | "png" | "jpeg"
    quality: int | None = None

    def __str__(self) -> str:
        return f"jpeg:{self.quality}" if self.codec == "jpeg" else self.codec

    @property
    def suffix(self) -> str:
        """For directory names and split ids: ``jpeg90``, ``png``, ``raw``."""
        return f"jpeg{self.quality}" if self.codec == "jpeg" else self.codec

    @property
    def lossy(self) -> bool:
        return self.codec == "jpeg"


def parse_spec(text: str) -> CodecSpec:
    """``raw`` | ``png`` | ``jpeg`` | ``jpeg:Q`` (Q 1-100); BadInputError otherwise."""
    raw = text.strip().lower()
    name, sep, quality = raw.partition(":")
    if name in ("raw", "png") and not sep:
        return CodecSpec(name)
    if name == "jpeg" or name == "jpg":
        if not sep:
            return CodecSpec("jpeg", DEFAULT_JPEG_QUALITY)
        if quality.isdigit() and 1 <= int(quality) <= 100:
            return CodecSpec("jpeg", int(quality))
    raise BadInputError(f"input codec {text!r}: expected raw, png, jpeg or jpeg:Q with Q "
                        "from 1 to 100 (e.g. jpeg:90)")


def image_layout(shape: Sequence[Any], dtype: str, *, name: str = "input") -> str:
    """``NCHW`` or ``NHWC`` for an image-like tensor spec; BadInputError saying why not.

    An image here: rank 4 (batch first), dtype uint8 or float, 1 or 3 channels on axis 1
    (NCHW) or axis 3 (NHWC). When both axes could be channels (``N,3,H,3``) NCHW wins.
    """
    if dtype != "uint8" and dtype not in _FLOATS:
        raise BadInputError(f"input {name!r} is {dtype}; an image codec needs uint8 or float "
                            "pixels")
    if len(shape) != 4:
        raise BadInputError(f"input {name!r} has shape {list(shape)}; an image codec needs "
                            "4 dims, NCHW or NHWC")
    if shape[1] in _MODES:
        return "NCHW"
    if shape[3] in _MODES:
        return "NHWC"
    raise BadInputError(f"input {name!r} has shape {list(shape)}; an image codec needs 1 or "
                        "3 channels on axis 1 (NCHW) or axis 3 (NHWC)")


@dataclass(frozen=True)
class ImageCodec:
    """How one image input is encoded on the device and decoded on the worker."""

    codec: str
    input: str
    layout: str
    channels: int
    dtype: str
    quality: int | None = None
    scale: tuple[float, ...] | None = None
    offset: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        what = f"input_codec of {self.input!r}"
        if self.codec not in CODECS:
            raise ManifestError(f"{what}: codec {self.codec!r}; expected one of {CODECS}")
        if self.layout not in LAYOUTS:
            raise ManifestError(f"{what}: layout {self.layout!r}; expected NCHW or NHWC")
        if self.channels not in _MODES:
            raise ManifestError(f"{what}: {self.channels} channels; expected 1 or 3")
        if self.codec == "jpeg" and not (isinstance(self.quality, int)
                                         and 1 <= self.quality <= 100):
            raise ManifestError(f"{what}: jpeg quality {self.quality!r}; expected 1-100")
        if self.dtype in _FLOATS:
            for label, values in (("scale", self.scale), ("offset", self.offset)):
                if values is None or len(values) != self.channels or not all(
                        math.isfinite(v) for v in values):
                    raise ManifestError(f"{what}: a {self.dtype} input needs {label} as "
                                        f"{self.channels} finite number(s), got {values!r}")
            if self.scale is not None and not all(v > 0 for v in self.scale):
                raise ManifestError(f"{what}: scale must be > 0, got {list(self.scale)}")
        elif self.dtype != "uint8":
            raise ManifestError(f"{what}: dtype {self.dtype!r}; expected uint8 or a float")

    @property
    def spec(self) -> CodecSpec:
        return CodecSpec(self.codec, self.quality if self.codec == "jpeg" else None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"codec": self.codec}
        if self.quality is not None:
            out["quality"] = self.quality
        out.update({"input": self.input, "layout": self.layout, "channels": self.channels,
                    "dtype": self.dtype})
        if self.scale is not None and self.offset is not None:
            out["scale"] = list(self.scale)
            out["offset"] = list(self.offset)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageCodec:
        if not isinstance(data, Mapping):
            raise ManifestError(f"input_codec {data!r}: expected an object")
        try:
            scale, offset, quality = data.get("scale"), data.get("offset"), data.get("quality")
            return cls(codec=str(data["codec"]), input=str(data["input"]),
                       layout=str(data["layout"]), channels=int(data["channels"]),
                       dtype=str(data["dtype"]),
                       quality=None if quality is None else int(quality),
                       scale=None if scale is None else tuple(float(v) for v in scale),
                       offset=None if offset is None else tuple(float(v) for v in offset))
        except KeyError as exc:
            raise ManifestError(f"input_codec {dict(data)!r}: missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"input_codec {dict(data)!r}: {exc}") from None

    # -- the device side ------------------------------------------------------------------

    def to_pixels(self, array: Array) -> Array:
        """The batch as uint8 NHWC (or NHW for one channel): what the image files hold."""
        if array.dtype.name != self.dtype or array.ndim != 4:
            raise BadInputError(f"input {self.input!r}: the codec encodes {self.dtype} 4-D "
                                f"{self.layout} arrays, got {array.dtype.name} "
                                f"{tuple(array.shape)}")
        nhwc = array.transpose(0, 2, 3, 1) if self.layout == "NCHW" else array
        if nhwc.shape[3] != self.channels:
            raise BadInputError(f"input {self.input!r}: {nhwc.shape[3]} channels in "
                                f"{tuple(array.shape)} ({self.layout}), the codec has "
                                f"{self.channels}")
        if self.dtype != "uint8":
            scale, offset = self._affine()
            scaled = (nhwc.astype(np.float32) - offset) / scale
            nhwc = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(nhwc[..., 0] if self.channels == 1 else nhwc)

    def encode(self, array: Array) -> list[bytes]:
        """One encoded image per sample of ``array`` (the input, batch first)."""
        from PIL import Image

        pixels = self.to_pixels(array)
        if pixels.shape[1] > _MAX_SIDE or pixels.shape[2] > _MAX_SIDE:
            raise BadInputError(f"input {self.input!r}: images of {pixels.shape[2]}x"
                                f"{pixels.shape[1]} exceed the codec's {_MAX_SIDE} pixels")
        out = []
        for sample in pixels:
            buffer = io.BytesIO()
            image = Image.fromarray(sample)  # 2-D uint8: L, H x W x 3: RGB
            if self.codec == "jpeg":
                image.save(buffer, format="JPEG", quality=self.quality)
            else:
                image.save(buffer, format="PNG", compress_level=6)
            out.append(buffer.getvalue())
        return out

    # -- the worker side ------------------------------------------------------------------

    def decode(self, images: Sequence[bytes], shape: Sequence[int], dtype: str, *,
               max_bytes: int = MAX_DECODED_BYTES) -> Array:
        """The tensor of declared ``dtype``/``shape`` from one image per sample.

        Hostile input: the declared shape is checked against the codec (rank, layout,
        channels, dtype) and the decoded size cap, and every image's header (format, mode,
        width, height) against the declared shape, all before anything is decompressed.
        Every failure is a WireError with code ``bad_tensor``.
        """
        from PIL import Image

        where = f"tensor {self.input!r} ({self.spec})"
        if dtype != self.dtype:
            raise _bad(f"{where}: declared dtype {dtype}, the split's codec carries "
                       f"{self.dtype}")
        if len(shape) != 4:
            raise _bad(f"{where}: declared shape {list(shape)}; expected 4 dims "
                       f"({self.layout})")
        n, h, w, c = ((shape[0], shape[2], shape[3], shape[1]) if self.layout == "NCHW"
                      else tuple(shape))
        if c != self.channels:
            raise _bad(f"{where}: declared shape {list(shape)} has {c} channels; the codec "
                       f"carries {self.channels} ({self.layout})")
        if len(images) != n:
            raise _bad(f"{where}: {len(images)} image(s) for {n} sample(s); expected one "
                       "per sample")
        itemsize = np.dtype(self.dtype).itemsize
        if math.prod(shape) * max(itemsize, 1) > max_bytes or h > _MAX_SIDE or w > _MAX_SIDE:
            raise _bad(f"{where}: declared shape {list(shape)} decodes to more than the "
                       f"{max_bytes} byte limit")
        opened = []
        for i, data in enumerate(images):
            try:
                image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[self.codec]])
            except Exception:  # Pillow raises several types for a bad header; its words
                # (and object reprs) stay out of an answer to a device
                raise _bad(f"{where}: image #{i} is not a readable {self.codec} file "
                           f"({len(data)} bytes); expected one {self.codec} image of the "
                           f"declared shape {list(shape)}") from None
            if image.mode != _MODES[self.channels] or image.size != (w, h):
                raise _bad(f"{where}: image #{i} is {image.size[0]}x{image.size[1]} "
                           f"{image.mode}; the declared shape {list(shape)} needs {w}x{h} "
                           f"{_MODES[self.channels]}")
            opened.append(image)
        pixels = np.empty((n, h, w) if self.channels == 1 else (n, h, w, c), dtype=np.uint8)
        for i, image in enumerate(opened):
            try:
                image.load()
                pixels[i] = np.asarray(image)
            except Exception:  # truncated or corrupt data after a valid header
                raise _bad(f"{where}: image #{i} cannot be decoded (truncated or corrupt "
                           f"{self.codec} data after a valid header)") from None
            finally:
                image.close()
        return self.from_pixels(pixels)

    def _affine(self) -> tuple[Array, Array]:
        if self.scale is None or self.offset is None:  # __post_init__ refuses that for floats
            raise ManifestError(f"input_codec of {self.input!r}: no scale/offset for a "
                                f"{self.dtype} input")
        return (np.asarray(self.scale, dtype=np.float32),
                np.asarray(self.offset, dtype=np.float32))

    def from_pixels(self, pixels: Array) -> Array:
        """Inverse of :meth:`to_pixels` (up to the codec's loss): the model's tensor."""
        nhwc = pixels[..., None] if self.channels == 1 else pixels
        if self.dtype != "uint8":
            scale, offset = self._affine()
            nhwc = (nhwc.astype(np.float32) * scale + offset).astype(self.dtype)
        out = nhwc.transpose(0, 3, 1, 2) if self.layout == "NCHW" else nhwc
        return np.ascontiguousarray(out)


def _bad(message: str) -> WireError:
    return WireError(message, code=ErrorCode.BAD_TENSOR)


def make_codec(spec: str | CodecSpec, name: str, dtype: str, shape: Sequence[Any],
               samples: Array | None = None) -> ImageCodec | None:
    """The codec for input ``name`` (None for ``raw``); BadInputError if it is no image.

    A float input needs ``samples`` (the input's values, batch first): the per-channel
    uint8 map is their min/max.
    """
    parsed = spec if isinstance(spec, CodecSpec) else parse_spec(spec)
    if parsed.codec == "raw":
        return None
    layout = image_layout(shape, dtype, name=name)
    channels = int(shape[1] if layout == "NCHW" else shape[3])
    scale = offset = None
    if dtype != "uint8":
        if samples is None or samples.ndim != 4 or samples.size == 0:
            raise BadInputError(f"input {name!r} is {dtype}: the {parsed} codec maps it to "
                                "uint8 by the samples' per-channel range; give samples")
        axes = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
        lo = samples.min(axis=axes).astype(np.float64)
        hi = samples.max(axis=axes).astype(np.float64)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise BadInputError(f"input {name!r}: the samples hold NaN or infinite values; "
                                "expected finite pixels")
        span = hi - lo
        scale = tuple(float(s / 255.0) if s > 0 else 1.0 / 255.0 for s in span)
        offset = tuple(float(v) for v in lo)
    return ImageCodec(codec=parsed.codec, input=name, layout=layout, channels=channels,
                      dtype=dtype, quality=parsed.quality, scale=scale, offset=offset)
