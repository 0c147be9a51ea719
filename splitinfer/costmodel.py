"""The cost model: the predicted end-to-end p50 of every split of a bundle on one link.

Used by ``splitinfer plan`` (which prints and plots it), the device's run-time chooser
(:mod:`edge_agent.adaptive`, fed with what it observes) and the planner bench (which checks
it against the fleet). Pure Python, stdlib only, so the device can run it.

A request's latency, from the moment it is due to the moment its result is decoded, is the
sum of the stages it passes through in order (all seconds, each a p50)::

    total = agent                               the device's own overhead (a constant)
          + head + encode                       on the device (edge profile)
          + uplink                              request PUBLISH over the link
          + broker                              per broker hop, x 2 (there and back)
          + queue                               waiting at the worker (load, batching)
          + cloud decode + tail                 on the worker (cloud profile)
          + downlink                            result PUBLISH over the link
          + decode                              the device reads the result

*edge_only* is ``agent + head`` (the whole model, nothing crosses); *cloud_only* has no head
(``head`` = 0) but may encode its input (an image codec: ``encode``).

Each term (see :func:`predict`):

* ``agent``: the device's per-request time outside the profiled stages (its event loop
  and thread hops; in the fleet, also its dispatch lag behind the scheduled arrival, which
  the fleet charges): :data:`DEFAULT_AGENT_S`, measured once per machine.
* ``head``, ``encode`` (edge profile; head already x ``--speed``), ``tail``,
  ``cloud_decode`` (cloud profile, batch 1): p50s as measured.
* ``uplink`` = ``wire_bytes * 8 / up_bps + delay + loss delay + own queue``. ``wire_bytes``
  is the MQTT PUBLISH packet (:func:`mqtt_publish_bytes`: fixed header, remaining-length
  varint, topic, packet id, payload). The link rates are TCP *goodput* (as
  :mod:`simulators.shaper` emulates them and a speed test reports), so no IP/TCP headers.
  Loss delay is the mean retransmission delay, ``segments * p * RTO`` (exactly
  :meth:`splitinfer.link.LinkProfile.expected_loss_delay_s`). *Own queue*: a device that
  sends ``device_rps`` requests/s on one TCP connection queues behind its own previous
  request while that one serializes: an M/D/1 queue on the link with service
  ``wire_bytes * 8 / up_bps`` and ``rho = device_rps * service`` (its median wait, as for
  the worker below, is 0 while ``rho <= 0.5``).
* ``broker``: a constant per broker hop, two hops per request (device -> broker ->
  worker, worker -> broker -> device): the broker forwarding one message, both clients'
  MQTT handling, the worker's own handling around its tail and the link emulator's timer
  lateness; :data:`DEFAULT_BROKER_S`, measured once per machine; override it per
  deployment.
* ``queue``: each worker sees Poisson arrivals at ``lambda = load_rps / workers``
  (mosquitto's shared subscription deals round robin, more regular than Poisson, so this
  errs on the slow side) and a deterministic service (a tail's time varies by a few
  percent). A tail that cannot batch (the cloud profile has no batch > 1) is an **M/D/1**
  queue, ``rho = lambda * T(1)``; the p50 of its waiting time comes from the exact
  distribution (Erlang's formula, :func:`md1_wait_quantile`) and is 0 while
  ``rho <= 0.5`` (the median request finds the worker idle); ``rho >= 1``: ``inf``.
  A batching tail serves everything waiting at once (:mod:`cloud_service.batcher`), so a
  request waits at most for the batch in progress: a **bulk-service** queue. Its batch is
  the fixed point ``b = clamp(lambda * T(b), 1, max_batch)`` (what arrives during one batch
  makes the next), ``T`` interpolated in the cloud profile's per-batch p50s; the thread is
  busy ``u = lambda * T(b) / b`` of the time; a request finds it idle (no wait) or busy
  with a residual ``U(0, T(b))``, so the median wait is ``T(b) (u - 1/2) / u`` for
  ``u > 1/2``, else 0. It also pays ``T(b) - T(1)`` (its batch is slower than batch 1) and
  the batcher's hold for company (``max_delay / 2`` when arrivals come closer than
  ``max_delay``; a lone device is never held). ``u > 1`` (even ``max_batch`` cannot keep
  up): ``inf``.
  The payload is the request as the device sends it: compressed when the split's
  manifest has a ``compression`` (``splitinfer profile`` encodes it as the agent does), so
  wire compression counts here as fewer bytes, and its codec time in ``encode`` and
  ``cloud_decode``; the profile's ``compressed`` entry says what each codec would save at
  every cut.
* ``downlink`` = result PUBLISH bytes * 8 / down_bps + delay + loss delay (the result in
  the request's codec, as the worker answers).
* ``decode``: the device's result decode (from the split costs; 0 when not profiled).

**Jitter** does not move the p50. The shaper (and, roughly, a real radio) adds
``U(-j, +j)`` per chunk, clipped so that nothing arrives before it was sent or before the
chunk ahead of it. The clip binds only when ``delay < j`` or when two chunks are closer
than ``2 j`` apart on the link; a message's last chunk (which decides when it lands) comes
at least a chunk's serialization after the one ahead, and the one ahead of a message's
first chunk is a previous message (1 s earlier at 1 req/s; on the downlink the broker's
PUBACK of the request, one worker round (tail + hops) earlier, which binds only when that
round is shorter than ``2 j``, and then rarely). So the delivery is ``end + delay + U``,
symmetric about ``end + delay``, and the sum of the two directions' independent symmetric
jitters has median 0. (Jitter widens the p99, which this model does not predict.) Even where
``delay < j`` clips it, the clipped mass lies below 0 and the median of ``max(-delay, U)``
stays 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitinfer.errors import BadInputError
from splitinfer.link import DEFAULT_MSS, MIN_RTO_S, LinkProfile

__all__ = ["LinkEstimate", "SplitCosts", "Prediction", "mqtt_publish_bytes", "predict",
           "recommend", "costs_from_profiles", "md1_wait_quantile", "DEFAULT_BROKER_S",
           "DEFAULT_AGENT_S",
           "DEFAULT_MAX_BATCH", "DEFAULT_MAX_DELAY_S", "PROFILE_FORMAT"]

# One broker hop: a PUBLISH into the tuned mosquitto and out to its subscriber, both
# clients' MQTT work, the worker's handling around its tail, and the link emulator's timer
# lateness (~0.7 ms a direction). Measured once on the 2-core dev box by
# `splitinfer bench planner --calibrate`: the digits CNN cloud_only over the "lan" profile,
# half the fleet's broker_queue p50 (3.5 ms). docs/planning.md, "Calibration".
DEFAULT_BROKER_S = 0.0018
# The device's own time per request outside head, encode and decode: the fleet's dispatch
# lag behind the scheduled arrival, the hop to the head's thread and back, resolving the
# result. Measured the same way: the "other" stage p50 of the digits CNN edge_only (1.6 ms)
# and cloud_only (2.0 ms, device decode 0.2 ms apart) runs.
DEFAULT_AGENT_S = 0.002
DEFAULT_MAX_BATCH = 32  # cloud_service.config defaults
DEFAULT_MAX_DELAY_S = 0.002
PROFILE_FORMAT = "splitinfer.profile/1"


@dataclass(frozen=True)
class LinkEstimate:
    """What the model needs of a link: rates in bit/s (goodput), times in seconds."""

    up_bps: float
    down_bps: float
    delay_s: float
    jitter_s: float = 0.0
    loss: float = 0.0
    mss: int = DEFAULT_MSS
    rto_s: float | None = None

    def __post_init__(self) -> None:
        if not (self.up_bps > 0 and self.down_bps > 0):
            raise BadInputError(f"link estimate: rates up={self.up_bps!r} down="
                                f"{self.down_bps!r} bit/s; expected > 0")
        if not (self.delay_s >= 0 and self.jitter_s >= 0 and 0 <= self.loss < 1
                and self.mss >= 1):
            raise BadInputError(f"link estimate {self!r}: expected delay, jitter >= 0, "
                                "0 <= loss < 1, mss >= 1")

    @classmethod
    def from_profile(cls, p: LinkProfile) -> LinkEstimate:
        return cls(up_bps=p.up_bps, down_bps=p.down_bps, delay_s=p.delay_s,
                   jitter_s=p.jitter_s, loss=p.loss, mss=p.mss, rto_s=p.rto_s)

    @property
    def effective_rto_s(self) -> float:
        """As :attr:`LinkProfile.effective_rto_s`: ``rto`` or max(200 ms, 2 * RTT)."""
        return self.rto_s if self.rto_s is not None else max(MIN_RTO_S, 4 * self.delay_s)

    def expected_loss_delay_s(self, nbytes: int) -> float:
        """Mean retransmission delay of ``nbytes``: segments * p * RTO (as LinkProfile)."""
        return math.ceil(nbytes / self.mss) * self.loss * self.effective_rto_s

    def to_dict(self) -> dict[str, Any]:
        return {"up_bps": self.up_bps, "down_bps": self.down_bps, "delay_ms": self.delay_s * 1e3,
                "jitter_ms": self.jitter_s * 1e3, "loss": self.loss, "mss": self.mss,
                "rto_ms": None if self.rto_s is None else self.rto_s * 1e3}


@dataclass(frozen=True)
class SplitCosts:
    """One candidate's measured costs (seconds, bytes per sample), from the two profiles.

    ``request_bytes`` / ``result_bytes`` are MQTT *payloads* (whole envelopes);
    ``batch_tail_s`` maps a batch size to the seconds one batch of it takes on the worker.
    ``decode_s`` is the device decoding the result, ``cloud_decode_s`` the worker decoding
    the request (envelope + image codec).
    """

    split_id: str
    kind: str
    request_bytes: int
    result_bytes: int
    head_s: float
    encode_s: float
    decode_s: float
    tail_s: float
    batch_tail_s: Mapping[int, float] = field(default_factory=dict)
    cloud_decode_s: float = 0.0


@dataclass(frozen=True)
class Prediction:
    """The predicted p50 of one split on one link, by term (seconds).

    ``decode_s`` holds both decodes (worker: request, device: result); ``bytes`` the
    request's bytes on the wire (the MQTT PUBLISH packet; 0 for edge_only); ``agent_s``
    the device's own overhead (in ``total_s``).
    """

    split_id: str
    kind: str
    total_s: float
    head_s: float
    encode_s: float
    uplink_s: float
    broker_s: float
    queue_s: float
    tail_s: float
    downlink_s: float
    decode_s: float
    bytes: int = 0
    agent_s: float = 0.0

    @property
    def network_s(self) -> float:
        return self.uplink_s + self.broker_s + self.downlink_s

    def to_dict(self) -> dict[str, Any]:
        """The ``plan --json`` keys, times in ms (``inf`` as None: not JSON)."""

        def ms(s: float) -> float | None:
            return round(s * 1e3, 3) if math.isfinite(s) else None

        return {"split_id": self.split_id, "kind": self.kind, "bytes": self.bytes,
                "predicted_ms": ms(self.total_s), "head_ms": ms(self.head_s),
                "encode_ms": ms(self.encode_s), "uplink_ms": ms(self.uplink_s),
                "broker_ms": ms(self.broker_s), "queue_ms": ms(self.queue_s),
                "tail_ms": ms(self.tail_s), "downlink_ms": ms(self.downlink_s),
                "decode_ms": ms(self.decode_s), "agent_ms": ms(self.agent_s)}


def _varint_len(n: int) -> int:
    """Bytes of MQTT's variable byte integer (7 bits per byte, at most 4)."""
    if n < 0 or n > 268_435_455:
        raise BadInputError(f"MQTT remaining length {n}: expected 0..268435455")
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def mqtt_publish_bytes(topic: str | int, payload: int, *, qos: int = 1,
                       protocol: str = "3.1.1") -> int:
    """Bytes of one MQTT PUBLISH packet: fixed header (1 byte + remaining-length varint),
    topic (2-byte length + UTF-8), packet id (2 bytes, QoS 1/2 only), MQTT 5's property
    length (1 byte, no properties), payload. ``topic`` is the topic or its length in bytes.
    """
    if qos not in (0, 1, 2):
        raise BadInputError(f"qos {qos!r}: expected 0, 1 or 2")
    if protocol not in ("3.1.1", "5"):
        raise BadInputError(f"MQTT protocol {protocol!r}: expected 3.1.1 or 5")
    topic_len = topic if isinstance(topic, int) else len(topic.encode())
    body = 2 + topic_len + (2 if qos else 0) + (1 if protocol == "5" else 0) + payload
    return 1 + _varint_len(body) + body


