"""The agent's view of a broker connection, small enough to fake.

:class:`~edge_agent.client.EdgeAgent` never speaks MQTT itself: it asks a
:class:`Connector` for a connected :class:`Transport` (again after every loss) and uses
four calls on it. :class:`MqttConnector` is the real one, over the project's one MQTT
client, :class:`splitinfer.mqtt_client.MqttClient` (paho driven by the event loop:
TCP_NODELAY, MQTT 5 with a 3.1.1 fall-back, TLS and credentials from the URL, a last
will); :mod:`edge_agent.memory` holds an in-process fake for unit tests. The simulated
fleet connects its thousand devices through the same connector.

A transport reports a lost connection by raising :class:`~splitinfer.errors.TransportError`
from ``publish``/``subscribe`` or from its ``messages()`` stream; it never reconnects by
itself — the agent's supervisor does, with backoff.

``publish`` returns the broker's reason code for a QoS 1/2 publish on MQTT 5 (its PUBACK),
None when there is none (QoS 0, MQTT 3.1.1, a fake). :data:`NO_MATCHING_SUBSCRIBERS` (16)
tells the agent that no worker subscribes to its request topic (mosquitto 2 sends it).

A transport may also expose ``max_packet_size`` (the real one does: the smaller of the
broker's CONNACK Maximum Packet Size and the URL's ``?max_packet=``, None when neither is
set); the agent sends payloads that would not fit as chunks (:mod:`splitinfer.chunks`).

Refusals. A broker that enforces its ACL at SUBSCRIBE time (mosquitto with the
dynamic-security plugin, as ``splitinfer broker config`` sets it up; EMQX; AWS IoT Core)
answers a forbidden SUBSCRIBE with a failure code in its SUBACK (0x87 *not authorized*):
``subscribe`` raises :class:`~splitinfer.errors.TransportError` naming the topic, the
client id and the username, so a device with the wrong identity fails at start-up. A
refused PUBLISH (MQTT 5 PUBACK 0x87, or 0x95 for a payload over the broker's limit)
is logged once per topic and code, with the same names, and its reason code returned.
Brokers that grant every SUBSCRIBE and filter deliveries instead (mosquitto's plain
``acl_file``, MQTT 3.1.1 brokers that give no reason codes) leave nothing to detect: no
probe can tell "denied" from "no answer yet" (a device may not publish on its own result
topic), so the agent gives no ACL hint there; requests then end in ``deadline_exceeded``
(see docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from splitinfer.errors import TransportError
from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import (  # the one MQTT client, and its table of reasons
    Message,
    MqttClient,
    SubscribeRefused,
    Will,
    open_client,
    reason_text,
)

__all__ = [
    "PublishOptions",
    "IncomingMessage",
    "LastWill",
    "Transport",
    "Connector",
    "MqttTransport",
    "MqttConnector",
    "NO_MATCHING_SUBSCRIBERS",
    "NOT_AUTHORIZED",
    "reason_text",
]

log = logging.getLogger(__name__)
# MQTT 5 PUBACK/PUBREC reason code: accepted, but no subscription matches the topic.
NO_MATCHING_SUBSCRIBERS = 16
NOT_AUTHORIZED = 0x87


@dataclass(frozen=True)
class PublishOptions:
    """MQTT 5 request properties; a 3.1.1 transport drops them (the envelope has them too)."""

    response_topic: str
    correlation: bytes
    expiry_s: float | None = None


@dataclass(frozen=True)
class IncomingMessage:
    topic: str
    payload: bytes
    correlation: bytes | None = None


@dataclass(frozen=True)
class LastWill:
    """What the broker publishes for us when the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Transport(Protocol):
    """One connected session to a broker.

    Optional fast paths, used where a transport has them (:class:`MqttTransport` does):
    ``publish_nowait`` (publish now, a future for the PUBACK's reason) and ``deliver_to``
    with ``wait_lost`` (messages handed to a callback as they are read).
    """

    @property
    def protocol(self) -> str:
        """``"5"`` or ``"3.1.1"``: what was negotiated."""
        ...

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      options: PublishOptions | None = None) -> int | None:
        """Publish; the broker's MQTT 5 reason code once acknowledged, None if it gave none."""
        ...

    async def subscribe(self, topic: str, *, qos: int = 1) -> None: ...

    def messages(self) -> AsyncIterator[IncomingMessage]:
        """Incoming messages; raises TransportError when the connection is lost."""
        ...

    async def close(self) -> None:
        """Disconnect cleanly (no last will); never raises."""
        ...


class Connector(Protocol):
    async def __call__(self, *, client_id: str, will: LastWill | None) -> Transport:
        """A connected transport, or TransportError."""
        ...


