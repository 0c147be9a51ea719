"""Planner benchmark; the same as ``splitinfer bench planner``.

    python bench/bench_planner.py                       # MobileNetV2 + ResNet-18 int8, 3g/4g/wifi
    python bench/bench_planner.py --models mobilenet_v2 --links wifi --duration 10
    python bench/bench_planner.py --workdir /tmp/planner --plot docs/img/planner.png

See :mod:`simulators.bench_planner` for what is measured and the targets.
"""

from __future__ import annotations

import sys

from simulators.bench_planner import main

if __name__ == "__main__":
    sys.exit(main())