# ---- M/D/1 ------------------------------------------------------------------------------


def _md1_wait_cdf(t: float, lam: float, service_s: float) -> float:
    """P(W <= t) of an M/D/1 queue (Erlang): (1-rho) sum_{k=0}^{floor(t/D)}
    (lam (kD - t))^k / k! e^{-lam (kD - t)}. Alternating terms: exact for t/D up to ~30."""
    rho = lam * service_s
    total = 0.0
    for k in range(int(t / service_s) + 1):
        x = lam * (k * service_s - t)  # <= 0
        total += (x ** k) / math.factorial(k) * math.exp(-x)
    return (1 - rho) * total


def md1_wait_quantile(rho: float, service_s: float, q: float = 0.5) -> float:
    """The ``q`` quantile of the waiting time (before service) in an M/D/1 queue with
    utilization ``rho`` and service time ``service_s``. 0 while ``1 - rho >= q`` (that many
    arrivals find the server idle); ``inf`` for ``rho >= 1``.

    Exact (bisection on Erlang's distribution) while the quantile is under 25 service
    times; beyond, the heavy-traffic exponential tail ``P(W > t) ~ rho exp(-2 (1 - rho) t /
    (rho D))`` (Kingman; the exact sum loses its digits there).
    """
    if not 0 < q < 1:
        raise BadInputError(f"quantile {q!r}: expected 0 < q < 1")
    if rho <= 0 or service_s <= 0 or 1 - rho >= q:
        return 0.0
    if rho >= 1:
        return math.inf
    lam = rho / service_s
    tail = rho * service_s / (2 * (1 - rho))  # mean wait given Kingman's exponential tail
    approx = tail * math.log(rho / (1 - q))
    if approx > 25 * service_s:
        return approx
    lo, hi = 0.0, 25 * service_s
    if _md1_wait_cdf(hi, lam, service_s) < q:
        return approx
    for _ in range(60):
        mid = (lo + hi) / 2
        if _md1_wait_cdf(mid, lam, service_s) >= q:
            hi = mid
        else:
            lo = mid
    return hi


