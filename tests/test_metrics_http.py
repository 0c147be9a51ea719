"""The worker's /metrics, /healthz and /readyz, scraped over HTTP from a real Server."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_cloud_support import Requester, make_split, request_payload, running

from cloud_service.config import Config
from cloud_service.http import MetricsHTTP
from cloud_service.metrics import Metrics
from cloud_service.server import Server
from simulators.support.broker import MosquittoBroker
from splitinfer.topics import Topics

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_scrape_a_serving_worker(fresh_mosquitto: MosquittoBroker, tmp_path: Path,
                                 topic_prefix: str) -> None:
    split = make_split(tmp_path, "split-a", seed=1)
    cfg = Config(artifacts=tmp_path, broker=fresh_mosquitto.url, prefix=topic_prefix,
                 threads=1, metrics_interval_s=0, reconnect_min_s=0.05, reconnect_max_s=0.2)
    server = Server(cfg)
    http = MetricsHTTP(server.metrics.registry, lambda: server.ready)
    topics = Topics(topic_prefix)
    n = 5

    async def send() -> None:
        async with Requester(fresh_mosquitto.url, topics) as req:
            rids = []
            for i in range(n):
                rid, payload = request_payload(split, split.sample(seed=i))
                await req.send("tiny", "dev-1", payload)
                rids.append(rid)
            bad, payload = request_payload("no-such-split", split.sample())
            await req.send("tiny", "dev-1", payload)
            await req.wait_for([*rids, bad], timeout=20)

    with http:
        assert get(http.url + "/healthz")[0] == 200
        assert get(http.url + "/readyz")[0] == 503  # not connected yet
        assert get(http.url + "/nope")[0] == 404
        with running(server):
            assert get(http.url + "/readyz")[0] == 200
            asyncio.run(send())
            eventually(lambda: server.metrics.answered == n)
            status, text = get(http.url + "/metrics")
            assert status == 200
            got = samples(text)
            sid = split.split_id
            ns = "splitinfer_worker"
            assert got[(f"{ns}_received_total", ())] == n + 1
            assert got[(f"{ns}_answered_total", ())] == n
            assert got[(f"{ns}_split_requests_total", (("split", sid),))] == n
            assert got[(f"{ns}_split_requests_total", (("split", "_unknown"),))] == 1
            assert got[(f"{ns}_split_answered_total", (("split", sid),))] == n
            assert got[(f"{ns}_errors_total", (("code", "unknown_split"),))] == 1
            assert got[(f"{ns}_split_errors_total",
                        (("code", "unknown_split"), ("split", "_unknown")))] == 1
            assert got[(f"{ns}_request_latency_seconds_count", (("split", sid),))] == n
            assert got[(f"{ns}_request_latency_seconds_bucket",
                        (("le", "+Inf"), ("split", sid)))] == n
            assert got[(f"{ns}_queue_wait_seconds_count", (("split", sid),))] == n
            batches = got[(f"{ns}_batches_total", ())]
            assert 1 <= batches <= n
            assert got[(f"{ns}_tail_run_seconds_count", (("split", sid),))] == batches
            assert got[(f"{ns}_batch_size_samples_sum", (("split", sid),))] == n
            assert (f"{ns}_queue_depth", ()) in got
            fresh_mosquitto.stop()
            eventually(lambda: get(http.url + "/readyz")[0] == 503)
            assert get(http.url + "/healthz")[0] == 200
            fresh_mosquitto.start()
            eventually(lambda: get(http.url + "/readyz")[0] == 200, timeout=20)
        assert get(http.url + "/readyz")[0] == 503  # drained and gone


def test_each_worker_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.splits = frozenset({"s"})
    a.request("s")
    a.request("attacker-chosen")  # a label value never comes from the network
    text_a = samples(get_text(a))
    assert text_a[("splitinfer_worker_split_requests_total", (("split", "s"),))] == 1
    assert text_a[("splitinfer_worker_split_requests_total", (("split", "_unknown"),))] == 1
    assert not any("attacker" in str(k) for k in text_a)
    text_b = samples(get_text(b))
    assert ("splitinfer_worker_split_requests_total", (("split", "s"),)) not in text_b


def get_text(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()
