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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import Message, MqttClient, SubscribeRefused, open_client
from splitinfer.topics import Topics

__all__ = ["BrokerCheck", "check_broker", "probe_topic", "subscribe_failure",
           "PROBE_TIMEOUT_S", "SLOW_ROUND_TRIP_S", "ROUND_TRIPS"]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0  # how long the first probe message may take through the group
SLOW_ROUND_TRIP_S = 0.020  # above this median a start-up round trip is called slow
ROUND_TRIPS = 5
# About a small activation (the digits CNN's int8 cut is 784 bytes).
_PROBE_PAYLOAD = b"splitinfer probe " + bytes(1000)
_NOT_SUPPORTED = 0x9E  # MQTT 5 SUBACK: Shared Subscriptions not supported
_ACK_TIMEOUT_S = 10.0  # a SUBACK, UNSUBACK or PUBACK of the check


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


def subscribe_failure(granted: Iterable[Any]) -> str:
    """Why a SUBACK refused (its first failure code as text), or "" when all granted.

    ``granted``: reason codes (ints, or objects with ``.value`` as paho's ReasonCode),
    e.g. ``[exc.reason]`` of a :class:`~splitinfer.mqtt_client.SubscribeRefused`."""
    for code in granted:
        value = code if isinstance(code, int) else code.value
        if value >= 0x80:
            if value == _NOT_SUPPORTED:
                return "SUBACK reason 0x9E: shared subscriptions not supported"
            return f"SUBACK refused it (0x{value:02X})"
    return ""


async def _subscribe(client: MqttClient, topic: str) -> str:
    """Subscribe at QoS 1; "" when granted, else why not (:func:`subscribe_failure`)."""
    try:
        await asyncio.wait_for(client.subscribe(topic, qos=1), _ACK_TIMEOUT_S)
    except SubscribeRefused as exc:
        return subscribe_failure([exc.reason])
    return ""


async def _unsubscribe(client: MqttClient, topic: str) -> None:
    await asyncio.wait_for(client.unsubscribe(topic), _ACK_TIMEOUT_S)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a probe answer's outcome as seen (its PUBACK matters to nobody)."""
    if not future.cancelled():
        future.exception()


async def _round_trips(worker: MqttClient, device: MqttClient, request: str,
                       reply: str, count: int, first_timeout_s: float) -> list[float]:
    """``device`` publishes ``count`` QoS 1 messages on ``request`` one after another; the
    worker answers each on ``reply`` at once. Each time how long until the answer is
    back: the path of a real request. Stops at the first that does not come back in time.

    Both clients' ``on_message`` are taken over meanwhile: the worker's hands what is
    not a probe on to the callback it had (a persistent session's queued requests may
    arrive during the check), and both are put back before returning.
    """
    arrived: asyncio.Queue[float] = asyncio.Queue()
    worker_handler, device_handler = worker.on_message, device.on_message

    def answer(message: Message) -> None:
        if message.topic == request:
            worker.publish(reply, message.payload, qos=1).add_done_callback(_retrieve)
        elif worker_handler is not None:
            worker_handler(message)

    def on_reply(message: Message) -> None:
        if message.topic == reply:
            arrived.put_nowait(time.perf_counter())

    worker.on_message, device.on_message = answer, on_reply
    times: list[float] = []
    try:
        for i in range(count):
            sent = time.perf_counter()
            await asyncio.wait_for(device.publish(request, _PROBE_PAYLOAD, qos=1),
                                   _ACK_TIMEOUT_S)
            try:
                got = await asyncio.wait_for(arrived.get(),
                                             first_timeout_s if i == 0 else 1.0)
            except asyncio.TimeoutError:
                break
            times.append(got - sent)
    finally:
        worker.on_message, device.on_message = worker_handler, device_handler
    return times


async def check_broker(client: MqttClient, topics: Topics, group: str,
                       broker: BrokerConfig, client_id: str, *,
                       timeout_s: float = PROBE_TIMEOUT_S) -> BrokerCheck:
    """Does ``$share/{group}/…`` deliver here, and how long is a round trip?

    ``client`` is the worker's connection. A second, short-lived connection stands for
    a device: its messages reach the worker through the shared filter when that works,
    else through a plain one, and the worker answers each at once. Everything made here
    is removed before returning. Raises TransportError (or asyncio.TimeoutError when the
    broker does not acknowledge) if the check cannot be made.
    """
    protocol = client.protocol or broker.protocol
    request, reply = probe_topic(topics), probe_topic(topics)
    device = await open_client(broker.with_protocol(protocol), f"{client_id}-probe")
    try:
        # Refused (an ACL on the probe topics): no answer comes back, and the check
        # ends inconclusive, which says so.
        await _subscribe(device, reply)
        reason = ""
        if group:
            if protocol == "5" and client.connack_property("SharedSubscriptionAvailable") == 0:
                reason = "its CONNACK says Shared Subscription Available = 0"
            else:
                shared = f"$share/{group}/{request}"
                reason = await _subscribe(client, shared)
                if not reason:
                    try:
                        times = await _round_trips(client, device, request, reply,
                                                   ROUND_TRIPS, timeout_s)
                    finally:
                        await _unsubscribe(client, shared)
                    if times:
                        return BrokerCheck(shared=True, round_trips_s=times)
                    reason = (f"a message published through the group did not arrive "
                              f"within {timeout_s:g} s (the broker took "
                              f"'$share/{group}/…' as a plain filter)")
        times = []
        if not await _subscribe(client, request):
            try:
                times = await _round_trips(client, device, request, reply, ROUND_TRIPS,
                                           timeout_s)
            finally:
                await _unsubscribe(client, request)
    finally:
        await device.disconnect()
    if not times:
        # Not even a plain subscription gets it (an ACL on the probe topics?): no verdict
        # on the group, which then stays as asked.
        log.warning("broker check inconclusive: a message on %s did not reach the worker "
                    "within %g s (an ACL on %s/v1/probe/#?); keeping %s", request,
                    timeout_s, topics.prefix, f"group {group!r}" if group else "no group")
        return BrokerCheck(shared=bool(group), reason="", round_trips_s=[])
    return BrokerCheck(shared=bool(group) and not reason, reason=reason, round_trips_s=times)
