"""Shared fixtures: a real mosquitto on a free loopback port, per-test topic prefixes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from simulators.broker import EmbeddedBroker, MosquittoBroker, mosquitto_binary


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoBroker]:
    """A private, latency-tuned mosquitto for the whole session (never a public broker)."""
    if not mosquitto_binary():
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does)")
    broker = MosquittoBroker()
    broker.start()
    yield broker
    broker.close()


@pytest.fixture()
def fresh_mosquitto() -> Iterator[MosquittoBroker]:
    """A mosquitto of the test's own, for tests that stop or restart it."""
    broker = MosquittoBroker()
    broker.start()
    yield broker
    broker.close()


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """amqtt in-process: MQTT 3.1.1 only, as the demo uses without mosquitto."""
    broker = EmbeddedBroker()
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture()
def topic_prefix() -> str:
    """A unique topic prefix so tests sharing one broker never see each other's traffic."""
    return f"t{uuid.uuid4().hex[:12]}"
