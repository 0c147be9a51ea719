"""The received-message queue of the simulators' own transports (paho-driven, lite).

Both deliver messages from a callback on the event loop's thread and hand them to one
``messages()`` reader without a task or a queue future per message: the reader waits on
one future only when the queue is empty.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from edge_agent.transport import IncomingMessage
from splitinfer.errors import TransportError

__all__ = ["Inbox"]


class Inbox:
    """Messages received and not yet read; call only from the loop's thread."""

    __slots__ = ("_error", "_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[IncomingMessage] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def put(self, message: IncomingMessage) -> None:
        self._items.append(message)
        if self._waiter is not None:
            self._wake()

    def fail(self, error: BaseException) -> None:
        """The connection is gone: the reader gets what is queued, then a TransportError."""
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        items = self._items
        while True:
            while items:
                yield items.popleft()
            if self._error is not None:
                raise TransportError(str(self._error))
            self._waiter = self._loop.create_future()
            await self._waiter
