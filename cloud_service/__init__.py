"""cloud_service: workers that run split tails for a fleet of devices over MQTT.

::

    registry.py  split directories → onnxruntime tail sessions, request checks
    batcher.py   per-split dynamic batching on tail threads; bounded queue, deadlines
    worker.py    message → checks → batch → tail → answer (no MQTT: publish is injected)
    server.py    the broker side: subscribe, reconnect, drain on SIGTERM, signals
    broker_check.py  start-up probe: shared subscriptions (CONNACK, SUBACK, a message
                 through the group) and the request round trip
    metrics.py   counters, Prometheus text, rate-limited error logging
    config.py    Config, one field per ``splitinfer cloud serve`` flag
    cli.py       ``splitinfer cloud serve``

Imports only the contract (``splitinfer``). Importing this package is cheap; onnxruntime
and paho load when a tail is opened or a server starts.
"""

from __future__ import annotations

from cloud_service.config import Config
from cloud_service.metrics import Metrics, render_prometheus
from cloud_service.registry import Registry, Tail
from cloud_service.server import Server
from cloud_service.worker import Incoming, ReplyAddress, Worker

__all__ = [
    "Config",
    "Server",
    "Worker",
    "Incoming",
    "ReplyAddress",
    "Registry",
    "Tail",
    "Metrics",
    "render_prometheus",
]
