"""The MQTT binding of the contract: broker URLs, TLS, credentials, protocol choice.

Both the edge agent and the cloud workers connect through :func:`connect`, so they agree
on TCP_NODELAY (a QoS1 round trip otherwise stalls ~40 ms on Nagle + delayed ACK), on
MQTT 5 with a fall-back to 3.1.1, and on TLS. It wraps aiomqtt, which drives paho's socket
from the asyncio loop: thousands of connections in one process, no thread each.

Needs ``paho-mqtt`` and ``aiomqtt`` (the ``edge`` and ``cloud`` extras); imported lazily
so that the rest of the contract stays numpy + msgpack.

URL forms::

    mqtt://host:1883                 plain TCP (default port 1883)
    mqtts://host:8883                TLS (default port 8883), system CAs unless ca= given
    mqtt://user:secret@host?protocol=3.1.1
    mqtts://host?ca=/etc/ca.pem&cert=/etc/dev.pem&key=/etc/dev.key   per-device client cert
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from splitinfer.errors import BadInputError, TransportError

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["BrokerConfig", "connect", "connack_property", "request_properties",
           "result_properties", "PROTOCOLS", "V5_CONNACK_TIMEOUT_S"]

log = logging.getLogger(__name__)
PROTOCOLS = ("auto", "5", "3.1.1")
_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    protocol: str = "auto"
    keepalive: int = 30
    # The largest packet to send (``?max_packet=128k``, e.g. AWS IoT Core); None: only
    # what the broker's CONNACK says (MQTT 5 Maximum Packet Size) limits it.
    max_packet: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise BadInputError(f"MQTT protocol {self.protocol!r}: expected one of {PROTOCOLS}")
        if not 0 < self.port < 65536:
            raise BadInputError(f"broker port {self.port}: expected 1-65535")
        if self.max_packet is not None and not 64 <= self.max_packet <= _MAX_PACKET:
            raise BadInputError(f"broker max_packet {self.max_packet}: expected 64 bytes to "
                                f"{_MAX_PACKET} (256 MiB, MQTT's limit)")

    @classmethod
    def from_url(cls, url: str) -> BrokerConfig:
        """Parse ``mqtt[s]://[user[:password]@]host[:port][?protocol=&ca=&cert=&key=]``.

        A password may also come from ``SPLITINFER_BROKER_PASSWORD`` so it stays out of
        process listings.
        """
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise BadInputError(f"broker URL {url!r}: scheme {parts.scheme!r} unsupported; "
                                "expected mqtt:// or mqtts://")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise BadInputError(f"broker URL {url!r}: {exc}") from exc
        if not parts.hostname:
            raise BadInputError(f"broker URL {url!r} has no host; expected mqtt://HOST:PORT")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        known = {"protocol", "ca", "cert", "key", "insecure", "keepalive", "max_packet"}
        unknown = set(query) - known
        if unknown:
            raise BadInputError(f"broker URL {url!r}: unknown option(s) {sorted(unknown)}; "
                                f"expected {sorted(known)}")
        return cls(
            host=parts.hostname, port=port, tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password
            else os.environ.get("SPLITINFER_BROKER_PASSWORD"),
            ca_file=query.get("ca") or None, cert_file=query.get("cert") or None,
            key_file=query.get("key") or None,
            tls_insecure=query.get("insecure", "0") in ("1", "true", "yes"),
            protocol=query.get("protocol") or "auto",
            keepalive=_keepalive(url, query.get("keepalive", "30")),
            max_packet=parse_size(query["max_packet"], f"broker URL {url!r}: max_packet")
            if "max_packet" in query else None,
        )

    def url(self) -> str:
        """The URL without secrets, for logs and reports."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        limit = f"?max_packet={self.max_packet}" if self.max_packet else ""
        return f"{scheme}://{user}{self.host}:{self.port}{limit}"

    def with_protocol(self, protocol: str) -> BrokerConfig:
        return replace(self, protocol=protocol)

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


_MAX_PACKET = 268_435_460  # MQTT's largest packet: 256 MiB remaining length + header
_SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024,
                  "m": 1024 ** 2, "mb": 1024 ** 2, "mib": 1024 ** 2}


def parse_size(text: str, what: str) -> int:
    """``131072``, ``128k``, ``128KiB``, ``1m`` … as bytes (k and m are 1024-based, as the
    brokers' own limits: AWS IoT Core's "128 KB" is 131,072 bytes)."""
    raw = text.strip().lower()
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    suffix = raw[len(digits):]
    if not digits.isdigit() or suffix not in _SIZE_SUFFIXES:
        raise BadInputError(f"{what} {text!r}: expected a byte count such as 131072, 128k "
                            "or 1MiB")
    return int(digits) * _SIZE_SUFFIXES[suffix]


