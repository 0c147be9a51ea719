"""Cheaper socket I/O under an aiomqtt client: buffered reads, writes flushed from the loop.

aiomqtt drives paho's socket from the event loop, but per packet it costs more than the
worker's own work on a request: paho reads each fixed header a byte at a time (a
``recv`` per byte), and every queued packet (each PUBACK the worker owes, each answer)
goes through ``call_soon_threadsafe`` (a self-pipe write) to ``add_writer``, then an
``epoll`` round and ``remove_writer``. On a small machine that CPU comes out of the tail.

:func:`tune` keeps aiomqtt (and so paho: the same packets, QoS, keep-alive, reconnects)
and changes only the I/O under it:

* reads go through :class:`BufferedSocket`: one ``recv`` per readiness; its ``pending()``
  makes aiomqtt's reader keep parsing while bytes are buffered (as it does for TLS);
* a packet queued on the loop's thread is written by one ``call_soon`` callback per loop
  iteration (coalescing the PUBACKs and answers queued in between); only a full socket
  buffer registers a writer.

Plain TCP only: a TLS client is left as it is.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["BufferedSocket", "tune", "session_options"]

log = logging.getLogger(__name__)

_READ_SIZE = 65536


class BufferedSocket:
    """What paho reads through: one ``recv`` fills a buffer that paho's small reads drain."""

    __slots__ = ("_buf", "_pos", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._pos = 0

    def pending(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._buf) - self._pos

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self.sock.recv(max(size, _READ_SIZE))  # BlockingIOError: paho's AGAIN
            if len(data) <= size:
                return data
            self._buf, self._pos = data, 0
        end = self._pos + size
        out = self._buf[self._pos:end]
        self._pos = min(end, len(self._buf))
        if self._pos >= len(self._buf):
            self._buf, self._pos = b"", 0
        return out

    def send(self, data: Any) -> int:
        return self.sock.send(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def tune(client: aiomqtt.Client, loop: asyncio.AbstractEventLoop) -> bool:
    """Apply the module docstring's changes to a connected client; False if left as is."""
    paho = getattr(client, "_client", None)
    raw = getattr(paho, "_sock", None)
    if paho is None or not isinstance(raw, socket.socket) or isinstance(raw, ssl.SSLSocket):
        return False
    paho._sock = BufferedSocket(raw)
    fd = raw.fileno()
    loop_thread = threading.get_ident()
    state = {"scheduled": False, "writer": False}
    disconnected: asyncio.Future[None] | None = getattr(client, "_disconnected", None)

    def flush() -> None:
        state["scheduled"] = False
        if paho._sock is None:
            return
        try:
            paho.loop_write()
        except Exception as exc:  # a broken pipe: the connection is gone (as aiomqtt does)
            if disconnected is not None and not disconnected.done():
                disconnected.set_exception(exc)
            return
        if paho.want_write() and paho._sock is not None and not state["writer"]:
            loop.add_writer(fd, flush)  # the socket buffer is full: wait until writable
            state["writer"] = True

    def register_write(_client: Any, _userdata: Any, _sock: Any) -> None:
        if state["scheduled"]:
            return
        state["scheduled"] = True
        if threading.get_ident() == loop_thread:
            loop.call_soon(flush)
        else:
            loop.call_soon_threadsafe(flush)

    def unregister_write(_client: Any, _userdata: Any, _sock: Any) -> None:
        # Always: a writer aiomqtt added before tune() must go too (no system call when
        # none is registered).
        state["writer"] = False
        if not loop.is_closed():
            loop.remove_writer(fd)

    paho.on_socket_register_write = register_write
    paho.on_socket_unregister_write = unregister_write
    return True


def session_options(protocol: str, *, persistent: bool, expiry_s: float,
                    will: tuple[str, bytes] | None = None) -> dict[str, Any]:
    """``aiomqtt.Client`` keyword arguments for a worker's session on ``protocol``.

    ``persistent``: MQTT 5 ``clean_start=False`` + Session Expiry Interval ``expiry_s``
    (rounded up to whole seconds); MQTT 3.1.1 ``clean_session=False`` (the broker keeps
    that session until it is taken over with a clean one, or its own expiry, e.g.
    mosquitto's ``persistent_client_expiration``). ``will``: (topic, payload) published
    retained at QoS 1 when the connection ends without a DISCONNECT.
    """
    import math

    import aiomqtt

    options: dict[str, Any] = {}
    if will is not None:
        options["will"] = aiomqtt.Will(will[0], will[1], qos=1, retain=True)
    if not persistent:
        return options
    if protocol == "5":
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = min(math.ceil(expiry_s), 0xFFFFFFFE)
        options.update(clean_start=False, properties=props)
    else:
        options["clean_session"] = False
    return options