def _batch_time(costs: SplitCosts, b: float) -> float:
    """Seconds one batch of ``b`` takes: the profile's per-batch p50s, linear in between
    (and beyond the largest, per sample at the largest's rate); T(1) = ``tail_s``."""
    points = sorted({1: costs.tail_s, **{int(k): float(v) for k, v in
                                         costs.batch_tail_s.items() if int(k) >= 1}}.items())
    if b <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in itertools.pairwise(points):
        if b <= b1:
            return t0 + (t1 - t0) * (b - b0) / (b1 - b0)
    bl, tl = points[-1]
    return tl * b / bl


def _worker_queue(costs: SplitCosts, lam: float, max_batch: int, max_delay_s: float,
                  ) -> float:
    """Median seconds a request spends at one worker beyond its batch-1 tail (see module)."""
    if lam <= 0 or costs.tail_s <= 0:
        return 0.0
    if not any(int(b) > 1 for b in costs.batch_tail_s):  # not batchable: M/D/1
        return md1_wait_quantile(lam * costs.tail_s, costs.tail_s)
    b = 1.0
    for _ in range(200):  # the fixed point b = clamp(lam * T(b), 1, max_batch)
        nb = min(float(max_batch), max(1.0, lam * _batch_time(costs, b)))
        if abs(nb - b) < 1e-9:
            break
        b = nb
    batch_s = _batch_time(costs, b)
    busy = lam * batch_s / b  # the share of time the tail thread is busy
    if busy > 1 + 1e-9:
        return math.inf  # more than max_batch arrive per batch: the queue grows
    busy = min(busy, 1.0)
    # a request finds the thread idle (1 - busy) or busy with a residual U(0, T(b))
    wait = 0.0 if busy <= 0.5 else batch_s * (busy - 0.5) / busy
    hold = max_delay_s / 2 if 1 / lam < max_delay_s else 0.0
    return wait + (batch_s - costs.tail_s) + hold


