"""``manifest.json``: what a split directory holds and what crosses the cut.

Written by ``splitinfer split``; read by the edge agent (which runs ``head``) and by
cloud workers (which run ``tail``). Plain JSON so that any language can read it::

    {
      "format": "splitinfer.manifest/1",
      "split_id": "digits_cnn-1a2b3c4d-5e6f7a8b",
      "model": "digits_cnn",
      "source": {"path": "digits_cnn.onnx", "sha256": "…"},
      "head": {"path": "head.onnx", "sha256": "…"},
      "tail": {"path": "tail.onnx", "sha256": "…"},
      "inputs":  [{"name": "x", "dtype": "float32", "shape": ["N", 1, 8, 8]}],
      "cut":     [{"name": "q1", "dtype": "int8", "shape": ["N", 16, 4, 4],
                   "quantization": {"scale": 0.02, "zero_point": 0}}],
      "outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", 10]}],
      "bytes_per_sample": 256,
      "opsets": {"": 17, "com.microsoft": 1},
      "versions": {"splitinfer": "0.1.0", "onnx": "1.17.0", "onnxruntime": "1.20.0"},
      "verification": {"max_abs_diff": 0.0, "samples": 8, "tolerance": 1e-05}
    }

Shapes use an int for a fixed dimension and a string (or null) for a dynamic one; the
first dimension is the batch. ``bytes_per_sample`` excludes the batch dimension.

``kind`` says what runs where (absent in older manifests, which read as ``"split"``):

- ``"split"``: ``head`` on the device, ``tail`` on a worker, ``cut`` crosses the network.
- ``"cloud_only"``: the baseline with everything on the worker. ``head`` is null; ``cut``
  lists exactly the model ``inputs`` (the device sends its inputs); ``tail`` is the whole
  model.
- ``"edge_only"``: the baseline with everything on the device. ``tail`` is null; ``head`` is
  the whole model; ``cut`` lists the model ``outputs``; ``bytes_per_sample`` is 0.

Optional ``input_codec`` (``cloud_only`` only; absent = raw): one image input travels
JPEG/PNG-encoded, see :mod:`splitinfer.imagecodec` for the object. ``bytes_per_sample``
stays the raw size; the encoded size depends on the image (``verification.input_codec``
records what the samples took).

Optional ``compression`` (``"zstd"`` or ``"lz4"``; absent = none; not on ``edge_only``,
where nothing crosses): the codec a device and a worker use for this split's raw tensors
on the wire (:mod:`splitinfer.compression`), set where it pays on the samples
(:func:`splitinfer.compression.pays`: the bytes saved take longer to send than the codec
takes). Each tensor is still sent compressed only where that is smaller.

Optional ``head_tflite`` (absent = none; ``splitinfer split --head-format tflite``): the
same head converted to TFLite, beside ``head.onnx``, for devices that run LiteRT instead
of onnxruntime. It takes the manifest's ``inputs`` and gives its ``cut`` (same layout,
dtype and quantization); ``inputs``/``outputs`` map those names to the keys of the
file's signature (TFLite names cannot hold every ONNX name)::

    "head_tflite": {"path": "head.tflite", "sha256": "…", "signature": "serving_default",
                    "inputs": {"image": "in_0"}, "outputs": {"pool": "out_0"}}

``verification.tflite`` records how the TFLite head compared with the ONNX one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer.compression import CODECS
from splitinfer.dtypes import numpy_dtype
from splitinfer.errors import BadInputError, ManifestError, TensorError
from splitinfer.imagecodec import ImageCodec, image_layout

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "KINDS",
    "Quantization",
    "TensorSpec",
    "FileRef",
    "TfliteRef",
    "Manifest",
    "make_split_id",
    "sha256_file",
    "safe_name",
    "find_split_dirs",
]

MANIFEST_FORMAT = "splitinfer.manifest/1"
MANIFEST_NAME = "manifest.json"
KINDS = ("split", "cloud_only", "edge_only")
Dim = int | str | None

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A name usable in an MQTT topic level and a file name (no '/', '+', '#')."""
    cleaned = _SAFE.sub("_", text).strip("._")
    return cleaned or "model"


