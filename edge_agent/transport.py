"""The agent's view of a broker connection, small enough to fake.

:class:`~edge_agent.client.EdgeAgent` never touches aiomqtt directly: it asks a
:class:`Connector` for a connected :class:`Transport` (again after every loss) and uses
four calls on it. :class:`MqttConnector` is the real one (``splitinfer.mqtt.connect``:
TCP_NODELAY, MQTT 5 with a 3.1.1 fall-back, TLS and credentials from the URL);
:mod:`edge_agent.memory` holds an in-process fake for unit tests.

A transport reports a lost connection by raising :class:`~splitinfer.errors.TransportError`
from ``publish``/``subscribe`` or from its ``messages()`` stream; it never reconnects by
itself (aiomqtt does not either) — the agent's supervisor does.

``publish`` returns the broker's reason code for a QoS 1/2 publish on MQTT 5 (its PUBACK),
None when there is none (QoS 0, MQTT 3.1.1, a fake). :data:`NO_MATCHING_SUBSCRIBERS` (16)
tells the agent that no worker subscribes to its request topic (mosquitto 2 sends it).

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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from splitinfer.errors import TransportError
from splitinfer.mqtt import BrokerConfig, connect, request_properties
from splitinfer.mqtt_client import reason_text  # the one table of MQTT 5 reasons

if TYPE_CHECKING:
    import aiomqtt

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
    """One connected session to a broker."""

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
    """A :class:`Transport` over one ``aiomqtt.Client``."""

    def __init__(self, client: aiomqtt.Client, protocol: str, url: str) -> None:
        self._client = client
        self._protocol = protocol
        self._url = url
        # aiomqtt warns past 10 unacknowledged publishes; an agent with requests in flight
        # is normal, not a concern.
        client.pending_calls_threshold = 100_000
        self._reasons: dict[int, int] = {}  # mid -> non-zero PUBACK reason, until read
        self._mids: dict[asyncio.Task[Any], int] = {}  # the publishing task -> its mid
        self._refusals_logged: set[tuple[str, int]] = set()
        self._hook_reason_codes(client)

    def _hook_reason_codes(self, client: aiomqtt.Client) -> None:
        """aiomqtt's publish returns nothing: keep paho's PUBACK reason code per message id.

        aiomqtt calls paho's ``publish`` synchronously inside our task, so the mid is
        recorded against that task; paho's ``on_publish`` (called before aiomqtt wakes the
        task) records a non-zero reason under the mid.
        """
        paho = client._client
        publish = paho.publish
        on_publish: Any = paho.on_publish  # aiomqtt's, always set
        reasons, mids = self._reasons, self._mids

        def tracked_publish(*args: Any, **kwargs: Any) -> Any:
            info = publish(*args, **kwargs)
            task = asyncio.current_task()
            if task is not None:
                mids[task] = info.mid
            return info

        def keep_reason(mqttc: Any, userdata: Any, mid: int, reason: Any,
                        properties: Any = None) -> None:
            value = int(getattr(reason, "value", reason) or 0)
            if value:
                reasons[mid] = value
            on_publish(mqttc, userdata, mid, reason, properties)

        paho.publish = tracked_publish  # type: ignore[method-assign]
        paho.on_publish = keep_reason

    @property
    def protocol(self) -> str:
        return self._protocol

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      options: PublishOptions | None = None) -> int | None:
        import aiomqtt

        props = None
        if options is not None and self._protocol == "5":
            props = request_properties(options.response_topic, options.correlation,
                                       options.expiry_s)
        task = asyncio.current_task()
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"publish to {topic} via {self._url} failed: {exc}",
                                 topic=topic) from exc
        finally:
            mid = self._mids.pop(task, None) if task is not None else None
            reason = self._reasons.pop(mid, None) if mid is not None else None
        if self._protocol != "5" or qos == 0:
            return None
        if reason is not None and reason >= 0x80:
            self._refused(topic, reason)
        return reason or 0

    async def subscribe(self, topic: str, *, qos: int = 1) -> None:
        import aiomqtt

        try:
            granted = await self._client.subscribe(topic, qos=qos)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"subscribe to {topic} via {self._url} failed: {exc}",
                                 topic=topic) from exc
        for code in granted:
            # MQTT 5 gives ReasonCodes, 3.1.1 gives ints; 0x80 and above is a refusal.
            value = code.value if hasattr(code, "value") else int(code)
            if value >= 0x80:
                hint = ("the broker's ACL does not let this identity read it: a device may "
                        "subscribe only to its own result topic, connected with username = "
                        "client id = its device id (docs/security.md)"
                        if value in (NOT_AUTHORIZED, 0x80) else "see docs/brokers.md")
                raise TransportError(f"broker {self._url} refused the subscription to "
                                     f"{topic!r} for {self._identity()} "
                                     f"(SUBACK {reason_text(value)}); {hint}", topic=topic)

    def _identity(self) -> str:
        paho = self._client._client
        raw = getattr(paho, "_client_id", b"")
        client_id = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        raw_user = getattr(paho, "_username", None)
        user = (raw_user.decode(errors="replace") if isinstance(raw_user, bytes)
                else raw_user)
        return f"client id {client_id!r}, username {user!r}" if user else (
            f"client id {client_id!r}, no username")

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
                    topic, self._identity(), reason_text(reason), hint)

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        import aiomqtt

        try:
            async for message in self._client.messages:
                yield IncomingMessage(topic=message.topic.value,
                                      payload=_as_bytes(message.payload),
                                      correlation=_correlation(message.properties))
        except aiomqtt.MqttError as exc:
            raise TransportError(f"lost the connection to {self._url}: {exc}") from exc
        raise TransportError(f"the message stream from {self._url} ended")

    async def close(self) -> None:
        try:
            await self._client.__aexit__(None, None, None)
        except Exception as exc:  # closing a broken connection may fail in many ways
            log.debug("closing the connection to %s: %s", self._url, exc)


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b"" if payload is None else str(payload).encode()


def _correlation(properties: Any) -> bytes | None:
    value = getattr(properties, "CorrelationData", None) if properties is not None else None
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None


class MqttConnector:
    """Connects through :func:`splitinfer.mqtt.connect`; remembers the protocol it got.

    Once the first connection has settled on MQTT 5 or 3.1.1, reconnects ask for that
    protocol directly, so a restart does not pay for a refused MQTT 5 attempt each time.
    One connector may serve many agents (each passes its own client id).
    """

    def __init__(self, broker: BrokerConfig | str, *, timeout_s: float = 10.0) -> None:
        self.config = broker if isinstance(broker, BrokerConfig) else BrokerConfig.from_url(broker)
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return self.config.url()

    async def __call__(self, *, client_id: str, will: LastWill | None) -> MqttTransport:
        import aiomqtt

        kwargs: dict[str, Any] = {"timeout": self.timeout_s}
        if will is not None:
            kwargs["will"] = aiomqtt.Will(will.topic, will.payload, qos=will.qos,
                                          retain=will.retain)
        client, protocol = await connect(self.config, client_id, **kwargs)
        if self.config.protocol == "auto":
            self.config = self.config.with_protocol(protocol)
        return MqttTransport(client, protocol, self.config.url())
