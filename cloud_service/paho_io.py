"""A buffered socket wrapper, left only for ``simulators/fleet_transport.py``.

The worker no longer uses anything here: it connects through
:class:`splitinfer.mqtt_client.MqttClient`, which reads with paho's public ``loop_read``.
The fleet's paho device transport still wraps its socket in :class:`BufferedSocket` (one
``recv`` per readiness that paho's small reads then drain); this module goes with that
transport's port onto MqttClient (issue 11).
"""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["BufferedSocket"]

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
