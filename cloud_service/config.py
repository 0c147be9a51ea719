"""``Config``: everything a worker needs to know, as plain data.

The CLI (``splitinfer cloud serve``) maps one flag onto each field; every flag can also
come from an environment variable (``--max-batch`` ↔ ``SPLITINFER_MAX_BATCH``), which is
how the container images are configured.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cloud_service.dedupe import DEFAULT_MAX_BYTES
from splitinfer.errors import BadInputError
from splitinfer.mqtt import BrokerConfig
from splitinfer.ort_config import SPINNING
from splitinfer.topics import DEFAULT_GROUP, DEFAULT_PREFIX, Topics, check_level
from splitinfer.wire import DEFAULT_MAX_PAYLOAD

__all__ = ["Config"]



def _default_client_id() -> str:
    host = socket.gethostname().split(".")[0] or "host"
    return f"splitinfer-worker-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Config:
    """A worker's settings. Validated on construction; a bad value raises BadInputError."""

    artifacts: Path
    broker: str = "mqtt://127.0.0.1:1883"
    # Shared-subscription group; "" subscribes plainly (brokers without $share, e.g. amqtt;
    # without "" the server probes the group at start-up and falls back with a warning).
    group: str = DEFAULT_GROUP
    prefix: str = DEFAULT_PREFIX
    # Dynamic batching: a batch closes at max_batch samples or max_delay_ms after its
    # oldest request arrived, whichever comes first.
    max_batch: int = 32
    max_delay_ms: float = 2.0
    # Requests waiting for the tail, all splits together; beyond it: OVERLOADED.
    queue_size: int = 1024
    # onnxruntime intra-op threads per tail session. 0 = per tail, measured at load: one
    # per usable CPU (splitinfer.ort_config.pool_threads) where that runs one sample
    # faster than one thread by registry.POOL_GAIN, else one thread (no pool to wake).
    threads: int = 0
    # When the tail's pool threads spin for work (splitinfer.ort_config.SPINNING): "run"
    # (while a run lasts), "always" (onnxruntime's default: also tens of ms after each
    # run, a core busy meanwhile), "off" (never). Default "run": `splitinfer bench
    # overhead` (MobileNetV2, 2-vCPU VM, one request at a time) e2e/floor 1.31-1.43 against
    # 1.37-1.64 with "always", whose spinning after the run slowed the device's next head
    # on the shared cores. See cloud_service.registry.session_options.
    spinning: str = "run"
    # Tail runs at once (all splits together); each run may use `threads` threads.
    tail_workers: int = 1
    # A lone request, with nothing queued or running, its split's requests arriving
    # further apart than the batching delay and INLINE_LOAD tail runs, and its run known to
    # take at most INLINE_MAX_S (cloud_service.worker), runs on the event loop that got
    # it: no hand-over to a tail thread and back (two thread wake-ups, ~0.3 ms on an idle
    # 2-vCPU VM). Under load requests queue for the tail threads and batch as before.
    # False: every request goes through the queue.
    inline: bool = True
    # onnxruntime execution providers in preference order; () = CUDA if present, else CPU.
    providers: tuple[str, ...] = ()
    max_payload: int = DEFAULT_MAX_PAYLOAD
    # On SIGTERM: how long to finish the queue and wait for PUBACKs before giving up.
    drain_timeout_s: float = 30.0
    # How long one answer may wait for a broker connection before it is dropped (counted).
    reply_timeout_s: float = 30.0
    metrics_interval_s: float = 30.0
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 5.0
    client_id: str = field(default_factory=_default_client_id)
    # A stable identity: the MQTT client id becomes worker_id and the session persists
    # (MQTT 5 clean_start=false + session expiry; MQTT 3.1.1 clean_session=false), so a
    # worker restarted within session_expiry_s gets what the broker queued for it.
    # "" = a random client id and a clean session. See docs/cloud.md "Faults".
    worker_id: str = ""
    session_expiry_s: float = 60.0
    # Retained heartbeat on {prefix}/v1/workers/{id} every heartbeat_s (0 = none).
    heartbeat_s: float = 1.0
    # A peer whose heartbeat is older than this is fenced (0 = never fence).
    fence_after_s: float = 3.0
    # Recent results kept to answer a retried request id again (0 = no result cache;
    # duplicates of queued requests are still dropped), bounded by entries and bytes.
    dedupe_size: int = 4096
    dedupe_bytes: int = DEFAULT_MAX_BYTES
    # HTTP /metrics, /healthz, /readyz on metrics_host:metrics_port (0 = not served).
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Hot reload (cloud_service.reload): poll --artifacts every reload_interval_s; a split
    # directory that appeared, changed or went is acted on once it stayed unchanged for
    # reload_settle_s. Off: the splits loaded at start are served until the process ends.
    reload: bool = True
    reload_interval_s: float = 1.0
    reload_settle_s: float = 1.0

    def __post_init__(self) -> None:
        self.artifacts = Path(self.artifacts)
        self.broker_config()  # raises BadInputError naming the bad URL
        self.topics()
        if self.group:
            check_level(self.group, "subscription group")
        for name in ("max_batch", "queue_size", "tail_workers", "max_payload"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise BadInputError(f"{name} = {value!r}: expected an integer >= 1")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise BadInputError(f"threads = {self.threads!r}: expected an integer >= 0 "
                                "(0 = onnxruntime's default)")
        if self.spinning not in SPINNING:
            raise BadInputError(f"spinning = {self.spinning!r}: expected one of "
                                f"{', '.join(SPINNING)}")
        for name in ("max_delay_ms", "drain_timeout_s", "reply_timeout_s",
                     "metrics_interval_s", "reconnect_min_s", "reconnect_max_s"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise BadInputError(f"{name} = {value!r}: expected a finite number >= 0")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise BadInputError(f"reconnect_max_s ({self.reconnect_max_s}) must be >= "
                                f"reconnect_min_s ({self.reconnect_min_s})")
        if self.worker_id:
            check_level(self.worker_id, "worker id")
            self.client_id = self.worker_id
        if not self.client_id:
            raise BadInputError("client_id must not be empty")
        for name in ("dedupe_size", "dedupe_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadInputError(f"{name} = {value!r}: expected an integer >= 0")
        for name in ("session_expiry_s", "heartbeat_s", "fence_after_s"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise BadInputError(f"{name} = {value!r}: expected a finite number >= 0")
        if self.session_expiry_s > 0xFFFFFFFE:
            raise BadInputError(f"session_expiry_s = {self.session_expiry_s!r}: expected at "
                                "most 4294967294 s (MQTT 5's largest finite expiry)")
        if self.heartbeat_s > 0 or self.fence_after_s > 0:
            try:
                check_level(self.client_id, "client id")
            except BadInputError as exc:
                raise BadInputError(f"{exc}: it names this worker's heartbeat topic; pick "
                                    "another, or turn heartbeat and fencing off "
                                    "(heartbeat_s = fence_after_s = 0)") from None
        if 0 < self.fence_after_s <= self.heartbeat_s:
            raise BadInputError(f"fence_after_s = {self.fence_after_s!r}: expected more than "
                                f"heartbeat_s ({self.heartbeat_s!r}), or 0 (never fence)")
        if not isinstance(self.metrics_port, int) or isinstance(self.metrics_port, bool) \
                or not 0 <= self.metrics_port <= 65535:
            raise BadInputError(f"metrics_port = {self.metrics_port!r}: expected a TCP port "
                                "0-65535 (0 = no metrics endpoint)")
        if not isinstance(self.reload, bool):
            raise BadInputError(f"reload = {self.reload!r}: expected true or false")
        for name in ("reload_interval_s", "reload_settle_s"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise BadInputError(f"{name} = {value!r}: expected a finite number >= 0")
        if not self.reload_interval_s > 0:
            raise BadInputError(f"reload_interval_s = {self.reload_interval_s!r}: expected "
                                "seconds > 0 between scans of the artifacts directory")
        if not isinstance(self.metrics_host, str) or not self.metrics_host:
            raise BadInputError(f"metrics_host = {self.metrics_host!r}: expected a host name "
                                "or address to bind, e.g. 127.0.0.1 or 0.0.0.0")
        self.providers = tuple(self.providers)
        if self.providers:
            import onnxruntime as ort

            known = ort.get_all_providers()
            bad = [p for p in self.providers if p not in known]
            if bad:
                raise BadInputError(f"providers {bad}: unknown to onnxruntime; expected "
                                    f"names from {known}")

    def broker_config(self) -> BrokerConfig:
        return BrokerConfig.from_url(self.broker)

    def topics(self) -> Topics:
        return Topics(self.prefix)

    def subscription(self) -> str:
        """What the worker asks to subscribe to: every model's requests, shared within the
        group. The server falls back to the plain filter where the broker has no shared
        subscriptions (``Server.subscription`` holds what it really subscribed to)."""
        topics = self.topics()
        return topics.shared_request_filter(self.group) if self.group \
            else topics.request_filter()

    @property
    def persistent(self) -> bool:
        """Whether the worker keeps a broker session across connections (worker_id set)."""
        return bool(self.worker_id)

    @property
    def heartbeat_id(self) -> str:
        """The id in the heartbeat topic: worker_id, else the (random) client id."""
        return self.worker_id or self.client_id

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0
