"""``Server``: the worker on a broker — connect, subscribe, reconnect, drain, signals.

::

    server = Server(Config(artifacts="artifacts", broker="mqtt://127.0.0.1:1883"))
    asyncio.run(server.serve())          # or server.run(); or start_in_thread() in tests

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
that id and the session persists (:func:`cloud_service.paho_io.session_options`), so a
restart within ``session_expiry_s`` gets what the broker queued meanwhile; a graceful exit
ends the session (taken over with a clean start, as a fence does) so a replica that left
takes no more share. The heartbeat (:mod:`cloud_service.heartbeat`) beats ``online``,
``draining`` from the first signal, ``offline`` on the way out (and as the last will);
the watchdog fences a peer that went silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloud_service.broker_check import (
    SLOW_ROUND_TRIP_S,
    BrokerCheck,
    check_broker,
    subscribe_failure,
)
from cloud_service.config import Config
from cloud_service.heartbeat import HeartbeatPublisher, Load, PeerWatcher, Watchdog, fence
from cloud_service.metrics import Metrics
from cloud_service.paho_io import session_options, tune
from cloud_service.registry import Registry
from cloud_service.worker import Incoming, Worker
from splitinfer.errors import StartupError, TransportError
from splitinfer.mqtt import connect, result_properties

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["Server"]

log = logging.getLogger(__name__)

_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_UNSUBSCRIBE_TIMEOUT_S = 5.0
_DISCONNECT_TIMEOUT_S = 5.0


@dataclass(eq=False)
class _Connection:
    client: aiomqtt.Client
    protocol: str
    lost: asyncio.Future[None] = field(default_factory=asyncio.Future)
    acks: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # fast path, by mid

    def fail_acks(self, reason: str) -> None:
        acks, self.acks = self.acks, {}
        for future in acks.values():
            if not future.done():
                future.set_exception(TransportError(reason))


class _Ack:
    """What aiomqtt's PUBACK handler ``set()``s: resolves a fast-path future."""

    __slots__ = ("conn", "future", "mid")

    def __init__(self, future: asyncio.Future[None], mid: int, conn: _Connection) -> None:
        self.future, self.mid, self.conn = future, mid, conn

    def set(self) -> None:
        self.conn.acks.pop(self.mid, None)
        if not self.future.done():
            self.future.set_result(None)


