"""splitter: valid cut points, cutting, verification (and, alongside, quantization).

Offline tooling; needs ``onnx`` and ``onnxruntime``. The console commands live in
:mod:`splitter.cli`, which imports this package only when a command runs.
"""

from __future__ import annotations

from splitter.cuts import Cut, CutPlan, Inspection, inspect_model, list_cuts, plan_cut
from splitter.graph import GraphIndex, load_model
from splitter.split import SplitResult, split_model
from splitter.verify import (
    OutputDiff,
    VerifyReport,
    check_samples,
    load_npz,
    make_samples,
    verify_split,
)

__all__ = [
    # cuts
    "Cut", "list_cuts", "inspect_model", "Inspection", "plan_cut", "CutPlan",
    # splitting
    "split_model", "SplitResult",
    # verification and samples
    "verify_split", "VerifyReport", "OutputDiff", "make_samples", "load_npz", "check_samples",
    # graph access
    "GraphIndex", "load_model",
]
