"""How the fleet's devices speak MQTT: the agent's own connector, one per broker URL.

A simulated device is a real :class:`~edge_agent.EdgeAgent` over the agent's own
:class:`~edge_agent.transport.MqttConnector`, that is over the project's one MQTT client,
:class:`splitinfer.mqtt_client.MqttClient`: the same packets, QoS, MQTT 5 properties,
last will, TLS and credentials as one device in the field. The client is what lets a
thousand of them share one event loop on a small machine: paho is driven by the loop
(no thread, no task per message), the writes of one loop iteration go out in one
``send`` per connection, and one keep-alive timer per loop serves every client.

There used to be three transports here (a paho driver of our own that swapped paho's
socket for a buffered one, the agent's transport of then, and a hand-written MQTT
3.1.1 client); they all gave way to that one. ``--transport`` stays for scripts that
name it: ``auto`` and ``paho`` both mean the one client.
"""

from __future__ import annotations

from edge_agent.transport import Connector, MqttConnector
from splitinfer.errors import BadInputError
from splitinfer.mqtt import BrokerConfig

__all__ = ["connector_for", "pick_transport", "TRANSPORTS", "TRANSPORT"]

TRANSPORT = "paho"  # what the report says: MqttClient drives paho
TRANSPORTS = ("auto", TRANSPORT)


def pick_transport(transport: str) -> str:
    """The transport that ``transport`` (one of :data:`TRANSPORTS`) names: :data:`TRANSPORT`."""
    if transport not in TRANSPORTS:
        raise BadInputError(f"transport {transport!r}: expected one of "
                            f"{', '.join(TRANSPORTS)} (the fleet's devices speak MQTT through "
                            "splitinfer.mqtt_client, with or without TLS)")
    return TRANSPORT


def connector_for(url: str, transport: str = "auto", *, timeout_s: float = 10.0) -> Connector:
    """The devices' connector for ``url`` (any broker URL the agent takes, TLS included)."""
    pick_transport(transport)
    return MqttConnector(BrokerConfig.from_url(url), timeout_s=timeout_s)
