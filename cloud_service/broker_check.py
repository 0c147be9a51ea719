"""What a worker checks about its broker at start-up: shared subscriptions, round trip.

Brokers differ in ways that otherwise show only as silence (see docs/brokers.md):

* **Shared subscriptions** (``$share/{group}/…``). MQTT 5 says when they are missing:
  the CONNACK property *Shared Subscription Available* = 0, or a SUBACK reason code of
  0x9E (or any failure). MQTT 3.1.1 has no such signal, and RabbitMQ, NATS and amqtt
  all grant ``$share/…`` as if it were a plain (literal) filter that never matches a
  request. So the worker also sends one message through the group, on a private probe
  topic, and waits for it (:data:`PROBE_TIMEOUT_S` at most).
* **Round trip**. The probe messages come from a second, short-lived connection (a
  stand-in device) and the worker answers each: the path of a request, timed (QoS 1).
  A stock mosquitto (Nagle's algorithm on its sockets, no ``set_tcp_nodelay true``)
  holds the answer ~40 ms behind the PUBACK it just sent the device, until the device's
  delayed ACK comes; a tuned one takes ~1 ms on a LAN.

:func:`check_broker` does both and returns a :class:`BrokerCheck`; the server decides.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from splitinfer.mqtt import BrokerConfig, connack_property, connect
from splitinfer.topics import Topics

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["BrokerCheck", "check_broker", "probe_topic", "subscribe_failure",
           "PROBE_TIMEOUT_S", "SLOW_ROUND_TRIP_S", "ROUND_TRIPS"]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0  # how long the first probe message may take through the group
SLOW_ROUND_TRIP_S = 0.020  # above this median a start-up round trip is called slow
ROUND_TRIPS = 5
# About a small activation (the digits CNN's int8 cut is 784 bytes).
_PROBE_PAYLOAD = b"splitinfer probe " + bytes(1000)
_NOT_SUPPORTED = 0x9E  # MQTT 5 SUBACK: Shared Subscriptions not supported


@dataclass
class BrokerCheck:
    """What the start-up check found."""

    shared: bool  # the group's shared subscription delivers
    reason: str = ""  # why not, when not
    round_trips_s: list[float] = field(default_factory=list)

    @property
    def round_trip_s(self) -> float | None:
        """Median QoS 1 round trip through the broker (to itself), if measured."""
        return statistics.median(self.round_trips_s) if self.round_trips_s else None

    @property
    def slow(self) -> bool:
        rtt = self.round_trip_s
        return rtt is not None and rtt > SLOW_ROUND_TRIP_S


def probe_topic(topics: Topics) -> str:
    """A private topic: no device publishes under ``…/v1/probe/``, no worker filter
    (``…/v1/req/+/+``) matches it."""
    return f"{topics.prefix}/v1/probe/{uuid.uuid4().hex}"


def subscribe_failure(granted: Any) -> str:
    """Why a SUBACK refused (its first failure code as text), or "" when all granted."""
    for code in granted:
        value = code if isinstance(code, int) else code.value
        if value >= 0x80:
            if value == _NOT_SUPPORTED:
                return "SUBACK reason 0x9E: shared subscriptions not supported"
            return f"SUBACK refused it ({code}, 0x{value:02X})"
    return ""


async def _round_trips(worker: aiomqtt.Client, device: aiomqtt.Client, request: str,
                       reply: str, count: int, first_timeout_s: float) -> list[float]:
    """``device`` publishes ``count`` QoS 1 messages on ``request`` one after another; the
    worker answers each on ``reply`` at once. Each time how long until the answer is
    back: the path of a real request. Stops at the first that does not come back in time.
    """
    wpaho, dpaho = worker._client, device._client
    arrived: asyncio.Queue[float] = asyncio.Queue()

    def answer(_client: Any, _userdata: Any, message: Any) -> None:
        wpaho.publish(reply, message.payload, 1)  # paho calls back on the loop's thread

    def on_reply(_client: Any, _userdata: Any, _message: Any) -> None:
        arrived.put_nowait(time.perf_counter())

    wpaho.message_callback_add(request, answer)
    dpaho.message_callback_add(reply, on_reply)
    times: list[float] = []
    try:
        for i in range(count):
            sent = time.perf_counter()
            await device.publish(request, _PROBE_PAYLOAD, qos=1)
            try:
                got = await asyncio.wait_for(arrived.get(),
                                             first_timeout_s if i == 0 else 1.0)
            except asyncio.TimeoutError:
                break
            times.append(got - sent)
    finally:
        wpaho.message_callback_remove(request)
        dpaho.message_callback_remove(reply)
    return times


async def check_broker(client: aiomqtt.Client, protocol: str, topics: Topics, group: str,
                       broker: BrokerConfig, client_id: str, *,
                       timeout_s: float = PROBE_TIMEOUT_S) -> BrokerCheck:
    """Does ``$share/{group}/…`` deliver here, and how long is a round trip?

    A second, short-lived connection stands for a device: its messages reach the worker
    through the shared filter when that works, else through a plain one, and the worker
    answers each at once. Everything made here is removed before returning.
    """
    request, reply = probe_topic(topics), probe_topic(topics)
    device, _ = await connect(broker.with_protocol(protocol), f"{client_id}-probe")
    try:
        await device.subscribe(reply, qos=1)
        reason = ""
        if group:
            if protocol == "5" and connack_property(client,
                                                    "SharedSubscriptionAvailable") == 0:
                reason = "its CONNACK says Shared Subscription Available = 0"
            else:
                shared = f"$share/{group}/{request}"
                granted = await client.subscribe(shared, qos=1)
                reason = subscribe_failure(granted)
                if not reason:
                    try:
                        times = await _round_trips(client, device, request, reply,
                                                   ROUND_TRIPS, timeout_s)
                    finally:
                        await client.unsubscribe(shared)
                    if times:
                        return BrokerCheck(shared=True, round_trips_s=times)
                    reason = (f"a message published through the group did not arrive "
                              f"within {timeout_s:g} s (the broker took "
                              f"'$share/{group}/…' as a plain filter)")
        await client.subscribe(request, qos=1)
        try:
            times = await _round_trips(client, device, request, reply, ROUND_TRIPS,
                                       timeout_s)
        finally:
            await client.unsubscribe(request)
    finally:
        await device.__aexit__(None, None, None)
    if not times:
        # Not even a plain subscription gets it (an ACL on the probe topics?): no verdict
        # on the group, which then stays as asked.
        log.warning("broker check inconclusive: a message on %s did not reach the worker "
                    "within %g s (an ACL on %s/v1/probe/#?); keeping %s", request,
                    timeout_s, topics.prefix, f"group {group!r}" if group else "no group")
        return BrokerCheck(shared=bool(group), reason="", round_trips_s=[])
    return BrokerCheck(shared=bool(group) and not reason, reason=reason, round_trips_s=times)
