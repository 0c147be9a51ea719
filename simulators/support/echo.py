"""A raw MQTT echo: the network floor that benchmarks measure beside the real path.

It subscribes to one topic and republishes every payload, unchanged, on another, through
the same client (:class:`splitinfer.mqtt_client.MqttClient`: paho driven by the loop,
TCP_NODELAY, QoS 1) as the edge agent and the worker. Run it in its own process, as the
worker runs::

    python -m simulators.support.echo --broker mqtt://127.0.0.1:1883 --listen bench/echo/req \\
        --answer bench/echo/res
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import open_client

__all__ = ["echo"]

READY = "echo ready"


async def echo(broker: str, listen: str, answer: str, qos: int = 1) -> None:
    client = await open_client(BrokerConfig.from_url(broker), f"echo-{id(listen):x}")
    try:
        await client.subscribe(listen, qos=qos)
        print(READY, flush=True)
        async for message in client.messages():
            await client.publish(answer, message.payload, qos=qos)
    finally:
        await client.disconnect()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.support.echo")
    p.add_argument("--broker", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--answer", required=True)
    p.add_argument("--qos", type=int, default=1)
    a = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(echo(a.broker, a.listen, a.answer, a.qos))
    return 0


if __name__ == "__main__":
    sys.exit(main())
