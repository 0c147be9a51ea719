"""The one MQTT client: paho-mqtt 2.x driven by the asyncio loop through its public API.

Devices (``edge_agent.transport``), workers (``cloud_service.server``), the fleet's
simulated devices and the start-up checks all connect through :class:`MqttClient`. It
uses only what paho documents for an external event loop (paho's own
``examples/loop_asyncio.py``): ``socket()``, ``loop_read()``, ``loop_write()``,
``loop_misc()``, ``want_write()`` and the ``on_socket_open`` / ``on_socket_close`` /
``on_socket_register_write`` / ``on_socket_unregister_write`` callbacks; MQTT 5
properties are paho ``Properties`` (:class:`PackedProperties` is a subclass whose
``pack()`` returns bytes encoded here, for the three PUBLISH properties we send on every
request). ``tests/test_mqtt_paho_api.py`` fails loudly when any of that changes.

What it adds on top of paho:

* ``connect()`` with the 5 → 3.1.1 fall-back of ``protocol=auto`` (the MQTT 5 try gives
  up within :data:`splitinfer.mqtt.V5_CONNACK_TIMEOUT_S`, more on a slow link), TLS and
  credentials from :class:`~splitinfer.mqtt.BrokerConfig`, TCP_NODELAY, a last will,
  clean start / session expiry; failures raise :class:`~splitinfer.errors.TransportError`.
* ``publish()`` returns a future the PUBACK resolves with its MQTT 5 reason code (0, 16
  no matching subscribers, >= 0x80 refusals; None on QoS 0 and MQTT 3.1.1); no task per
  message. A lost connection fails every pending future.
* ``subscribe()`` surfaces SUBACK refusals (:class:`SubscribeRefused`).
* inbound messages go to ``on_message`` (the fast path) or a bounded inbox read with
  ``messages()``: while the inbox is full the socket is not read (TCP pushes back on
  the broker), so memory stays bounded.
* ``max_packet_size``: the smaller of the broker's CONNACK Maximum Packet Size and the
  URL's ``?max_packet=``.

Writes are coalesced: paho asks for a write (``on_socket_register_write``) and one
``call_soon`` callback per loop iteration writes everything queued meanwhile (the PUBACKs
and answers of a burst go out in one ``send``); only a full socket buffer registers a
writer. Reads: one ``loop_read()`` per readiness, repeated while it still produces
packets, except that a publish made while reading (a worker answering from
``on_message``) is written as soon as paho's callback returns, before the next read.
Keep-alive: one timer per event loop runs ``loop_misc()`` for all its clients.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from splitinfer.errors import TransportError
from splitinfer.mqtt import AUTH_HINT, V5_CONNACK_TIMEOUT_S, BrokerConfig

if TYPE_CHECKING:
    from paho.mqtt.properties import Properties

__all__ = ["MqttClient", "Message", "Will", "SubscribeRefused", "PackedProperties",
           "open_client", "publish_properties", "reason_value", "reason_text", "REASONS"]

log = logging.getLogger(__name__)

# MQTT 5 CONNACK reasons that mean "who you are is refused" (paho maps the 3.1.1 return
# codes 2, 4, 5 onto these too): client identifier not valid, bad user name or
# password, not authorized.
_AUTH_REFUSED = frozenset({0x85, 0x86, 0x87})
_MISC_INTERVAL_S = 1.0
_MAX_INFLIGHT = 65535
_READS_PER_READY = 64  # loop_read() calls per readiness while they yield packets
_PAHO_CALLBACKS = ("on_connect", "on_disconnect", "on_message", "on_publish", "on_subscribe",
                   "on_unsubscribe", "on_socket_open", "on_socket_close",
                   "on_socket_register_write", "on_socket_unregister_write")


@dataclass(frozen=True)
class Will:
    """What the broker publishes for us when the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class Message:
    """An inbound PUBLISH."""

    __slots__ = ("correlation", "payload", "qos", "response_topic", "retain", "topic")

    def __init__(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                 response_topic: str | None = None, correlation: bytes | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.response_topic = response_topic
        self.correlation = correlation

    def __repr__(self) -> str:
        return (f"Message(topic={self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, "
                f"retain={self.retain})")


class SubscribeRefused(TransportError):
    """The broker's SUBACK refused a subscription; ``reason`` is its code (>= 0x80)."""

    def __init__(self, message: str, *, topic: str, reason: int) -> None:
        super().__init__(message, topic=topic)
        self.reason = reason


REASONS = {
    0x10: "no matching subscribers",
    0x80: "unspecified error",
    0x83: "implementation specific error",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x95: "packet too large (mosquitto: a payload over its message_size_limit)",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9E: "shared subscriptions not supported",
}


def reason_text(code: int) -> str:
    """An MQTT 5 reason code as ``0x87 not authorized``."""
    return f"0x{code:02X} {REASONS.get(code, 'refused')}"


def reason_value(reason: Any) -> int:
    """paho's ReasonCode (or an int) as the plain reason byte."""
    try:
        return int(getattr(reason, "value", reason) or 0)
    except (TypeError, ValueError):
        return 0


def _properties_class() -> type[Properties]:
    from paho.mqtt.properties import Properties

    return Properties


_PACKED: Any = None


def _packed_class() -> Any:
    """:class:`PackedProperties`, defined on first use (paho is imported lazily)."""
    global _PACKED
    if _PACKED is not None:
        return _PACKED
    from paho.mqtt.packettypes import PacketTypes

    base = _properties_class()

    class _PackedProperties(base):  # type: ignore[misc,valid-type]
        """PUBLISH properties whose ``pack()`` returns bytes encoded by
        :func:`publish_properties`.

        paho builds a ``Properties`` in generic Python (~25 µs for our three, on every
        request and answer); these are trivial to encode (MQTT 5 §2.2.2). paho only
        calls ``pack()`` on PUBLISH properties (checked by tests/test_mqtt_paho_api.py);
        the values stay readable as attributes. The base ``__init__`` is not called: it
        builds tables only its own ``pack``/``unpack`` use.
        """

        __setattr__ = object.__setattr__  # our own attributes, not paho's checks

        def __init__(self, wire: bytes, values: dict[str, Any]) -> None:
            self.packetType = PacketTypes.PUBLISH
            self.wire = wire
            for name, value in values.items():
                setattr(self, name, value)

        def pack(self) -> bytes:
            return self.wire

        def __str__(self) -> str:
            return f"PackedProperties({len(self.wire)} bytes)"

    _PACKED = _PackedProperties
    return _PACKED


def PackedProperties(wire: bytes, values: dict[str, Any]) -> Any:
    return _packed_class()(wire, values)


def _prop(ident: int, value: bytes) -> bytes:
    return bytes((ident,)) + struct.pack("!H", len(value)) + value


def publish_properties(response_topic: str | None = None, correlation: bytes | None = None,
                       expiry_s: float | None = None) -> Any:
    """MQTT 5 PUBLISH properties (a paho ``Properties``): response topic, correlation
    data, message expiry (rounded up to whole seconds)."""
    values: dict[str, Any] = {}
    body = b""
    if response_topic is not None:
        values["ResponseTopic"] = response_topic
        body += _prop(0x08, response_topic.encode())
    if correlation:
        values["CorrelationData"] = correlation
        body += _prop(0x09, correlation)
    if expiry_s is not None and expiry_s > 0:
        expiry = max(1, int(expiry_s + 0.999))
        values["MessageExpiryInterval"] = expiry
        body += b"\x02" + struct.pack("!L", expiry)
    size, prefix = len(body), bytearray()  # the length as a variable byte integer
    while True:
        byte, size = size % 128, size // 128
        prefix.append(byte | (0x80 if size else 0))
        if not size:
            break
    return PackedProperties(bytes(prefix) + body, values)


class _Ticker:
    """One ``loop_misc()`` timer per event loop, for all its clients (keep-alive)."""

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ticker]] = \
        weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.clients: weakref.WeakSet[MqttClient] = weakref.WeakSet()
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def add(cls, loop: asyncio.AbstractEventLoop, client: MqttClient) -> None:
        ticker = cls._by_loop.get(loop)
        if ticker is None:
            ticker = cls._by_loop[loop] = cls(loop)
        ticker.clients.add(client)
        if ticker.handle is None:
            ticker.handle = loop.call_later(_MISC_INTERVAL_S, ticker.tick)

    def tick(self) -> None:
        for client in list(self.clients):
            client._misc()
        self.handle = (self.loop.call_later(_MISC_INTERVAL_S, self.tick)
                       if len(self.clients) and not self.loop.is_closed() else None)


