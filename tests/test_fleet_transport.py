"""The fleet's paho transport reports the broker's PUBACK reason as the agent's own does."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from edge_agent.transport import NO_MATCHING_SUBSCRIBERS, MqttConnector
from simulators.broker import MosquittoBroker
from simulators.fleet_transport import PahoConnector

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("connector", [PahoConnector, MqttConnector])
def test_puback_reason_no_matching_subscribers(mosquitto: MosquittoBroker,
                                               connector: type) -> None:
    topic = f"fleetpuback/{uuid.uuid4().hex}/req"

    async def main() -> list[int | None]:
        v5 = connector(mosquitto.url + "?protocol=5")
        v311 = connector(mosquitto.url + "?protocol=3.1.1")
        device = await v5(client_id=f"d-{uuid.uuid4().hex[:8]}", will=None)
        old = await v311(client_id=f"o-{uuid.uuid4().hex[:8]}", will=None)
        worker = await v5(client_id=f"w-{uuid.uuid4().hex[:8]}", will=None)
        try:
            codes = [await device.publish(topic, b"x", qos=1)]  # nobody listens yet
            codes.append(await device.publish(topic, b"x", qos=0))  # no PUBACK at all
            codes.append(await old.publish(topic, b"x", qos=1))  # 3.1.1: no reason codes
            await worker.subscribe(f"$share/g/{topic}", qos=1)
            codes.append(await device.publish(topic, b"x", qos=1))
            return codes
        finally:
            for t in (device, old, worker):
                await t.close()

    assert asyncio.run(main()) == [NO_MATCHING_SUBSCRIBERS, None, None, 0]
