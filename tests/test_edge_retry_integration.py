"""No request lost when the worker is not there yet, or dies and comes back: a real mosquitto.

* MQTT 3.1.1 (no PUBACK reason): the worker starts only after the request was sent; the
  re-send on silence gets the request to it, within the deadline;
* MQTT 5: a worker answered, stopped, and a new one starts after the request was sent:
  "no matching subscribers" meanwhile is re-sent, not raised (a worker was seen);
* a ``splitinfer cloud serve`` subprocess killed with SIGKILL (or stopped with SIGTERM)
  under a steady stream of requests and restarted 2 s later: every request is answered,
  correctly, once.

The splits and the reference model come from test_edge_integration.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_edge_integration import (  # noqa: F401  (registry, splits: fixtures)
    agent_for,
    full_model,
    registry,
    splits,
    worker,
)

from cloud_service.registry import Registry
from edge_agent import EdgeAgent, InferenceResult
from simulators.support.broker import MosquittoBroker
from splitinfer.errors import NoSubscriberError
from splitter import zoo

pytestmark = pytest.mark.integration

Array = np.ndarray[Any, Any]
TOL = 1e-5


@pytest.fixture(scope="module")
def digits() -> Array:
    x, _ = zoo.digits_test_set()
    return x[:40]


def assert_answers(results: list[InferenceResult], x: Array) -> None:
    want = full_model(zoo.digits_cnn_path(), {"image": x})[0]
    got = np.concatenate([r.outputs["logits"] for r in results])
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= TOL


def test_worker_started_after_the_request_was_sent_mqtt311(
        mosquitto: MosquittoBroker, splits: Path, registry: Registry,  # noqa: F811
        digits: Array, topic_prefix: str) -> None:
    url = mosquitto.url + "?protocol=3.1.1"

    async def main() -> InferenceResult:
        async with agent_for(splits / "splits" / "fp32", url, topic_prefix,
                             device_id="retry-311", retry_s=0.3) as agent:
            call = asyncio.create_task(agent.infer({"image": digits[:1]}, timeout=20))
            await asyncio.sleep(0.8)
            assert not call.done()  # nobody there: the request reached no one
            with worker(url, topic_prefix, registry):
                result = await call
            assert agent.counters.retries >= 1 and agent.counters.duplicates == 0
            return result

    result = asyncio.run(main())
    assert result.attempts >= 2
    assert_answers([result], digits[:1])


def test_no_subscriber_is_resent_once_a_worker_was_seen(
        mosquitto: MosquittoBroker, splits: Path, registry: Registry,  # noqa: F811
        digits: Array, topic_prefix: str) -> None:
    url = mosquitto.url

    async def main() -> list[InferenceResult]:
        async with agent_for(splits / "splits" / "fp32", url, topic_prefix,
                             device_id="retry-5") as agent:
            assert agent.protocol == "5"
            with pytest.raises(NoSubscriberError):  # first use, no worker: fail fast
                await agent.infer({"image": digits[:1]}, timeout=20)
            with worker(url, topic_prefix, registry):
                first = await agent.infer({"image": digits[:1]}, timeout=20)
            # the worker left (clean stop); a request now reaches no subscriber
            call = asyncio.create_task(agent.infer({"image": digits[1:2]}, timeout=20))
            await asyncio.sleep(1.0)
            assert not call.done() and agent.counters.no_subscriber >= 2
            with worker(url, topic_prefix, registry):
                second = await call
            assert second.attempts >= 3 and agent.counters.duplicates == 0
            return [first, second]

    assert_answers(asyncio.run(main()), digits[:2])


class ServeProcess:
    """``splitinfer cloud serve`` as a subprocess that the test can kill and restart."""

    def __init__(self, url: str, prefix: str, artifacts: Path, log: Path) -> None:
        self.env = {**os.environ, "SPLITINFER_ARTIFACTS": str(artifacts),
                    "SPLITINFER_BROKER": url, "SPLITINFER_PREFIX": prefix,
                    "SPLITINFER_THREADS": "1", "SPLITINFER_METRICS_INTERVAL": "0"}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "splitinfer.cli", "cloud", "serve"], env=self.env,
                stdout=out, stderr=subprocess.STDOUT)

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.mark.parametrize("how", ["kill", "term"])
def test_worker_killed_and_restarted_loses_no_request(
        mosquitto: MosquittoBroker, splits: Path, digits: Array, topic_prefix: str,  # noqa: F811
        tmp_path: Path, how: str) -> None:
    """40 requests at ~10/s; the worker dies at the 10th (SIGKILL: what it held is lost;
    SIGTERM: it drains and leaves) and a new one starts 2 s later. Every request is
    answered, correctly, exactly once; some only after a re-send."""
    serve = ServeProcess(mosquitto.url, topic_prefix, splits / "splits" / "fp32",
                         tmp_path / "serve.log")

    async def main(agent: EdgeAgent) -> tuple[list[InferenceResult], dict[str, Any]]:
        async with agent:
            end = time.monotonic() + 60
            while True:  # until the worker has subscribed
                try:
                    await agent.infer({"image": digits[:1]}, timeout=5)
                    break
                except NoSubscriberError:
                    assert time.monotonic() < end, serve.log.read_text()
                    await asyncio.sleep(0.2)
            before = agent.counters.as_dict()
            calls: list[asyncio.Task[InferenceResult]] = []
            for i in range(len(digits)):
                calls.append(asyncio.create_task(
                    agent.infer({"image": digits[i:i + 1]}, timeout=30)))
                if i == 10:
                    await asyncio.to_thread(
                        serve.signal, signal.SIGKILL if how == "kill" else signal.SIGTERM)
                    asyncio.get_running_loop().call_later(2.0, serve.start)
                await asyncio.sleep(0.1)
            return await asyncio.gather(*calls), before

    agent = agent_for(splits / "splits" / "fp32", mosquitto.url, topic_prefix,
                      device_id=f"retry-{how}", worker_grace_s=30.0)
    serve.start()
    try:
        results, before = asyncio.run(main(agent))
    finally:
        serve.close()
    assert serve.starts == 2
    assert len(results) == len(digits) and len({r.request_id for r in results}) == len(digits)
    assert_answers(results, digits)
    assert max(r.attempts for r in results) >= 2  # some went out again
    c = {k: v - before[k] for k, v in agent.counters.as_dict().items() if k != "errors"}
    assert c["published"] == len(digits) + c["retries"] + c["republished"]
    assert c["duplicates"] == 0 or c["retries"] > 0  # only a re-sent request has two answers
    assert agent.counters.errors == before["errors"]  # no call failed in the stream
