"""Worker counters: a dict for logs and tests, Prometheus text for scrapers.

All updates happen on the worker's event loop thread, so plain ints suffice; a reader on
another thread (a test, the HTTP endpoint of :mod:`cloud_service.http`) gets a
consistent-enough snapshot.

Each :class:`Metrics` owns a prometheus-client ``CollectorRegistry`` (``.registry``, never
the process-wide default, so two workers in one process do not collide): histograms of the
per-request latency (receipt to reply), queue wait, tail run time and batch size, per-split
counters, and the counters and gauges below read at scrape time. The ``split`` label only
takes the ids of the splits this worker serves (``Metrics.splits``); any other id a request
names is counted as ``_unknown``: a label's values must not come from the network.
"""


from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from splitinfer.errors import ErrorCode

__all__ = ["Metrics", "ErrorLog", "render_prometheus", "NAMESPACE", "UNKNOWN_SPLIT"]

log = logging.getLogger(__name__)

NAMESPACE = "splitinfer_worker"
UNKNOWN_SPLIT = "_unknown"  # the split label of requests naming no split served here
# Seconds: fixed buckets, the same on every replica, so histograms sum across them.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                   0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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
    inline: int = 0  # runs of a lone request on the event loop (Config.inline)
    queue_wait_s: float = 0.0  # sum over requests: receipt -> batch formed
    tail_s: float = 0.0  # sum over batches: onnxruntime run time
    reconnects: int = 0
    duplicates: int = 0  # requests seen again by (device, id): dropped or answered from cache
    fenced: int = 0  # silent peers this worker fenced (cloud_service.heartbeat)
    # Hot reload (cloud_service.reload): splits added, replaced or removed while serving;
    # new versions that failed to load (the previous one, if any, kept serving).
    reloads: int = 0
    reload_failures: int = 0
    # split directories without a loaded tail of their newest version (failed; loading)
    reload_pending: Callable[[], int] = field(default=lambda: 0, repr=False)
    # replaced tails still answering requests they accepted before the swap
    tails_retiring: Callable[[], int] = field(default=lambda: 0, repr=False)
    queue_depth: Callable[[], int] = field(default=lambda: 0, repr=False)
    # (starved, held) seconds of the tail threads: no job at all / waiting for company
    tail_waits: Callable[[], tuple[float, float]] = field(default=lambda: (0.0, 0.0),
                                                          repr=False)
    in_flight: Callable[[], int] = field(default=lambda: 0, repr=False)
    started_at: float = field(default_factory=time.time)
    # The split ids the ``split`` label may take (the worker sets its registry's ids; a
    # reload adds the new ones and keeps the removed ones' series).
    splits: frozenset[str] = frozenset()
    # The split ids served now (the registry's keys; the hot reload changes them).
    splits_now: Callable[[], frozenset[str]] = field(default=lambda: frozenset(),
                                                     repr=False)
    # Per split (label value from split_label): requests decoded, answers acknowledged,
    # error answers by (split, code).
    split_requests: Counter[str] = field(default_factory=Counter)
    split_answered: Counter[str] = field(default_factory=Counter)
    split_errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    registry: CollectorRegistry = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ns = NAMESPACE
        self.latency = Histogram(
            "request_latency_seconds", "receipt of a request to its answer's publish",
            ["split"], namespace=ns, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram(
            "queue_wait_seconds", "receipt of a request to its batch's tail run",
            ["split"], namespace=ns, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tail_run = Histogram(
            "tail_run_seconds", "onnxruntime run time of one batch", ["split"],
            namespace=ns, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "batch_size_samples", "samples per tail run", ["split"], namespace=ns,
            buckets=BATCH_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))
        # (histogram, split label) -> its child: labels() takes a lock and checks its
        # arguments on every call, four times per request
        self._children: dict[tuple[Histogram, str], Any] = {}

    def _child(self, histogram: Histogram, label: str) -> Any:
        key = (histogram, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = histogram.labels(label)
        return child

    def split_label(self, split: str | None) -> str:
        return split if split and split in self.splits else UNKNOWN_SPLIT

    def request(self, split: str) -> None:
        """A request decoded; ``received`` already counts every message."""
        self.split_requests[self.split_label(split)] += 1

    def answer(self, split: str = "") -> None:
        """An answer with tensors acknowledged by the broker."""
        self.answered += 1
        self.split_answered[self.split_label(split)] += 1

    def replied(self, split: str, latency_s: float) -> None:
        """An answer with tensors published ``latency_s`` after its request arrived."""
        self._child(self.latency, self.split_label(split)).observe(max(latency_s, 0.0))

    def queued(self, split: str, wait_s: float) -> None:
        """A request waited ``wait_s`` from receipt until its batch ran."""
        self.queue_wait_s += wait_s
        self._child(self.queue_wait, self.split_label(split)).observe(max(wait_s, 0.0))

    def error(self, code: ErrorCode, split: str | None = None) -> None:
        self.errors[code.value] += 1
        self.split_errors[(self.split_label(split), code.value)] += 1

    def batch(self, requests: int, samples: int, tail_s: float, split: str = "") -> None:
        self.batches += 1
        self.batched_requests += requests
        self.batched_samples += samples
        self.tail_s += tail_s
        label = self.split_label(split)
        self._child(self.tail_run, label).observe(max(tail_s, 0.0))
        self._child(self.batch_size, label).observe(samples)

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
            "inline_runs": self.inline,
            "fenced": self.fenced,
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "splits_served": len(self.splits_now()),
            "reload_pending": self.reload_pending(),
            "tails_retiring": self.tails_retiring(),
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
    ("inline_runs", "tail runs of a lone request on the event loop, past the queue"),
    ("fenced", "silent peer workers fenced off the broker"),
    ("reloads", "splits added, replaced or removed by the hot reload"),
    ("reload_failures", "new split versions that failed to load (the old one kept serving)"),
)
_GAUGES = (
    ("queue_depth", "requests waiting for a tail run"),
    ("replies_in_flight", "answers waiting for a PUBACK"),
    ("mean_batch_size", "samples per tail run since start"),
    ("splits_served", "splits with a loaded tail"),
    ("reload_pending", "split directories whose newest version is not served (failed or "
     "loading)"),
    ("tails_retiring", "replaced tails still answering the requests they accepted"),
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


class _Collector:
    """The plain counters and gauges of a :class:`Metrics`, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        snap = m.snapshot()
        for name, help_text in _COUNTERS:
            yield CounterMetricFamily(f"{NAMESPACE}_{name}", help_text, value=snap[name])
        errors = CounterMetricFamily(f"{NAMESPACE}_errors", "error results by code",
                                     labels=["code"])
        for code, count in snap["errors"].items():
            errors.add_metric([code], count)
        yield errors
        per_split = (("split_requests", "requests decoded, by the split they name",
                      m.split_requests),
                     ("split_answered", "results with tensors acknowledged, by split",
                      m.split_answered))
        for name, help_text, counts in per_split:
            family = CounterMetricFamily(f"{NAMESPACE}_{name}", help_text, labels=["split"])
            for split in sorted(m.splits | set(counts)):
                family.add_metric([split], counts.get(split, 0))
            yield family
        split_errors = CounterMetricFamily(f"{NAMESPACE}_split_errors",
                                           "error results by split and code",
                                           labels=["split", "code"])
        for (split, code), count in sorted(m.split_errors.items()):
            split_errors.add_metric([split, code], count)
        yield split_errors
        for name, help_text in _GAUGES:
            yield GaugeMetricFamily(f"{NAMESPACE}_{name}", help_text, value=snap[name])


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
