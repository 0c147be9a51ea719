"""The MQTT binding of the contract: broker URLs, TLS, credentials, protocol choice.

:class:`BrokerConfig` is what every side agrees on: host and port, MQTT 5 or 3.1.1 (or
"auto": 5 first, then 3.1.1 within :data:`V5_CONNACK_TIMEOUT_S`), TLS and its files,
credentials, keep-alive and a configured packet limit. The one client that connects with
it is :class:`splitinfer.mqtt_client.MqttClient` (paho driven from the asyncio loop
through paho's public external-loop API), used by the edge agent, the cloud worker and the
fleet's devices alike. Nothing here imports paho: the rest of the contract stays numpy +
msgpack.

URL forms::

    mqtt://host:1883                 plain TCP (default port 1883)
    mqtts://host:8883                TLS (default port 8883), system CAs unless ca= given
    mqtt://user:secret@host?protocol=3.1.1
    mqtts://host?ca=/etc/ca.pem&cert=/etc/dev.pem&key=/etc/dev.key   per-device client cert
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, unquote, urlsplit

from splitinfer.errors import BadInputError

__all__ = ["BrokerConfig", "parse_size", "PROTOCOLS", "V5_CONNACK_TIMEOUT_S", "AUTH_HINT"]

PROTOCOLS = ("auto", "5", "3.1.1")


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


# How long the MQTT 5 try of protocol "auto" waits for its CONNACK once the socket is up
# (and TLS done): a broker that ignores an MQTT 5 CONNECT (RabbitMQ before 3.13, amqtt at
# times) would otherwise hold the start-up for the whole connect timeout. The client scales
# it up on a slow link, so a far MQTT 5 broker is not taken for an old one.
V5_CONNACK_TIMEOUT_S = 0.5


AUTH_HINT = ("check the username and password and, on a broker set up by `splitinfer broker "
             "config`, that the client id equals the username (the device id): "
             "docs/security.md")