# ---- the model --------------------------------------------------------------------------


def predict(costs: SplitCosts, link: LinkEstimate, *, load_rps: float = 0.0,
            workers: int = 1, broker_s: float = DEFAULT_BROKER_S, topic_len: int = 48,
            qos: int = 1, device_rps: float = 0.0, agent_s: float = DEFAULT_AGENT_S,
            protocol: str = "3.1.1",
            max_batch: int = DEFAULT_MAX_BATCH,
            max_delay_s: float = DEFAULT_MAX_DELAY_S) -> Prediction:
    """The predicted p50 of ``costs`` on ``link`` (see the module docstring, term by term).

    ``load_rps``: requests/s reaching the worker pool (all devices); ``workers``: how many
    share it; ``broker_s``: one broker hop; ``topic_len``: bytes of the topics (request and
    result alike); ``device_rps``: this device's own rate (its requests queue behind each
    other on its uplink; 0 = one at a time); ``agent_s``: the device's own overhead.
    """
    if workers < 1:
        raise BadInputError(f"workers {workers}: expected at least 1")
    if load_rps < 0 or device_rps < 0:
        raise BadInputError(f"load {load_rps!r} / device rate {device_rps!r} req/s: "
                            "expected >= 0")
    if costs.kind == "edge_only":
        return Prediction(costs.split_id, costs.kind, agent_s + costs.head_s, costs.head_s, 0.0,
                          0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, agent_s)
    up_bytes = mqtt_publish_bytes(topic_len, costs.request_bytes, qos=qos, protocol=protocol)
    down_bytes = mqtt_publish_bytes(topic_len, costs.result_bytes, qos=qos, protocol=protocol)
    up_serial = up_bytes * 8 / link.up_bps
    own_queue = md1_wait_quantile(device_rps * up_serial, up_serial) if device_rps else 0.0
    uplink = (up_serial + link.delay_s + link.expected_loss_delay_s(up_bytes)
              + own_queue)
    downlink = (down_bytes * 8 / link.down_bps + link.delay_s
                + link.expected_loss_delay_s(down_bytes))
    queue = _worker_queue(costs, load_rps / workers, max_batch, max_delay_s)
    broker = 2 * broker_s
    decode = costs.cloud_decode_s + costs.decode_s
    total = (agent_s + costs.head_s + costs.encode_s + uplink + broker + queue + costs.tail_s
             + downlink + decode)
    return Prediction(costs.split_id, costs.kind, total, costs.head_s, costs.encode_s, uplink,
                      broker, queue, costs.tail_s, downlink, decode, up_bytes, agent_s)


