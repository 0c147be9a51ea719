"""A lean :class:`~edge_agent.transport.Transport` for fleets: paho driven by the event loop.

The edge agent's own :class:`~edge_agent.transport.MqttConnector` goes through aiomqtt,
which is right for one device but costs a simulated fleet more CPU per message than the
broker and the worker spend on it together: a task and an ``asyncio.wait`` per incoming
message, a thread hop (``call_soon_threadsafe``, a self-pipe write) and two ``epoll_ctl``
per outgoing packet, a keep-alive task per client. On a small machine that overhead, not
the system under test, would set the fleet's latency.

:class:`PahoConnector` keeps the same MQTT client library (paho: the same packets, QoS,
MQTT 5 properties, last will, keep-alive) and the same agent code (envelopes, topics,
deadlines, reconnects and re-publishing all stay in :class:`~edge_agent.EdgeAgent`); it
only drives paho's socket directly from the loop:

* writes go out at once from ``publish`` (paho's own non-threaded path); the loop's
  writer is registered only when the socket buffer is full;
* reads run paho's parser from a reader callback, over a buffered socket (one ``recv``
  per readiness, not paho's one per header byte), and hand messages to a deque that
  ``messages()`` drains without a task per message;
* PUBACK/SUBACK resolve futures keyed by message id; one timer per connector runs
  ``loop_misc`` (keep-alive) for all its clients;
* ``publish`` returns the PUBACK's MQTT 5 reason code as the agent's own transport does
  (16, :data:`~edge_agent.transport.NO_MATCHING_SUBSCRIBERS`: no worker subscribes), None
  on QoS 0 and MQTT 3.1.1.

Plain TCP only; a TLS broker URL falls back to the agent's own connector
(:func:`connector_for`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import weakref
from collections.abc import AsyncIterator
from typing import Any

from cloud_service.paho_io import BufferedSocket  # one recv per readiness, shared with the worker
from edge_agent.transport import (
    Connector,
    IncomingMessage,
    LastWill,
    MqttConnector,
    PublishOptions,
)
from simulators.inbox import Inbox
from splitinfer.errors import BadInputError, TransportError
from splitinfer.mqtt import BrokerConfig, request_properties

__all__ = ["PahoConnector", "PahoTransport", "connector_for", "pick_transport", "TRANSPORTS"]

log = logging.getLogger(__name__)

# auto: paho (aiomqtt for TLS); lite only when asked for
TRANSPORTS = ("auto", "lite", "paho", "aiomqtt")
_MISC_INTERVAL_S = 1.0


class PahoTransport:
    """One paho client whose socket the running loop drives (see the module docstring)."""

    def __init__(self, client: Any, protocol: str, url: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._protocol = protocol
        self._url = url
        self._loop = loop
        self._inbox = Inbox(loop)
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._connected: asyncio.Future[int] = loop.create_future()
        self._lost: BaseException | None = None
        self._fd = -1
        self._writing = False
        self._buffered: BufferedSocket | None = None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_ack
        client.on_subscribe = self._on_subscribe
        client.on_socket_close = self._on_socket_close

    @property
    def protocol(self) -> str:
        return self._protocol

    @property
    def closed(self) -> bool:
        return self._lost is not None

    # ---- socket plumbing --------------------------------------------------------------

    def attach(self) -> None:
        """Wrap the freshly connected socket and start reading it from the loop."""
        client = self._client
        raw = client.socket()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffered = BufferedSocket(raw)
        client._sock = self._buffered  # paho reads/writes through the buffer
        self._fd = raw.fileno()
        self._loop.add_reader(self._fd, self._readable)
        self.flush()

    def _readable(self) -> None:
        client, buffered = self._client, self._buffered
        try:
            while True:
                rc = client.loop_read()
                if rc or buffered is None or not buffered.pending() or client.socket() is None:
                    break
        except Exception as exc:  # paho raises OSError & co. from a broken socket
            self._fail(TransportError(f"lost the connection to {self._url}: {exc}"))
            return
        if rc:
            self._fail(TransportError(f"lost the connection to {self._url} (paho rc {rc})"))
            return
        self.flush()  # PUBACKs and the like that paho queued while reading

    def flush(self) -> None:
        client = self._client
        if not client.want_write() or client.socket() is None:
            return
        try:
            client.loop_write()
        except Exception as exc:
            self._fail(TransportError(f"lost the connection to {self._url}: {exc}"))
            return
        want = client.want_write() and client.socket() is not None
        if want and not self._writing:
            self._loop.add_writer(self._fd, self.flush)
            self._writing = True
        elif not want and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def misc(self) -> None:
        """Keep-alive: paho sends PINGREQ and notices a missing PINGRESP."""
        if self._lost is None and self._client.loop_misc():
            self._fail(TransportError(f"keep-alive to {self._url} failed"))
        else:
            self.flush()

    def _fail(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = exc
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
                self._writing = False
            self._fd = -1
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
            self._client._sock = None
        for future in self._acks.values():
            if not future.done():
                future.set_exception(self._lost)
        self._acks.clear()
        if not self._connected.done():
            self._connected.set_exception(self._lost)
        self._inbox.fail(self._lost)

    # ---- paho callbacks (all on the loop's thread) ----------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if not self._connected.done():
            self._connected.set_result(reason.value if hasattr(reason, "value") else int(reason))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._fail(TransportError(f"disconnected from {self._url}: {reason}"))

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._lost is None:
            self._fail(TransportError(f"the connection to {self._url} closed"))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        props = getattr(message, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        self._inbox.put(IncomingMessage(
            topic=message.topic, payload=message.payload,
            correlation=bytes(correlation) if isinstance(correlation, (bytes, bytearray))
            else None))

    def _on_ack(self, client: Any, userdata: Any, mid: int, reason: Any,
                properties: Any) -> None:
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reason)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        self._on_ack(client, userdata, mid, reasons, properties)

    # ---- the Transport protocol ----------------------------------------------------------

    async def wait_connected(self, timeout: float) -> None:
        try:
            code = await asyncio.wait_for(asyncio.shield(self._connected), timeout)
        except asyncio.TimeoutError:
            self._fail(TransportError(f"no CONNACK from {self._url} within {timeout:g} s"))
            raise self._lost from None  # type: ignore[misc]
        if code:
            self._fail(TransportError(f"broker {self._url} refused the connection ({code})"))
            raise self._lost  # type: ignore[misc]

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      options: PublishOptions | None = None) -> int | None:
        """Publish; as :class:`~edge_agent.transport.MqttTransport`: the broker's MQTT 5
        PUBACK reason code (0, or e.g. 16 "no matching subscribers"), None on QoS 0 or
        MQTT 3.1.1."""
        if self._lost is not None:
            raise TransportError(f"publish to {topic} via {self._url} failed: {self._lost}",
                                 topic=topic)
        props = None
        if options is not None and self._protocol == "5":
            props = request_properties(options.response_topic, options.correlation,
                                       options.expiry_s)
        info = self._client.publish(topic, payload, qos, retain, props)
        if info.rc:
            raise TransportError(f"publish to {topic} via {self._url} failed (paho rc "
                                 f"{info.rc})", topic=topic)
        self.flush()
        if qos == 0:
            return None
        reason: Any = 0
        if not info.is_published():
            future = self._acks.get(info.mid)
            if future is None:
                future = self._acks[info.mid] = self._loop.create_future()
            try:
                reason = await future
            except TransportError as exc:
                raise TransportError(f"publish to {topic} via {self._url} failed: {exc}",
                                     topic=topic) from exc
        if self._protocol != "5":
            return None
        return _reason_value(reason)

    async def subscribe(self, topic: str, *, qos: int = 1) -> None:
        if self._lost is not None:
            raise TransportError(f"subscribe to {topic} via {self._url} failed: {self._lost}",
                                 topic=topic)
        rc, mid = self._client.subscribe(topic, qos)
        if rc:
            raise TransportError(f"subscribe to {topic} via {self._url} failed (paho rc {rc})",
                                 topic=topic)
        future = self._acks[mid] = self._loop.create_future()
        self.flush()
        granted = await future
        for code in granted if isinstance(granted, (list, tuple)) else [granted]:
            value = code.value if hasattr(code, "value") else int(code)
            if value >= 0x80:
                raise TransportError(f"broker {self._url} refused the subscription to {topic} "
                                     f"({code}); check the broker's ACL", topic=topic)

    def messages(self) -> AsyncIterator[IncomingMessage]:
        return self._inbox.messages()

    async def close(self) -> None:
        if self._lost is not None:
            return
        try:
            self._client.disconnect()
            self.flush()
        except Exception as exc:  # a broken socket may fail the DISCONNECT in many ways
            log.debug("closing the connection to %s: %s", self._url, exc)
        self._fail(TransportError(f"connection to {self._url} closed by the client"))


def _reason_value(reason: Any) -> int:
    """paho's ReasonCode (or an int) as the plain MQTT 5 reason byte."""
    try:
        return int(getattr(reason, "value", reason) or 0)
    except (TypeError, ValueError):
        return 0


