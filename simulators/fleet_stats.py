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

__all__ = ["STAGE_SOURCES", "REPORT_STAGES", "RAW_STAGES", "Tally", "Outcome", "FleetResult",
           "accuracy", "jsonable", "write_outputs", "split_figures", "fault_windows",
           "per_second", "agent_counters", "agent_retry",
           "counters_since", "COUNTER_NAMES"]

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


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request ended: ``due_s`` from the start of the measured window, ``kind``
    ``answered``/``timeout``/``error``; for an answer the split that served it, where
    (``served_by``: ``cloud`` or ``edge``), why locally (``fallback``) and its latency."""

    due_s: float
    device: int
    kind: str
    split_id: str = ""
    served_by: str = ""
    fallback: str = ""
    e2e_s: float = 0.0
    attempts: int = 1  # publishes of the request before its answer (agent's own count)


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
    splits: Counter[str] = field(default_factory=Counter)  # answers per split_id
    served_locally: int = 0
    split_e2e: dict[str, list[float]] = field(default_factory=dict)
    due: list[float] = field(default_factory=list)  # every request sent, s from the window
    outcomes: list[Outcome] = field(default_factory=list)
    after_retry: int = 0  # answers that took more than one publish
    attempts: Counter[int] = field(default_factory=Counter)  # answers by publishes

    def sent_one(self, due_s: float) -> None:
        self.sent += 1
        self.due.append(due_s)

    def failed_one(self, kind: str, *, due_s: float, device: int, error: str = "") -> None:
        """A timeout (``kind`` "timeout") or an error (``error`` names it)."""
        if kind == "timeout":
            self.timeouts += 1
        else:
            self.errors[error] += 1
        self.outcomes.append(Outcome(due_s, device, kind))

    @property
    def failed(self) -> int:
        return self.timeouts + sum(self.errors.values())

    def answered_one(self, timings: Mapping[str, float], *, due: float, start: float,
                     done: float, group: int, up_s: float, down_s: float,
                     split_id: str = "", served_by: str = "cloud", fallback: str = "",
                     device: int = 0, due_s: float = 0.0, attempts: int = 1) -> None:
        """Record an answered request: ``timings`` as the agent measured them (seconds),
        ``due``/``start``/``done`` on ``time.perf_counter``, the derived one-way link times
        ``up_s``/``down_s`` of its split on its link, the split that served it and where
        (``served_by`` "cloud" or "edge"), ``due_s`` from the start of the window,
        ``attempts`` the publishes it took (``InferenceResult.attempts``)."""
        e2e = done - due
        attempts = attempts if isinstance(attempts, int) and attempts > 0 else 1
        self.attempts[attempts] += 1
        if attempts > 1:
            self.after_retry += 1
        self.splits[split_id] += 1
        self.split_e2e.setdefault(split_id, []).append(e2e)
        if served_by == "edge":
            self.served_locally += 1
        self.outcomes.append(Outcome(due_s, device, "answered", split_id, served_by,
                                     fallback, e2e, attempts))
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
    outcomes: list[Outcome] = field(default_factory=list)  # the measured window's
    link_changes: list[tuple[float, str]] = field(default_factory=list)  # (t_s, profile)
    fault_spans: list[tuple[float, float, str]] = field(default_factory=list)  # start, end


# EdgeAgent.counters summed over the fleet; a counter the agent does not have yet is None
COUNTER_NAMES = ("published", "republished", "retries", "reconnects", "duplicates",
                 "late_results")


def agent_counters(counters: list[Any]) -> dict[str, int | None]:
    """The fleet's sum of each of :data:`COUNTER_NAMES` (None where an agent lacks it)."""
    out: dict[str, int | None] = {}
    for name in COUNTER_NAMES:
        values = [getattr(c, name, None) for c in counters]
        out[name] = None if any(not isinstance(v, int) for v in values) else \
            sum(v for v in values if isinstance(v, int))
    return out


