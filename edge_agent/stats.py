"""Per-request stage timings and their percentiles.

A request's timings (seconds) are split into stages measured on the device's clock, or as
differences of the worker's own stamps, so no clock sync is needed:

========  =================================================================================
head      running the head on the device (0 for a replayed activation)
encode    building and msgpack-encoding the request envelope
network   (reply received - sent) - (worker replied - worker received): uplink, broker,
          downlink and the broker's queues; up and down cannot be told apart without
          synced clocks
queue     worker received → tail started (the worker's batcher and queue)
tail      the worker's tail run (shared by a whole batch)
decode    decoding the result envelope on the device
e2e       the call, from inputs to outputs
========  =================================================================================

``queue`` and ``tail`` need the worker's stamps (:data:`WORKER_STAMPS`); without them
``network`` is the whole round trip.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["STAGES", "WORKER_STAMPS", "worker_stages", "percentiles", "summarize",
           "LatencyStats"]

STAGES = ("e2e", "head", "encode", "network", "queue", "tail", "decode")
# Envelope ``ts`` keys a worker stamps (unix seconds, the worker's clock).
WORKER_STAMPS = ("recv", "tail_start", "tail_end", "reply")
QUANTILES = (50, 95, 99)


def worker_stages(stamps: Mapping[str, float]) -> dict[str, float]:
    """``worker`` (recv → reply), ``queue`` and ``tail`` from a result's stamps, when present."""
    out: dict[str, float] = {}
    recv, start, end, reply = (stamps.get(k) for k in WORKER_STAMPS)
    if recv is not None and reply is not None:
        out["worker"] = max(0.0, reply - recv)
    if recv is not None and start is not None:
        out["queue"] = max(0.0, start - recv)
    if start is not None and end is not None:
        out["tail"] = max(0.0, end - start)
    return out


def percentiles(values: Iterable[float], scale: float = 1e3) -> dict[str, float]:
    """p50/p95/p99, mean and max of ``values`` * ``scale`` (milliseconds by default)."""
    data = np.fromiter((v for v in values if math.isfinite(v)), dtype=np.float64) * scale
    if data.size == 0:
        return {"n": 0}
    out: dict[str, float] = {"n": int(data.size)}
    for q, value in zip(QUANTILES, np.percentile(data, QUANTILES), strict=True):
        out[f"p{q}"] = round(float(value), 4)
    out["mean"] = round(float(data.mean()), 4)
    out["max"] = round(float(data.max()), 4)
    return out


def summarize(timings: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Percentiles (ms) per stage over many requests' timings, stages in :data:`STAGES` order."""
    columns: dict[str, list[float]] = {}
    for row in timings:
        for stage, value in row.items():
            columns.setdefault(stage, []).append(value)
    order = [s for s in STAGES if s in columns] + sorted(set(columns) - set(STAGES))
    return {stage: percentiles(columns[stage]) for stage in order}


@dataclass
class LatencyStats:
    """Collects the timings of finished requests and counts the failed ones by kind."""

    timings: list[Mapping[str, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retried: int = 0  # answered requests that went out more than once
    attempts: int = 0  # publishes of the answered requests

    def add(self, timings: Mapping[str, float], *, attempts: int = 1) -> None:
        self.timings.append(timings)
        self.attempts += attempts
        if attempts > 1:
            self.retried += 1

    def fail(self, kind: str) -> None:
        self.errors[kind] += 1

    @property
    def ok(self) -> int:
        return len(self.timings)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.ok + self.failed,
            "ok": self.ok,
            "failed": self.failed,
            "errors": dict(sorted(self.errors.items())),
            "answered_after_retry": self.retried,
            "attempts": self.attempts,
            "latency_ms": summarize(self.timings),
        }
