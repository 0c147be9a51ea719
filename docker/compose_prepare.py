"""The compose demo's one-shot 'prepare' step (docker/compose.yaml), in splitinfer-tools.

What ``splitinfer demo`` does before it serves, written to a volume the workers and the
fleet share: quantize the bundled digits CNN to int8 (static QDQ, the bundled calibration
set), pick the int8 cut with the fewest bytes that leaves work on both sides (the demo's
own rule, simulators.support.demo.choose_cut), split and verify it. Layout under OUT:

    OUT/split/                 manifest.json head.onnx tail.onnx (the workers serve it)
    OUT/digits_cnn.int8.onnx   the unsplit int8 model (the fleet's reference)
    OUT/digits_test.npz        the labelled test set (the fleet's --input)
    OUT/digits_images.npz      the same images alone ('splitinfer edge run --input')
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from simulators.support.demo import choose_cut
from splitter import list_cuts, split_model
from splitter.quantize import quantize_static
from splitter.zoo import digits_calibration_path, digits_cnn_path, digits_test_set


def main(out: Path) -> int:
    if (out / "split").exists():
        shutil.rmtree(out / "split")
    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits_test_set()
    int8 = quantize_static(digits_cnn_path(), digits_calibration_path(),
                           out / "digits_cnn.int8.onnx")
    names = [t.name for t in choose_cut(list_cuts(int8)).tensors]
    split = split_model(int8, names, out / "split", samples={"image": images[:16]})
    np.savez(out / "digits_test.npz", image=images, label=labels)
    np.savez(out / "digits_images.npz", image=images)
    print(f"prepared {split.manifest_obj.split_id}: cut at {names}, verified max |diff| "
          f"{split.max_abs_diff}; {len(labels)} labelled test samples in "
          f"{out / 'digits_test.npz'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/artifacts/digits")))
