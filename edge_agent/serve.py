"""``splitinfer edge serve``: the long-running device service.

::

    splitinfer edge serve --config /etc/splitinfer/edge.toml
    splitinfer edge serve --broker mqtt://broker:1883 --artifacts DIR --device-id cam-7 \\
        --http 127.0.0.1:8470

One :class:`EdgeService` holds one :class:`~edge_agent.client.EdgeAgent` (a split
directory) or :class:`~edge_agent.bundle_agent.BundleAgent` (a bundle), built by the same
``from_artifacts`` / ``from_bundle`` as ``edge run``, and answers the apps on the device
through :mod:`edge_agent.local_api`. Settings: :mod:`edge_agent.serve_config`.

Lifecycle:

- **Start**: settings checked (exit 2 naming the bad one), the device id settled
  (:mod:`edge_agent.identity`: configured, or derived once and kept in the state dir), the
  head loaded (exit 2 for a bad split), the HTTP API bound (exit 3 when the address is
  taken); then ``READY=1`` to systemd — the service is up and answering, even before the
  broker is reached.
- **Broker down at boot**: never an exit. The agent's ``start()`` is retried with
  jittered backoff from 0.1 s doubling to ``reconnect_max`` (default 2 s), so a broker that
  comes up is reached within about ``reconnect_max`` s; one warning line, then one a minute.
  Meanwhile ``/healthz`` and ``POST /v1/infer`` answer 503 naming the broker and the last
  error (``Retry-After: 1``): the app decides whether to wait, and no request waits on a
  broker that may not come. Once connected the agent's supervisor keeps the connection up
  (:mod:`edge_agent.supervisor`); while it is down again, new requests get 503
  ``disconnected`` and those already sent are re-published on reconnect within their
  deadline. A bundle with an ``edge_only`` split answers locally instead of 503.
- **SIGTERM / SIGINT**: ``STOPPING=1``; the listening socket is closed (new connections
  refused, requests on kept-alive ones 503 ``shutting_down``); requests in flight are
  answered as they finish, for up to ``drain_timeout`` (4 s); any still waiting then get
  503 ``shutting_down`` when the agent closes (announcing ``offline``). Exit 0 — within
  5 s with the defaults.
- **Watchdog**: with ``WatchdogSec=`` a ``WATCHDOG=1`` every third of it from the event
  loop, while the HTTP thread lives: a stuck loop or a dead server gets the service
  restarted. ``STATUS=`` says connecting / ready / disconnected.
- **Logs**: one line per event; under journald with syslog priorities and no time stamps
  (:func:`edge_agent.systemd.configure_logging`).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.bundle_agent import BundleAgent
from edge_agent.client import AgentConfig, Array, EdgeAgent, InferenceResult
from edge_agent.identity import stable_device_id
from edge_agent.local_api import LocalAPI, Unavailable
from edge_agent.metrics import ServiceMetrics
from edge_agent.serve_config import ServeConfig, is_loopback, resolve
from edge_agent.systemd import configure_logging, notify, watchdog_interval
from edge_agent.transport import MqttConnector
from splitinfer import gctune
from splitinfer.bundle import is_bundle
from splitinfer.errors import DeadlineExceeded, StartupError, TransportError
from splitinfer.manifest import MANIFEST_NAME, Manifest

__all__ = ["EdgeService", "main", "BOOT_RETRY_MIN_S"]

log = logging.getLogger(__name__)
BOOT_RETRY_MIN_S = 0.1
_REMIND_S = 60.0  # a broker still unreachable is logged again this often
_GRACE_S = 5.0  # beyond a request's deadline before an HTTP thread stops waiting


class _DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """The service loop's default executor: each call in a daemon thread of its own.

    The broker connect runs there (paho's blocking ``connect()`` whenever the broker is not
    on loopback, or with TLS), and so do the heads. With the standard pool, a connect stuck
    on a broker whose packets are dropped (no network at boot) held the exit after SIGTERM
    until its 10 s connect timeout ran out: ``asyncio.run`` and the interpreter both join
    the pool's threads (measured: exit 8.1 s after SIGTERM). A daemon thread is simply
    left behind. The thread costs tens of microseconds a call, against a head's
    milliseconds; the HTTP API's ``max_in_flight`` bounds how many run at once. (A
    ThreadPoolExecutor only because ``set_default_executor`` takes nothing else; its own
    pool never starts a thread.)
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the awaiting coroutine, as a pool does
                future.set_exception(exc)
            else:
                future.set_result(result)

        threading.Thread(target=call, name="edge-serve:call", daemon=True).start()
        return future


