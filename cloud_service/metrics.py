"""Worker counters: a dict for logs and tests, Prometheus text for scrapers.

All updates happen on the worker's event loop thread, so plain ints suffice; a reader on
another thread (a test, a future HTTP endpoint) gets a consistent-enough snapshot.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from splitinfer.errors import ErrorCode

__all__ = ["Metrics", "ErrorLog", "render_prometheus"]

log = logging.getLogger(__name__)


@dataclass
class Metrics:
    received: int = 0  # every message taken off the subscription
    answered: int = 0  # results carrying tensors, published (PUBACK received)
    errors: Counter[str] = field(default_factory=Counter)  # error results by code
    unanswerable: int = 0  # bad messages with no readable reply address
    reply_failures: int = 0  # answers given up on (broker gone past reply_timeout_s)
    batches: int = 0
    batched_samples: int = 0
    batched_requests: int = 0
    queue_wait_s: float = 0.0  # sum over requests: receipt -> batch formed
    tail_s: float = 0.0  # sum over batches: onnxruntime run time
    reconnects: int = 0
    duplicates: int = 0  # requests seen again by (device, id): dropped or answered from cache
    fenced: int = 0  # silent peers this worker fenced (cloud_service.heartbeat)
    queue_depth: Callable[[], int] = field(default=lambda: 0, repr=False)
    # (starved, held) seconds of the tail threads: no job at all / waiting for company
    tail_waits: Callable[[], tuple[float, float]] = field(default=lambda: (0.0, 0.0),
                                                          repr=False)
    in_flight: Callable[[], int] = field(default=lambda: 0, repr=False)
    started_at: float = field(default_factory=time.time)

    def error(self, code: ErrorCode) -> None:
        self.errors[code.value] += 1

    def batch(self, requests: int, samples: int, tail_s: float) -> None:
        self.batches += 1
        self.batched_requests += requests
        self.batched_samples += samples
        self.tail_s += tail_s

    def snapshot(self) -> dict[str, Any]:
        batches = self.batches
        return {
            "received": self.received,
            "answered": self.answered,
            "errors": {code.value: self.errors.get(code.value, 0) for code in ErrorCode},
            "errors_total": sum(self.errors.values()),
            "unanswerable": self.unanswerable,
            "reply_failures": self.reply_failures,
            "batches": batches,
            "batched_samples": self.batched_samples,
            "mean_batch_size": self.batched_samples / batches if batches else 0.0,
            "mean_batch_requests": self.batched_requests / batches if batches else 0.0,
            "mean_queue_wait_ms": (1e3 * self.queue_wait_s / self.batched_requests
                                   if self.batched_requests else 0.0),
            "mean_tail_ms": 1e3 * self.tail_s / batches if batches else 0.0,
            "tail_starved_s": self.tail_waits()[0],
            "tail_held_s": self.tail_waits()[1],
            "queue_depth": self.queue_depth(),
            "replies_in_flight": self.in_flight(),
            "reconnects": self.reconnects,
            "duplicates": self.duplicates,
            "fenced": self.fenced,
            "uptime_s": time.time() - self.started_at,
        }


_COUNTERS = (
    ("received", "requests taken off the subscription"),
    ("answered", "results with tensors published"),
    ("unanswerable", "bad messages without a readable reply address"),
    ("reply_failures", "answers given up on because the broker stayed away"),
    ("batches", "tail runs"),
    ("batched_samples", "samples run through a tail"),
    ("reconnects", "broker reconnections"),
    ("duplicates", "requests received again (same device and id), not run twice"),
    ("fenced", "silent peer workers fenced off the broker"),
)
_GAUGES = (
    ("queue_depth", "requests waiting for a tail run"),
    ("replies_in_flight", "answers waiting for a PUBACK"),
    ("mean_batch_size", "samples per tail run since start"),
)


def render_prometheus(metrics: Metrics, *, namespace: str = "splitinfer_worker",
                      labels: dict[str, str] | None = None) -> str:
    """The counters in Prometheus' text exposition format (version 0.0.4)."""
    snap = metrics.snapshot()
    base = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted((labels or {}).items()))

    def series(name: str, value: float, extra: str = "") -> str:
        inner = ",".join(part for part in (base, extra) if part)
        return f"{namespace}_{name}{{{inner}}} {value:g}" if inner else \
            f"{namespace}_{name} {value:g}"

    lines: list[str] = []
    for name, help_text in _COUNTERS:
        lines += [f"# HELP {namespace}_{name}_total {help_text}",
                  f"# TYPE {namespace}_{name}_total counter",
                  series(f"{name}_total", snap[name])]
    lines += [f"# HELP {namespace}_errors_total error results by code",
              f"# TYPE {namespace}_errors_total counter"]
    lines += [series("errors_total", count, f'code="{code}"')
              for code, count in snap["errors"].items()]
    for name, help_text in _GAUGES:
        lines += [f"# HELP {namespace}_{name} {help_text}", f"# TYPE {namespace}_{name} gauge",
                  series(name, snap[name])]
    lines += [f"# HELP {namespace}_tail_seconds_total time spent in tail runs",
              f"# TYPE {namespace}_tail_seconds_total counter",
              series("tail_seconds_total", metrics.tail_s),
              f"# HELP {namespace}_queue_wait_seconds_total receipt to batch, summed",
              f"# TYPE {namespace}_queue_wait_seconds_total counter",
              series("queue_wait_seconds_total", metrics.queue_wait_s)]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ErrorLog:
    """Logs the first error of each kind, then at most one line per kind per interval.

    A device stuck sending garbage must not flood the worker's log, yet an operator must
    see that it happens and how often.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def report(self, kind: str, message: str, *args: object,
               exc_info: BaseException | bool | None = None) -> bool:
        """Log ``message % args`` unless ``kind`` was logged recently. True when logged.

        ``exc_info`` (an exception, or True in an ``except`` block) adds its traceback to
        the logged line only: a bug hit by every message costs one traceback per interval.
        """
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] += 1
            return False
        self._last[kind] = now
        skipped = self._suppressed.pop(kind, 0)
        suffix = f" ({skipped} more {kind} since the last report)" if skipped else ""
        self._log.warning("%s: " + message + "%s", kind, *args, suffix, exc_info=exc_info)
        return True