def recommend(preds: Sequence[Prediction], *,
              deadline_s: float | None = None) -> Prediction | None:
    """The prediction with the lowest ``total_s`` that meets ``deadline_s`` (``<=``; None =
    no deadline). Ties go to the earlier one in ``preds``. None when no finite prediction
    meets it (the caller decides: ``plan`` says so and exits 1, the device answers
    locally)."""
    best: Prediction | None = None
    for p in preds:
        if not math.isfinite(p.total_s):
            continue
        if deadline_s is not None and p.total_s > deadline_s:
            continue
        if best is None or p.total_s < best.total_s:
            best = p
    return best


# ---- from profile JSON ------------------------------------------------------------------


def _p50_s(entry: Mapping[str, Any], key: str, where: str, default: float | None = None,
           ) -> float:
    stat = entry.get(key)
    if stat is None:
        if default is not None:
            return default
        raise BadInputError(f"{where}: no {key!r}; expected {{\"p50\": ms, ...}}")
    try:
        value = float(stat["p50"] if isinstance(stat, Mapping) else stat)
    except (KeyError, TypeError, ValueError):
        raise BadInputError(f"{where}: {key} {stat!r}; expected {{\"p50\": ms, ...}}") from None
    if not (math.isfinite(value) and value >= 0):
        raise BadInputError(f"{where}: {key} p50 {value!r} ms; expected >= 0")
    return value / 1e3