class EdgeService:
    """The device service: one agent, the local API, the lifecycle above."""

    def __init__(self, config: ServeConfig, agent: EdgeAgent, *,
                 device_id_source: str = "configured") -> None:
        self.config = config
        self.agent = agent
        self.device_id_source = device_id_source
        self.metrics = ServiceMetrics(connected=lambda: self.agent.connected,
                                      counters=lambda: self.agent.counters)
        self.metrics.set_info(device_id=agent.device_id, split_id=agent.manifest.split_id,
                              model=agent.manifest.model)
        self.api: LocalAPI | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False  # agent.start() returned
        self._stopping = False
        self._attempts = 0
        self._last_error = ""
        self._broker = config.broker_config().url()

    @classmethod
    def from_config(cls, config: ServeConfig) -> EdgeService:
        device_id, source = stable_device_id(config.device_id, config.state_dir)
        agent_config = AgentConfig(
            device_id=device_id, broker=config.broker, prefix=config.prefix,
            timeout_s=config.timeout, head_in_thread=True,  # concurrent apps: heads overlap
            reconnect_min_s=min(0.05, config.reconnect_max),
            reconnect_max_s=config.reconnect_max)
        connector = MqttConnector(config.broker_config(),
                                  timeout_s=agent_config.connect_timeout_s)
        threads = config.threads or None
        agent: EdgeAgent
        artifacts = Path(config.artifacts)
        if is_bundle(artifacts) and not (artifacts / MANIFEST_NAME).is_file():
            agent = EdgeAgent.from_bundle(artifacts, config=agent_config, split=config.split,
                                          connector=connector, threads=threads)
        else:
            agent = EdgeAgent.from_artifacts(artifacts, config=agent_config,
                                             connector=connector, threads=threads)
        return cls(config, agent, device_id_source=source)

    # ------------------------------------------------------------ the Backend of local_api

    @property
    def manifest(self) -> Manifest:
        return self.agent.manifest

    def _answers_offline(self) -> bool:
        if isinstance(self.agent, BundleAgent):
            return self.agent.policy.edge_only is not None
        return self.agent.kind == "edge_only"

    def health(self) -> tuple[bool, dict[str, Any]]:
        body: dict[str, Any] = {"device_id": self.agent.device_id,
                                "split_id": self.agent.manifest.split_id,
                                "broker": self._broker, "connected": self.agent.connected}
        if self._stopping:
            return False, {"status": "stopping", "reason": "the service is shutting down",
                           **body}
        reason = self._unavailable_reason()
        if reason is None:
            local = self._answers_offline() and not self.agent.connected
            return True, {"status": "ready", **body,
                          **({"answering": "locally"} if local else {})}
        status, text = reason
        return False, {"status": status, "reason": text, **body}

    def _unavailable_reason(self) -> tuple[str, str] | None:
        if self._started and (self.agent.connected or self._answers_offline()):
            return None
        if not self._started:
            last = f" (last error: {self._last_error})" if self._last_error else ""
            return "connecting", (f"not connected to the broker {self._broker} yet"
                                  f"{last}; retrying every <= {self.config.reconnect_max:g} s,"
                                  f" {self._attempts} attempt(s) so far")
        return "disconnected", (f"lost the connection to the broker {self._broker}; "
                                "reconnecting")

    def infer(self, arrays: dict[str, Array], timeout: float | None = None
              ) -> InferenceResult:
        """From an HTTP thread: the agent's answer for ``arrays`` within ``timeout`` (s;
        None: the configured one), or our errors."""
        loop = self._loop
        if self._stopping or loop is None or loop.is_closed():
            raise Unavailable("the service is stopping", status="shutting_down")
        reason = self._unavailable_reason()
        if reason is not None:
            raise Unavailable(reason[1], status=reason[0])
        timeout = self.config.timeout if timeout is None else timeout
        call = self.agent.infer(arrays, timeout=timeout)
        try:
            future = asyncio.run_coroutine_threadsafe(call, loop)
        except RuntimeError:  # the loop closed between the check and now
            call.close()
            raise Unavailable("the service is stopping", status="shutting_down") from None
        try:
            return future.result(timeout + _GRACE_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"no answer within {timeout + _GRACE_S:g} s",
                                   device_id=self.agent.device_id) from None
        except concurrent.futures.CancelledError:  # the loop ended under it
            raise Unavailable("the service stopped before the answer came",
                              status="shutting_down") from None
        except TransportError as exc:
            if self._stopping:
                raise Unavailable("the service stopped before the answer came",
                                  status="shutting_down") from exc
            raise

    # ------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Serve until SIGTERM/SIGINT (or ``stop`` is set); 0 after a clean drain."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        loop.set_default_executor(_DaemonExecutor())
        stop = stop or asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                loop.add_signal_handler(sig, stop.set)
        host, port = self.config.http_address
        try:
            self.api = LocalAPI(self, host=host, port=port, max_body=self.config.max_body,
                                max_in_flight=self.config.max_in_flight).start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {self.config.http} (http): {exc}; choose "
                               "another HOST:PORT") from exc
        if not is_loopback(host):
            log.warning("the local API listens on %s, not a loopback address: anyone who "
                        "reaches it can run inference (it has no authentication)",
                        self.api.url)
        log.info("serving %s (%s, model %s) as device %s (%s) on %s; broker %s; config %s",
                 self.agent.manifest.split_id, self.agent.kind, self.agent.manifest.model,
                 self.agent.device_id, self.device_id_source, self.api.url, self._broker,
                 self.config.config_file or "none (environment and flags)")
        notify("READY=1", f"STATUS=connecting to {self._broker}")
        tasks = [asyncio.create_task(self._keep_connecting(), name="edge-serve:connect")]
        interval = watchdog_interval()
        if interval is not None:
            tasks.append(asyncio.create_task(self._watchdog(interval),
                                             name="edge-serve:watchdog"))
        try:
            await stop.wait()
        finally:
            await self._shutdown(tasks)
        return 0

    async def _keep_connecting(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BOOT_RETRY_MIN_S
        warned_at: float | None = None
        while True:
            self._attempts += 1
            try:
                await self.agent.start()
            except Exception as exc:
                # StartupError: the broker is not there (yet). Anything else (a TLS file that
                # became unreadable, a bug) must not end this task unseen, leaving the
                # service 'connecting' for ever with no line in the journal: it is logged
                # with its traceback and retried the same way.
                expected = isinstance(exc, StartupError)
                self._last_error = (str(exc.__cause__ or exc) if expected
                                    else f"{type(exc).__name__}: {exc}")
                now = loop.time()
                if warned_at is None or now - warned_at >= _REMIND_S:
                    warned_at = now
                    log.warning("broker %s unreachable (%s); answering 503 and retrying "
                                "every <= %g s (attempt %d)", self._broker, self._last_error,
                                self.config.reconnect_max, self._attempts,
                                exc_info=None if expected else exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter, not crypto
                delay = min(delay * 2, self.config.reconnect_max)
                continue
            self._started = True
            if self.agent.connected:
                log.info("connected to %s as %s (MQTT %s) after %d attempt(s)", self._broker,
                         self.agent.device_id, self.agent.protocol, self._attempts)
                notify(f"STATUS=ready; connected to {self._broker}")
            else:
                log.info("answering locally until %s is reachable", self._broker)
                notify("STATUS=ready; answering locally")
            return

    async def _watchdog(self, interval: float) -> None:
        while True:
            if self.api is not None and self.api.alive():
                notify("WATCHDOG=1")
            await asyncio.sleep(interval / 3)

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        self._stopping = True
        notify("STOPPING=1", "STATUS=draining")
        api = self.api
        in_flight = api.in_flight if api is not None else 0
        log.info("stopping: %d request(s) in flight, draining for up to %g s", in_flight,
                 self.config.drain_timeout)
        if api is not None:
            await asyncio.to_thread(api.stop_accepting)
            until = loop.time() + self.config.drain_timeout
            while api.in_flight and loop.time() < until:
                await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        left = api.in_flight if api is not None else 0
        await self.agent.close()  # what is still pending fails: answered 503 shutting_down
        if api is not None:
            until = loop.time() + 0.5
            while api.in_flight and loop.time() < until:
                await asyncio.sleep(0.01)
        log.info("stopped in %.2f s: %d request(s) were in flight, %d answered 503 when the "
                 "drain ran out", time.perf_counter() - began, in_flight, left)


def main(args: argparse.Namespace) -> int:
    """``splitinfer edge serve``: resolve the settings, then serve until a signal."""
    config = resolve(vars(args))
    configure_logging(getattr(args, "verbose", 0))
    service = EdgeService.from_config(config)
    gctune.tune_for_serving()  # the daemon's own process, its heads loaded
    return asyncio.run(service.run())