def _keepalive(url: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise BadInputError(f"broker URL {url!r}: keepalive {text!r}: expected whole "
                            "seconds, 1-65535")
    return int(text)


def _client(cfg: BrokerConfig, client_id: str, protocol: str, **kwargs: Any) -> aiomqtt.Client:
    import aiomqtt

    version = aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
    client = aiomqtt.Client(
        cfg.host, cfg.port, identifier=client_id, username=cfg.username,
        password=cfg.password, protocol=version, keepalive=cfg.keepalive,
        socket_options=_NODELAY, tls_context=cfg.tls_context(),
        # paho defaults to 20 in flight; a worker answering a burst needs more.
        max_inflight_messages=1000,
        **kwargs,
    )
    # Keep the CONNACK's properties (aiomqtt drops them): "Shared Subscription Available",
    # "Maximum Packet Size", "Retain Available" … tell what the broker offers.
    paho = client._client
    on_connect: Any = paho.on_connect

    def keep_connack(mqttc: Any, userdata: Any, flags: Any, reason: Any,
                     properties: Any = None) -> None:
        client._splitinfer_connack = properties  # type: ignore[attr-defined]
        on_connect(mqttc, userdata, flags, reason, properties)

    paho.on_connect = keep_connack
    return client


def connack_property(client: aiomqtt.Client, name: str) -> Any:
    """A property of the broker's CONNACK (MQTT 5), e.g. ``"SharedSubscriptionAvailable"``;
    None when absent (the broker's default applies) or on MQTT 3.1.1."""
    props = getattr(client, "_splitinfer_connack", None)
    return getattr(props, name, None) if props is not None else None


# How long the MQTT 5 try of protocol "auto" waits for its CONNACK once the socket is up
# (and TLS done): a broker that ignores an MQTT 5 CONNECT (RabbitMQ before 3.13, amqtt
# at times) would otherwise hold the start-up for aiomqtt's 10 s timeout. Scaled up on a
# slow link (see _bounded_connack) so a far MQTT 5 broker is not taken for an old one.
V5_CONNACK_TIMEOUT_S = 0.5


async def connect(cfg: BrokerConfig, client_id: str, **kwargs: Any) -> tuple[aiomqtt.Client, str]:
    """Connect and return ``(client, protocol)``, protocol being ``"5"`` or ``"3.1.1"``.

    With ``protocol="auto"`` MQTT 5 is tried first, then 3.1.1 (brokers such as amqtt and
    RabbitMQ before 3.13 refuse, drop or ignore an MQTT 5 CONNECT). The MQTT 5 try gives
    up when the broker closes the socket or sends no CONNACK within
    :data:`V5_CONNACK_TIMEOUT_S` (more on a slow link), so the fall-back costs well under
    a second. Extra keyword arguments go to ``aiomqtt.Client`` (``will``,
    ``clean_session`` …). The caller leaves with ``await client.__aexit__(...)`` or uses
    the client in ``async with``. Failures raise :class:`TransportError`.
    """
    import aiomqtt

    attempts = ["5", "3.1.1"] if cfg.protocol == "auto" else [cfg.protocol]
    last: Exception | None = None
    for protocol in attempts:
        client = _client(cfg, client_id, protocol, **kwargs)
        probing = protocol == "5" and len(attempts) > 1
        timeout = client.timeout
        if probing:
            _bounded_connack(client)
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            last = exc
            log.debug("connect %s as MQTT %s failed: %s", cfg.url(), protocol, exc)
            if probing:
                _discard(client)
            if _auth_refused(exc):  # an MQTT 5 broker said no: 3.1.1 would say no too
                raise TransportError(
                    f"broker {cfg.url()} refused {client_id!r} (user "
                    f"{cfg.username or '(none)'!r}): {exc}; {AUTH_HINT}") from exc
            continue
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot reach broker {cfg.url()}: {exc}") from exc
        client.timeout = timeout  # the default for subscribe/publish waits from here on
        if probing:
            _unhook(client)
        return client, protocol
    hint = f"; {AUTH_HINT}" if "authori" in str(last).lower() or "password" in str(last) \
        else ""
    raise TransportError(f"cannot connect to broker {cfg.url()} as {client_id!r}: {last}{hint}")


# MQTT 5 CONNACK reasons that mean "who you are is refused": 0x85 client identifier not
# valid, 0x86 bad user name or password, 0x87 not authorized. Only a real MQTT 5 reason
# code counts (paho's ReasonCode); a plain int may be one of paho's own error numbers.
_AUTH_REFUSED_V5 = frozenset({0x85, 0x86, 0x87})
AUTH_HINT = ("check the username and password and, on a broker set up by `splitinfer broker "
             "config`, that the client id equals the username (the device id): "
             "docs/security.md")


def _auth_refused(exc: Exception) -> bool:
    rc = getattr(exc, "rc", None)
    return (not isinstance(rc, int) and hasattr(rc, "getName")
            and getattr(rc, "value", None) in _AUTH_REFUSED_V5)


def _bounded_connack(client: aiomqtt.Client) -> None:
    """Make an MQTT 5 try fail fast: on a closed socket at once, on silence after a bound.

    aiomqtt waits ``client.timeout`` for the CONNACK and ignores a socket closed before
    it. The socket connect (TCP, TLS) runs first in an executor; its duration is a
    measure of the link's round trip, so the CONNACK bound is the larger of
    :data:`V5_CONNACK_TIMEOUT_S` and 3 times that duration (one more round trip is all a
    CONNACK needs). ``client.timeout`` is read only when the wait starts.
    """
    import time

    paho = client._client
    connect_socket = client._client_connect

    def timed_connect() -> None:
        start = time.monotonic()
        connect_socket()
        client.timeout = min(client.timeout,
                             max(V5_CONNACK_TIMEOUT_S, 3 * (time.monotonic() - start)))

    client._client_connect = timed_connect  # type: ignore[method-assign]
    on_disconnect = paho.on_disconnect

    def closed_before_connack(*args: Any, **kw: Any) -> None:
        pending = client._connected
        if not pending.done():
            import aiomqtt

            pending.set_exception(aiomqtt.MqttError("the broker closed the connection "
                                                    "before its CONNACK"))
            return
        if on_disconnect is not None:
            on_disconnect(*args, **kw)

    paho.on_disconnect = closed_before_connack
    client._splitinfer_on_disconnect = on_disconnect  # type: ignore[attr-defined]


def _unhook(client: aiomqtt.Client) -> None:
    client._client.on_disconnect = client._splitinfer_on_disconnect  # type: ignore[attr-defined]


def _discard(client: aiomqtt.Client) -> None:
    """Close the socket of a failed try now rather than leave it to the GC."""
    try:
        # paho's own close: aiomqtt's socket callbacks drop the loop's reader and writer.
        client._client._sock_close()
    except Exception as exc:  # best effort: the try has failed anyway
        log.debug("closing a failed MQTT 5 try: %r", exc)


def _prop_bytes(ident: int, value: bytes) -> bytes:
    return bytes((ident,)) + struct.pack("!H", len(value)) + value


_PACKED_CLASS: Any = None


def _packed(payload: bytes, **values: Any) -> Any:
    """A paho ``Properties`` whose ``pack()`` returns bytes we encoded ourselves.

    paho builds and packs properties in generic Python (~60 µs for three on this machine,
    on every request); these few are trivial to encode (MQTT 5 §2.2.2: identifier byte +
    value; the section starts with its length as a variable byte integer). The values are
    also set as attributes, so code that reads them (tests, in-memory brokers) still works.
    """
    global _PACKED_CLASS
    from paho.mqtt.packettypes import PacketTypes

    if _PACKED_CLASS is None:
        from paho.mqtt.properties import Properties

        class _Packed(Properties):
            def pack(self) -> bytes:
                return self._splitinfer_packed  # type: ignore[attr-defined,no-any-return]

        _PACKED_CLASS = _Packed
    props = object.__new__(_PACKED_CLASS)
    object.__setattr__(props, "packetType", PacketTypes.PUBLISH)
    # The section is < 128 bytes for our few properties only when topics are short; encode
    # the length as MQTT's variable byte integer in general.
    size, prefix = len(payload), bytearray()
    while True:
        byte, size = size % 128, size // 128
        prefix.append(byte | (0x80 if size else 0))
        if not size:
            break
    object.__setattr__(props, "_splitinfer_packed", bytes(prefix) + payload)
    for name, value in values.items():
        object.__setattr__(props, name, value)
    return props


def request_properties(reply_topic: str, correlation: bytes, expiry_s: float | None) -> Any:
    """MQTT 5 PUBLISH properties for a request: response topic, correlation data, expiry."""
    values: dict[str, Any] = {"ResponseTopic": reply_topic, "CorrelationData": correlation}
    payload = _prop_bytes(0x08, reply_topic.encode()) + _prop_bytes(0x09, correlation)
    if expiry_s is not None and expiry_s > 0:
        expiry = max(1, int(expiry_s + 0.999))
        values["MessageExpiryInterval"] = expiry
        payload += b"\x02" + struct.pack("!L", expiry)
    return _packed(payload, **values)


def result_properties(correlation: bytes | None) -> Any:
    """MQTT 5 PUBLISH properties for a result: the request's correlation data, if any."""
    if not correlation:
        return _packed(b"")
    return _packed(_prop_bytes(0x09, correlation), CorrelationData=correlation)
