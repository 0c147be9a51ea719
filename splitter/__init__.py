"""splitter: valid cut points, cutting, verification (and, alongside, quantization).

Offline tooling; needs ``onnx`` and ``onnxruntime``. The public names below load lazily
(PEP 562) so that ``splitter.cli`` — imported by ``splitinfer --help`` on every install,
edge devices included — never pulls in ``onnx`` before a command actually runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOME = {
    **dict.fromkeys(("Cut", "CutPlan", "Inspection", "inspect_model", "list_cuts", "plan_cut"),
                    "splitter.cuts"),
    **dict.fromkeys(("GraphIndex", "load_model"), "splitter.graph"),
    **dict.fromkeys(("SplitResult", "split_model"), "splitter.split"),
    **dict.fromkeys(("OutputDiff", "VerifyReport", "check_samples", "load_npz", "make_samples",
                     "verify_split"), "splitter.verify"),
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'splitter' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
