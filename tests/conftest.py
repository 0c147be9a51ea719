"""Shared fixtures: real brokers on free loopback ports, per-test topic prefixes.

mosquitto (latency-tuned, and stock) and amqtt are always there; ``nats-server`` and
RabbitMQ (the broker matrix, tests/test_brokers.py) are skipped with the reason where the
machine lacks them. Never a system broker, never a public one.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator

import pytest

from simulators.support.broker import (
    EmbeddedBroker,
    MosquittoBroker,
    NatsBroker,
    RabbitMQBroker,
    mosquitto_binary,
    nats_binary,
    rabbitmq_binary,
)
from splitinfer.errors import StartupError


@pytest.fixture(autouse=True)
def _collector_as_it_was() -> Iterator[None]:
    """A test that runs ``cloud serve`` / ``edge serve`` in this process has them tune its
    collector (splitinfer.gctune: freeze, higher threshold); the next test gets the
    collector back as it was."""
    thresholds = gc.get_threshold()
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
    if gc.get_threshold() != thresholds:
        gc.set_threshold(*thresholds)


def _mosquitto(*, tuned: bool = True) -> Iterator[MosquittoBroker]:
    if not mosquitto_binary():
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does)")
    broker = MosquittoBroker(tuned=tuned)
    broker.start()
    yield broker
    broker.close()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoBroker]:
    """A private, latency-tuned mosquitto for the whole session (never a public broker)."""
    yield from _mosquitto()


@pytest.fixture()
def fresh_mosquitto() -> Iterator[MosquittoBroker]:
    """A mosquitto of the test's own, for tests that stop or restart it."""
    yield from _mosquitto()


@pytest.fixture()
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """amqtt in-process: MQTT 3.1.1 only, as the demo uses without mosquitto.

    One per test: amqtt leaves the server side of closed connections to the garbage
    collector, and a session-wide broker let them be collected inside a later, unrelated
    test (a ResourceWarning there, which the suite turns into an error: seen in CI in
    test_edge_unit). Stopping it at the test's end drains and collects them with warnings
    off (EmbeddedBroker._drain)."""
    broker = EmbeddedBroker()
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def stock_mosquitto() -> Iterator[MosquittoBroker]:
    """mosquitto with its stock settings (no set_tcp_nodelay): the ~40 ms QoS1 stall."""
    yield from _mosquitto(tuned=False)


@pytest.fixture(scope="session")
def nats_broker() -> Iterator[NatsBroker]:
    """nats-server of our own: MQTT gateway + JetStream, own config and store directory."""
    if not nats_binary():
        pytest.skip("nats-server is not installed (apt-get install -y nats-server)")
    broker = NatsBroker()
    try:
        broker.start()
    except StartupError as exc:
        broker.close()
        pytest.skip(f"nats-server did not start: {exc}")
    yield broker
    broker.close()


_rabbitmq: RabbitMQBroker | None = None


def launch_rabbitmq() -> RabbitMQBroker | None:
    """Start booting our own RabbitMQ node (~15 s) without waiting; None without RabbitMQ.
    The broker matrix calls it early so the boot overlaps the other brokers' tests."""
    global _rabbitmq
    if _rabbitmq is None and rabbitmq_binary():
        try:
            _rabbitmq = RabbitMQBroker()
            _rabbitmq.launch()
        except StartupError:
            _rabbitmq = None
    return _rabbitmq


@pytest.fixture(scope="session")
def rabbitmq_broker() -> Iterator[RabbitMQBroker]:
    """A RabbitMQ node of our own with the MQTT plugin (own node name, cookie, epmd and
    ports: a system RabbitMQ stays untouched)."""
    if not rabbitmq_binary():
        pytest.skip("RabbitMQ is not installed (apt-get install -y rabbitmq-server); see "
                    "docs/brokers.md for running the matrix against one")
    broker = launch_rabbitmq()
    if broker is None:
        pytest.skip("RabbitMQ could not be launched (no epmd?); see docs/brokers.md")
    try:
        broker.wait()
    except StartupError as exc:
        broker.close()
        pytest.skip(f"our RabbitMQ node did not start: {exc}")
    yield broker
    broker.close()


@pytest.fixture()
def topic_prefix() -> str:
    """A unique topic prefix so tests sharing one broker never see each other's traffic."""
    return f"t{uuid.uuid4().hex[:12]}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A RabbitMQ launched early but never used (tests deselected) still goes."""
    if _rabbitmq is not None:
        _rabbitmq.close()