class _Unreachable(TransportError):
    """The TCP connect itself failed: no point trying another MQTT version."""


class PahoConnector:
    """A :class:`~edge_agent.transport.Connector` of :class:`PahoTransport` (plain TCP)."""

    def __init__(self, broker: BrokerConfig | str, *, timeout_s: float = 10.0) -> None:
        self.config = broker if isinstance(broker, BrokerConfig) else BrokerConfig.from_url(broker)
        if self.config.tls:
            raise TransportError("PahoConnector drives plain TCP only; use the agent's "
                                 "MqttConnector for TLS")
        self.timeout_s = timeout_s
        self._live: weakref.WeakSet[PahoTransport] = weakref.WeakSet()
        self._ticker: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:
        return self.config.url()

    async def __call__(self, *, client_id: str, will: LastWill | None) -> PahoTransport:
        attempts = ["5", "3.1.1"] if self.config.protocol == "auto" else [self.config.protocol]
        last: BaseException | None = None
        for protocol in attempts:
            try:
                transport = await self._connect(client_id, will, protocol)
            except _Unreachable:
                raise
            except TransportError as exc:  # refused or dropped: try the older protocol
                last = exc
                continue
            if self.config.protocol == "auto":
                self.config = self.config.with_protocol(protocol)
            return transport
        raise TransportError(f"cannot connect to broker {self.url} as {client_id!r}: {last}")

    async def _connect(self, client_id: str, will: LastWill | None,
                       protocol: str) -> PahoTransport:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.config
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"protocol": version}
        if version == mqtt.MQTTv311:
            kwargs["clean_session"] = True
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **kwargs)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        loop = asyncio.get_running_loop()
        transport = PahoTransport(client, protocol, self.url, loop)
        try:
            # A plain TCP connect to a local listener completes in the kernel (no accept
            # needed), so doing it on the loop costs microseconds, not a thread.
            client.connect(cfg.host, cfg.port, cfg.keepalive)
        except (OSError, ValueError) as exc:
            raise _Unreachable(f"cannot reach broker {self.url}: {exc}") from exc
        transport.attach()
        await transport.wait_connected(self.timeout_s)
        self._live.add(transport)
        if self._ticker is None:
            self._ticker = loop.call_later(_MISC_INTERVAL_S, self._tick, loop)
        return transport

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        for transport in list(self._live):
            if not transport.closed:
                transport.misc()
        self._ticker = loop.call_later(_MISC_INTERVAL_S, self._tick, loop) if self._live \
            else None


