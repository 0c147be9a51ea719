"""``splitinfer plan``: JSON shape, recommendation, baselines, several links, plot, bad input.

The bundle and both profiles are written by hand (section 3 of the profile schema), so the
expected figures follow from the cost model's arithmetic (tests/test_costmodel.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from splitinfer.cli import main
from splitinfer.costmodel import mqtt_publish_bytes
from splitinfer.topics import Topics
from splitter.planner.plan import DEVICE_ID_LEN, split_links

SHA = "f" * 64
IDS = {"edge_only": "m-e", "cut_01": "m-c1", "cut_02": "m-c2", "cloud_only": "m-raw",
       "cloud_only_jpeg90": "m-jpg"}


def _stat(ms: float) -> dict[str, float]:
    return {"p50": ms, "p90": ms * 1.1, "p99": ms * 1.3, "mean": ms, "n": 16}


def _write(tmp: Path, *, edge_sha: str = SHA, cloud_side: str = "cloud",
           drop: str | None = None) -> tuple[Path, Path, Path]:
    bundle = tmp / "bundle"
    bundle.mkdir(exist_ok=True)
    kinds = {"edge_only": "edge_only", "cut_01": "split", "cut_02": "split",
             "cloud_only": "cloud_only", "cloud_only_jpeg90": "cloud_only"}
    # head ms (already x speed), request payload bytes, tail ms
    figures = {"edge_only": (400.0, 0, 0.0), "cut_01": (60.0, 25_000, 8.0),
               "cut_02": (150.0, 10_000, 4.0), "cloud_only": (0.0, 600_000, 10.0),
               "cloud_only_jpeg90": (0.0, 60_000, 10.0)}
    splits = []
    edge: dict[str, Any] = {}
    cloud: dict[str, Any] = {}
    for d, sid in IDS.items():
        entry: dict[str, Any] = {"split_id": sid, "dir": d, "kind": kinds[d],
                                 "bytes_per_sample": figures[d][1], "head_flops_share": 0.5}
        if d.endswith("jpeg90"):
            entry["input_codec"] = "jpeg:90"
        splits.append(entry)
        head, req, tail = figures[d]
        if d != drop:
            edge[sid] = {"kind": kinds[d], "dir": d, "head_ms": _stat(head),
                         "encode_ms": _stat(2.0 if d.endswith("jpeg90") else 0.5),
                         "request_bytes": req, "cut_bytes": req}
        if kinds[d] != "edge_only":
            cloud[sid] = {"kind": kinds[d], "dir": d, "decode_ms": _stat(0.5),
                          "tail_ms": _stat(tail), "result_bytes": 400,
                          "batches": {"1": {"p50_ms": tail, "throughput_rps": 1e3 / tail},
                                      "4": {"p50_ms": 3 * tail,
                                            "throughput_rps": 4e3 / (3 * tail)}}}
    (bundle / "bundle.json").write_text(json.dumps(
        {"format": "splitinfer.bundle/1", "model": "m", "source_sha256": SHA,
         "splits": splits}))
    common = {"format": "splitinfer.profile/1", "model": "m", "machine": {}, "threads": 1,
              "samples": 16}
    e_path, c_path = tmp / "edge.json", tmp / "cloud.json"
    e_path.write_text(json.dumps({**common, "side": "edge", "speed": 8.0,
                                  "source_sha256": edge_sha, "splits": edge}))
    c_path.write_text(json.dumps({**common, "side": cloud_side, "speed": 1.0,
                                  "source_sha256": SHA, "splits": cloud}))
    return bundle, e_path, c_path


def _plan(capsys: pytest.CaptureFixture[str], paths: tuple[Path, Path, Path],
          *extra: str) -> tuple[int, str, str]:
    bundle, e, c = paths
    rc = main(["plan", "--artifacts", str(bundle), "--edge-profile", str(e),
               "--cloud-profile", str(c), *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_one_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _plan(capsys, _write(tmp_path), "--link", "4g", "--json")
    assert rc == 0
    data = json.loads(out)
    assert set(data) >= {"link", "recommended", "splits"}
    assert data["link"]["name"] == "4g" and data["link"]["up_bps"] == 5.85e6
    keys = {"split_id", "kind", "bytes", "predicted_ms", "head_ms", "uplink_ms", "queue_ms",
            "tail_ms", "downlink_ms"}
    assert [s["split_id"] for s in data["splits"]] == list(IDS.values())  # baselines listed
    assert all(keys <= set(s) for s in data["splits"])
    by = {s["split_id"]: s for s in data["splits"]}
    # cut_02 on 4g by hand: topic "splitinfer/v1/req/m/" + 12 chars = 32 bytes
    topic = len(Topics("splitinfer").request("m", "d" * DEVICE_ID_LEN))
    assert topic == 32
    up = mqtt_publish_bytes(32, 10_000) * 8 / 5.85e6 + 0.030  # 10039 bytes: 13.73 + 30 ms
    down = mqtt_publish_bytes(32, 400) * 8 / 20e6 + 0.030     # 437 bytes: 0.17 + 30 ms
    # agent 2 ms + head + encode + up + 2 broker hops of 1.8 ms + tail + worker decode + down
    total = 0.002 + 0.150 + 0.0005 + up + 2 * 0.0018 + 0.004 + 0.0005 + down
    assert by["m-c2"]["bytes"] == 10039
    assert by["m-c2"]["predicted_ms"] == pytest.approx(total * 1e3, abs=1e-3)
    assert by["m-e"]["predicted_ms"] == 402.0 and by["m-e"]["uplink_ms"] == 0.0
    best = min(data["splits"], key=lambda s: s["predicted_ms"])
    assert data["recommended"] == best["split_id"]


def test_several_links_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out" / "plan.png"
    rc, out, _ = _plan(capsys, _write(tmp_path), "--link", "3g,wifi", "--link", "4g,loss=1%",
                       "--json", "--plot", str(png))
    assert rc == 0
    links = json.loads(out)["links"]
    assert [r["link"]["name"] for r in links] == ["3g", "wifi", "4g,loss=1%"]
    rec = {r["link"]["name"]: r["recommended"] for r in links}
    # 3g (1.1 Mbit/s) favours few bytes: cut_02's 10 KB (73 ms up) behind its 150 ms head
    # (~380 ms) beats cut_01's 25 KB (182 ms) behind 60 ms (~403) and the 60 KB JPEG (~600);
    # wifi (18.88 Mbit/s) favours no head: the JPEG (25 ms up, ~50 ms) over cut_01 (~91)
    assert rec["3g"] == "m-c2"
    assert rec["wifi"] == "m-jpg"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_human_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _plan(capsys, _write(tmp_path), "--link", "wifi", "--load", "50")
    assert rc == 0
    assert "link wifi" in out and "load 50 req/s" in out
    row = next(line for line in out.splitlines() if line.startswith("cloud_only_jpeg90"))
    assert row.endswith("<- recommended")
    assert any(line.startswith("edge_only") and line.endswith("(baseline)")
               for line in out.splitlines())
    assert "baselines: edge_only" in out


def test_deadline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _plan(capsys, _write(tmp_path), "--link", "3g", "--deadline-ms", "50",
                       "--json")
    assert rc == 1
    assert json.loads(out)["recommended"] is None
    rc, out, _ = _plan(capsys, _write(tmp_path), "--link", "3g", "--deadline-ms", "50")
    assert rc == 1 and "no split meets the 50 ms deadline" in out


def test_load_makes_a_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _plan(capsys, _write(tmp_path), "--link", "wifi", "--load", "100", "--json")
    assert rc == 0
    by = {s["split_id"]: s for s in json.loads(out)["splits"]}
    assert by["m-c1"]["queue_ms"] > 0  # 100 req/s x 8 ms: busy 0.8, median wait 3 ms
    assert by["m-e"]["queue_ms"] == 0.0


@pytest.mark.parametrize("kwargs, flags, message", [
    ({"edge_sha": "0" * 64}, (), "is not the bundle's"),
    ({"cloud_side": "edge"}, (), "expected 'cloud'"),
    ({"drop": "cut_02"}, (), "no entry for split"),
    ({}, ("--workers", "0"), "--workers 0"),
])
def test_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], kwargs: dict[str, Any],
                    flags: tuple[str, ...], message: str) -> None:
    rc, _, err = _plan(capsys, _write(tmp_path, **kwargs), "--link", "4g", *flags)
    assert rc == 2
    assert message in err


def test_bad_link_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, e, c = _write(tmp_path)
    rc, _, err = _plan(capsys, (bundle, e, c), "--link", "5g")
    assert rc == 2 and "unknown profile" in err
    rc, _, err = _plan(capsys, (bundle, tmp_path / "nope.json", c), "--link", "4g")
    assert rc == 2 and "no such file" in err
    rc, _, err = _plan(capsys, (tmp_path, e, c), "--link", "4g")
    assert rc == 2 and "bundle.json" in err


def test_split_links() -> None:
    assert split_links(["3g,4g,loss=1%", "wifi"]) == ["3g", "4g,loss=1%", "wifi"]
    assert split_links(["up=2mbit,delay=40ms"]) == ["up=2mbit,delay=40ms"]


def test_cheap_import() -> None:
    code = ("import sys, splitter.planner.plan; "
            "bad = [m for m in ('onnx', 'matplotlib', 'onnxruntime') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bench_summary_arithmetic() -> None:
    """The planner bench's figures from synthetic rows: MAPE, recommended vs best, baselines."""
    from bench.bench_planner import SpacedTimer, summarize

    def row(link: str, d: str, kind: str, pred: float, meas: float,
            codec: str = "raw") -> dict[str, Any]:
        return {"link": link, "split_id": f"m-{d}", "dir": d, "kind": kind,
                "input_codec": codec, "predicted_ms": pred, "p50_ms": meas}

    rows = [row("3g", "edge_only", "edge_only", 100, 110), row("3g", "cut", "split", 90, 100),
            row("3g", "cloud_only", "cloud_only", 300, 300),
            row("3g", "jpeg", "cloud_only", 95, 95, "jpeg:90")]
    summary = summarize([{"model": "m", "rows": rows, "recommended": {"3g": "m-cut"}}])
    # |errors|: 10/110, 10/100, 0, 0 -> (9.09 + 10 + 0 + 0) / 4 = 4.77 %
    assert summary["mape_pct"] == pytest.approx((100 * 10 / 110 + 10) / 4)
    link = summary["per_link"][0]
    # recommended cut measured 100 ms, best measured jpeg 95 ms: 5.26 % behind
    assert link["best"] == "jpeg" and link["gap_pct"] == pytest.approx(100 * 5 / 95)
    assert (link["edge_only_ms"], link["cloud_only_raw_ms"], link["cloud_only_jpeg_ms"]) == \
        (110, 300, 95)
    timer = SpacedTimer(0.0)
    assert timer() <= timer()
