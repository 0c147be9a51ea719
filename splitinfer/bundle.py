"""``bundle.json``: a folder of split directories of one model, the candidates to choose from.

Written by ``splitinfer bundle``; read by ``profile``, ``plan``, the adaptive edge agent
(which holds every head), the worker (which serves every tail: it walks the folder for
manifests, bundle or not) and the fleet. Plain JSON::

    {
      "format": "splitinfer.bundle/1",
      "model": "mobilenetv2_int8",
      "source_sha256": "…",
      "splits": [
        {"split_id": "mobilenetv2_int8-…", "dir": "edge_only", "kind": "edge_only",
         "bytes_per_sample": 0, "head_flops_share": 1.0},
        {"split_id": "mobilenetv2_int8-…", "dir": "cut_03", "kind": "split",
         "bytes_per_sample": 25088, "head_flops_share": 0.31},
        {"split_id": "mobilenetv2_int8-…", "dir": "cloud_only", "kind": "cloud_only",
         "bytes_per_sample": 602112, "head_flops_share": 0.0},
        {"split_id": "mobilenetv2_int8-…", "dir": "cloud_only_jpeg90", "kind": "cloud_only",
         "bytes_per_sample": 14210, "head_flops_share": 0.0, "input_codec": "jpeg:90"}
      ]
    }

``split_id`` is the ``split_id`` of the manifest in ``dir`` (relative to the bundle
folder, one level, no ``..``). ``bytes_per_sample`` is what crosses per sample (for an
input codec: the mean encoded size over the samples the bundle was built with).
``head_flops_share`` is the head's share of the model's FLOPs (0 for cloud_only, 1 for
edge_only). Optional per split: ``input_codec`` (absent = raw), ``cut`` (tensor names),
``agreement`` (share of samples whose answer matches the uncompressed model's, for a
lossy codec). Unknown keys are kept and ignored, so later versions can add fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitinfer.errors import ManifestError
from splitinfer.manifest import KINDS, MANIFEST_NAME, Manifest

__all__ = ["BUNDLE_FORMAT", "BUNDLE_NAME", "BundleSplit", "Bundle", "is_bundle"]

BUNDLE_FORMAT = "splitinfer.bundle/1"
BUNDLE_NAME = "bundle.json"


@dataclass(frozen=True)
class BundleSplit:
    split_id: str
    dir: str
    kind: str
    bytes_per_sample: int | None
    head_flops_share: float | None
    input_codec: str = "raw"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.split_id or not isinstance(self.split_id, str):
            raise ManifestError(f"bundle split {self!r}: split_id must be a non-empty string")
        if self.kind not in KINDS:
            raise ManifestError(f"bundle split {self.split_id}: kind {self.kind!r}; expected "
                                f"one of {', '.join(KINDS)}")
        parts = Path(self.dir).parts
        if (not self.dir or Path(self.dir).is_absolute() or len(parts) != 1
                or parts[0] in (".", "..")):
            raise ManifestError(f"bundle split {self.split_id}: dir {self.dir!r}; expected "
                                "the name of a folder inside the bundle")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update({"split_id": self.split_id, "dir": self.dir, "kind": self.kind,
                    "bytes_per_sample": self.bytes_per_sample,
                    "head_flops_share": self.head_flops_share})
        if self.input_codec != "raw":
            out["input_codec"] = self.input_codec
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BundleSplit:
        if not isinstance(data, Mapping):
            raise ManifestError(f"bundle split {data!r}: expected an object")
        try:
            known = {"split_id", "dir", "kind", "bytes_per_sample", "head_flops_share",
                     "input_codec"}
            bps = data.get("bytes_per_sample")
            share = data.get("head_flops_share")
            return cls(split_id=data["split_id"], dir=str(data["dir"]), kind=data["kind"],
                       bytes_per_sample=None if bps is None else int(bps),
                       head_flops_share=None if share is None else float(share),
                       input_codec=str(data.get("input_codec") or "raw"),
                       extra={k: v for k, v in data.items() if k not in known})
        except KeyError as exc:
            raise ManifestError(f"bundle split {dict(data)!r}: missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"bundle split {dict(data)!r}: {exc}") from None


@dataclass(frozen=True)
class Bundle:
    """The candidates of one model; ``root`` is the folder holding ``bundle.json``."""

    model: str
    source_sha256: str
    splits: tuple[BundleSplit, ...]
    root: Path = Path(".")

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for s in self.splits:
            if s.split_id in seen:
                raise ManifestError(f"bundle {self.root}: split_id {s.split_id} listed twice")
            seen.add(s.split_id)

    def __iter__(self) -> Iterator[BundleSplit]:
        return iter(self.splits)

    def __len__(self) -> int:
        return len(self.splits)

    @property
    def ids(self) -> list[str]:
        return [s.split_id for s in self.splits]

    def get(self, split_id: str) -> BundleSplit:
        for s in self.splits:
            if s.split_id == split_id or s.dir == split_id:
                return s
        raise ManifestError(f"bundle {self.root}: no split {split_id!r}; it has "
                            f"{', '.join(self.ids)}")

    def of_kind(self, kind: str) -> list[BundleSplit]:
        return [s for s in self.splits if s.kind == kind]

    def path(self, split: BundleSplit | str) -> Path:
        s = self.get(split) if isinstance(split, str) else split
        return self.root / s.dir

    def manifest(self, split: BundleSplit | str) -> Manifest:
        s = self.get(split) if isinstance(split, str) else split
        m = Manifest.load(self.root / s.dir)
        if m.split_id != s.split_id:
            raise ManifestError(f"bundle {self.root}: {s.dir}/{MANIFEST_NAME} is split "
                                f"{m.split_id}, bundle.json says {s.split_id}")
        return m

    def to_dict(self) -> dict[str, Any]:
        return {"format": BUNDLE_FORMAT, "model": self.model,
                "source_sha256": self.source_sha256,
                "splits": [s.to_dict() for s in self.splits]}

    def save(self, directory: str | Path | None = None) -> Path:
        root = Path(directory) if directory is not None else self.root
        path = root / BUNDLE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: str | Path = ".") -> Bundle:
        if not isinstance(data, Mapping):
            raise ManifestError(f"{root}/{BUNDLE_NAME}: expected a JSON object")
        fmt = data.get("format", BUNDLE_FORMAT)
        if fmt != BUNDLE_FORMAT:
            raise ManifestError(f"{root}/{BUNDLE_NAME}: format {fmt!r}; this splitinfer reads "
                                f"{BUNDLE_FORMAT!r}")
        splits = data.get("splits")
        if not isinstance(splits, Sequence) or isinstance(splits, str | bytes):
            raise ManifestError(f"{root}/{BUNDLE_NAME}: 'splits' must be a list")
        try:
            return cls(model=str(data["model"]), source_sha256=str(data["source_sha256"]),
                       splits=tuple(BundleSplit.from_dict(s) for s in splits), root=Path(root))
        except KeyError as exc:
            raise ManifestError(f"{root}/{BUNDLE_NAME}: missing {exc.args[0]!r}") from None

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """From a bundle folder or its ``bundle.json``."""
        path = Path(path)
        file = path / BUNDLE_NAME if path.is_dir() else path
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no {BUNDLE_NAME}; make one with "
                                "`splitinfer bundle MODEL.onnx -o DIR`") from None
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{file}: cannot read: {exc}") from None
        return cls.from_dict(data, root=file.parent)


def is_bundle(path: str | Path) -> bool:
    path = Path(path)
    return (path / BUNDLE_NAME).is_file() or (path.name == BUNDLE_NAME and path.is_file())