def pick_transport(transport: str, *, protocol: str, qos: int, tls: bool) -> str:
    """What ``transport`` (one of :data:`TRANSPORTS`) means for this broker and QoS."""
    lite_ok = protocol == "3.1.1" and qos in (0, 1) and not tls
    if transport == "auto":
        # paho (the maintained library) by default; the hand-written lite transport only
        # when asked for (a bigger fleet than paho's CPU cost allows on one machine).
        return "aiomqtt" if tls else "paho"
    if transport == "lite" and not lite_ok:
        raise BadInputError("the lite transport speaks MQTT 3.1.1 at QoS 0/1 over plain TCP; "
                            f"got MQTT {protocol}, QoS {qos}{', TLS' if tls else ''}: use "
                            "--transport paho")
    if transport == "paho" and tls:
        raise BadInputError("the paho fleet transport is plain TCP; use --transport aiomqtt "
                            "for TLS")
    return transport


def connector_for(url: str, transport: str, *, timeout_s: float = 10.0) -> Connector:
    """The fleet's connector for ``url``: ``lite``, ``paho`` or the agent's ``aiomqtt``."""
    from simulators.mqtt_lite import LiteConnector

    cfg = BrokerConfig.from_url(url)
    if transport == "lite":
        return LiteConnector(cfg, timeout_s=timeout_s)
    if transport == "paho":
        return PahoConnector(cfg, timeout_s=timeout_s)
    return MqttConnector(cfg, timeout_s=timeout_s)