def _check_profile(profile: Mapping[str, Any], side: str) -> Mapping[str, Any]:
    if not isinstance(profile, Mapping):
        raise BadInputError(f"{side} profile: expected a JSON object")
    fmt = profile.get("format", PROFILE_FORMAT)
    if fmt != PROFILE_FORMAT:
        raise BadInputError(f"{side} profile: format {fmt!r}; expected {PROFILE_FORMAT!r}")
    if profile.get("side") != side:
        raise BadInputError(f"{side} profile: it says side {profile.get('side')!r}; expected "
                            f"{side!r} (made by `splitinfer profile --side {side}`)")
    splits = profile.get("splits")
    if not isinstance(splits, Mapping) or not splits:
        raise BadInputError(f"{side} profile: 'splits' must be a non-empty object")
    return splits


def costs_from_profiles(edge: Mapping[str, Any], cloud: Mapping[str, Any],
                        ) -> list[SplitCosts]:
    """One :class:`SplitCosts` per split of the edge profile, in its order (profile JSON
    dicts, section 3 of the issue's contracts). Both must be of the same model build
    (``source_sha256``) and the right ``side``; every split but edge_only needs its cloud
    entry. Raises :class:`BadInputError` naming what does not fit."""
    edge_splits = _check_profile(edge, "edge")
    cloud_splits = _check_profile(cloud, "cloud")
    if edge.get("source_sha256") != cloud.get("source_sha256"):
        raise BadInputError(f"profiles of different models: edge source_sha256 "
                            f"{edge.get('source_sha256')!r}, cloud {cloud.get('source_sha256')!r}"
                            "; profile both sides of the same bundle")
    out: list[SplitCosts] = []
    for split_id, e in edge_splits.items():
        where = f"edge profile, split {split_id}"
        if not isinstance(e, Mapping):
            raise BadInputError(f"{where}: expected an object")
        kind = str(e.get("kind", "split"))
        head = _p50_s(e, "head_ms", where, 0.0 if kind == "cloud_only" else None)
        if kind == "edge_only":
            out.append(SplitCosts(split_id, kind, 0, 0, head, 0.0, 0.0, 0.0))
            continue
        c = cloud_splits.get(split_id)
        cwhere = f"cloud profile, split {split_id}"
        if not isinstance(c, Mapping):
            raise BadInputError(f"{cwhere}: missing; the cloud profile has "
                                f"{', '.join(cloud_splits)}; profile the same bundle")
        batches: dict[int, float] = {}
        for b, stat in (c.get("batches") or {}).items():
            try:
                batches[int(b)] = float(stat["p50_ms"]) / 1e3
            except (KeyError, TypeError, ValueError):
                raise BadInputError(f"{cwhere}: batches[{b!r}] {stat!r}; expected "
                                    "{\"p50_ms\": ms, \"throughput_rps\": ...}") from None
        try:
            request_bytes = int(e["request_bytes"])
            result_bytes = int(c["result_bytes"])
        except KeyError as exc:
            raise BadInputError(f"{split_id}: no {exc.args[0]!r} in its profile entry") from None
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"{split_id}: byte counts must be integers ({exc})") from None
        out.append(SplitCosts(
            split_id, kind, request_bytes, result_bytes, head,
            _p50_s(e, "encode_ms", where, 0.0), _p50_s(e, "decode_ms", where, 0.0),
            _p50_s(c, "tail_ms", cwhere), batches, _p50_s(c, "decode_ms", cwhere, 0.0)))
    return out
