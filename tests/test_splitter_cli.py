"""``splitinfer inspect | split | quantize``: exit codes 0/1/2, JSON shapes, one-line errors.

A few runs go through the installed console script (a subprocess, as a user runs it); the
rest call ``splitinfer.cli.main`` in-process to keep the suite fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import models_text as mt
import numpy as np
import pytest

from splitinfer.cli import build_parser, main


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli_models")
    return {name: mt.build(name, d) for name in ("chain", "residual", "qdq_chain", "noisy")}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["splitinfer", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def _one_error_line(stderr: str, command: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"splitinfer {command}: error: ") and "Traceback" not in stderr
    return lines[0]


# -- through the console script ---------------------------------------------------------------

def test_inspect_json_via_console_script(models: dict[str, Path]) -> None:
    proc = _run("inspect", str(models["residual"]), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["cuts"][0]["tensors"] == [{"name": "x", "dtype": "float32",
                                           "shape": ["N", 4, 6, 6]}]
    for cut in data["cuts"]:
        assert set(cut) >= {"tensors", "bytes_per_sample", "head_flops_share",
                            "head_params_share", "quantized"}
        assert isinstance(cut["bytes_per_sample"], int)
    assert any(len(c["tensors"]) == 2 for c in data["cuts"])


def test_split_exit_codes_via_console_script(models: dict[str, Path], tmp_path: Path) -> None:
    ok = _run("split", str(models["chain"]), "--at", "p1", "-o", str(tmp_path / "ok"), "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert set(data) >= {"split_id", "head", "tail", "manifest", "max_abs_diff"}
    assert Path(data["manifest"]).is_file() and data["max_abs_diff"] <= 1e-5

    failed = _run("split", str(models["noisy"]), "--at", "r", "-o", str(tmp_path / "bad"))
    assert failed.returncode == 1
    assert "differs from the full model" in _one_error_line(failed.stderr, "split")
    assert not (tmp_path / "bad" / "manifest.json").exists()

    bad = _run("split", str(models["residual"]), "--at", "c", "-o", str(tmp_path / "x"))
    assert bad.returncode == 2
    line = _one_error_line(bad.stderr, "split")
    assert "leaves a path from input 'x' to output 'y' through 'r0' uncovered" in line


# -- in-process -------------------------------------------------------------------------------

def test_inspect_table(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(models["qdq_chain"])]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("idx"))
    for column in ("tensors", "dtype", "shape", "bytes/sample", "head FLOPs", "head params",
                   "int8"):
        assert column in header
    q1 = next(line for line in out.splitlines() if " q1 " in line)
    assert "uint8" in q1 and "256 B" in q1 and q1.rstrip().endswith("yes")


def test_inspect_max_tensors(models: dict[str, Path], capsys: pytest.CaptureFixture[str]
                             ) -> None:
    assert main(["inspect", str(models["residual"]), "--json", "--max-tensors", "1"]) == 0
    cuts = json.loads(capsys.readouterr().out)["cuts"]
    assert cuts and all(len(c["tensors"]) == 1 for c in cuts)


def test_split_human_output_and_options(models: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    samples = tmp_path / "s.npz"
    np.savez(samples, x=np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32))
    assert main(["split", str(models["qdq_chain"]), "--at", "q1", "-o", str(tmp_path / "o"),
                 "--samples", str(samples), "--tolerance", "0", "--name", "qdq"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("split qdq-") and "q1 uint8(N,4,8,8) int8" in out
    assert "verified: max|diff| 0 on 3 sample(s)" in out
    assert main(["split", str(models["chain"]), "--at", "g", "-o", str(tmp_path / "n"),
                 "--no-verify", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_abs_diff"] is None and data["verified"] is False


@pytest.mark.parametrize(("argv", "message"), [
    (["inspect", "{d}/missing.onnx"], "no such file"),
    (["inspect", "{d}/junk.onnx"], "not an ONNX model"),
    (["split", "{chain}", "--at", "pl", "-o", "{d}/o"], "unknown tensor 'pl'; did you mean 'p1'"),
    (["split", "{chain}", "--at", "w1", "-o", "{d}/o"], "is an initializer"),
    (["split", "{chain}", "--at", "p1", "-o", "{d}/o", "--samples", "{d}/wrong.npz"],
     "missing 'x'; expected one array per model input"),
    (["split", "{chain}", "--at", "p1", "-o", "{d}/o", "--samples", "{d}/junk.onnx"],
     "not an .npz archive"),
    (["split", "{chain}", "--at", "p1", "-o", "{d}/o", "--tolerance", "-1"], "tolerance"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path,
                                          models: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.onnx").write_text("not a model")
    np.savez(tmp_path / "wrong.npz", image=np.zeros((1, 3, 8, 8), np.float32))
    args = [a.format(d=tmp_path, chain=models["chain"]) for a in argv]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, args[0])
    assert message in line


def test_quantize_parser_is_registered() -> None:
    args = build_parser().parse_args(["quantize", "m.onnx", "--calibration", "c.npz", "-o",
                                      "q.onnx", "--format", "qoperator", "--per-tensor",
                                      "--json"])
    assert (args.model, args.calibration, args.out, args.format) == (
        "m.onnx", "c.npz", "q.onnx", "qoperator")
    assert args.per_tensor and args.json and callable(args.func)


def test_cli_module_does_not_import_onnx() -> None:
    code = ("import sys, splitter.cli; "
            "sys.exit(int(any(m in sys.modules for m in ('onnx', 'onnxruntime'))))")
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


def test_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITINFER_TOLERANCE", "0.5")
    monkeypatch.setenv("SPLITINFER_NUM_SAMPLES", "3")
    args = build_parser().parse_args(["split", "m.onnx", "--at", "a", "-o", "d"])
    assert (args.tolerance, args.num_samples) == (0.5, 3)
    monkeypatch.setenv("SPLITINFER_NUM_SAMPLES", "many")
    with pytest.raises(SystemExit) as exc:  # argparse's usage error, not a traceback
        build_parser().parse_args(["split", "m.onnx", "--at", "a", "-o", "d"])
    assert exc.value.code == 2


# -- wire compression -------------------------------------------------------------------------

def _first_sample(tmp_path: Path) -> tuple[Path, np.ndarray[Any, Any]]:
    x = np.random.default_rng(3).random((1, 3, 8, 8), dtype=np.float32)
    path = tmp_path / "one.npz"
    np.savez(path, x=x)
    return path, x


def test_inspect_json_measures_each_cut_compressed(models: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    from splitinfer import compression
    from splitter import split_model

    npz, x = _first_sample(tmp_path)
    assert main(["inspect", str(models["qdq_chain"]), "--json", "--samples", str(npz)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["compression"] == {"codecs": list(compression.supported()), "samples": 1,
                                  "source": "file"}
    for cut in doc["cuts"]:
        measured = cut["compressed"]
        if cut["kind"] == "edge_only":
            assert measured is None
            continue
        assert measured["requests"] == 1 and measured["raw_bytes"] == cut["bytes_per_sample"]
        for name, c in measured["codecs"].items():
            assert name in compression.supported()
            assert 0 < c["compressed_bytes"] <= c["raw_bytes"] == cut["bytes_per_sample"]
            assert isinstance(c["pays"], bool) and c["compress_ms"] >= 0
        assert measured["choice"] in (None, *compression.supported())
    # the figure for q1 is the zstd frame of exactly what the split's head sends
    q1 = next(c for c in doc["cuts"] if [t["name"] for t in c["tensors"]] == ["q1"])
    split_model(models["qdq_chain"], "q1", tmp_path / "q1", samples=npz)
    head = ort.InferenceSession(str(tmp_path / "q1" / "head.onnx"),
                                providers=["CPUExecutionProvider"])
    sent = head.run(None, {"x": x})[0].tobytes()
    frame = len(compression.compress("zstd", sent))
    want = frame if compression.worth_sending(len(sent), frame) else len(sent)
    assert q1["compressed"]["codecs"]["zstd"]["compressed_bytes"] == want

    assert main(["inspect", str(models["qdq_chain"]), "--json", "--no-measure"]) == 0
    bare = json.loads(capsys.readouterr().out)
    assert "compression" not in bare and all("compressed" not in c for c in bare["cuts"])
    assert main(["inspect", str(models["chain"]), "--json", "--num-samples", "2"]) == 0
    generated = json.loads(capsys.readouterr().out)["compression"]
    assert generated["samples"] == 2 and generated["source"] == "generated"


def test_split_compression_flag(models: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from splitinfer.manifest import Manifest

    npz, _ = _first_sample(tmp_path)
    base = ["split", str(models["qdq_chain"]), "--at", "q1", "--samples", str(npz)]
    assert main([*base, "-o", str(tmp_path / "auto"), "--compression", "auto", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    measured = data["compression_measured"]
    assert measured["mode"] == "auto" and list(measured["codecs"]) == ["zstd"]
    assert data["compression"] == measured["choice"]
    assert measured["choice"] == ("zstd" if measured["codecs"]["zstd"]["pays"] else None)
    manifest = Manifest.load(tmp_path / "auto")
    assert manifest.compression == data["compression"]
    assert manifest.verification["compression"] == measured

    assert main([*base, "-o", str(tmp_path / "z"), "--compression", "zstd"]) == 0
    out = capsys.readouterr().out
    assert "compression: zstd (zstd); zstd " in out and "per request, on 1 request(s)" in out
    assert Manifest.load(tmp_path / "z").compression == "zstd"
    assert json.loads((tmp_path / "z" / "manifest.json").read_text())["compression"] == "zstd"

    assert main([*base, "-o", str(tmp_path / "n"), "--compression", "none"]) == 0
    capsys.readouterr()
    assert "compression" not in json.loads((tmp_path / "n" / "manifest.json").read_text())

    # edge_only sends nothing: a codec is refused, auto quietly means none
    edge = ["split", str(models["qdq_chain"]), "--at", "edge_only"]
    assert main([*edge, "-o", str(tmp_path / "e"), "--compression", "zstd"]) == 2
    assert "edge_only split sends nothing" in _one_error_line(capsys.readouterr().err, "split")
    assert main([*edge, "-o", str(tmp_path / "e"), "--compression", "auto"]) == 0
    capsys.readouterr()
    assert Manifest.load(tmp_path / "e").compression is None
    with pytest.raises(SystemExit) as usage:
        main([*base, "-o", str(tmp_path / "g"), "--compression", "gzip"])
    assert usage.value.code == 2


def test_bundle_compression_flag(models: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from splitinfer.bundle import Bundle

    npz, _ = _first_sample(tmp_path)
    assert main(["bundle", str(models["qdq_chain"]), "--cuts", "q1", "--samples", str(npz),
                 "-o", str(tmp_path / "b"), "--compression", "zstd", "--json"]) == 0
    capsys.readouterr()
    bundle = Bundle.load(tmp_path / "b")
    kinds = {s.kind for s in bundle}
    for s in bundle:
        manifest = bundle.manifest(s)
        if s.kind == "edge_only" or s.input_codec != "raw":  # nothing raw to compress
            assert manifest.compression is None and "compression" not in s.extra
        else:
            assert manifest.compression == "zstd" and s.extra["compression"] == "zstd"
            measured = manifest.verification["compression"]["codecs"]["zstd"]
            assert s.extra["compressed_bytes_per_request"] == measured["compressed_bytes"]
    assert kinds == {"edge_only", "split", "cloud_only"}
    assert any(s.input_codec != "raw" for s in bundle)  # the image input's jpeg baseline


def test_inspect_json_skips_the_measurement_it_cannot_make(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = mt.build("dynamic", tmp_path)  # H and W symbolic: no inputs to generate
    assert main(["inspect", str(src), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "symbolic input dims" in doc["compression"]["skipped"]
    assert all(c["compressed"] is None for c in doc["cuts"])
    assert main(["inspect", str(src), "--json", "--input-shape", "x=1x3x16x16"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert "skipped" not in fixed["compression"]
    stem = fixed["cuts"][0]
    assert stem["kind"] == "cloud_only" and stem["compressed"]["raw_bytes"] == 3 * 16 * 16 * 4
