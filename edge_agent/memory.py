"""An in-process broker for unit tests: no sockets, no threads, one asyncio loop.

It does what the agent relies on — topic wildcards (``+``, ``#``), ``$share`` groups
(one member of a group gets each message), retained messages, last wills, outages —
and records every publish so a test can look at topics, payloads and MQTT 5 options::

    broker = MemoryBroker()
    agent = EdgeAgent(manifest=m, head=h, config=cfg, connector=broker.connect)
    ...
    broker.stop()   # every connection drops (wills fire), connects fail until start()
    broker.lose(1, "splitinfer/v1/req/#")   # the next such publish is acked, delivered to
                                            # nobody: a request handed to a hung replica

Integration tests use a real mosquitto instead; this is for logic, not for MQTT.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from edge_agent.transport import (
    NO_MATCHING_SUBSCRIBERS,
    IncomingMessage,
    LastWill,
    PublishOptions,
)
from splitinfer.costmodel import mqtt_publish_bytes
from splitinfer.errors import TransportError

__all__ = ["MemoryBroker", "MemoryTransport", "Published", "topic_matches"]


@dataclass(frozen=True)
class Published:
    client_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    options: PublishOptions | None


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching for ``+`` (one level) and ``#`` (the rest)."""
    want, got = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(got) or (level != "+" and level != got[i]):
            return False
    return len(want) == len(got)


def _split_share(pattern: str) -> tuple[str | None, str]:
    if pattern.startswith("$share/"):
        _, group, rest = pattern.split("/", 2)
        return group, rest
    return None, pattern


class MemoryTransport:
    """One client's session on a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, client_id: str, will: LastWill | None) -> None:
        self._broker = broker
        self.client_id = client_id
        self.will = will
        self.subscriptions: list[str] = []
        self._arrivals: asyncio.Queue[IncomingMessage | None] = asyncio.Queue()
        self.connected = True
        self._lost = False

    @property
    def protocol(self) -> str:
        return self._broker.protocol

    @property
    def max_packet_size(self) -> int | None:
        return self._broker.max_packet_size

    def _check(self, what: str) -> None:
        if not self.connected:
            raise TransportError(f"{what}: client {self.client_id!r} is not connected")

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      options: PublishOptions | None = None) -> int | None:
        self._check(f"publish to {topic}")
        await asyncio.sleep(0)  # a real publish yields to the loop too
        self._check(f"publish to {topic}")
        limit = self._broker.max_packet_size
        if limit is not None and mqtt_publish_bytes(topic, len(payload), qos=qos,
                                                    protocol=self.protocol) > limit:
            # a real broker discards it (MQTT 5 3.1.2-25) and may close the connection
            self._broker.oversized.append(Published(self.client_id, topic, bytes(payload),
                                                    qos, retain, options))
            return None
        matched = self._broker._route(Published(self.client_id, topic, bytes(payload), qos,
                                                retain, options if self.protocol == "5"
                                                else None))
        if self.protocol != "5" or qos == 0:
            return None
        return 0 if matched else NO_MATCHING_SUBSCRIBERS  # as mosquitto 2 answers

    async def subscribe(self, topic: str, *, qos: int = 1) -> None:
        self._check(f"subscribe to {topic}")
        self.subscriptions.append(topic)
        _, plain = _split_share(topic)
        for retained_topic, payload in self._broker.retained.items():
            if topic_matches(plain, retained_topic):
                self._deliver(IncomingMessage(retained_topic, payload))

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        while True:
            item = await self._arrivals.get()
            if item is None:
                if self._lost:
                    raise TransportError(f"client {self.client_id!r}: connection lost")
                return
            yield item

    async def close(self) -> None:
        if self.connected:
            self.connected = False
            self._broker._forget(self)
            self._arrivals.put_nowait(None)

    def _deliver(self, message: IncomingMessage) -> None:
        self._arrivals.put_nowait(message)

    def _drop(self) -> None:
        self.connected = False
        self._lost = True
        self._arrivals.put_nowait(None)


class MemoryBroker:
    """A broker in memory; ``connect`` is a :class:`~edge_agent.transport.Connector`."""

    def __init__(self, *, protocol: str = "5", max_packet_size: int | None = None) -> None:
        self.protocol = protocol
        # like a broker's Maximum Packet Size: bigger payloads are dropped (``oversized``)
        self.max_packet_size = max_packet_size
        self.oversized: list[Published] = []
        self.up = True
        self.clients: dict[str, MemoryTransport] = {}
        self.retained: dict[str, bytes] = {}
        self.published: list[Published] = []
        self.connects = 0
        self.lost: list[Published] = []  # publishes swallowed by lose()
        self._turn = itertools.count()
        self._lose: list[tuple[str, int]] = []  # (topic filter, publishes still to swallow)

    def lose(self, count: int = 1, pattern: str = "#") -> None:
        """Swallow the next ``count`` publishes whose topic matches ``pattern``: each is
        acknowledged as if a subscriber had it (PUBACK 0) and delivered to nobody, like a
        request handed to a hung replica or lost with a killed worker."""
        if count < 1:
            raise ValueError(f"lose: expected count >= 1, got {count}")
        self._lose.append((pattern, count))

    async def connect(self, *, client_id: str, will: LastWill | None) -> MemoryTransport:
        await asyncio.sleep(0)
        if not self.up:
            raise TransportError("memory broker is down")
        old = self.clients.get(client_id)
        if old is not None:  # MQTT: a second connection with the same id takes over
            self.drop(client_id)
        transport = MemoryTransport(self, client_id, will)
        self.clients[client_id] = transport
        self.connects += 1
        return transport

    def drop(self, client_id: str) -> None:
        """Cut one client off without a DISCONNECT: its last will is published."""
        transport = self.clients.pop(client_id, None)
        if transport is None:
            return
        transport._drop()
        if transport.will is not None:
            w = transport.will
            self._route(Published(client_id, w.topic, w.payload, w.qos, w.retain, None))

    def stop(self) -> None:
        """An outage: every connection drops, connects fail until :meth:`start`.

        Retained messages are lost too, as with a mosquitto without persistence.
        """
        self.up = False
        for client_id in list(self.clients):
            transport = self.clients.pop(client_id)
            transport._drop()
        self.retained.clear()

    def start(self) -> None:
        self.up = True

    def _forget(self, transport: MemoryTransport) -> None:
        if self.clients.get(transport.client_id) is transport:
            del self.clients[transport.client_id]

    def _route(self, message: Published) -> bool:
        """Deliver ``message``; True when some subscription matched it."""
        self.published.append(message)
        for i, (pattern, left) in enumerate(self._lose):
            if topic_matches(pattern, message.topic):
                if left > 1:
                    self._lose[i] = (pattern, left - 1)
                else:
                    del self._lose[i]
                self.lost.append(message)
                return True
        if message.retain:
            if message.payload:
                self.retained[message.topic] = message.payload
            else:
                self.retained.pop(message.topic, None)
        correlation = message.options.correlation if message.options else None
        incoming = IncomingMessage(message.topic, message.payload, correlation)
        groups: dict[str, list[MemoryTransport]] = {}
        matched = False
        for transport in list(self.clients.values()):
            for pattern in transport.subscriptions:
                group, plain = _split_share(pattern)
                if not topic_matches(plain, message.topic):
                    continue
                matched = True
                if group is None:
                    transport._deliver(incoming)
                else:
                    groups.setdefault(group, []).append(transport)
                break
        for members in groups.values():
            members[next(self._turn) % len(members)]._deliver(incoming)
        return matched
