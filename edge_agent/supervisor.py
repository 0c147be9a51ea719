"""The edge agent's connection: connect, subscribe, announce presence, reconnect.

:meth:`Supervisor._establish` subscribes to ``{prefix}/v1/res/{device_id}`` and publishes
a retained ``online`` on ``{prefix}/v1/status/{device_id}`` (the last will: a retained
``offline``). A supervisor task (:meth:`Supervisor._supervise`) then reads results and
hands each to the request bookkeeping (:mod:`edge_agent.pending`). The transport does
not reconnect by itself, so when the connection drops the supervisor reconnects with
jittered exponential backoff (``reconnect_min_s`` doubling to ``reconnect_max_s``),
subscribes again and re-publishes every request still pending whose deadline has not
passed; for ``reconnect_grace_s`` after a reconnect "no matching subscribers" is re-sent,
not raised (the workers may still be subscribing again to a restarted broker).

A mixin of :class:`edge_agent.client.EdgeAgent`, which owns the state it names; kept
apart so the connection's life reads in one place.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from edge_agent.transport import Connector, IncomingMessage, LastWill, Transport
from splitinfer.errors import TransportError

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from edge_agent.counters import _Counters
    from edge_agent.pending import _Pending

__all__ = ["OFFLINE", "ONLINE", "Supervisor"]

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"


class Supervisor:
    """One broker connection kept up: connect, establish, detach, reconnect, read."""

    # the agent's, set in EdgeAgent.__init__
    config: AgentConfig
    result_topic: str
    status_topic: str
    _counters: _Counters
    _pending: dict[str, _Pending]

    if TYPE_CHECKING:
        @property
        def device_id(self) -> str: ...

        def _send(self, pending: _Pending) -> None: ...

        def _dispatch(self, message: IncomingMessage) -> None: ...

    def _init_connection(self, connector: Connector) -> None:
        self._connector = connector
        self._transport: Transport | None = None
        self._protocol = ""
        self._epoch = 0  # connections so far: a request knows which one it went out on
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._grace_until = 0.0  # loop.time() until which no-subscriber PUBACKs are retried

    @property
    def connected(self) -> bool:
        return self._transport is not None

    @property
    def protocol(self) -> str:
        """MQTT version of the current (or last) connection: ``"5"`` or ``"3.1.1"``."""
        return self._protocol

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once connected (a test or a daemon waiting out a broker restart)."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise TransportError(f"edge agent {self.device_id}: not connected to "
                                 f"{self._broker_name()} after {timeout} s",
                                 device_id=self.device_id) from None

    async def _connect(self) -> Transport:
        will = LastWill(self.status_topic, OFFLINE) if self.config.presence else None
        return await self._connector(client_id=self.device_id, will=will)

    async def _establish(self, transport: Transport) -> None:
        await transport.subscribe(self.result_topic, qos=self.config.qos)
        if self.config.presence:
            await transport.publish(self.status_topic, ONLINE, qos=1, retain=True)
        self._epoch += 1
        if self._epoch > 1:
            self._grace_until = asyncio.get_running_loop().time() + self.config.reconnect_grace_s
        self._transport = transport
        self._protocol = transport.protocol
        self._connected.set()
        now = asyncio.get_running_loop().time()
        again = [p for p in self._pending.values()
                 if p.epoch < self._epoch and not p.future.done() and p.expires > now]
        for pending in again:
            if pending.publishes:
                self._counters.republished += 1
            self._send(pending)
        if again:
            log.info("%s: (re)published %d pending request(s)", self.device_id, len(again))

    def _detach(self, transport: Transport) -> None:
        if self._transport is transport:
            self._transport = None
            self._connected.clear()

    async def _supervise(self, transport: Transport | None) -> None:
        delay = self.config.reconnect_min_s
        while True:
            if transport is not None:
                try:
                    await self._pump(transport)
                except TransportError as exc:
                    log.warning("%s: %s; reconnecting", self.device_id, exc)
                self._detach(transport)
                await transport.close()
                transport = None
            try:
                transport = await self._connect()
                await self._establish(transport)
            except TransportError as exc:
                if transport is not None:
                    self._detach(transport)
                    await transport.close()
                    transport = None
                pause = delay * random.uniform(0.5, 1.0)  # jitter, not crypto
                log.info("%s: reconnect to %s failed (%s); next try in %.2f s", self.device_id,
                         self._broker_name(), exc, pause)
                await asyncio.sleep(pause)
                delay = min(delay * 2, self.config.reconnect_max_s)
            else:
                self._counters.reconnects += 1
                delay = self.config.reconnect_min_s
                log.info("%s: reconnected to %s", self.device_id, self._broker_name())

    async def _pump(self, transport: Transport) -> None:
        # A transport that can (MqttTransport) hands results over as they are read: no
        # task wakes per message, no loop turn between the answer and its caller.
        deliver_to = getattr(transport, "deliver_to", None)
        wait_lost = getattr(transport, "wait_lost", None)
        if deliver_to is not None and wait_lost is not None:
            deliver_to(self._dispatch)
            raise await wait_lost()
        async for message in transport.messages():
            self._dispatch(message)
        raise TransportError(f"the message stream from {self._broker_name()} ended")

    def _broker_name(self) -> str:
        url = getattr(self._connector, "url", None)
        return url if isinstance(url, str) else "the broker"
