"""Prometheus metrics of the device service (``GET /metrics`` of ``splitinfer edge serve``).

One registry per service (prometheus-client, pure Python, in the edge extra):

- ``splitinfer_edge_requests_total{outcome}`` — local API inference requests by outcome:
  ``ok``, ``bad_input`` (400/413), ``unavailable`` (503: not connected, shutting down, no
  worker), ``overloaded`` (429), ``deadline`` (504), ``remote_error`` (502), ``error`` (500);
- ``splitinfer_edge_request_seconds`` — end-to-end time of answered requests (histogram);
- ``splitinfer_edge_stage_seconds_total{stage}`` — time per stage (head, encode, network,
  queue, tail, decode) summed over answered requests: ``rate(stage) / rate(requests)`` is
  the mean stage time;
- ``splitinfer_edge_in_flight``, ``splitinfer_edge_connected`` (1 while the broker
  connection is up), ``splitinfer_edge_info{device_id, split_id, model}``;
- ``splitinfer_edge_agent_{published,retries,republished,no_subscriber,duplicates,
  late_results,reconnects}_total`` — the agent's own counters (:class:`AgentCounters`);
- the process collector (resident memory, CPU seconds, open files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from edge_agent.counters import AgentCounters

__all__ = ["ServiceMetrics", "OUTCOMES"]

OUTCOMES = ("ok", "bad_input", "unavailable", "overloaded", "deadline", "remote_error", "error")
_AGENT_COUNTERS = ("published", "retries", "republished", "no_subscriber", "duplicates",
                   "late_results", "reconnects")
# a Pi head + a LAN round trip is milliseconds; a 3G link or a slow head, seconds
_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class _AgentCollector(Collector):
    def __init__(self, counters: Callable[[], AgentCounters | None]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        counters = self._counters()
        if counters is None:
            return
        values = counters.as_dict()
        for name in _AGENT_COUNTERS:
            yield CounterMetricFamily(f"splitinfer_edge_agent_{name}",
                                      f"edge agent counter {name} (see AgentCounters)",
                                      value=values[name])


class ServiceMetrics:
    """The service's metrics; ``render()`` is the body and content type of ``/metrics``."""

    def __init__(self, *, connected: Callable[[], bool],
                 counters: Callable[[], AgentCounters | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("splitinfer_edge_requests", "local API inference requests "
                                "by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.latency = Histogram("splitinfer_edge_request_seconds", "end-to-end time of "
                                 "answered requests", buckets=_BUCKETS, registry=r)
        self.stages = Counter("splitinfer_edge_stage_seconds", "time per stage summed over "
                              "answered requests", ["stage"], registry=r)
        self.in_flight = Gauge("splitinfer_edge_in_flight", "inference requests being "
                               "answered", registry=r)
        gauge = Gauge("splitinfer_edge_connected", "1 while the broker connection is up",
                      registry=r)
        gauge.set_function(lambda: 1.0 if connected() else 0.0)
        self.info = Info("splitinfer_edge", "the device and the split it serves", registry=r)
        r.register(_AgentCollector(counters))
        ProcessCollector(registry=r)

    def observe(self, outcome: str, timings: dict[str, float] | None = None) -> None:
        self.requests.labels(outcome).inc()
        if timings:
            if "e2e" in timings:
                self.latency.observe(timings["e2e"])
            for stage, seconds in timings.items():
                if stage != "e2e":
                    self.stages.labels(stage).inc(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def set_info(self, **labels: Any) -> None:
        self.info.info({k: str(v) for k, v in labels.items()})
