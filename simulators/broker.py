"""Start a broker for tests, the demo and benchmarks: mosquitto if installed, else amqtt.

:class:`MosquittoBroker` runs the Debian ``mosquitto`` binary on a free loopback port
with the latency-tuned settings kept in ``docker/mosquitto/mosquitto.conf`` (the
``TUNING`` lines below; a test keeps the two in step). It can be stopped and restarted
on the same port, which the fault injection uses. :class:`EmbeddedBroker` runs amqtt
(MQTT 3.1.1 only, no shared subscriptions) in a thread of its own for machines
without mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from splitinfer.errors import StartupError

__all__ = ["TUNING", "Broker", "MosquittoBroker", "EmbeddedBroker", "start_broker",
           "free_port", "wait_for_port", "mosquitto_binary"]

log = logging.getLogger(__name__)

TUNING = (
    "set_tcp_nodelay true",
    "max_inflight_messages 0",
    "max_queued_messages 100000",
    "max_queued_bytes 0",
    "message_size_limit 16777216",
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise StartupError(f"broker did not listen on {host}:{port} within "
                                   f"{timeout:.0f} s") from None
            time.sleep(0.02)


class Broker(Protocol):
    host: str
    port: int
    supports_shared_subscriptions: bool
    supports_mqtt5: bool

    @property
    def url(self) -> str: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class _Lifecycle:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class MosquittoBroker(_Lifecycle):
    """A private mosquitto on ``host:port`` (a free port when 0)."""

    supports_shared_subscriptions = True
    supports_mqtt5 = True

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, binary: str | None = None,
                 extra_config: tuple[str, ...] = ()) -> None:
        found = binary or mosquitto_binary()
        if not found:
            raise StartupError("mosquitto is not installed; install it (apt-get install -y "
                               "mosquitto) or use the embedded broker")
        self.binary = found
        self.host = host
        self.port = port or free_port(host)
        self.extra_config = extra_config
        self._dir = tempfile.TemporaryDirectory(prefix="splitinfer-mosquitto-")
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self._dir.name) / "mosquitto.log"

    def config_text(self) -> str:
        return "\n".join([
            *TUNING,
            "persistence false",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            *self.extra_config,
        ]) + "\n"

    def start(self) -> None:
        if self.running:
            return
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(self.config_text())
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self._proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=logf,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        try:
            wait_for_port(self.host, self.port)
        except StartupError:
            self.stop()
            raise StartupError(f"mosquitto failed to start on port {self.port}: "
                               f"{self.log_path.read_text()[-500:]}") from None
        log.info("mosquitto listening on %s (pid %d)", self.url, self._proc.pid)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """Crash it (SIGKILL): no clean disconnects, no last wills delivered by us."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


class EmbeddedBroker(_Lifecycle):
    """amqtt in a background thread with its own event loop (MQTT 3.1.1)."""

    supports_shared_subscriptions = False
    supports_mqtt5 = False

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        try:
            import amqtt.broker  # noqa: F401
        except ImportError as exc:
            raise StartupError("neither mosquitto nor amqtt is available; "
                               "pip install 'splitinfer[all]'") from exc
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        self._ready.wait(15)
        if self._error is not None:
            raise StartupError(f"embedded broker failed to start: {self._error}")
        wait_for_port(self.host, self.port)

    def _run(self) -> None:
        from amqtt.broker import Broker as AmqttBroker

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        try:
            with warnings_silenced():
                self._broker = AmqttBroker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        with contextlib.suppress(Exception):
            loop.run_until_complete(self._broker.shutdown())
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self._thread = None


@contextlib.contextmanager
def warnings_silenced() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def mosquitto_binary() -> str | None:
    """The mosquitto to run: ``$SPLITINFER_MOSQUITTO`` if set ("" = pretend none is
    installed), else ``mosquitto`` on PATH, else Debian's ``/usr/sbin/mosquitto``."""
    configured = os.environ.get("SPLITINFER_MOSQUITTO")
    if configured is not None:
        return configured or None
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def start_broker(prefer: str = "mosquitto") -> MosquittoBroker | EmbeddedBroker:
    """Start mosquitto when installed (unless ``prefer="embedded"``), else amqtt."""
    if prefer != "embedded" and mosquitto_binary():
        broker: MosquittoBroker | EmbeddedBroker = MosquittoBroker()
    else:
        broker = EmbeddedBroker()
    broker.start()
    return broker
