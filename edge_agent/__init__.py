"""The device side of splitinfer: run the head, send the cut over MQTT, await the tail's result.

::

    from edge_agent import AgentConfig, EdgeAgent, SplitClient

    async with EdgeAgent.from_artifacts(split_dir, config=AgentConfig(device_id="cam-7",
                                        broker="mqtt://broker:1883")) as agent:
        result = await agent.infer({"x": batch})      # InferenceResult(outputs, timings, …)

    agent = EdgeAgent.from_bundle(bundle_dir, config=config, link="4g")  # every split
    async with agent:
        result = await agent.infer(frame)   # .split_id, .served_by "cloud"|"edge", .fallback

    with SplitClient(split_dir, broker="mqtt://broker:1883") as client:   # blocking form
        result = client.infer({"x": batch})

Imports only the contract (``splitinfer``), numpy and msgpack here; onnxruntime loads with a
head and paho (through :mod:`splitinfer.mqtt_client`) with the first connection. Never
``onnx``, never ``torch``: it runs on a Raspberry Pi.
"""

from __future__ import annotations

from edge_agent.adaptive import Decision, Observation, Policy, PolicyConfig, Switch
from edge_agent.client import (
    OFFLINE,
    ONLINE,
    AgentConfig,
    AgentCounters,
    EdgeAgent,
    InferenceResult,
    RetryBackoff,
    SplitState,
)
from edge_agent.memory import MemoryBroker
from edge_agent.runtime import HeadRuntime, OrtHead, load_head
from edge_agent.stats import STAGES, LatencyStats, summarize
from edge_agent.sync import SplitClient, default_device_id
from edge_agent.transport import (
    Connector,
    IncomingMessage,
    LastWill,
    MqttConnector,
    PublishOptions,
    Transport,
)

__all__ = [
    # the agent
    "AgentConfig", "EdgeAgent", "InferenceResult", "SplitClient", "default_device_id",
    "ONLINE", "OFFLINE", "SplitState", "AgentCounters", "RetryBackoff",
    # choosing the split at run time (EdgeAgent.from_bundle)
    "Policy", "PolicyConfig", "Observation", "Decision", "Switch",
    # head backends
    "HeadRuntime", "OrtHead", "load_head",
    # timings
    "STAGES", "LatencyStats", "summarize",
    # transports
    "Transport", "Connector", "MqttConnector", "PublishOptions", "IncomingMessage", "LastWill",
    "MemoryBroker",
]
