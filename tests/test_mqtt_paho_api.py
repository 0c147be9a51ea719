"""Fails loudly when a paho-mqtt API that splitinfer.mqtt_client relies on changes.

splitinfer.mqtt_client drives paho through its documented external-loop API only; this
lists every method, parameter, callback and attribute it uses. If a paho release renames
or drops one, this test names it (rather than the client going slow or silent).
"""

from __future__ import annotations

import inspect

import pytest

paho_client = pytest.importorskip("paho.mqtt.client")

METHODS = {
    "connect": ["host", "port", "keepalive", "clean_start", "properties"],
    "publish": ["topic", "payload", "qos", "retain", "properties"],
    "subscribe": ["topic", "qos"],
    "unsubscribe": ["topic"],
    "disconnect": [],
    "loop_read": [],
    "loop_write": [],
    "loop_misc": [],
    "want_write": [],
    "socket": [],
    "max_inflight_messages_set": ["inflight"],
    "max_queued_messages_set": ["queue_size"],
    "username_pw_set": ["username", "password"],
    "tls_set_context": ["context"],
    "tls_insecure_set": ["value"],
    "will_set": ["topic", "payload", "qos", "retain"],
}
CALLBACKS = ("on_connect", "on_disconnect", "on_message", "on_publish", "on_subscribe",
             "on_unsubscribe", "on_socket_open", "on_socket_close",
             "on_socket_register_write", "on_socket_unregister_write")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_client_method_and_parameters(name: str) -> None:
    method = getattr(paho_client.Client, name, None)
    assert callable(method), f"paho.mqtt.client.Client.{name} is gone"
    params = list(inspect.signature(method).parameters)[1:]
    for i, want in enumerate(METHODS[name]):
        assert want in params, f"paho Client.{name} lost parameter {want!r}: {params}"
        if name == "publish":  # called positionally: the order matters
            assert params[i] == want, f"paho Client.publish parameters moved: {params}"


def test_callbacks_and_properties_settable() -> None:
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho_client.Client(CallbackAPIVersion.VERSION2, client_id="api-check",
                                protocol=paho_client.MQTTv5)
    for name in CALLBACKS:
        assert hasattr(client, name), f"paho Client has no {name} any more"
        setattr(client, name, lambda *a: None)
        assert getattr(client, name) is not None
    client.connect_timeout = 2.0
    assert client.connect_timeout == 2.0
    assert client.socket() is None and client.want_write() is False
    assert client.loop_read() != 0  # not connected: an error code, not an exception
    info = client.publish("t", b"x", 1, False, None)
    assert hasattr(info, "rc") and hasattr(info, "mid")
    v311 = paho_client.Client(CallbackAPIVersion.VERSION2, client_id="api-check",
                              protocol=paho_client.MQTTv311, clean_session=False)
    assert v311 is not None


def test_message_attributes() -> None:
    msg = paho_client.MQTTMessage(mid=1, topic=b"a/b")
    msg.payload = b"p"
    for name in ("topic", "payload", "qos", "retain", "properties"):
        assert hasattr(msg, name), f"paho MQTTMessage.{name} is gone"
    assert msg.topic == "a/b"


def test_reason_codes_have_value() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    assert ReasonCode(PacketTypes.PUBACK, identifier=16).value == 16
    assert ReasonCode(PacketTypes.SUBACK, identifier=0x87).value == 0x87


@pytest.mark.parametrize("topic", ["splitinfer/v1/res/cam-1", "p/" + "x" * 300])
def test_packed_properties_are_paho_properties(topic: str) -> None:
    """paho checks ``isinstance(properties, Properties)`` and calls ``pack()``; our bytes
    decode as paho's own."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from splitinfer.mqtt_client import publish_properties

    props = publish_properties(topic, b"rid-1", 2.2)
    assert isinstance(props, Properties)
    got = Properties(PacketTypes.PUBLISH)
    got.unpack(props.pack())
    assert (got.ResponseTopic, got.CorrelationData, got.MessageExpiryInterval) == (
        topic, b"rid-1", 3)
    assert publish_properties().pack() == b"\x00"
    assert props.CorrelationData == b"rid-1"  # readable as paho's are
