"""SplitClient: the blocking form of :class:`~edge_agent.client.EdgeAgent`.

::

    with SplitClient("artifacts/digits_cnn-…", broker="mqtt://broker:1883") as client:
        result = client.infer({"x": batch})

The agent lives on an event loop in one background thread; each call hops onto it with
``run_coroutine_threadsafe`` and blocks until the agent answers (it always does by the
request's deadline). Calls from several threads at once are fine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from edge_agent.client import AgentConfig, Array, EdgeAgent, InferenceResult, Inputs
from edge_agent.transport import Connector
from splitinfer.errors import BadInputError, DeadlineExceeded, StartupError
from splitinfer.topics import topic_name

__all__ = ["SplitClient", "default_device_id"]

T = TypeVar("T")
_GRACE_S = 10.0  # beyond the request deadline, before we stop waiting on the loop thread


def default_device_id() -> str:
    """``SPLITINFER_DEVICE_ID``, else ``edge-<hostname>-<random>`` (unique per process)."""
    configured = os.environ.get("SPLITINFER_DEVICE_ID")
    if configured:
        return configured
    return topic_name(f"edge-{socket.gethostname()}-{uuid.uuid4().hex[:6]}")


class SplitClient:
    """An :class:`EdgeAgent` behind a blocking API (a context manager)."""

    def __init__(self, artifacts: str | Path | None = None, *, broker: str | None = None,
                 device_id: str | None = None, config: AgentConfig | None = None,
                 agent: EdgeAgent | None = None, connector: Connector | None = None,
                 threads: int | None = None, start_timeout_s: float = 30.0) -> None:
        if agent is None:
            if artifacts is None:
                raise BadInputError("SplitClient needs a split directory (artifacts) or an agent")
            if config is None:
                config = AgentConfig(device_id=device_id or default_device_id(),
                                     broker=broker or AgentConfig.broker)
            agent = EdgeAgent.from_artifacts(artifacts, config=config, connector=connector,
                                             threads=threads)
        self.agent = agent
        self.start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SplitClient:
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"split-client:"
                                  f"{self.agent.device_id}", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._call(self.agent.start(), self.start_timeout_s)
        except BaseException:
            self._stop_loop()
            raise
        return self

    def infer(self, inputs: Inputs, *, timeout: float | None = None) -> InferenceResult:
        return self._call(self.agent.infer(inputs, timeout=timeout), self._wait(timeout))

    def infer_activation(self, cut_tensors: Mapping[str, Array], *,
                         timeout: float | None = None) -> InferenceResult:
        return self._call(self.agent.infer_activation(cut_tensors, timeout=timeout),
                          self._wait(timeout))

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self.agent.close(), 15.0)
        finally:
            self._stop_loop()

    def __enter__(self) -> SplitClient:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _wait(self, timeout: float | None) -> float:
        return (self.agent.config.timeout_s if timeout is None else timeout) + _GRACE_S

    def _call(self, coro: Coroutine[Any, Any, T], wait: float) -> T:
        if self._loop is None:
            coro.close()
            raise StartupError("SplitClient is not started; use 'with SplitClient(...)'")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"edge agent {self.agent.device_id} gave no answer within "
                                   f"{wait:.3g} s", device_id=self.agent.device_id) from None

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return

        async def _drain() -> None:
            await loop.shutdown_default_executor()

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(_drain(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        if not loop.is_running():
            loop.close()