class Server:
    """One worker process: see the module docstring."""

    def __init__(self, config: Config, *, registry: Registry | None = None,
                 on_started: Callable[[Server], None] | None = None) -> None:
        self.config = config
        self.registry = registry
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
        # Readiness (/readyz, cloud_service.http): True while connected and subscribed.
        self.ready = False
        self._should_exit = False
        self._force_exit = False
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self._conn: _Connection | None = None
        self._connected: asyncio.Event | None = None
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
        if self.registry is None:
            self.registry = await asyncio.to_thread(
                Registry.load, cfg.artifacts, threads=cfg.threads, providers=cfg.providers)
        try:
            conn = await self._connect()
        except TransportError as exc:
            raise StartupError(f"cloud worker cannot start: {exc}") from exc
        worker = self.worker = Worker(cfg, self.registry, self._publish, metrics=self.metrics,
                                      publish_nowait=self._publish_nowait)
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self._check(conn)
            conn = await self._first_subscribe(conn)
            log.info("worker %s serving %d split(s) on %s (%s, MQTT %s), max batch %d, "
                     "max delay %.1f ms", cfg.client_id, len(self.registry),
                     cfg.broker_config().url(), self.subscription, conn.protocol,
                     cfg.max_batch, cfg.max_delay_ms)
            if self.on_started is not None:
                self.on_started(self)
            self.started.set()
            supervisor = asyncio.create_task(self._supervise(conn), name="mqtt-supervisor")
            exit_wait = asyncio.create_task(self._wait(self._exit), name="exit-wait")
            tasks += [supervisor, exit_wait,
                      asyncio.create_task(self._report(), name="metrics-log")]
            if self.heartbeat is not None:
                tasks.append(asyncio.create_task(self.heartbeat.run(), name="heartbeat"))
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
            # The pump keeps running while draining: it hands over what the broker sent
            # before the unsubscribe took effect, and PUBACKs arrive through it.
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

    async def _connect(self) -> _Connection:
        cfg = self.config
        broker = cfg.broker_config()
        will = (self.heartbeat.topic, self.heartbeat.will()) if self.heartbeat else None

        def options(protocol: str) -> dict[str, Any]:
            return session_options(protocol, persistent=cfg.persistent,
                                   expiry_s=cfg.session_expiry_s, will=will)

        known = self.protocol or (broker.protocol if broker.protocol != "auto" else None)
        if known is not None:
            client, protocol = await connect(broker.with_protocol(known), cfg.client_id,
                                             **options(known))
        else:
            try:
                client, protocol = await connect(broker, cfg.client_id, **options("5"))
            except ValueError:  # auto fell back to 3.1.1, which takes no MQTT 5 options
                client, protocol = await connect(broker.with_protocol("3.1.1"), cfg.client_id,
                                                 **options("3.1.1"))
        # aiomqtt warns past 10 unacknowledged publishes; a busy worker has hundreds.
        client.pending_calls_threshold = 1_000_000
        tune(client, asyncio.get_running_loop())
        conn = _Connection(client, protocol)
        self._conn = conn
        self.protocol = protocol
        if self._connected is not None:
            self._connected.set()
        return conn

    def ready_line(self) -> str:
        """One line for people and scripts: splits, broker (no password), group, protocol."""
        splits = ", ".join(sorted(self.registry or ()))
        group = f"group {self.group}" if self.group else "no group"
        rtt = self.broker_check.round_trip_s if self.broker_check else None
        took = f", round trip {rtt * 1e3:.1f} ms" if rtt is not None else ""
        return (f"serving {len(self.registry or ())} split(s) [{splits}] on "
                f"{self.config.broker_config().url()}, {group}, MQTT {self.protocol}{took}")

    async def _check(self, conn: _Connection) -> None:
        """Shared subscriptions and the round trip (cloud_service.broker_check); without
        shared subscriptions, fall back to a plain subscription with one warning."""
        import aiomqtt

        cfg = self.config
        try:
            check = await check_broker(conn.client, conn.protocol, cfg.topics(), cfg.group,
                                       cfg.broker_config(), cfg.client_id)
        except (aiomqtt.MqttError, TransportError) as exc:
            log.warning("broker check failed (%s); subscribing as configured", exc)
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

    async def _first_subscribe(self, conn: _Connection) -> _Connection:
        """Subscribe at start-up; a connection lost meanwhile (e.g. taken over by a peer
        fencing this worker id's old session) is reconnected, not a failed start."""
        import aiomqtt

        try:
            await self._subscribe(conn)
        except StartupError as exc:
            if not isinstance(exc.__cause__, aiomqtt.MqttError):
                raise  # refused: a configuration problem
            log.warning("connection lost while subscribing (%s); reconnecting", exc)
            await self._close(conn)
            conn = await self._reconnect()
        return conn

    async def _subscribe(self, conn: _Connection) -> None:
        import aiomqtt

        topic = self.subscription
        try:
            granted = await conn.client.subscribe(topic, qos=1)
        except aiomqtt.MqttError as exc:
            raise StartupError(f"cannot subscribe to {topic!r}: {exc}") from exc
        failure = subscribe_failure(granted)
        if failure:
            hint = ("a broker without shared subscriptions needs --no-group"
                    if topic.startswith("$share/") else
                    "does the broker's ACL let this worker read it?")
            raise StartupError(f"broker refused the subscription {topic!r} ({failure}); "
                               f"{hint}")
        if self.watcher is not None:
            await self._watch(conn)
        self.ready = True  # readiness hook: subscribed on a live connection
        if self.heartbeat is not None and self.started.is_set():
            # Back after a reconnect: say so now rather than at the next tick.
            task = asyncio.get_running_loop().create_task(self.heartbeat.beat(),
                                                          name="heartbeat-now")
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _watch(self, conn: _Connection) -> None:
        """Subscribe to the peers' statuses; without them this worker fences nobody."""
        import aiomqtt

        watcher = self.watcher
        if watcher is None:
            return
        topic = self.config.topics().worker_status_filter()
        try:
            # QoS 0: a persistent session must not queue beats while this worker is away
            # (old beats delivered late would make a silent peer look alive).
            failure = subscribe_failure(await conn.client.subscribe(topic, qos=0))
        except aiomqtt.MqttError as exc:
            failure = str(exc)
        if failure:
            log.warning("cannot watch the other workers (%s on %r): this worker fences "
                        "no silent peer; does the broker's ACL let workers read it?",
                        failure, topic)
            return
        watcher.connected()

    async def _supervise(self, conn: _Connection) -> None:
        """Pump messages into the worker; on a lost connection reconnect and resubscribe."""
        import aiomqtt

        while True:
            try:
                await self._pump(conn)
            except aiomqtt.MqttError as exc:
                reason: object = exc
            else:
                reason = "message stream ended"
            self.ready = False  # readiness hook: the connection is gone
            if not conn.lost.done():
                conn.lost.set_result(None)
            conn.fail_acks(f"connection lost before the PUBACK: {reason}")
            if self._conn is conn:
                self._conn = None
                if self._connected is not None:
                    self._connected.clear()
            if self.watcher is not None:
                self.watcher.disconnected()
            log.warning("lost the broker (%s); reconnecting", reason)
            conn = await self._reconnect()
            self.metrics.reconnects += 1

    async def _pump(self, conn: _Connection) -> None:
        worker = self.worker
        if worker is None:
            return
        # aiomqtt's iterator spends a task and an asyncio.wait on every message (and its
        # Message and queue some more): paho's message callback, which runs on the loop in
        # aiomqtt's reader, hands each message to the worker directly instead. The
        # iterator stays, to take what was queued before and to raise when the
        # connection goes.
        paho = getattr(conn.client, "_client", None)
        submit = self._route
        if paho is not None:

            def on_message(_client: Any, _userdata: Any, message: Any) -> None:
                try:
                    incoming = _incoming_paho(message)
                except Exception as exc:  # e.g. a topic that is not UTF-8: drop that one
                    log.warning("unreadable message dropped: %r", exc)
                    return
                submit(incoming)

            paho.on_message = on_message
        queue = getattr(conn.client, "_queue", None)
        if not isinstance(queue, asyncio.Queue):
            queue = None
        async for message in conn.client.messages:
            submit(_incoming(message))
            while queue is not None and not queue.empty():
                submit(_incoming(queue.get_nowait()))

    def _route(self, incoming: Incoming) -> None:
        """Requests to the worker, peer statuses to the watcher."""
        worker = self.worker
        if incoming.topic.startswith(self._status_head):
            watcher = self.watcher
            worker_id = self.config.topics().parse_worker_status(incoming.topic)
            if watcher is not None and worker_id is not None:
                watcher.observe(worker_id, incoming.payload)
            return
        if worker is not None:
            worker.submit(incoming)

    async def _reconnect(self) -> _Connection:
        cfg = self.config
        delay = cfg.reconnect_min_s
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(max(delay * 2, 0.05), cfg.reconnect_max_s)
            try:
                conn = await self._connect()
            except TransportError as exc:
                log.debug("reconnect failed: %s", exc)
                continue
            if self._draining:
                log.info("reconnected to %s (draining: not subscribing)",
                         cfg.broker_config().url())
                return conn
            try:
                await self._subscribe(conn)
            except StartupError as exc:
                log.warning("reconnected but %s; retrying", exc)
                await self._close(conn)
                continue
            log.info("reconnected to %s and resubscribed", cfg.broker_config().url())
            return conn

    def _publish_nowait(self, topic: str, payload: bytes,
                        correlation: bytes | None) -> asyncio.Future[None] | None:
        """Send a QoS 1 answer now; a future the PUBACK resolves, or None (not connected).

        The worker's fast path: no task and no ``asyncio.wait`` per answer. It puts its
        own entry where aiomqtt keeps pending publishes (so aiomqtt's PUBACK handler
        resolves it); a lost connection fails it and the worker falls back to
        :meth:`_publish`, which waits for the next connection.
        """
        conn = self._conn
        paho = getattr(conn.client, "_client", None) if conn is not None else None
        pending = getattr(conn.client, "_pending_publishes", None) if conn is not None \
            else None
        if conn is None or conn.lost.done() or paho is None or not isinstance(pending, dict):
            return None
        props = result_properties(correlation) if conn.protocol == "5" and correlation \
            else None
        info = paho.publish(topic, payload, 1, False, props)
        if info.rc:
            return None  # refused now (not connected): the slow path waits and retries
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if info.is_published():
            future.set_result(None)
            return future
        pending[info.mid] = _Ack(future, info.mid, conn)
        conn.acks[info.mid] = future
        return future

    async def _publish(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        """QoS 1 publish that survives reconnects; gives up after ``reply_timeout_s``.

        One task per answer and no ``wait_for`` (each would add a task): the publish races
        the connection's ``lost`` future, bounded by the time left.
        """
        import aiomqtt

        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.reply_timeout_s
        while True:
            remaining = give_up - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no broker connection to answer on {topic} within "
                                   f"{self.config.reply_timeout_s:g} s")
            conn = self._conn
            if conn is None:
                if self._connected is None:
                    raise RuntimeError("server not serving")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._connected.wait(), remaining)
                continue
            props = result_properties(correlation) if conn.protocol == "5" and correlation \
                else None
            # timeout=inf: aiomqtt then awaits the PUBACK without a wait_for task.
            publish = asyncio.ensure_future(conn.client.publish(
                topic, payload, qos=1, properties=props, timeout=math.inf))
            try:
                await asyncio.wait((publish, conn.lost), timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                publish.cancel()
                raise
            if not publish.done():
                publish.cancel()  # lost (send it again on the next connection) or timed out
                continue
            try:
                publish.result()
                return
            except aiomqtt.MqttError as exc:
                if not conn.lost.done():  # refused while connected: wait a little
                    log.debug("publish to %s failed: %s", topic, exc)
                    await asyncio.sleep(0.05)

    async def _drain(self, worker: Worker) -> None:
        import aiomqtt

        self._draining = True
        self.ready = False  # readiness hook: draining takes no new requests
        if self.watcher is not None:
            self.watcher.active = False  # leaving: fencing is for the ones that stay
        if self.heartbeat is not None:
            await self.heartbeat.beat("draining")
        conn = self._conn
        if conn is not None:
            try:
                await conn.client.unsubscribe(self.subscription,
                                              timeout=_UNSUBSCRIBE_TIMEOUT_S)
            except aiomqtt.MqttError as exc:
                log.warning("unsubscribe failed while draining: %s", exc)
            # Messages delivered before the UNSUBACK are ours: let the pump take them.
            while len(conn.client.messages) and not conn.lost.done():
                await asyncio.sleep(0.001)
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
        conn = self._conn
        if conn is None or conn.lost.done():
            raise TransportError("not connected")
        await conn.client.publish(topic, payload, qos=1, retain=True,
                                  timeout=max(self.config.heartbeat_s, 1.0))

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
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._close(conn)

    @staticmethod
    async def _close(conn: _Connection) -> None:
        conn.fail_acks("connection closed before the PUBACK")
        try:
            await asyncio.wait_for(conn.client.__aexit__(None, None, None),
                                   _DISCONNECT_TIMEOUT_S)
        except Exception as exc:  # already gone: nothing left to close cleanly
            log.debug("disconnect: %r", exc)

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


def _incoming_paho(message: Any) -> Incoming:
    """A paho ``MQTTMessage`` as the worker takes it (payload bytes, MQTT 5 properties)."""
    props = getattr(message, "properties", None)
    response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    return Incoming(topic=message.topic, payload=bytes(message.payload),
                    response_topic=response_topic if isinstance(response_topic, str) else None,
                    correlation=bytes(correlation) if correlation else None)


def _incoming(message: aiomqtt.Message) -> Incoming:
    payload = message.payload
    if isinstance(payload, str):
        data = payload.encode()
    elif isinstance(payload, (bytes, bytearray)):
        data = bytes(payload)
    elif payload is None:
        data = b""
    else:
        data = str(payload).encode()
    props = message.properties
    response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    return Incoming(topic=message.topic.value, payload=data,
                    response_topic=response_topic if isinstance(response_topic, str) else None,
                    correlation=bytes(correlation) if correlation else None)
