"""Dynamic batching benchmark; the same as ``splitinfer bench batching``.

    python bench/bench_batching.py                      # MobileNetV2 tail at block12.add
    python bench/bench_batching.py --devices 32 --json
    python bench/bench_batching.py --model m.onnx --at CUT --threads 2

See :mod:`simulators.bench_batching` for what is measured and the targets.
"""

from __future__ import annotations

import sys

from simulators.bench_batching import main

if __name__ == "__main__":
    sys.exit(main())
