"""The fleet's cheapest device transport: MQTT 3.1.1, QoS 0/1, on an asyncio Protocol.

A simulated fleet spends its CPU on what a real device spends its own CPU on, all in one
process; with paho each message costs ~100 µs of pure Python (a packet read a byte at a
time, property and reason-code objects, locks), so at 1,000 requests/s the *simulator* would
take half a core for its MQTT clients alone and its event loop would lag. This transport
speaks the small part of MQTT 3.1.1 an edge agent uses (CONNECT with will and credentials,
SUBSCRIBE, PUBLISH and PUBACK at QoS 0/1, PINGREQ, DISCONNECT) straight from
``data_received``: one ``send`` per packet, no task or thread per message.

It sits *below* :class:`~edge_agent.EdgeAgent` (the :class:`~edge_agent.transport.Transport`
protocol), so envelopes, topics, deadlines, reconnects and re-publishing stay the agent's
own; the broker is the real one, and rejects what MQTT does not allow. MQTT 5, QoS 2 and
TLS are paho's (:mod:`simulators.fleet_transport` picks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from edge_agent.transport import IncomingMessage, LastWill, PublishOptions
from simulators.inbox import Inbox
from splitinfer.errors import TransportError
from splitinfer.mqtt import BrokerConfig

__all__ = ["LiteConnector", "LiteTransport", "encode_publish", "encode_connect"]

log = logging.getLogger(__name__)

# fixed-header packet types (high nibble)
CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"
_CONNACK_CODES = {1: "unacceptable protocol version", 2: "identifier rejected",
                  3: "server unavailable", 4: "bad user name or password",
                  5: "not authorized"}
_TICK_S = 1.0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> bytes:
    """A PUBLISH packet (``mid`` only used when ``qos`` > 0)."""
    var = _str(topic) + (mid.to_bytes(2, "big") if qos else b"")
    return bytes((0x30 | qos << 1 | int(retain),)) + _varint(len(var) + len(payload)) + \
        var + payload


def encode_connect(client_id: str, *, keepalive: int, will: LastWill | None = None,
                   username: str | None = None, password: str | None = None) -> bytes:
    """A CONNECT packet for MQTT 3.1.1 with a clean session."""
    flags = 0x02
    payload = _str(client_id)
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += _str(will.topic) + _str(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    var = _str("MQTT") + bytes((4, flags)) + keepalive.to_bytes(2, "big")
    return bytes((CONNECT << 4,)) + _varint(len(var) + len(payload)) + var + payload


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: LiteTransport) -> None:
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.owner._made(transport)  # type: ignore[arg-type]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self.owner._feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._fail(TransportError(f"lost the connection to {self.owner.url}"
                                        + (f": {exc}" if exc else "")))


class LiteTransport:
    """One MQTT 3.1.1 session (see the module docstring)."""

    protocol = "3.1.1"

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.url = url
        self._loop = loop
        self._io: asyncio.Transport | None = None
        self._buf = b""
        self._inbox = Inbox(loop)
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._next_mid = 0
        self._connack: asyncio.Future[int] = loop.create_future()
        self._lost: TransportError | None = None
        self.last_out = time.monotonic()
        self.ping_sent: float | None = None

    @property
    def closed(self) -> bool:
        return self._lost is not None

    # ---- wire -------------------------------------------------------------------------

    def _made(self, transport: asyncio.Transport) -> None:
        self._io = transport

    def _write(self, data: bytes) -> None:
        if self._io is None or self._lost is not None:
            raise TransportError(f"not connected to {self.url}: {self._lost}")
        self._io.write(data)
        self.last_out = time.monotonic()

    def _feed(self, data: bytes) -> None:
        if self._lost is not None:
            return  # bytes still arriving after close() or a protocol error
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        while n - pos >= 2:
            first = buf[pos]
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= n:
                    self._buf = buf[pos:]
                    return
                digit = buf[i]
                length += (digit & 0x7F) * mult
                i += 1
                if digit < 0x80:
                    break
                mult *= 128
                if mult > 128 ** 3:
                    self._protocol_error("malformed remaining length")
                    return
            end = i + length
            if end > n:
                break
            try:
                self._packet(first, buf, i, end)
            except (IndexError, UnicodeDecodeError) as exc:
                self._protocol_error(f"malformed packet type {first >> 4}: {exc}")
                return
            pos = end
        self._buf = buf[pos:] if pos < n else b""

    def _packet(self, first: int, buf: bytes, start: int, end: int) -> None:
        kind = first >> 4
        if kind == PUBLISH:
            qos = (first >> 1) & 3
            tlen = buf[start] << 8 | buf[start + 1]
            p = start + 2 + tlen
            topic = buf[start + 2:p].decode()
            if qos:
                self._write(b"\x40\x02" + buf[p:p + 2])  # PUBACK
                p += 2
            self._inbox.put(IncomingMessage(topic, buf[p:end]))
        elif kind in (PUBACK, SUBACK):
            mid = buf[start] << 8 | buf[start + 1]
            future = self._acks.pop(mid, None)
            if future is not None and not future.done():
                future.set_result(buf[start + 2:end])
        elif kind == PINGRESP:
            self.ping_sent = None
        elif kind == CONNACK:
            if not self._connack.done():
                self._connack.set_result(buf[start + 1])
        else:
            log.debug("%s: ignored packet type %d", self.url, kind)

    def _protocol_error(self, what: str) -> None:
        self._fail(TransportError(f"{self.url}: {what}"))
        if self._io is not None:
            self._io.abort()

    def _fail(self, exc: TransportError) -> None:
        if self._lost is not None:
            return
        self._lost = exc
        for future in self._acks.values():
            if not future.done():
                future.set_exception(exc)
        self._acks.clear()
        if not self._connack.done():
            self._connack.set_exception(exc)
        self._inbox.fail(exc)

    def _mid(self) -> int:
        for _ in range(65535):
            self._next_mid = self._next_mid % 65535 + 1
            if self._next_mid not in self._acks:
                return self._next_mid
        raise TransportError(f"{self.url}: 65535 packets in flight")

    def keepalive(self, interval: float, now: float) -> None:
        """Send PINGREQ when nothing went out for half the interval; a missing PINGRESP
        past a whole interval means the connection is dead."""
        if self._lost is not None:
            return
        if self.ping_sent is not None and now - self.ping_sent > interval:
            self._fail(TransportError(f"no PINGRESP from {self.url} within {interval:g} s"))
            if self._io is not None:
                self._io.abort()
        elif self.ping_sent is None and now - self.last_out >= interval / 2:
            self.ping_sent = now
            self._write(_PINGREQ)

    # ---- the Transport protocol ----------------------------------------------------------

    async def handshake(self, connect: bytes, timeout: float) -> None:
        self._write(connect)
        try:
            code = await asyncio.wait_for(asyncio.shield(self._connack), timeout)
        except asyncio.TimeoutError:
            self._fail(TransportError(f"no CONNACK from {self.url} within {timeout:g} s"))
            await self.close()
            raise self._lost from None  # type: ignore[misc]
        if code:
            await self.close()
            raise TransportError(f"broker {self.url} refused the connection: "
                                 f"{_CONNACK_CODES.get(code, code)}")

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      options: PublishOptions | None = None) -> None:
        if qos not in (0, 1):
            raise TransportError(f"QoS {qos} is not supported by the lite transport; use paho",
                                 topic=topic)
        mid = self._mid() if qos else 0
        try:
            self._write(encode_publish(topic, payload, qos, retain, mid))
        except TransportError as exc:
            raise TransportError(f"publish to {topic} via {self.url} failed: {exc}",
                                 topic=topic) from None
        if qos:
            future = self._acks[mid] = self._loop.create_future()
            try:
                await future
            except TransportError as exc:
                raise TransportError(f"publish to {topic} via {self.url} failed: {exc}",
                                     topic=topic) from None

    async def subscribe(self, topic: str, *, qos: int = 1) -> None:
        mid = self._mid()
        body = mid.to_bytes(2, "big") + _str(topic) + bytes((qos,))
        future = self._acks[mid] = self._loop.create_future()
        try:
            self._write(bytes((SUBSCRIBE << 4 | 0x02,)) + _varint(len(body)) + body)
            granted = await future
        except TransportError as exc:
            raise TransportError(f"subscribe to {topic} via {self.url} failed: {exc}",
                                 topic=topic) from None
        if not granted or granted[0] >= 0x80:
            raise TransportError(f"broker {self.url} refused the subscription to {topic}; "
                                 "check the broker's ACL", topic=topic)

    def messages(self) -> AsyncIterator[IncomingMessage]:
        return self._inbox.messages()

    async def close(self) -> None:
        io = self._io
        if self._lost is None and io is not None:
            io.write(_DISCONNECT)  # no will: the client left on purpose
        self._fail(TransportError(f"connection to {self.url} closed by the client"))
        if io is not None:
            io.close()


class LiteConnector:
    """A :class:`~edge_agent.transport.Connector` of :class:`LiteTransport` (plain TCP,
    MQTT 3.1.1). One keep-alive timer serves all its connections."""

    def __init__(self, broker: BrokerConfig | str, *, timeout_s: float = 10.0) -> None:
        self.config = broker if isinstance(broker, BrokerConfig) else BrokerConfig.from_url(broker)
        if self.config.tls or self.config.protocol == "5":
            raise TransportError("the lite transport speaks MQTT 3.1.1 over plain TCP only")
        self.timeout_s = timeout_s
        self._live: weakref.WeakSet[LiteTransport] = weakref.WeakSet()
        self._ticker: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:
        return self.config.url()

    async def __call__(self, *, client_id: str, will: LastWill | None) -> LiteTransport:
        loop = asyncio.get_running_loop()
        cfg = self.config
        transport = LiteTransport(self.url, loop)
        try:
            await asyncio.wait_for(loop.create_connection(
                lambda: _Protocol(transport), cfg.host, cfg.port), self.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise TransportError(f"cannot reach broker {self.url}: {exc or 'timed out'}") \
                from exc
        await transport.handshake(encode_connect(
            client_id, keepalive=cfg.keepalive, will=will, username=cfg.username,
            password=cfg.password), self.timeout_s)
        self._live.add(transport)
        if self._ticker is None:
            self._ticker = loop.call_later(_TICK_S, self._tick, loop)
        return transport

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        interval = float(self.config.keepalive)
        for transport in list(self._live):
            if not transport.closed:
                with contextlib.suppress(TransportError):  # its stream reports the loss
                    transport.keepalive(interval, now)
        self._ticker = loop.call_later(_TICK_S, self._tick, loop) if self._live else None
