"""``Server``: the worker on a broker — connect, subscribe, reconnect, drain, signals.

::

    server = Server(Config(artifacts="artifacts", broker="mqtt://127.0.0.1:1883"))
    asyncio.run(server.serve())          # or server.run(); or start_in_thread() in tests

The connection is a :class:`splitinfer.mqtt_client.MqttClient` (paho driven by this
loop through its public API). Requests arrive through its ``on_message`` callback, which
hands each one to the :class:`~cloud_service.worker.Worker` on the loop (no task, no
queue per message); answers go out through ``client.publish``, whose future the PUBACK
resolves (no task per answer either). A PUBACK that refuses an answer (reason >= 0x80) is
logged with its reason and the answer tried once more on the slow path, which then counts
it in ``reply_failures``. The worker chunks answers over the broker's maximum packet size
(``client.max_packet_size``: the CONNACK's, or ``?max_packet=`` on the broker URL).

Before subscribing it checks the broker (:mod:`cloud_service.broker_check`): without
shared subscriptions it subscribes plainly and warns once (each replica would then answer
every request); a slow request round trip (a stock mosquitto's ~40 ms) is a warning too.
``on_started`` (e.g. the CLI printing :meth:`Server.ready_line`) runs and ``started`` (a
threading.Event) is set once the subscription is in place; setting
``should_exit`` (from any thread) or SIGTERM/SIGINT (captured only when serving on the
main thread) drains: unsubscribe, answer everything already accepted, wait for the
PUBACKs, disconnect. A second signal skips the wait. If the broker goes away the server
reconnects with capped exponential backoff and subscribes again; answers waiting for a
connection are sent once it is back (within ``reply_timeout_s``).

Sessions and heartbeats (docs/cloud.md "Faults"): with ``worker_id`` the client id is
that id and the session persists (MQTT 5 clean start off + Session Expiry Interval
``session_expiry_s``; MQTT 3.1.1 clean session off), so a restart within
``session_expiry_s`` gets what the broker queued meanwhile; a graceful exit ends the
session (taken over with a clean start, as a fence does) so a replica that left takes no
more share. The heartbeat (:mod:`cloud_service.heartbeat`) beats ``online``,
``draining`` from the first signal, ``offline`` on the way out (and as the last will);
the watchdog fences a peer that went silent.

Hot reload (:mod:`cloud_service.reload`, ``Config.reload``): when the server loaded its
registry from ``config.artifacts`` itself, a task follows that directory and swaps tails
in and out on this loop. ``ready`` (``/readyz``) is subscribed on a live connection and
every split directory served (:meth:`Server.readiness` says why not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from cloud_service.broker_check import (
    SLOW_ROUND_TRIP_S,
    BrokerCheck,
    check_broker,
    subscribe_failure,
)
from cloud_service.config import Config
from cloud_service.heartbeat import HeartbeatPublisher, Load, PeerWatcher, Watchdog, fence
from cloud_service.metrics import ErrorLog, Metrics
from cloud_service.registry import Registry, open_directory
from cloud_service.reload import Reloader, readiness_problems, scan
from cloud_service.worker import Incoming, Worker
from splitinfer import gctune
from splitinfer.errors import StartupError, TransportError
from splitinfer.mqtt_client import (
    Message,
    MqttClient,
    SubscribeRefused,
    Will,
    open_client,
    reason_text,
)

__all__ = ["Server"]

log = logging.getLogger(__name__)

_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SUBSCRIBE_TIMEOUT_S = 10.0
_UNSUBSCRIBE_TIMEOUT_S = 5.0
_DISCONNECT_TIMEOUT_S = 5.0
_REFUSED = 0x80  # PUBACK reason codes from here on refuse the message


class AnswerRefused(TransportError):
    """The broker's PUBACK refused an answer (``reason`` >= 0x80: not authorized, quota
    exceeded, packet too large, ...)."""

    def __init__(self, topic: str, reason: int) -> None:
        super().__init__(f"the broker refused the answer on {topic} (PUBACK "
                         f"{reason_text(reason)})", topic=topic)
        self.reason = reason


class Server:
    """One worker process: see the module docstring."""

    def __init__(self, config: Config, *, registry: Registry | None = None,
                 on_started: Callable[[Server], None] | None = None,
                 tune_gc: bool = False) -> None:
        self.config = config
        self.registry = registry
        # The process is ours (cloud serve): tune its garbage collector once the tails are
        # loaded (splitinfer.gctune). A worker embedded in another program leaves it be.
        self.tune_gc = tune_gc
        # Called once (on the serving loop) when the subscription is in place; the CLI
        # prints ready_line() from it.
        self.on_started = on_started
        self.broker_check: BrokerCheck | None = None
        # What the worker subscribed to: the group's shared filter, or the plain one when
        # the group was not asked for or the broker has no shared subscriptions.
        self.subscription: str = config.subscription()
        self.group: str = config.group
        self.metrics = Metrics()
        self.worker: Worker | None = None
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.error: BaseException | None = None  # why serve() ended, if it failed
        self.protocol: str | None = None  # "5" or "3.1.1" once connected
        self.drained_cleanly: bool | None = None
        # Readiness (/readyz, cloud_service.http): connected and subscribed (assigned
        # below as ``self.ready``), and every split directory served (see ``ready``).
        self._subscribed = False
        # Hot reload of config.artifacts (cloud_service.reload); None when off, or when
        # the registry was handed in rather than loaded from there.
        self.reloader: Reloader | None = None
        self._should_exit = False
        self._force_exit = False
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self._mqtt: MqttClient | None = None  # the live connection, None between them
        self._connected: asyncio.Event | None = None
        # The broker's packet limit as of the last connection (kept while reconnecting, so
        # an answer made meanwhile is chunked for the broker it will be sent to).
        self._max_packet: int | None = config.broker_config().max_packet
        self._refusals = ErrorLog(log)
        topics = config.topics()
        self._status_head = topics.worker_status_filter()[:-1]  # "{prefix}/v1/workers/"
        self.heartbeat: HeartbeatPublisher | None = None
        if config.heartbeat_s > 0:
            self.heartbeat = HeartbeatPublisher(
                config.heartbeat_id, topics.worker_status(config.heartbeat_id),
                self._publish_status, interval_s=config.heartbeat_s,
                persistent=config.persistent, load=Load(
                    queue=lambda: self.metrics.queue_depth(),
                    in_flight=lambda: self.worker.accepted if self.worker else 0,
                    received=lambda: self.metrics.received))
        self.watcher: PeerWatcher | None = None
        self._side_tasks: set[asyncio.Task[Any]] = set()
        if config.fence_after_s > 0:
            self.watcher = PeerWatcher(config.heartbeat_id, config.fence_after_s)

    # --- readiness (any thread) ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Subscribed on a live connection, and every split directory has a tail serving
        it (a reload in progress keeps the old one serving: ready throughout)."""
        return self._subscribed and not self.unready_reasons()

    @ready.setter
    def ready(self, value: bool) -> None:
        self._subscribed = value

    def unready_reasons(self) -> list[str]:
        """What keeps the worker from being ready; [] when it is (or not started yet and
        nothing is known)."""
        reasons = [] if self._subscribed else ["not subscribed to the broker"]
        if self.reloader is not None:
            return reasons + self.reloader.problems()
        if self.registry is not None:
            return reasons + readiness_problems(self.registry)
        return reasons

    def readiness(self) -> tuple[bool, str]:
        """(ready, text) for ``/readyz``: one line per reason, or per stale split."""
        reasons = self.unready_reasons()
        stale = self.reloader.stale() if self.reloader is not None else []
        head = "not ready" if reasons else "ready"
        return not reasons, "\n".join([head, *reasons, *stale]) + "\n"

    # --- exit requests (any thread) ------------------------------------------------------

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        self._wake()

    @property
    def force_exit(self) -> bool:
        return self._force_exit

    @force_exit.setter
    def force_exit(self, value: bool) -> None:
        self._force_exit = value
        if value:
            self._should_exit = True
        self._wake()

    def _wake(self) -> None:
        """Let the serving loop see should_exit / force_exit; safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # serve() reads the flags when it starts

        def apply() -> None:
            if self._should_exit and self._exit is not None:
                self._exit.set()
            if self._force_exit and self._force is not None:
                self._force.set()

        if _running_loop() is loop:
            apply()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(apply)

    def handle_exit(self, sig: int | None = None, frame: Any = None) -> None:
        if self._should_exit:
            log.warning("second signal: exiting without waiting for the queue")
            self.force_exit = True
        else:
            log.info("signal %s: draining (a second one exits at once)",
                     signal.Signals(sig).name if sig else "-")
            self.should_exit = True

    # --- entry points --------------------------------------------------------------------

    def run(self) -> None:
        """Serve until told to exit (blocking); raises StartupError if it cannot start."""
        asyncio.run(self.serve())

    def start_in_thread(self, timeout: float = 60.0) -> threading.Thread:
        """Serve in a daemon thread; return once subscribed (raise what stopped it)."""

        def target() -> None:
            try:
                self.run()
            except StartupError:
                pass  # raised below, in the caller's thread
            except BaseException:
                log.exception("cloud server failed")

        thread = threading.Thread(target=target, name="cloud-server", daemon=True)
        thread.start()
        while not self.started.wait(0.05):
            if self.stopped.is_set() or not thread.is_alive():
                thread.join(5)
                raise self.error or StartupError("server stopped before it started")
            timeout -= 0.05
            if timeout <= 0:
                self.should_exit = True
                raise StartupError("server did not start in time")
        return thread

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        self._force = asyncio.Event()
        self._connected = asyncio.Event()
        if self._should_exit:
            self._exit.set()
        if self._force_exit:
            self._force.set()
        try:
            with self._capture_signals():
                await self._serve()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.stopped.set()

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        installed = []
        for sig in _HANDLED_SIGNALS:
            try:
                loop.add_signal_handler(sig, self.handle_exit, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # Windows / no signal support
                signal.signal(sig, self.handle_exit)
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    # --- the body ------------------------------------------------------------------------

    async def _serve(self) -> None:
        cfg = self.config
        # Fingerprints taken before loading: a directory changed while it loads is seen.
        watch = self.registry is None and cfg.reload
        known = (await asyncio.to_thread(scan, cfg.artifacts) if watch else None) or {}
        if self.registry is None:
            self.registry = await asyncio.to_thread(
                Registry.load, cfg.artifacts, threads=cfg.threads, providers=cfg.providers,
                spinning=cfg.spinning)
        if self.tune_gc:
            gctune.tune_for_serving()
        # The worker exists before the connection: a persistent session's queued requests
        # arrive right after the CONNACK, before anything is subscribed.
        worker = self.worker = Worker(cfg, self.registry, self._publish, metrics=self.metrics,
                                      publish_nowait=self._publish_nowait,
                                      max_packet=self._packet_limit)
        if watch:
            self.reloader = Reloader(
                cfg.artifacts, self.registry, self.metrics, known=known,
                load=lambda d: open_directory(d, threads=cfg.threads,
                                              providers=cfg.providers,
                                              spinning=cfg.spinning),
                interval_s=cfg.reload_interval_s, settle_s=cfg.reload_settle_s)
        try:
            client = await self._connect()
        except TransportError as exc:
            raise StartupError(f"cloud worker cannot start: {exc}") from exc
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self._check(client)
            client = await self._first_subscribe(client)
            log.info("worker %s serving %d split(s) on %s (%s, MQTT %s), max batch %d, "
                     "max delay %.1f ms", cfg.client_id, len(self.registry),
                     cfg.broker_config().url(), self.subscription, client.protocol,
                     cfg.max_batch, cfg.max_delay_ms)
            if self.on_started is not None:
                self.on_started(self)
            self.started.set()
            supervisor = asyncio.create_task(self._supervise(client), name="mqtt-supervisor")
            exit_wait = asyncio.create_task(self._wait(self._exit), name="exit-wait")
            tasks += [supervisor, exit_wait,
                      asyncio.create_task(self._report(), name="metrics-log")]
            if self.heartbeat is not None:
                tasks.append(asyncio.create_task(self.heartbeat.run(), name="heartbeat"))
            if self.reloader is not None:
                tasks.append(asyncio.create_task(self.reloader.run(), name="hot-reload"))
            if self.watcher is not None:
                watchdog = Watchdog(
                    self.watcher, self._fence, self._publish_status,
                    topic_of=cfg.topics().worker_status, on_fenced=self._fenced,
                    check_s=min(0.1, cfg.fence_after_s / 10))
                tasks.append(asyncio.create_task(watchdog.run(), name="watchdog"))
            await asyncio.wait({supervisor, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
            if supervisor.done():
                supervisor.result()  # an unexpected failure: let it out
            await self._drain(worker)
            # The supervisor keeps running while draining: a connection lost meanwhile is
            # made again, so the answers still owed go out.
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await worker.aclose()
            leaving = self._should_exit  # asked to go, not failed: leave nothing behind
            if leaving and self.heartbeat is not None:
                await self.heartbeat.beat("offline", session="clean")
            await self._disconnect()
            if leaving and cfg.persistent:
                await self._end_session()
            log.info("worker %s stopped: %s", cfg.client_id, self.metrics.snapshot())

    @staticmethod
    async def _wait(event: asyncio.Event | None) -> None:
        if event is not None:
            await event.wait()

    def _packet_limit(self) -> int | None:
        """The broker's maximum packet size for the worker's chunking (None: no limit)."""
        return self._max_packet

    async def _connect(self) -> MqttClient:
        cfg = self.config
        broker = cfg.broker_config()
        known = self.protocol or (broker.protocol if broker.protocol != "auto" else None)
        if known is not None:
            broker = broker.with_protocol(known)
        will = (Will(self.heartbeat.topic, self.heartbeat.will(), qos=1, retain=True)
                if self.heartbeat is not None else None)
        # persistent: MQTT 5 clean start off + Session Expiry Interval; 3.1.1 clean
        # session off (MqttClient picks the form the negotiated protocol takes).
        client = await open_client(
            broker, cfg.client_id, will=will, clean_start=not cfg.persistent,
            session_expiry_s=cfg.session_expiry_s if cfg.persistent else None,
            on_message=self._on_message)
        self._mqtt = client
        self.protocol = client.protocol
        limit = client.max_packet_size
        if limit != self._max_packet:
            log.info("broker %s: maximum packet size %s; larger answers go as chunks",
                     broker.url(), limit if limit is not None else "unlimited")
        self._max_packet = limit
        if self._connected is not None:
            self._connected.set()
        return client

    @property
    def max_packet_size(self) -> int | None:
        """The broker's packet limit the worker chunks answers for (None: none known)."""
        return self._max_packet

    def ready_line(self) -> str:
        """One line for people and scripts: splits, broker (no password), group, protocol,
        round trip, and the packet limit when the broker has one."""
        splits = ", ".join(sorted(self.registry or ()))
        group = f"group {self.group}" if self.group else "no group"
        rtt = self.broker_check.round_trip_s if self.broker_check else None
        took = f", round trip {rtt * 1e3:.1f} ms" if rtt is not None else ""
        limit = self._max_packet
        packets = f", max packet {limit} bytes (larger answers chunked)" if limit else ""
        return (f"serving {len(self.registry or ())} split(s) [{splits}] on "
                f"{self.config.broker_config().url()}, {group}, MQTT {self.protocol}{took}"
                f"{packets}")

    async def _check(self, client: MqttClient) -> None:
        """Shared subscriptions and the round trip (cloud_service.broker_check); without
        shared subscriptions, fall back to a plain subscription with one warning."""
        cfg = self.config
        try:
            check = await check_broker(client, cfg.topics(), cfg.group, cfg.broker_config(),
                                       cfg.client_id)
        except (TransportError, asyncio.TimeoutError) as exc:
            log.warning("broker check failed (%s); subscribing as configured",
                        exc or "no answer in time")
            return
        self.broker_check = check
        if cfg.group and not check.shared:
            self.group = ""
            self.subscription = cfg.topics().request_filter()
            log.warning(
                "broker %s has no shared subscriptions (%s): subscribed to %s without the "
                "group %r instead. Every replica on this broker now receives and answers "
                "every request, so run only one; for several, use a broker with $share "
                "(mosquitto, EMQX, HiveMQ, VerneMQ). --no-group asks for this directly, "
                "without the probe.", cfg.broker_config().url(), check.reason,
                self.subscription, cfg.group)
        rtt = check.round_trip_s
        if rtt is not None and check.slow:
            log.warning(
                "slow broker: a QoS 1 request and answer through it took %.1f ms (median "
                "of %d; expected ~1 ms to a broker nearby, %.0f ms is the threshold). A stock "
                "mosquitto stalls ~40 ms per message on Nagle + delayed ACK: set "
                "'set_tcp_nodelay true' in mosquitto.conf (docs/brokers.md)",
                rtt * 1e3, len(check.round_trips_s), SLOW_ROUND_TRIP_S * 1e3)
        elif rtt is not None:
            log.info("broker round trip %.2f ms (QoS 1, median of %d)", rtt * 1e3,
                     len(check.round_trips_s))

    async def _first_subscribe(self, client: MqttClient) -> MqttClient:
        """Subscribe at start-up; a connection lost meanwhile (e.g. taken over by a peer
        fencing this worker id's old session) is reconnected, not a failed start."""
        try:
            await self._subscribe(client)
        except StartupError as exc:
            cause = exc.__cause__
            if isinstance(cause, SubscribeRefused) or not isinstance(
                    cause, (TransportError, asyncio.TimeoutError)):
                raise  # refused: a configuration problem
            log.warning("connection lost while subscribing (%s); reconnecting", exc)
            await self._close(client)
            client = await self._reconnect()
        return client

    async def _subscribe(self, client: MqttClient) -> None:
        topic = self.subscription
        try:
            await asyncio.wait_for(client.subscribe(topic, qos=1), _SUBSCRIBE_TIMEOUT_S)
        except SubscribeRefused as exc:
            hint = ("a broker without shared subscriptions needs --no-group"
                    if topic.startswith("$share/") else
                    "does the broker's ACL let this worker read it?")
            raise StartupError(f"broker refused the subscription {topic!r} "
                               f"({subscribe_failure([exc.reason])}); {hint}") from exc
        except TransportError as exc:
            raise StartupError(f"cannot subscribe to {topic!r}: {exc}") from exc
        except asyncio.TimeoutError as exc:
            raise StartupError(f"cannot subscribe to {topic!r}: no SUBACK within "
                               f"{_SUBSCRIBE_TIMEOUT_S:g} s") from exc
        if self.watcher is not None:
            await self._watch(client)
        self.ready = True  # readiness hook: subscribed on a live connection
        if self.heartbeat is not None and self.started.is_set():
            # Back after a reconnect: say so now rather than at the next tick.
            task = asyncio.get_running_loop().create_task(self.heartbeat.beat(),
                                                          name="heartbeat-now")
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _watch(self, client: MqttClient) -> None:
        """Subscribe to the peers' statuses; without them this worker fences nobody."""
        watcher = self.watcher
        if watcher is None:
            return
        topic = self.config.topics().worker_status_filter()
        failure = ""
        try:
            # QoS 0: a persistent session must not queue beats while this worker is away
            # (old beats delivered late would make a silent peer look alive).
            await asyncio.wait_for(client.subscribe(topic, qos=0), _SUBSCRIBE_TIMEOUT_S)
        except SubscribeRefused as exc:
            failure = subscribe_failure([exc.reason])
        except TransportError as exc:
            failure = str(exc)
        except asyncio.TimeoutError:
            failure = f"no SUBACK within {_SUBSCRIBE_TIMEOUT_S:g} s"
        if failure:
            log.warning("cannot watch the other workers (%s on %r): this worker fences "
                        "no silent peer; does the broker's ACL let workers read it?",
                        failure, topic)
            return
        watcher.connected()

    async def _supervise(self, client: MqttClient) -> None:
        """Wait for the connection to go; then reconnect (and resubscribe), forever."""
        while True:
            await client.lost.wait()
            reason = client.lost_reason or "connection closed"
            self.ready = False  # readiness hook: the connection is gone
            if self._mqtt is client:
                self._mqtt = None
                if self._connected is not None:
                    self._connected.clear()
            if self.watcher is not None:
                self.watcher.disconnected()
            log.warning("lost the broker (%s); reconnecting", reason)
            client = await self._reconnect()

    def _on_message(self, msg: Message) -> None:
        """Every inbound message, on the loop (MqttClient's fast path): requests to the
        worker, peer statuses to the watcher."""
        topic = msg.topic
        if topic.startswith(self._status_head):
            watcher = self.watcher
            worker_id = self.config.topics().parse_worker_status(topic)
            if watcher is not None and worker_id is not None:
                watcher.observe(worker_id, msg.payload)
            return
        worker = self.worker
        if worker is not None:
            worker.submit(Incoming(topic, msg.payload, msg.response_topic, msg.correlation))

    async def _reconnect(self) -> MqttClient:
        cfg = self.config
        delay = cfg.reconnect_min_s
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(max(delay * 2, 0.05), cfg.reconnect_max_s)
            try:
                client = await self._connect()
            except TransportError as exc:
                log.debug("reconnect failed: %s", exc)
                continue
            # Counted before anything waits: answers held for the connection go out as
            # soon as it is up, possibly before the subscription is confirmed.
            self.metrics.reconnects += 1
            if self._draining:
                log.info("reconnected to %s (draining: not subscribing)",
                         cfg.broker_config().url())
                return client
            try:
                await self._subscribe(client)
            except StartupError as exc:
                log.warning("reconnected but %s; retrying", exc)
                await self._close(client)
                continue
            log.info("reconnected to %s and resubscribed", cfg.broker_config().url())
            return client

    def _publish_nowait(self, topic: str, payload: bytes,
                        correlation: bytes | None) -> asyncio.Future[None] | None:
        """Send a QoS 1 answer now; a future the PUBACK resolves, or None (not connected).

        The worker's fast path: no task and no ``asyncio.wait`` per answer. The future
        fails when the connection goes first (the worker then re-sends through
        :meth:`_publish`, which waits for the next connection) or when the PUBACK refuses
        the answer (:class:`AnswerRefused`, logged here with its reason).
        """
        client = self._mqtt
        if client is None or not client.connected:
            return None
        try:
            sent = client.publish(topic, payload, qos=1, correlation=correlation)
        except TransportError:
            return None
        acked: asyncio.Future[None] = sent.get_loop().create_future()
        sent.add_done_callback(lambda fut: self._on_puback(fut, acked, topic))
        return acked

    def _on_puback(self, sent: asyncio.Future[int | None], acked: asyncio.Future[None],
                   topic: str) -> None:
        if acked.done():  # cancelled by a forced exit
            if not sent.cancelled():
                sent.exception()  # retrieved: nobody else will
            return
        if sent.cancelled():
            acked.cancel()
            return
        exc = sent.exception()
        if exc is not None:
            acked.set_exception(exc)
            return
        reason = sent.result()
        if reason is not None and reason >= _REFUSED:
            refused = AnswerRefused(topic, reason)
            self._refusals.report(f"puback_{reason:02x}", "%s", refused)
            acked.set_exception(refused)
            return
        acked.set_result(None)

    async def _publish(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        """QoS 1 publish that survives reconnects; gives up after ``reply_timeout_s``.

        A lost connection fails the PUBACK future (MqttClient), and the answer is sent
        again on the next connection. A PUBACK that refuses it raises
        :class:`AnswerRefused` at once: the same bytes would be refused again.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.reply_timeout_s
        while True:
            remaining = give_up - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no broker connection to answer on {topic} within "
                                   f"{self.config.reply_timeout_s:g} s")
            client = self._mqtt
            if client is None or not client.connected:
                if self._connected is None:
                    raise RuntimeError("server not serving")
                if client is not None:  # just lost: the supervisor is about to notice
                    await asyncio.sleep(0.01)
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._connected.wait(), remaining)
                continue
            try:
                reason = await asyncio.wait_for(
                    client.publish(topic, payload, qos=1, correlation=correlation), remaining)
            except asyncio.TimeoutError:
                continue  # no PUBACK in time: the loop's check gives up
            except TransportError as exc:
                if client.connected:  # refused now while connected: wait a little
                    log.debug("publish to %s failed: %s", topic, exc)
                    await asyncio.sleep(0.05)
                continue
            if reason is not None and reason >= _REFUSED:
                raise AnswerRefused(topic, reason)
            return

    async def _drain(self, worker: Worker) -> None:
        self._draining = True
        self.ready = False  # readiness hook: draining takes no new requests
        if self.watcher is not None:
            self.watcher.active = False  # leaving: fencing is for the ones that stay
        if self.heartbeat is not None:
            await self.heartbeat.beat("draining")
        client = self._mqtt
        if client is not None and client.connected:
            try:
                await asyncio.wait_for(client.unsubscribe(self.subscription),
                                       _UNSUBSCRIBE_TIMEOUT_S)
            except (TransportError, asyncio.TimeoutError) as exc:
                log.warning("unsubscribe failed while draining: %s",
                            exc or "no UNSUBACK in time")
            # Messages the broker sent before the UNSUBACK were handed to the worker as
            # they were read (on_message), before the UNSUBACK itself.
            await asyncio.sleep(0)
        if self._force_exit:
            self.drained_cleanly = False
            return
        drain = asyncio.create_task(worker.drain(), name="drain")
        force = asyncio.create_task(self._wait(self._force), name="force-wait")
        done, _ = await asyncio.wait({drain, force}, timeout=self.config.drain_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        self.drained_cleanly = drain in done
        if drain not in done:
            drain.cancel()
            log.warning("drain stopped early: %d request(s) queued, %d answer(s) unconfirmed",
                        self.metrics.queue_depth(), self.metrics.in_flight())
        await asyncio.gather(drain, force, return_exceptions=True)

    async def _publish_status(self, topic: str, payload: bytes) -> None:
        """A retained QoS 1 status (a heartbeat, or a fenced peer's record)."""
        client = self._mqtt
        if client is None or not client.connected:
            raise TransportError("not connected", topic=topic)
        reason = await asyncio.wait_for(client.publish(topic, payload, qos=1, retain=True),
                                        max(self.config.heartbeat_s, 1.0))
        if reason is not None and reason >= _REFUSED:
            raise AnswerRefused(topic, reason)

    def _broker_for_fencing(self) -> Any:
        broker = self.config.broker_config()
        return broker.with_protocol(self.protocol) if self.protocol else broker

    async def _fence(self, worker_id: str) -> None:
        await fence(self._broker_for_fencing(), worker_id)

    def _fenced(self, _worker_id: str) -> None:
        self.metrics.fenced += 1

    async def _end_session(self) -> None:
        """Drop this worker's persistent session on the broker: a replica that left
        must not go on taking (queueing) a share of the requests."""
        try:
            await fence(self._broker_for_fencing(), self.config.client_id)
        except Exception as exc:
            log.warning("could not end the session of %r (%s): the broker keeps it, and "
                        "queues a share of the requests for it, for up to %g s",
                        self.config.client_id, exc, self.config.session_expiry_s)
        else:
            log.info("session of %r ended", self.config.client_id)

    async def _disconnect(self) -> None:
        client, self._mqtt = self._mqtt, None
        if self._connected is not None:
            self._connected.clear()
        if client is not None:
            await self._close(client)

    @staticmethod
    async def _close(client: MqttClient) -> None:
        """DISCONNECT (no last will) and close; pending PUBACK futures fail."""
        await client.disconnect(_DISCONNECT_TIMEOUT_S)

    async def _report(self) -> None:
        interval = self.config.metrics_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            snap = self.metrics.snapshot()
            log.info("received %d answered %d errors %d batches %d (mean %.1f samples) "
                     "queue %d in flight %d reconnects %d", snap["received"], snap["answered"],
                     snap["errors_total"], snap["batches"], snap["mean_batch_size"],
                     snap["queue_depth"], snap["replies_in_flight"], snap["reconnects"])


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