def counters_since(now: Mapping[str, int | None],
                   before: Mapping[str, int | None]) -> dict[str, int | None]:
    """``now - before`` per counter (the measured window's share; None where unknown)."""
    out: dict[str, int | None] = {}
    for name, value in now.items():
        start = before.get(name, 0)
        out[name] = None if value is None or start is None else value - start
    return out


_WARNED: set[str] = set()


def agent_retry(config: Any, retry_s: float | None, retry_max_s: float | None) -> Any:
    """``config`` (an AgentConfig) with the given retry settings, for an agent that has them
    (others: unchanged, with a warning)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config)}
    changes = {k: v for k, v in (("retry_s", retry_s), ("retry_max_s", retry_max_s))
               if v is not None}
    missing = sorted(set(changes) - names - _WARNED)
    if missing:
        _WARNED.update(missing)
        log.warning("this edge agent has no %s: ignored", ", ".join(missing))
    usable = {k: v for k, v in changes.items() if k in names}
    return dataclasses.replace(config, **usable) if usable else config


def split_figures(tally: Tally, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Per split that answered: answers, how many on the device, latency percentiles (ms)
    and the answers within the deadline (``timeout_s``, from the scheduled arrival)."""
    from edge_agent.stats import percentiles

    local: Counter[str] = Counter(o.split_id for o in tally.outcomes
                                  if o.kind == "answered" and o.served_by == "edge")
    out: dict[str, dict[str, Any]] = {}
    for split_id in sorted(tally.split_e2e):
        e2e = tally.split_e2e[split_id]
        q = percentiles(e2e)
        out[split_id] = {"answered": len(e2e), "served_locally": local[split_id],
                         "within_deadline": sum(1 for v in e2e if v <= timeout_s),
                         **{f"{k}_ms": v for k, v in q.items() if k != "n"}}
    return out


def fault_windows(tally: Tally, spans: list[tuple[float, float, str]],
                  timeout_s: float) -> list[dict[str, Any]]:
    """What happened to the requests due inside each fault span ``[start, end)`` (s from
    the window's start): sent, answered, within the deadline, served on the device (and
    why), timeouts, errors and lost."""
    out = []
    for start, end, kind in spans:
        due = sum(1 for d in tally.due if start <= d < end)
        inside = [o for o in tally.outcomes if start <= o.due_s < end]
        answered = [o for o in inside if o.kind == "answered"]
        timeouts = sum(1 for o in inside if o.kind == "timeout")
        retried = sum(1 for o in answered if o.attempts > 1)
        errors = sum(1 for o in inside if o.kind == "error")
        out.append({
            "fault": kind, "start_s": round(start, 3), "end_s": round(end, 3), "sent": due,
            "answered": len(answered), "answered_after_retry": retried,
            "within_deadline": sum(1 for o in answered if o.e2e_s <= timeout_s),
            "served_locally": sum(1 for o in answered if o.served_by == "edge"),
            "fallbacks": dict(Counter(o.fallback for o in answered if o.fallback)),
            "timeouts": timeouts, "errors": errors,
            "lost": due - len(answered) - timeouts - errors,
            "max_ms": round(max((o.e2e_s for o in answered), default=0.0) * 1e3, 3),
        })
    return out


def per_second(outcomes: list[Outcome], seconds: int) -> tuple[list[str], Array]:
    """Answers per split per second of the window (by scheduled arrival): the split ids
    (first seen first) and a ``[len(ids), seconds]`` count matrix."""
    ids: list[str] = []
    for o in outcomes:
        if o.kind == "answered" and o.split_id not in ids:
            ids.append(o.split_id)
    counts = np.zeros((len(ids), max(1, seconds)), dtype=np.int64)
    index = {s: i for i, s in enumerate(ids)}
    for o in outcomes:
        if o.kind == "answered" and 0 <= o.due_s < counts.shape[1]:
            counts[index[o.split_id], int(o.due_s)] += 1
    return ids, counts


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
