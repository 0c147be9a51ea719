"""What a fleet run measured: outcomes, per-stage times, answers checked, the report files.

:class:`Tally` collects one set of requests (the warm-up, or the measured window) as they
end; :data:`STAGE_SOURCES` says where each stage of the breakdown comes from (measured on a
clock, or derived from the link model); :class:`FleetResult` is what a run returns.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from simulators.fleet_support import Inputs

__all__ = ["STAGE_SOURCES", "REPORT_STAGES", "RAW_STAGES", "Tally", "FleetResult",
           "accuracy", "jsonable", "write_outputs"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]

# The breakdown of a request, in order, and where each figure comes from.
STAGE_SOURCES: dict[str, str] = {
    "head": "measured on the device (replay: recorded head time x speed, emulated)",
    "encode": "measured: building and encoding the request envelope",
    "uplink": "derived from the link model: request bytes / up rate + delay "
              "(+ expected loss delay); 0 without --link (loopback)",
    "broker_queue": "measured - derived: round trip minus worker time minus uplink and "
                    "downlink, plus the worker's queue (its batcher)",
    "tail": "measured by the worker (tail run, shared by its batch)",
    "downlink": "derived from the link model: result bytes / down rate + delay "
                "(+ expected loss delay); 0 without --link",
    "decode": "measured: decoding the result on the device",
    "other": "e2e minus the measured stages: the fleet's scheduling lag and agent time "
             "between stamps",
}
REPORT_STAGES = tuple(STAGE_SOURCES)
RAW_STAGES = ("network", "queue")  # as the agent measures them, kept in the report too
# The agent's own figures per request
_MEASURED = ("head", "encode", "network", "queue", "tail", "decode")


@dataclass
class Tally:
    """Outcomes and figures of one set of requests (the warm-up or the measured window)."""

    sent: int = 0
    answered: int = 0
    timeouts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    stages: dict[str, list[float]] = field(default_factory=dict)
    e2e: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    checks: list[tuple[int, int]] = field(default_factory=list)  # (sample, predicted class)
    last_done: float = 0.0

    @property
    def failed(self) -> int:
        return self.timeouts + sum(self.errors.values())

    def answered_one(self, timings: Mapping[str, float], *, due: float, start: float,
                     done: float, group: int, up_s: float, down_s: float) -> None:
        """Record an answered request: ``timings`` as the agent measured them (seconds),
        ``due``/``start``/``done`` on ``time.perf_counter``, its link group's derived
        one-way times ``up_s``/``down_s``."""
        e2e = done - due
        get = timings.get
        network, queue = get("network", 0.0), get("queue", 0.0)
        measured = sum(get(s, 0.0) for s in _MEASURED)
        values = {
            "head": get("head", 0.0), "encode": get("encode", 0.0), "uplink": up_s,
            "broker_queue": max(0.0, network - up_s - down_s) + queue,
            "tail": get("tail", 0.0), "downlink": down_s, "decode": get("decode", 0.0),
            "other": max(0.0, e2e - measured), "network": network, "queue": queue,
        }
        stages = self.stages
        for name, value in values.items():
            stages.setdefault(name, []).append(value)
        self.e2e.append(e2e)
        self.lag.append(start - due)
        self.groups.append(group)
        self.answered += 1
        if done > self.last_done:
            self.last_done = done


@dataclass
class FleetResult:
    """The report (JSON-ready) and the raw figures the plots need."""

    report: dict[str, Any]
    e2e_ms: Array
    groups: Array
    group_names: list[str]
    stages_ms: dict[str, Array]


def accuracy(checks: list[tuple[int, int]], inputs: Inputs, ref_pred: Array | None,
              reference: Path | None) -> dict[str, Any] | None:
    if not checks or (inputs.labels is None and ref_pred is None):
        return None
    samples = np.fromiter((s for s, _ in checks), dtype=np.int64, count=len(checks))
    predicted = np.fromiter((p for _, p in checks), dtype=np.int64, count=len(checks))
    samples %= len(inputs)
    out: dict[str, Any] = {"checked": len(checks), "distinct_samples": len(set(samples))}
    if inputs.labels is not None:
        labels = np.asarray(inputs.labels)[samples]
        out["accuracy"] = round(float((predicted == labels).mean()), 6)
        if ref_pred is not None:
            out["reference_accuracy"] = round(float((ref_pred[samples] == labels).mean()), 6)
    if ref_pred is not None:
        out["agreement"] = round(float((predicted == ref_pred[samples]).mean()), 6)
        out["reference"] = str(reference)
    return out


def write_outputs(result: FleetResult, out: Path, *, png: bool) -> None:
    report = result.report
    if png:
        try:
            from simulators.report import write_png
        except ImportError as exc:  # matplotlib missing: the JSON still says everything
            log.warning("no PNG: %s", exc)
            report["png"] = None
        else:
            report["png"] = str(write_png(result, out / "fleet.png"))
    report["report"] = str(out / "report.json")
    (out / "report.json").write_text(json.dumps(jsonable(report), indent=2) + "\n")

def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars made plain and non-finite floats made None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
