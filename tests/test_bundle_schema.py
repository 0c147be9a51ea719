"""splitinfer.bundle: the bundle.json schema refuses what it cannot trust, keeps what it
does not know, and round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitinfer.bundle import BUNDLE_NAME, Bundle, BundleSplit, is_bundle
from splitinfer.errors import ManifestError


def _doc(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": "splitinfer.bundle/1", "model": "m", "source_sha256": "ab" * 32,
        "splits": [
            {"split_id": "m-1", "dir": "edge_only", "kind": "edge_only",
             "bytes_per_sample": 0, "head_flops_share": 1.0},
            {"split_id": "m-2", "dir": "cut_01", "kind": "split", "bytes_per_sample": 256,
             "head_flops_share": 0.4, "cut": ["q1"], "future_key": {"x": 1}},
            {"split_id": "m-3", "dir": "cloud_only_jpeg90", "kind": "cloud_only",
             "bytes_per_sample": 900, "head_flops_share": 0.0, "input_codec": "jpeg:90",
             "agreement": 0.99},
        ]}
    doc.update(over)
    return doc


def test_round_trip_keeps_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / BUNDLE_NAME).write_text(json.dumps(_doc()))
    assert is_bundle(tmp_path) and not is_bundle(tmp_path / "cut_01")
    bundle = Bundle.load(tmp_path)
    assert bundle.ids == ["m-1", "m-2", "m-3"]
    assert bundle.get("cut_01").split_id == "m-2"  # by dir name too
    assert bundle.get("m-3").input_codec == "jpeg:90"
    assert bundle.get("m-2").input_codec == "raw"
    assert [s.split_id for s in bundle.of_kind("cloud_only")] == ["m-3"]
    assert bundle.path("m-2") == tmp_path / "cut_01"
    out = tmp_path / "copy"
    out.mkdir()
    bundle.save(out)
    again = json.loads((out / BUNDLE_NAME).read_text())
    assert again == _doc()


@pytest.mark.parametrize("bad_dir", ["../x", "/abs", "a/b", ".", ""])
def test_dir_must_be_one_folder_inside(bad_dir: str) -> None:
    with pytest.raises(ManifestError, match="dir"):
        BundleSplit(split_id="m-1", dir=bad_dir, kind="split", bytes_per_sample=1,
                    head_flops_share=0.5)


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    doc = _doc()
    doc["splits"] = [*doc["splits"], doc["splits"][0]]  # type: ignore[list-item,index]
    with pytest.raises(ManifestError, match="listed twice"):
        Bundle.from_dict(doc)
    with pytest.raises(ManifestError, match="format"):
        Bundle.from_dict(_doc(format="splitinfer.bundle/9"))
    with pytest.raises(ManifestError, match="kind"):
        Bundle.from_dict(_doc(splits=[{"split_id": "a", "dir": "a", "kind": "half",
                                       "bytes_per_sample": 1, "head_flops_share": 0}]))
    with pytest.raises(ManifestError, match="missing 'dir'"):
        Bundle.from_dict(_doc(splits=[{"split_id": "a", "kind": "split"}]))
    with pytest.raises(ManifestError, match=r"no bundle\.json"):
        Bundle.load(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="no split 'zz'"):
        Bundle.from_dict(_doc()).get("zz")
