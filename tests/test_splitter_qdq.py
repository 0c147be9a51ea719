"""int8 cuts of a QDQ model stay bit-exact on onnxruntime builds that fuse QDQ groups."""

from __future__ import annotations

from pathlib import Path

from fixtures_models import assert_cuts_match, check_every_cut

from splitter import zoo
from splitter.quantize import quantize_static


def test_uint8_activations_keep_every_int8_cut_exact(tmp_path: Path) -> None:
    model = quantize_static(zoo.digits_cnn_path(), zoo.digits_calibration_path(),
                            tmp_path / "digits_u8.onnx", activations="uint8")
    images, _ = zoo.digits_test_set()
    checks = check_every_cut(model, tmp_path / "cuts", {"image": images[:16]})
    assert any(c.quantized for c in checks)
    assert_cuts_match(checks, exact_quantized=True)