class MqttClient:
    """One MQTT connection driven by the running loop (see the module docstring).

    One instance is one connection: after it is lost, make a new one (the callers'
    supervisors reconnect with backoff). Everything but :meth:`connect`'s socket set-up
    runs on the loop's thread.
    """

    def __init__(self, cfg: BrokerConfig, client_id: str, *, will: Any = None,
                 clean_start: bool = True, session_expiry_s: float | None = None,
                 keepalive_s: int | None = None, inbox_size: int = 10_000,
                 on_message: Callable[[Message], None] | None = None) -> None:
        if inbox_size < 1:
            raise ValueError(f"inbox_size {inbox_size}: expected >= 1")
        self.cfg = cfg
        self.client_id = client_id
        self.will = will
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s if keepalive_s is not None else cfg.keepalive
        self.inbox_size = inbox_size
        self.on_message = on_message
        self.protocol: str | None = None
        self.connack: Any = None  # the CONNACK's properties (MQTT 5), if any
        self.session_present = False
        self.dropped = 0  # inbound messages that could not be decoded
        self._paho: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._fd = -1
        self._reading = False
        self._writing = False
        self._flush_handle: asyncio.Handle | None = None  # a write waiting for its turn
        # a publish was queued while reading (an answer sent from on_message): it goes
        # out before the next packet is read, not after the whole read burst
        self._urgent = False
        self._packets = 0
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._subs: dict[int, asyncio.Future[Any]] = {}
        self._connack: asyncio.Future[int] | None = None
        self._inbox: collections.deque[Message] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost_exc: TransportError | None = None
        self._lost_event = asyncio.Event()
        self._connected = False

    # ---- state ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected and self._lost_exc is None

    @property
    def lost(self) -> asyncio.Event:
        """Set once the connection is gone (lost or closed)."""
        return self._lost_event

    @property
    def lost_reason(self) -> TransportError | None:
        return self._lost_exc

    async def wait_closed(self) -> None:
        await self._lost_event.wait()

    @property
    def max_packet_size(self) -> int | None:
        """The smaller of the CONNACK's Maximum Packet Size and the URL's ``max_packet``."""
        sizes = [s for s in (self.connack_property("MaximumPacketSize"),
                             self.cfg.max_packet) if isinstance(s, int) and s > 0]
        return min(sizes) if sizes else None

    def connack_property(self, name: str) -> Any:
        """A property of the broker's CONNACK (MQTT 5), e.g. ``"SharedSubscriptionAvailable"``;
        None when absent or on MQTT 3.1.1."""
        return getattr(self.connack, name, None) if self.connack is not None else None

    def identity(self) -> str:
        user = self.cfg.username
        return (f"client id {self.client_id!r}, username {user!r}" if user
                else f"client id {self.client_id!r}, no username")

    # ---- connect ----------------------------------------------------------------------

    async def connect(self, timeout_s: float = 10.0) -> str:
        """Connect; return the protocol (``"5"`` or ``"3.1.1"``). Raises TransportError."""
        if self._paho is not None:
            raise TransportError("MqttClient.connect: already used; make a new client")
        cfg = self.cfg
        attempts = ["5", "3.1.1"] if cfg.protocol == "auto" else [cfg.protocol]
        last: str = ""
        for protocol in attempts:
            probing = protocol == "5" and len(attempts) > 1
            try:
                await self._try(protocol, timeout_s, probing)
            except _Retry as exc:
                last = str(exc)
                log.debug("connect %s as MQTT %s failed: %s", cfg.url(), protocol, exc)
                self._reset()
                continue
            return protocol
        raise TransportError(f"cannot connect to broker {cfg.url()} as {self.client_id!r}: "
                             f"{last}")

    def _reset(self) -> None:
        self._close_socket()
        old = self._paho
        if old is not None:
            # A discarded attempt must not call back into this client: paho's __del__
            # closes its socket again and would report on_socket_close, failing the
            # connection made after it (seen with the 5 -> 3.1.1 fall-back on amqtt).
            for name in _PAHO_CALLBACKS:
                setattr(old, name, None)
        self._paho = None
        self._lost_exc = None
        self._lost_event = asyncio.Event()
        self._connack = None

    def _make_paho(self, protocol: str) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        kwargs: dict[str, Any] = {}
        if protocol == "5":
            kwargs["protocol"] = mqtt.MQTTv5
        else:
            kwargs.update(protocol=mqtt.MQTTv311, clean_session=self.clean_start)
        paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, **kwargs)
        paho.max_inflight_messages_set(_MAX_INFLIGHT)
        paho.max_queued_messages_set(0)
        if self.cfg.username:
            paho.username_pw_set(self.cfg.username, self.cfg.password)
        ctx = self.cfg.tls_context()
        if ctx is not None:
            paho.tls_set_context(ctx)
            if self.cfg.tls_insecure:
                paho.tls_insecure_set(True)
        if self.will is not None:
            w = self.will
            paho.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        paho.on_connect = self._on_connect
        paho.on_disconnect = self._on_disconnect
        paho.on_message = self._on_message
        paho.on_publish = self._on_publish
        paho.on_subscribe = self._on_suback
        paho.on_unsubscribe = self._on_suback
        paho.on_socket_open = self._on_socket_open
        paho.on_socket_close = self._on_socket_close
        paho.on_socket_register_write = self._on_register_write
        paho.on_socket_unregister_write = self._on_unregister_write
        return paho

    async def _try(self, protocol: str, timeout_s: float, probing: bool) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        paho = self._paho = self._make_paho(protocol)
        paho.connect_timeout = timeout_s
        self._connack = loop.create_future()
        kwargs: dict[str, Any] = {}
        if protocol == "5":
            from paho.mqtt.packettypes import PacketTypes

            kwargs["clean_start"] = self.clean_start
            if self.session_expiry_s is not None:
                props = _properties_class()(PacketTypes.CONNECT)
                props.SessionExpiryInterval = min(int(self.session_expiry_s + 0.999),
                                                  0xFFFFFFFE)
                kwargs["properties"] = props
        cfg = self.cfg
        start = time.monotonic()
        try:
            if not cfg.tls and _is_loopback(cfg.host):
                # A TCP connect to a loopback listener completes in the kernel: on the loop
                # it costs microseconds, not a thread (a fleet connects thousands).
                paho.connect(cfg.host, cfg.port, self.keepalive_s, **kwargs)
            else:
                await loop.run_in_executor(None, lambda: paho.connect(
                    cfg.host, cfg.port, self.keepalive_s, **kwargs))
        except (OSError, ValueError) as exc:
            self._reset()
            raise TransportError(f"cannot reach broker {cfg.url()}: {exc}") from exc
        took = time.monotonic() - start
        sock = paho.socket()
        if sock is None:
            self._reset()
            raise TransportError(f"cannot reach broker {cfg.url()}: no socket after connect")
        self._attach(sock)
        bound = min(timeout_s, max(V5_CONNACK_TIMEOUT_S, 3 * took)) if probing else timeout_s
        waiter = self._connack
        try:
            code = await asyncio.wait_for(asyncio.shield(waiter), bound)
        except asyncio.TimeoutError:
            if probing:
                raise _Retry(f"no CONNACK to MQTT 5 within {bound:g} s") from None
            self._reset()
            raise TransportError(f"no CONNACK from {cfg.url()} within {bound:g} s") from None
        except TransportError as exc:  # the socket closed before a CONNACK
            if probing:
                raise _Retry(str(exc)) from None
            self._reset()
            raise
        if code in _AUTH_REFUSED:
            self._reset()
            raise TransportError(f"broker {cfg.url()} refused {self.client_id!r} (user "
                                 f"{cfg.username or '(none)'!r}): CONNACK {reason_text(code)}; "
                                 f"{AUTH_HINT}")
        if code:
            if probing:
                raise _Retry(f"CONNACK refused MQTT 5 (0x{code:02X})")
            self._reset()
            raise TransportError(f"broker {cfg.url()} refused the connection of "
                                 f"{self.client_id!r} (CONNACK {reason_text(code)})")
        self.protocol = protocol
        self._connected = True
        _Ticker.add(loop, self)

    # ---- socket plumbing (paho's external-loop callbacks) ---------------------------------

    def _on_loop(self) -> bool:
        return threading.get_ident() == self._thread

    def _attach(self, sock: Any) -> None:
        if self._fd >= 0 or self._loop is None:
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)
        self._reading = True
        self._schedule_flush()

    def _on_socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if self._on_loop():
            self._attach(sock)
        # else: connect() runs in an executor; _try attaches once it returns

    def _on_socket_close(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        self._detach()
        self._fail(TransportError(f"the connection to {self.cfg.url()} closed"))

    def _on_register_write(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        if self._on_loop():
            self._schedule_flush()
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self._schedule_flush)

    def _on_unregister_write(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        if self._writing and self._fd >= 0 and self._loop is not None:
            self._loop.remove_writer(self._fd)
        self._writing = False

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None and self._fd >= 0:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._urgent = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()  # a no-op when it is the handle running this
            self._flush_handle = None
        paho = self._paho
        if paho is None or self._fd < 0:
            return
        try:
            rc = paho.loop_write()
        except Exception as exc:  # a broken pipe: the connection is gone
            self._lose(f"write failed: {exc}")
            return
        if rc and self._lost_exc is None and paho.socket() is None:
            self._lose(f"write failed (paho rc {rc})")
            return
        if paho.want_write() and self._fd >= 0 and not self._writing and self._loop:
            self._loop.add_writer(self._fd, self._flush)  # socket buffer full: wait
            self._writing = True

    def _readable(self) -> None:
        paho = self._paho
        if paho is None:
            return
        try:
            for _ in range(_READS_PER_READY):
                before = self._packets
                rc = paho.loop_read()
                if rc or self._packets == before or not self._reading or self._urgent:
                    break  # urgent: an answer waits to go out; the socket stays readable
        except Exception as exc:  # paho raises OSError & co. from a broken socket
            self._lose(f"read failed: {exc}")
            return
        if rc and self._lost_exc is None:
            self._lose(f"paho rc {rc}")
        elif self._urgent and self._flush_handle is not None:
            # Written here, outside paho's callbacks (a write from inside one could
            # complete a QoS 0 publish, whose on_publish takes paho's callback lock),
            # rather than at the loop's next turn after a further read.
            self._flush()

    def _misc(self) -> None:
        paho = self._paho
        if paho is None or self._lost_exc is not None:
            return
        if paho.loop_misc() and self._lost_exc is None:
            self._lose("keep-alive failed (no PINGRESP)")

    def _detach(self) -> None:
        loop, fd = self._loop, self._fd
        if fd >= 0 and loop is not None and not loop.is_closed():
            if self._reading:
                loop.remove_reader(fd)
            if self._writing:
                loop.remove_writer(fd)
        self._fd = -1
        self._reading = self._writing = False

    def _close_socket(self) -> None:
        self._detach()
        paho = self._paho
        sock = paho.socket() if paho is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _lose(self, why: str) -> None:
        self._close_socket()
        self._fail(TransportError(f"lost the connection to {self.cfg.url()}: {why}"))

    def _fail(self, exc: TransportError) -> None:
        if self._lost_exc is not None:
            return
        self._lost_exc = exc
        self._connected = False
        connack = self._connack
        if connack is not None and not connack.done():
            connack.set_exception(exc)
            connack.exception()  # retrieved: _try may have stopped waiting
        for futures in (self._acks, self._subs):
            pending = list(futures.values())
            futures.clear()
            for future in pending:
                if not future.done():
                    future.set_exception(exc)
        self._wake()
        self._lost_event.set()

    # ---- paho callbacks (on the loop's thread) -------------------------------------------

    def _on_connect(self, _client: Any, _userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self._packets += 1
        self.connack = properties
        self.session_present = bool(getattr(flags, "session_present", False))
        future = self._connack
        if future is not None and not future.done():
            future.set_result(reason_value(reason))

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any,
                       _properties: Any) -> None:
        self._packets += 1
        self._detach()
        self._fail(TransportError(f"disconnected from {self.cfg.url()}: {reason}"))

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason: Any,
                    _properties: Any) -> None:
        self._packets += 1
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reason_value(reason) if self.protocol == "5" else None)

    def _on_suback(self, _client: Any, _userdata: Any, mid: int, reasons: Any,
                   _properties: Any) -> None:
        self._packets += 1
        future = self._subs.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(list(reasons) if isinstance(reasons, (list, tuple))
                              else [reasons])

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._packets += 1
        try:
            props = message.properties
            response_topic = correlation = None
            if props is not None:
                response_topic = getattr(props, "ResponseTopic", None)
                correlation = getattr(props, "CorrelationData", None)
            msg = Message(message.topic, bytes(message.payload), message.qos,
                          bool(message.retain),
                          response_topic if isinstance(response_topic, str) else None,
                          bytes(correlation) if correlation else None)
        except Exception as exc:  # e.g. a topic that is not UTF-8: drop that one
            self.dropped += 1
            log.warning("unreadable message from %s dropped: %r", self.cfg.url(), exc)
            return
        handler = self.on_message
        if handler is not None:
            handler(msg)
            return
        self._inbox.append(msg)
        if len(self._inbox) >= self.inbox_size and self._reading and self._fd >= 0 \
                and self._loop is not None:
            self._loop.remove_reader(self._fd)  # full: TCP pushes back on the broker
            self._reading = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- the API ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation: bytes | None = None,
                expiry_s: float | None = None,
                properties: Any = None) -> asyncio.Future[int | None]:
        """Send now; a future resolved with the PUBACK's reason code (MQTT 5 QoS 1/2), or
        None (QoS 0, MQTT 3.1.1). Fails with TransportError if the connection goes first."""
        loop = self._loop
        paho = self._paho
        if loop is None or paho is None:
            raise TransportError(f"publish to {topic}: not connected", topic=topic)
        future: asyncio.Future[int | None] = loop.create_future()
        if self._lost_exc is not None:
            future.set_exception(TransportError(
                f"publish to {topic} via {self.cfg.url()} failed: {self._lost_exc}",
                topic=topic))
            return future
        if self.protocol == "5" and properties is None and (
                response_topic is not None or correlation or expiry_s):
            properties = publish_properties(response_topic, correlation, expiry_s)
        elif self.protocol != "5":
            properties = None
        info = paho.publish(topic, payload, qos, retain, properties)
        self._urgent = True
        if info.rc:
            future.set_exception(TransportError(
                f"publish to {topic} via {self.cfg.url()} failed (paho rc {info.rc})",
                topic=topic))
        elif qos == 0:
            future.set_result(None)
        else:
            self._acks[info.mid] = future
        return future

    async def subscribe(self, topic: str, qos: int = 1) -> int:
        """Subscribe; the granted QoS. A SUBACK failure raises :class:`SubscribeRefused`."""
        codes = await self._request(topic, "subscribe", self._paho_call("subscribe", topic,
                                                                          qos))
        code = reason_value(codes[0]) if codes else 0x80
        if code >= 0x80:
            raise SubscribeRefused(
                f"broker {self.cfg.url()} refused the subscription to {topic!r} for "
                f"{self.identity()} (SUBACK {reason_text(code)})", topic=topic, reason=code)
        return code

    def _paho_call(self, what: str, *args: Any) -> int:
        paho = self._paho
        if paho is None or self._lost_exc is not None:
            raise TransportError(f"{what} {args[0]!r} via {self.cfg.url()} failed: "
                                 f"{self._lost_exc or 'not connected'}", topic=args[0])
        rc, mid = getattr(paho, what)(*args)
        if rc:
            raise TransportError(f"{what} {args[0]!r} via {self.cfg.url()} failed (paho rc "
                                 f"{rc})", topic=args[0])
        return int(mid)

    async def _request(self, topic: str, what: str, mid: int) -> list[Any]:
        assert self._loop is not None
        future = self._subs[mid] = self._loop.create_future()
        try:
            return await future  # type: ignore[no-any-return]
        except TransportError as exc:
            raise TransportError(f"{what} {topic!r} via {self.cfg.url()} failed: {exc}",
                                 topic=topic) from exc

    async def unsubscribe(self, topic: str) -> None:
        await self._request(topic, "unsubscribe", self._paho_call("unsubscribe", topic))

    async def messages(self) -> AsyncGenerator[Message, None]:
        """Inbound messages (those ``on_message`` does not take); raises TransportError
        once the connection is lost and the inbox is empty."""
        inbox = self._inbox
        while True:
            while inbox:
                msg = inbox.popleft()
                if not self._reading and len(inbox) <= self.inbox_size // 2:
                    self._resume_reading()
                yield msg
            if self._lost_exc is not None:
                raise self._lost_exc
            assert self._loop is not None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def deliver_to(self, handler: Callable[[Message], None]) -> None:
        """From now on hand every inbound message to ``handler`` as it is read (the
        ``on_message`` fast path), what the inbox holds first; :meth:`messages` then
        waits only for the loss of the connection."""
        while self._inbox:
            handler(self._inbox.popleft())
        self.on_message = handler
        if not self._reading:
            self._resume_reading()

    def pending(self) -> int:
        """Messages waiting in the inbox."""
        return len(self._inbox)

    def _resume_reading(self) -> None:
        if self._fd >= 0 and self._loop is not None and self._lost_exc is None:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True

    async def disconnect(self, timeout_s: float = 5.0) -> None:
        """Send DISCONNECT (no last will) and close; never raises."""
        paho = self._paho
        if paho is None:
            return
        if self._lost_exc is None:
            try:
                paho.disconnect()
                self._flush()
                if self._lost_exc is None:
                    await asyncio.wait_for(self._lost_event.wait(), timeout_s)
            except Exception as exc:  # a broken socket may fail the DISCONNECT many ways
                log.debug("disconnect from %s: %r", self.cfg.url(), exc)
        self._close_socket()
        self._fail(TransportError(f"connection to {self.cfg.url()} closed by the client"))


async def open_client(cfg: BrokerConfig, client_id: str, *, timeout_s: float = 10.0,
                      **kwargs: Any) -> MqttClient:
    """A connected :class:`MqttClient` (``kwargs`` go to its constructor: ``will``,
    ``clean_start``, ``session_expiry_s``, ``keepalive_s``, ``inbox_size``,
    ``on_message``); ``client.protocol`` says what was negotiated. Raises TransportError."""
    client = MqttClient(cfg, client_id, **kwargs)
    await client.connect(timeout_s)
    return client


class _Retry(Exception):
    """The MQTT 5 try failed in a way the 3.1.1 one may not."""


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
