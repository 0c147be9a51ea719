"""Fault suite benchmark (issue 10); the same as ``splitinfer bench faults``.

    python bench/bench_faults.py                          # every scenario at the issue's scale
    python bench/bench_faults.py --scenarios broker-kill,worker-kill --json
    python bench/bench_faults.py --quick                  # the short version the tests run

See :mod:`simulators.bench_faults` for the scenarios, the figures and the targets.
"""

from __future__ import annotations

import sys

from simulators.bench_faults import main

if __name__ == "__main__":
    sys.exit(main())
