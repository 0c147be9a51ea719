"""splitinfer.costmodel against hand-computed cases (the arithmetic is written out)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from splitinfer.costmodel import (
    LinkEstimate,
    Prediction,
    SplitCosts,
    costs_from_profiles,
    md1_wait_quantile,
    mqtt_publish_bytes,
    predict,
    recommend,
)
from splitinfer.errors import BadInputError
from splitinfer.link import LinkProfile

LINK = LinkEstimate(up_bps=1e6, down_bps=2e6, delay_s=0.05)
COSTS = SplitCosts("s", "split", request_bytes=12450, result_bytes=950, head_s=0.2,
                   encode_s=0.001, decode_s=0.0005, tail_s=0.03, cloud_decode_s=0.002)


def test_publish_bytes() -> None:
    # topic "a/b": 2 + 3 bytes; packet id 2; payload 100: remaining 107 < 128 -> 1 byte
    assert mqtt_publish_bytes("a/b", 100) == 1 + 1 + 107
    # payload 200: remaining 207 >= 128 -> 2-byte varint
    assert mqtt_publish_bytes("a/b", 200) == 1 + 2 + 207
    assert mqtt_publish_bytes("a/b", 200, qos=0) == 1 + 2 + 205  # no packet id
    assert mqtt_publish_bytes(3, 200, protocol="5") == 1 + 2 + 208  # property length byte
    # remaining 16384 needs 3 bytes: 2 + 10 + 2 + 16370
    assert mqtt_publish_bytes(10, 16370) == 1 + 3 + 16384
    with pytest.raises(BadInputError, match="qos"):
        mqtt_publish_bytes("t", 1, qos=3)


def test_predict_by_hand() -> None:
    p = predict(COSTS, LINK, broker_s=0.001, agent_s=0.002)
    # up: remaining = 2 + 48 + 2 + 12450 = 12502 (2-byte varint) -> 12505 bytes on the wire
    up = 12505 * 8 / 1e6 + 0.05  # 0.10004 + 0.05
    # down: remaining = 2 + 48 + 2 + 950 = 1002 -> 1005 bytes
    down = 1005 * 8 / 2e6 + 0.05  # 0.00402 + 0.05
    assert p.bytes == 12505
    assert p.uplink_s == pytest.approx(up)
    assert p.downlink_s == pytest.approx(down)
    assert p.broker_s == pytest.approx(0.002)  # two hops
    assert p.queue_s == 0.0
    assert p.decode_s == pytest.approx(0.0025)  # worker 2 ms + device 0.5 ms
    total = 0.002 + 0.2 + 0.001 + up + 0.002 + 0.03 + down + 0.0025
    assert p.total_s == pytest.approx(total)
    assert p.total_s == pytest.approx(0.44156)
    d = p.to_dict()
    assert d["predicted_ms"] == pytest.approx(441.56)
    assert d["agent_ms"] == pytest.approx(2.0)
    assert d["uplink_ms"] == pytest.approx(150.04)
    assert {"split_id", "kind", "bytes", "predicted_ms", "head_ms", "uplink_ms", "queue_ms",
            "tail_ms", "downlink_ms"} <= set(d)


def test_loss_and_profile() -> None:
    link = LinkEstimate.from_profile(LinkProfile.parse("up=1mbit,down=2mbit,delay=50ms,"
                                                       "loss=1%,mss=1000"))
    # 12505 bytes = 13 segments of 1000; rto = max(200 ms, 2 * 100 ms) = 0.2 s
    assert link.expected_loss_delay_s(12505) == pytest.approx(13 * 0.01 * 0.2)
    p = predict(COSTS, link, broker_s=0.0)
    # the result: 1005 bytes = 2 segments
    assert p.uplink_s == pytest.approx(12505 * 8 / 1e6 + 0.05 + 0.026)
    assert p.downlink_s == pytest.approx(1005 * 8 / 2e6 + 0.05 + 2 * 0.01 * 0.2)


def test_jitter_leaves_the_median() -> None:
    jittery = LinkEstimate(up_bps=1e6, down_bps=2e6, delay_s=0.05, jitter_s=0.04)
    assert predict(COSTS, jittery).total_s == pytest.approx(predict(COSTS, LINK).total_s)


def test_edge_only_is_its_head() -> None:
    p = predict(SplitCosts("e", "edge_only", 0, 0, 0.5, 0, 0, 0), LINK, load_rps=100,
                agent_s=0.002)
    assert (p.uplink_s, p.bytes, p.broker_s) == (0.0, 0, 0.0)
    assert p.total_s == pytest.approx(0.502)  # agent + head


def test_md1_quantile() -> None:
    assert md1_wait_quantile(0.5, 1.0) == 0.0  # half the arrivals find it idle
    # for t < D the CDF is (1 - rho) e^{lambda t}: 0.4 e^{0.6 t} = 0.5 -> t = ln(1.25) / 0.6
    assert md1_wait_quantile(0.6, 1.0) == pytest.approx(math.log(1.25) / 0.6, rel=1e-6)
    assert md1_wait_quantile(0.6, 2.0) == pytest.approx(2 * math.log(1.25) / 0.6, rel=1e-6)
    assert md1_wait_quantile(1.0, 1.0) == math.inf
    # heavy traffic grows like 1 / (1 - rho)
    assert md1_wait_quantile(0.95, 1.0) > 4 * md1_wait_quantile(0.8, 1.0)


def test_queue_without_batching() -> None:
    costs = SplitCosts("s", "split", 100, 100, 0, 0, 0, tail_s=0.1)
    assert predict(costs, LINK, load_rps=4).queue_s == 0.0  # rho 0.4
    # 8 req/s x 0.1 s = rho 0.8; two workers halve it back to 0.4
    assert predict(costs, LINK, load_rps=8).queue_s == pytest.approx(
        md1_wait_quantile(0.8, 0.1))
    assert predict(costs, LINK, load_rps=8, workers=2).queue_s == 0.0
    assert predict(costs, LINK, load_rps=10).total_s == math.inf


def test_queue_with_batching() -> None:
    costs = SplitCosts("s", "split", 100, 100, 0, 0, 0, tail_s=0.1, batch_tail_s={4: 0.2})
    # 6 req/s: lambda T(1) = 0.6 < 1 -> batch 1, busy 0.6; median wait = T (u - .5) / u
    assert predict(costs, LINK, load_rps=6).queue_s == pytest.approx(0.1 * 0.1 / 0.6)
    # 20 req/s: T(b) = 0.1 + 0.1 (b - 1) / 3; b = 20 T(b) -> b = 4, T = 0.2, busy 1;
    # wait 0.2 * 0.5 / 1 = 0.1, plus its batch being 0.1 s slower than batch 1
    assert predict(costs, LINK, load_rps=20).queue_s == pytest.approx(0.1 + 0.1)
    # beyond max_batch 4 / T(4) = 20 req/s it cannot keep up
    assert predict(costs, LINK, load_rps=21, max_batch=4).queue_s == math.inf
    # above 1 / max_delay (500 req/s) the batcher holds for company: + max_delay / 2
    fast = SplitCosts("s", "split", 100, 100, 0, 0, 0, tail_s=1e-4, batch_tail_s={32: 1e-3})
    assert predict(fast, LINK, load_rps=1000).queue_s >= 0.001


def test_own_queue_on_the_uplink() -> None:
    big = SplitCosts("c", "cloud_only", 120_000, 100, 0, 0, 0, 0.01)
    alone = predict(big, LINK)
    # ~0.96 s serialization at 0.8 req/s: rho 0.77 -> the device queues behind itself
    busy = predict(big, LINK, device_rps=0.8)
    serial = mqtt_publish_bytes(48, 120_000) * 8 / 1e6
    assert busy.uplink_s - alone.uplink_s == pytest.approx(
        md1_wait_quantile(0.8 * serial, serial))
    assert busy.uplink_s > alone.uplink_s


def _pred(sid: str, total: float) -> Prediction:
    return Prediction(sid, "split", total, 0, 0, 0, 0, 0, 0, 0, 0)


def test_recommend() -> None:
    preds = [_pred("a", 0.3), _pred("b", 0.2), _pred("c", math.inf), _pred("d", 0.2)]
    rec = recommend(preds)
    assert rec is not None and rec.split_id == "b"  # ties: the first
    rec = recommend(preds, deadline_s=0.25)
    assert rec is not None and rec.split_id == "b"
    assert recommend(preds, deadline_s=0.1) is None
    assert recommend([_pred("c", math.inf)]) is None


def _profiles() -> tuple[dict[str, Any], dict[str, Any]]:
    edge = {"format": "splitinfer.profile/1", "side": "edge", "source_sha256": "abc",
            "splits": {
                "m-edge": {"kind": "edge_only", "head_ms": {"p50": 80.0}, "request_bytes": 0},
                "m-cut": {"kind": "split", "head_ms": {"p50": 20.0}, "encode_ms": {"p50": 0.5},
                          "request_bytes": 5000},
                "m-cloud": {"kind": "cloud_only", "head_ms": {"p50": 0.0},
                            "encode_ms": {"p50": 1.0}, "request_bytes": 50000}}}
    cloud = {"format": "splitinfer.profile/1", "side": "cloud", "source_sha256": "abc",
             "splits": {
                 "m-cut": {"kind": "split", "tail_ms": {"p50": 3.0}, "decode_ms": {"p50": 0.2},
                           "result_bytes": 300,
                           "batches": {"1": {"p50_ms": 3.0, "throughput_rps": 333},
                                       "4": {"p50_ms": 8.0, "throughput_rps": 500}}},
                 "m-cloud": {"kind": "cloud_only", "tail_ms": {"p50": 4.0},
                             "result_bytes": 300}}}
    return edge, cloud


def test_costs_from_profiles() -> None:
    edge, cloud = _profiles()
    costs = {c.split_id: c for c in costs_from_profiles(edge, cloud)}
    assert list(costs) == ["m-edge", "m-cut", "m-cloud"]
    assert costs["m-edge"].head_s == pytest.approx(0.08)
    cut = costs["m-cut"]
    assert (cut.request_bytes, cut.result_bytes) == (5000, 300)
    assert cut.head_s == pytest.approx(0.02) and cut.tail_s == pytest.approx(0.003)
    assert cut.cloud_decode_s == pytest.approx(0.0002)
    assert dict(cut.batch_tail_s) == pytest.approx({1: 0.003, 4: 0.008})
    assert costs["m-cloud"].encode_s == pytest.approx(0.001)


@pytest.mark.parametrize("change, message", [
    (lambda e, c: c.update(source_sha256="other"), "different models"),
    (lambda e, c: c.update(side="edge"), "expected 'cloud'"),
    (lambda e, c: c["splits"].pop("m-cut"), "cloud profile, split m-cut: missing"),
    (lambda e, c: e["splits"]["m-cut"].pop("request_bytes"), "request_bytes"),
    (lambda e, c: c["splits"]["m-cut"].update(tail_ms="x"), "tail_ms"),
    (lambda e, c: e.update(format="other/9"), "format"),
])
def test_bad_profiles(change: Any, message: str) -> None:
    edge, cloud = _profiles()
    change(edge, cloud)
    with pytest.raises(BadInputError, match=message):
        costs_from_profiles(edge, cloud)