@dataclass(frozen=True)
class Quantization:
    """Affine int8/uint8 quantization: real = (q - zero_point) * scale (per tensor)."""

    scale: float
    zero_point: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise TensorError(f"quantization scale must be finite and > 0, got {self.scale!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"scale": float(self.scale), "zero_point": int(self.zero_point)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Quantization:
        return cls(scale=float(data["scale"]), zero_point=int(data["zero_point"]))


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype, shape (batch first) and optional quantization of one tensor."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    quantization: Quantization | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise TensorError("tensor name must not be empty")
        numpy_dtype(self.dtype)  # raises TensorError naming the bad dtype
        for dim in self.shape:
            if isinstance(dim, int) and dim < 0:
                raise TensorError(f"tensor {self.name!r}: negative dimension in {self.shape}")
        if self.quantization is not None and self.dtype not in ("int8", "uint8", "int16",
                                                                  "uint16"):
            raise TensorError(
                f"tensor {self.name!r}: quantization given for dtype {self.dtype}, "
                "expected an integer dtype"
            )

    @property
    def itemsize(self) -> int:
        return int(numpy_dtype(self.dtype).itemsize)

    @property
    def sample_shape(self) -> tuple[Dim, ...]:
        return self.shape[1:]

    def bytes_per_sample(self) -> int | None:
        """Bytes of one sample (batch dim excluded); None when a non-batch dim is dynamic."""
        total = self.itemsize
        for dim in self.sample_shape:
            if not isinstance(dim, int):
                return None
            total *= dim
        return total

    def expected_shape(self, *, any_batch: bool = False) -> tuple[Dim, ...]:
        """The shape an array must have; with ``any_batch`` a fixed first (samples)
        dimension reads as ``"N"``: a call may hold any number of samples."""
        if any_batch and self.shape and isinstance(self.shape[0], int):
            return ("N", *self.shape[1:])
        return self.shape

    def shape_text(self, *, any_batch: bool = False) -> str:
        """:meth:`expected_shape` as messages print it: ``(N, 3, 224, 224)``."""
        return _fmt_shape(self.expected_shape(any_batch=any_batch))

    def check(self, array: np.ndarray[Any, Any], *, batched: bool = True,
              any_batch: bool = False) -> None:
        """Raise TensorError unless ``array`` matches this spec (dtype and fixed dims).

        ``batched=False``: ``array`` is one sample (no first dimension); ``any_batch``:
        the first dimension takes any size (:meth:`expected_shape`). A symbolic dimension
        takes any size. :func:`splitinfer.tensors.check_tensors` checks a whole set.
        """
        # dtype == first: check() runs on every request, and dtype.name costs ~2.5 us
        # where == costs ~0.1 (the name still decides: a byte-swapped array has it too)
        if array.dtype != numpy_dtype(self.dtype) and array.dtype.name != self.dtype:
            raise TensorError(
                f"tensor {self.name!r}: expected dtype {self.dtype}, got {array.dtype.name}"
            )
        expected = self.expected_shape(any_batch=any_batch) if batched else self.sample_shape
        if array.ndim != len(expected):
            raise TensorError(
                f"tensor {self.name!r}: expected {len(expected)} dims "
                f"{_fmt_shape(expected)}, got shape {tuple(array.shape)}"
            )
        for want, got in zip(expected, array.shape, strict=True):
            if isinstance(want, int) and want != got:
                raise TensorError(
                    f"tensor {self.name!r}: expected shape {_fmt_shape(expected)}, "
                    f"got {tuple(array.shape)}"
                )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        try:
            quant = data.get("quantization")
            return cls(
                name=str(data["name"]),
                dtype=str(data["dtype"]),
                shape=tuple(data["shape"]),
                quantization=Quantization.from_dict(quant) if quant else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, TensorError):
                raise
            raise ManifestError(f"bad tensor entry {dict(data)!r}: {exc}") from exc


def _fmt_shape(shape: Sequence[Dim]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


@dataclass(frozen=True)
class FileRef:
    path: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileRef:
        return cls(path=str(data["path"]), sha256=str(data["sha256"]))


@dataclass(frozen=True)
class TfliteRef:
    """``head_tflite``: the file, and the manifest's tensor names → its signature keys."""

    path: str
    sha256: str
    signature: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "signature": self.signature,
                "inputs": dict(self.inputs), "outputs": dict(self.outputs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TfliteRef:
        try:
            return cls(path=str(data["path"]), sha256=str(data["sha256"]),
                       signature=str(data["signature"]),
                       inputs={str(k): str(v) for k, v in data["inputs"].items()},
                       outputs={str(k): str(v) for k, v in data["outputs"].items()})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"bad head_tflite entry {dict(data)!r}: expected path, "
                                f"sha256, signature, inputs and outputs ({exc})") from exc


@dataclass(frozen=True)
class Manifest:
    split_id: str
    model: str
    source: FileRef
    head: FileRef | None
    tail: FileRef | None
    inputs: tuple[TensorSpec, ...]
    cut: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opsets: Mapping[str, int] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    verification: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "split"
    input_codec: Mapping[str, Any] | None = None
    compression: str | None = None
    head_tflite: TfliteRef | None = None
    _codec: ImageCodec | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.split_id or safe_name(self.split_id) != self.split_id:
            raise ManifestError(
                f"split_id {self.split_id!r} must be non-empty and use only "
                "letters, digits, '_', '.', '-'"
            )
        for label, specs in (("inputs", self.inputs), ("cut", self.cut),
                             ("outputs", self.outputs)):
            if not specs:
                raise ManifestError(f"manifest {self.split_id}: {label} must not be empty")
        self._check_kind()
        if self.input_codec is not None:
            object.__setattr__(self, "_codec", self._check_codec(self.input_codec))
        if self.compression is not None:
            self._check_compression()
        if self.head_tflite is not None:
            self._check_tflite(self.head_tflite)

    def _check_tflite(self, ref: TfliteRef) -> None:
        where = f"manifest {self.split_id}: head_tflite"
        if self.head is None:
            raise ManifestError(f"{where}: a {self.kind} split has no head to convert")
        for label, specs, given in (("inputs", self.inputs, ref.inputs),
                                    ("outputs", self.cut, ref.outputs)):
            want = sorted(s.name for s in specs)
            if sorted(given) != want:
                raise ManifestError(f"{where}: {label} maps {sorted(given)}; expected the "
                                    f"{'inputs' if label == 'inputs' else 'cut'} {want}")

    def _check_compression(self) -> None:
        where = f"manifest {self.split_id}"
        if self.compression not in CODECS:
            raise ManifestError(f"{where}: compression {self.compression!r}; expected one of "
                                f"{list(CODECS)} or absent (none)")
        if self.kind == "edge_only":
            raise ManifestError(f"{where}: an edge_only split sends no tensors; expected no "
                                "compression")

    def _check_codec(self, data: Mapping[str, Any]) -> ImageCodec:
        where = f"manifest {self.split_id}"
        if self.kind != "cloud_only":
            raise ManifestError(f"{where}: only a cloud_only split may have an input_codec "
                                f"(the device sends its inputs encoded); this one is {self.kind}")
        codec = ImageCodec.from_dict(data)
        specs = {s.name: s for s in self.cut}
        spec = specs.get(codec.input)
        if spec is None:
            raise ManifestError(f"{where}: input_codec input {codec.input!r} is not a model "
                                f"input; expected one of {sorted(specs)}")
        try:
            image_layout(spec.shape, spec.dtype, name=spec.name)
        except BadInputError as exc:
            raise ManifestError(f"{where}: input_codec: {exc.message}") from None
        channels = spec.shape[1] if codec.layout == "NCHW" else spec.shape[3]
        if spec.dtype != codec.dtype or channels != codec.channels:
            raise ManifestError(f"{where}: input_codec says {codec.dtype} {codec.layout} with "
                                f"{codec.channels} channel(s); input {spec.name!r} is "
                                f"{spec.dtype} {_fmt_shape(spec.shape)}")
        return codec

    def _check_kind(self) -> None:
        where = f"manifest {self.split_id}"
        if self.kind not in KINDS:
            raise ManifestError(f"{where}: unknown kind {self.kind!r}; expected one of "
                                f"{', '.join(KINDS)}")
        if self.kind == "cloud_only":
            if self.head is not None:
                raise ManifestError(f"{where}: a cloud_only split has no head; expected "
                                    "\"head\": null")
            if self.tail is None:
                raise ManifestError(f"{where}: a cloud_only split needs a tail (the model)")
            if [(s.name, s.dtype, s.shape) for s in self.cut] != [
                    (s.name, s.dtype, s.shape) for s in self.inputs]:
                raise ManifestError(f"{where}: a cloud_only split's cut must list exactly "
                                    "the model inputs (same names, dtypes and shapes)")
        elif self.kind == "edge_only":
            if self.tail is not None:
                raise ManifestError(f"{where}: an edge_only split has no tail; expected "
                                    "\"tail\": null")
            if self.head is None:
                raise ManifestError(f"{where}: an edge_only split needs a head (the model)")
        elif self.head is None or self.tail is None:
            raise ManifestError(f"{where}: a split needs both a head and a tail file")

    @property
    def bytes_per_sample(self) -> int | None:
        if self.kind == "edge_only":
            return 0  # nothing crosses the network
        sizes = [spec.bytes_per_sample() for spec in self.cut]
        if any(size is None for size in sizes):
            return None
        return sum(size for size in sizes if size is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "split_id": self.split_id,
            "model": self.model,
            "kind": self.kind,
            "source": self.source.to_dict(),
            "head": self.head.to_dict() if self.head is not None else None,
            "tail": self.tail.to_dict() if self.tail is not None else None,
            "inputs": [s.to_dict() for s in self.inputs],
            "cut": [s.to_dict() for s in self.cut],
            "outputs": [s.to_dict() for s in self.outputs],
            "bytes_per_sample": self.bytes_per_sample,
            "opsets": dict(self.opsets),
            "versions": dict(self.versions),
            "verification": dict(self.verification),
            **({"extra": dict(self.extra)} if self.extra else {}),
            **({"input_codec": dict(self.input_codec)} if self.input_codec is not None else {}),
            **({"compression": self.compression} if self.compression is not None else {}),
            **({"head_tflite": self.head_tflite.to_dict()}
               if self.head_tflite is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        fmt = data.get("format")
        if fmt != MANIFEST_FORMAT:
            raise ManifestError(
                f"unsupported manifest format {fmt!r}; expected {MANIFEST_FORMAT!r}")
        try:
            return cls(
                split_id=str(data["split_id"]),
                model=str(data["model"]),
                source=FileRef.from_dict(data["source"]),
                head=FileRef.from_dict(data["head"]) if data["head"] is not None else None,
                tail=FileRef.from_dict(data["tail"]) if data["tail"] is not None else None,
                inputs=tuple(TensorSpec.from_dict(d) for d in data["inputs"]),
                cut=tuple(TensorSpec.from_dict(d) for d in data["cut"]),
                outputs=tuple(TensorSpec.from_dict(d) for d in data["outputs"]),
                opsets={str(k): int(v) for k, v in data.get("opsets", {}).items()},
                versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
                verification=dict(data.get("verification", {})),
                extra=dict(data.get("extra", {})),
                kind=str(data.get("kind", "split")),
                input_codec=data.get("input_codec"),
                compression=data.get("compression"),
                head_tflite=TfliteRef.from_dict(data["head_tflite"])
                if data.get("head_tflite") is not None else None,
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is missing or has a bad field: {exc}") from exc

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Load ``path`` (a manifest.json or the split directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such file; expected a split directory written by "
                                "'splitinfer split' (with manifest.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: not a readable JSON manifest: {exc}") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    def codec_for(self, name: str) -> ImageCodec | None:
        """The image codec the cut tensor ``name`` travels with (None: raw bytes)."""
        codec = self._codec
        return codec if codec is not None and codec.input == name else None

    def resolve(self, directory: str | Path, which: str) -> Path:
        """Absolute path of ``head``, ``tail`` or ``head_tflite`` for a manifest loaded from
        ``directory``.

        Raises ManifestError when this kind of split has no such file (cloud_only: no head;
        edge_only: no tail; a split converted without ``--head-format tflite``: no
        head_tflite).
        """
        ref = {"head": self.head, "tail": self.tail, "head_tflite": self.head_tflite}[which]
        if ref is None:
            raise ManifestError(f"split {self.split_id} ({self.kind}) has no {which} file")
        return (Path(directory) / ref.path).resolve()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def make_split_id(model: str, source_sha256: str, cut_names: Iterable[str]) -> str:
    """Stable id: same model file + same cut → same id, on every machine."""
    cut_digest = hashlib.sha256("\0".join(sorted(cut_names)).encode()).hexdigest()
    return f"{safe_name(model)}-{source_sha256[:8]}-{cut_digest[:8]}"


def find_split_dirs(root: str | Path) -> list[Path]:
    """``root`` itself if it holds a manifest, else every directory below it that does."""
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(MANIFEST_NAME))