class MqttTransport:
    """A :class:`Transport` over one connected :class:`~splitinfer.mqtt_client.MqttClient`.

    The client does the MQTT (PUBACK futures with their reason codes, SUBACK refusals, the
    bounded inbox, keep-alive); this adds what the agent needs on top: refusals that name
    the topic and the identity, and :class:`IncomingMessage` for its dispatcher.
    """

    def __init__(self, mqtt: MqttClient) -> None:
        if mqtt.protocol is None:
            raise TransportError(f"MqttTransport needs a connected client ({mqtt.client_id!r} "
                                 "has not connected)")
        self._mqtt = mqtt
        self._protocol: str = mqtt.protocol
        self._url = mqtt.cfg.url()
        self._refusals_logged: set[tuple[str, int]] = set()

    @property
    def protocol(self) -> str:
        return self._protocol

    @property
    def max_packet_size(self) -> int | None:
        """The largest packet the broker takes (see the module docstring); None: no limit
        known, the agent sends every payload whole."""
        return self._mqtt.max_packet_size

    @property
    def client_id(self) -> str:
        return self._mqtt.client_id

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      options: PublishOptions | None = None) -> int | None:
        try:
            if options is None:
                reason = await self._mqtt.publish(topic, payload, qos=qos, retain=retain)
            else:
                reason = await self._mqtt.publish(
                    topic, payload, qos=qos, retain=retain,
                    response_topic=options.response_topic, correlation=options.correlation,
                    expiry_s=options.expiry_s)
        except TransportError as exc:
            raise TransportError(f"publish to {topic} via {self._url} failed: {exc}",
                                 topic=topic) from exc
        if reason is not None and reason >= 0x80:
            self._refused(topic, reason)
        return reason

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 1,
                       options: PublishOptions | None = None) -> asyncio.Future[int | None]:
        """:meth:`publish` without a task or a loop turn: written at once; the future
        resolves with the PUBACK's reason (refusals logged as there), or fails with
        TransportError. Raises TransportError when not connected."""
        if options is None:
            acked = self._mqtt.publish(topic, payload, qos=qos)
        else:
            acked = self._mqtt.publish(topic, payload, qos=qos,
                                       response_topic=options.response_topic,
                                       correlation=options.correlation,
                                       expiry_s=options.expiry_s)
        acked.add_done_callback(lambda fut: self._checked(topic, fut))
        return acked

    def _checked(self, topic: str, acked: asyncio.Future[int | None]) -> None:
        if acked.cancelled() or acked.exception() is not None:
            return
        reason = acked.result()
        if reason is not None and reason >= 0x80:
            self._refused(topic, reason)

    def deliver_to(self, handler: Callable[[IncomingMessage], None]) -> None:
        """Hand every incoming message to ``handler`` as it is read (what the inbox
        holds first), instead of through :meth:`messages`: no task, no loop turn. The
        handler must not block; an exception it raises is logged and the message dropped.
        """
        def deliver(message: Message) -> None:
            try:
                handler(IncomingMessage(message.topic, message.payload, message.correlation))
            except Exception:
                log.exception("handling a message on %s failed; dropped", message.topic)

        self._mqtt.deliver_to(deliver)

    async def wait_lost(self) -> TransportError:
        """Return (not raise) the connection's loss, once it happens."""
        await self._mqtt.lost.wait()
        return self._mqtt.lost_reason or TransportError(f"the connection to {self._url} "
                                                        "was lost")

    async def subscribe(self, topic: str, *, qos: int = 1) -> None:
        try:
            await self._mqtt.subscribe(topic, qos)
        except SubscribeRefused as exc:
            hint = ("the broker's ACL does not let this identity read it: a device may "
                    "subscribe only to its own result topic, connected with username = "
                    "client id = its device id (docs/security.md)"
                    if exc.reason in (NOT_AUTHORIZED, 0x80) else "see docs/brokers.md")
            raise TransportError(f"broker {self._url} refused the subscription to "
                                 f"{topic!r} for {self._mqtt.identity()} "
                                 f"(SUBACK {reason_text(exc.reason)}); {hint}",
                                 topic=topic) from exc
        except TransportError as exc:
            raise TransportError(f"subscribe to {topic} via {self._url} failed: {exc}",
                                 topic=topic) from exc

    def _refused(self, topic: str, reason: int) -> None:
        """A PUBACK refusal: logged once per (topic, code), naming the identity."""
        key = (topic, reason)
        if key in self._refusals_logged:
            return
        if len(self._refusals_logged) >= 256:  # bounded: a few topics per device
            self._refusals_logged.clear()
        self._refusals_logged.add(key)
        hint = ("the broker's ACL does not let this identity publish there: a device may "
                "publish only its own request topics (…/req/<model>/<its device id>) and "
                "presence, connected with username = client id = its device id "
                "(docs/security.md)" if reason == NOT_AUTHORIZED else
                "the broker refused the message (docs/brokers.md: limits)")
        log.warning("broker %s refused a publish to %r for %s (PUBACK %s); %s", self._url,
                    topic, self._mqtt.identity(), reason_text(reason), hint)

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        """The client's inbox as :class:`IncomingMessage`; its TransportError on a loss
        (after what arrived before it)."""
        async for message in self._mqtt.messages():
            yield IncomingMessage(message.topic, message.payload, message.correlation)
        raise TransportError(f"the message stream from {self._url} ended")

    async def close(self) -> None:
        try:
            await self._mqtt.disconnect()
        except Exception as exc:  # disconnect() does not raise; a close must not either
            log.debug("closing the connection to %s: %s", self._url, exc)


class MqttConnector:
    """Connects through :func:`splitinfer.mqtt_client.open_client`; remembers the protocol.

    Once the first connection has settled on MQTT 5 or 3.1.1, reconnects ask for that
    protocol directly, so a restart does not pay for a refused MQTT 5 attempt each time.
    One connector may serve many agents (each passes its own client id): the simulated
    fleet connects all its devices through one per broker URL.
    """

    def __init__(self, broker: BrokerConfig | str, *, timeout_s: float = 10.0) -> None:
        self.config = broker if isinstance(broker, BrokerConfig) else BrokerConfig.from_url(broker)
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return self.config.url()

    async def __call__(self, *, client_id: str, will: LastWill | None) -> MqttTransport:
        mqtt_will = (Will(will.topic, will.payload, qos=will.qos, retain=will.retain)
                     if will is not None else None)
        client = await open_client(self.config, client_id, timeout_s=self.timeout_s,
                                   will=mqtt_will)
        if self.config.protocol == "auto" and client.protocol is not None:
            self.config = self.config.with_protocol(client.protocol)
        return MqttTransport(client)
