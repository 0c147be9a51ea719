"""Start a broker for tests, the demo and benchmarks: mosquitto if installed, else amqtt.

:class:`MosquittoBroker` runs the Debian ``mosquitto`` binary on a free loopback port
with the latency-tuned, memory-bounded settings kept in ``docker/mosquitto/mosquitto.conf``
(the ``TUNING`` lines below; a test keeps the two in step), or with ``tuned=False`` the
stock settings. It can be stopped and restarted on the same port, which the fault injection
uses. For the security tests it also runs the production shape: the dynamic-security
plugin (``dynsec=``: a ``dynamic-security.json``, see ``cloud_service/broker_setup.py``),
a mosquitto password file, and TLS listeners (:class:`TlsListener`: server certificate,
optionally client certificates whose CN is the username and the client id).
:class:`EmbeddedBroker` runs amqtt (MQTT 3.1.1 only, no shared subscriptions) in a thread
of its own for machines without mosquitto.

For the broker matrix (tests/test_brokers.py, docs/brokers.md): :class:`NatsBroker` runs
``nats-server`` with its MQTT gateway and JetStream, :class:`RabbitMQBroker` a RabbitMQ
node of its own with the MQTT plugin; both on free loopback ports with their own
directories, never touching a system instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from cloud_service.broker_setup import (
    BOUNDED_TUNING,
    MAX_INFLIGHT_BYTES,
    MAX_PACKET_SIZE,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
    MEMORY_LIMIT,
    MESSAGE_SIZE_LIMIT,
    find_dynsec_plugin,
)
from splitinfer.errors import StartupError

__all__ = ["TUNING", "MESSAGE_SIZE_LIMIT", "MAX_PACKET_SIZE", "MAX_INFLIGHT_BYTES",
           "MAX_QUEUED_BYTES", "MAX_QUEUED_MESSAGES", "MEMORY_LIMIT", "subscriber_bound_bytes",
           "TlsListener", "dynsec_plugin", "Broker", "MosquittoBroker", "EmbeddedBroker",
           "NatsBroker", "RabbitMQBroker", "start_broker", "free_port", "wait_for_port",
           "mosquitto_binary", "nats_binary", "rabbitmq_binary"]

log = logging.getLogger(__name__)

# The bounded tuning lives with the production config generator (one source for both).
TUNING = BOUNDED_TUNING


def subscriber_bound_bytes() -> int:
    """What the shipped tuning lets mosquitto hold for one subscriber that stops reading.

    mosquitto keeps at most ``max_inflight_bytes`` + ``max_queued_bytes`` of messages for
    it (tested: 48 of 1 MiB reach a resumed worker), but 2.0.11 holds about two copies of
    each (its own ``$SYS/broker/heap/current``: 95 MB for those 48 MiB; the stored message
    and its outgoing packet), so twice that, plus ~256 bytes per queued message."""
    return 2 * (MAX_INFLIGHT_BYTES + MAX_QUEUED_BYTES) + MAX_QUEUED_MESSAGES * 256


def dynsec_plugin() -> str | None:
    """mosquitto's dynamic-security plugin on this machine, None without it."""
    return find_dynsec_plugin()


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener: the server's certificate and key, the CA that signs client
    certificates (and the server's), and whether a client certificate is required.

    With ``client_certs`` the certificate's CN is the username (``use_identity_as_username``:
    no password is asked) and the client id (``use_username_as_clientid``: whatever id the
    client sends is replaced, so one device cannot take another's session)."""

    cafile: str
    certfile: str
    keyfile: str
    client_certs: bool = False
    port: int = 0

    def config_lines(self, host: str, port: int) -> list[str]:
        lines = [f"listener {port} {host}", f"cafile {self.cafile}",
                 f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
        if self.client_certs:
            lines += ["require_certificate true", "use_identity_as_username true",
                      "use_username_as_clientid true"]
        return lines


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
    """A private mosquitto on ``host:port`` (a free port when 0).

    ``dynsec``: a dynamic-security configuration (a path or the parsed JSON) copied into
    the broker's directory on the first start (the plugin rewrites its copy when changed
    at run time with ``mosquitto_ctrl``; restarts keep those changes); anonymous access is
    then off. ``password_file``: a mosquitto password file (``mosquitto_passwd``), the
    plain alternative. ``tls``: TLS listeners, each on a free port (``tls_ports``,
    :meth:`tls_url`). ``plain=False`` leaves out the plain listener on ``port``.
    """

    supports_shared_subscriptions = True
    supports_mqtt5 = True

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, binary: str | None = None,
                 extra_config: tuple[str, ...] = (), tuned: bool = True,
                 dynsec: str | Path | Mapping[str, Any] | None = None,
                 password_file: str | Path | None = None,
                 tls: Sequence[TlsListener] = (), plain: bool = True,
                 allow_anonymous: bool | None = None) -> None:
        found = binary or mosquitto_binary()
        if not found:
            raise StartupError("mosquitto is not installed; install it (apt-get install -y "
                               "mosquitto) or use the embedded broker")
        self.binary = found
        self.host = host
        self.port = port or free_port(host)
        self.extra_config = extra_config
        self.tuned = tuned  # False: mosquitto's defaults (Nagle on, 20 in flight, 1000 queued)
        self._dir = tempfile.TemporaryDirectory(prefix="splitinfer-mosquitto-")
        self.dir = Path(self._dir.name)
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "mosquitto.log"
        self.plugin: str | None = None
        self.dynsec_path: Path | None = None
        if dynsec is not None:
            self.plugin = dynsec_plugin()
            if not self.plugin:
                raise StartupError("mosquitto's dynamic-security plugin is not installed "
                                   "(mosquitto_dynamic_security.so; Debian's mosquitto "
                                   "package ships it); set $SPLITINFER_MOSQUITTO_DYNSEC")
            self.dynsec_path = self.dir / "dynamic-security.json"
            text = (Path(dynsec).read_text() if isinstance(dynsec, (str, Path))
                    else json.dumps(dynsec, indent=1))
            self.dynsec_path.write_text(text)
        self.password_file = str(password_file) if password_file is not None else None
        self.tls = tuple(tls)
        self.tls_ports = [t.port or free_port(host) for t in self.tls]
        self.plain = plain
        secured = dynsec is not None or password_file is not None
        self.allow_anonymous = (not secured) if allow_anonymous is None else allow_anonymous

    def tls_url(self, index: int = 0) -> str:
        return f"mqtts://{self.host}:{self.tls_ports[index]}"

    def config_text(self) -> str:
        uses_files = self.dynsec_path is not None or self.password_file or self.tls
        lines = [
            *(TUNING if self.tuned else ()),
            "persistence false",
            # Root (CI containers) would switch to the 'mosquitto' user, which cannot read
            # our temp directory (keys, the dynsec file it also rewrites).
            *(["user root"] if uses_files and os.geteuid() == 0 else []),
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
        ]
        if self.plugin and self.dynsec_path is not None:
            lines += [f"plugin {self.plugin}", f"plugin_opt_config_file {self.dynsec_path}"]
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.plain:
            lines.append(f"listener {self.port} {self.host}")
        for listener, port in zip(self.tls, self.tls_ports, strict=True):
            lines += listener.config_lines(self.host, port)
        return "\n".join([*lines, *self.extra_config]) + "\n"

    def start(self) -> None:
        if self.running:
            return
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.config_text())
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self._proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=logf,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        try:
            for port in ([self.port] if self.plain else []) + self.tls_ports:
                wait_for_port(self.host, port)
        except StartupError:
            self.stop()
            raise StartupError(f"mosquitto failed to start on port {self.port}: "
                               f"{self.log_path.read_text()[-500:]}") from None
        log.info("mosquitto listening on %s (pid %d)", self.url, self._proc.pid)

    def rss_bytes(self) -> int | None:
        """The broker's resident set size (``/proc/PID/status`` VmRSS), None when not running
        or not on Linux."""
        if not self.running or self._proc is None:
            return None
        try:
            for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

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
        self._drain(loop)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Finish what amqtt leaves behind, here and now, with warnings off.

        amqtt's shutdown leaves client handler tasks and their transports for the
        garbage collector; collected later, in another thread, they raise
        ResourceWarnings inside whatever runs then (seen: in a ``compile`` during
        ``np.load``, which CPython 3.11 turns into a SystemError)."""
        import gc

        with warnings_silenced():
            tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            self._broker = None
            gc.collect()
            loop.close()
            gc.collect()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self._thread = None


class _ProcessBroker(_Lifecycle):
    """A broker run as a child process in a session of its own, in a temp directory.

    :meth:`launch` starts it without waiting (so slow starters can come up in parallel
    with other work), :meth:`wait` waits for its MQTT port; :meth:`start` does both.
    :meth:`stop` ends the child's whole process group (its own session: ours only).
    """

    name = "broker"
    startup_timeout_s = 15.0
    supports_shared_subscriptions = False
    supports_mqtt5 = False

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._dir = tempfile.TemporaryDirectory(prefix=f"splitinfer-{self.name}-")
        self.dir = Path(self._dir.name)
        self.log_path = self.dir / f"{self.name}.log"
        self._procs: list[subprocess.Popen[bytes]] = []

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=self.dir,
                                    start_new_session=True)
        finally:
            logf.close()
        self._procs.append(proc)
        return proc

    def launch(self) -> None:
        if self._procs:
            return
        argv, env = self._command()
        self._spawn(argv, env)

    def wait(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if any(p.poll() is not None for p in self._procs):
                log_text = self.log_path.read_text(errors="replace")[-800:]
                self.stop()
                raise StartupError(f"{self.name} exited during start-up: {log_text}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    log_text = self.log_path.read_text(errors="replace")[-800:]
                    self.stop()
                    raise StartupError(f"{self.name} did not listen on {self.host}:"
                                       f"{self.port} within {self.startup_timeout_s:.0f} s: "
                                       f"{log_text}") from None
                time.sleep(0.05)
        log.info("%s listening on %s", self.name, self.url)

    def start(self) -> None:
        self.launch()
        self.wait()

    def stop(self) -> None:
        """The last started first, each waited for (a RabbitMQ node that loses its epmd
        while shutting down starts another one)."""
        procs, self._procs = self._procs, []
        for proc in reversed(procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if procs:
            self._stopped()

    def _stopped(self) -> None:
        """Clean-up after the processes are gone."""

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


class NatsBroker(_ProcessBroker):
    """``nats-server`` with its MQTT gateway (needs JetStream and a server name).

    MQTT 3.1.1 only; no shared subscriptions (it grants ``$share/…`` as a literal
    filter); a ``.`` in a topic is refused with a disconnect (NATS subjects use ``.``
    where MQTT has ``/``); payloads up to NATS' ``max_payload`` (1 MB by default).
    """

    name = "nats"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, binary: str | None = None,
                 extra_config: tuple[str, ...] = ()) -> None:
        found = binary or nats_binary()
        if not found:
            raise StartupError("nats-server is not installed (apt-get install -y nats-server)")
        self.binary = found
        self.extra_config = extra_config
        super().__init__(host=host, port=port)
        self.client_port = free_port(host)

    def config_text(self) -> str:
        return "\n".join([
            f"server_name: splitinfer_{self.port}",
            f"listen: {self.host}:{self.client_port}",
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}',
            f"mqtt {{ listen: {self.host}:{self.port} }}",
            *self.extra_config,
        ]) + "\n"

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        conf = self.dir / "nats.conf"
        conf.write_text(self.config_text())
        return [self.binary, "-c", str(conf)], None


class RabbitMQBroker(_ProcessBroker):
    """A RabbitMQ node of its own with the MQTT plugin, on free ports, in a temp dir.

    Its own node name, Erlang cookie (``HOME``), epmd port, AMQP and distribution ports,
    Mnesia/log/plugin files: a system RabbitMQ on the same machine is left alone. Takes
    ~15 s to boot. RabbitMQ before 3.13: MQTT 3.1.1 only, no shared subscriptions.
    """

    name = "rabbitmq"
    startup_timeout_s = 45.0

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 binary: str | None = None) -> None:
        found = binary or rabbitmq_binary()
        if not found:
            raise StartupError("rabbitmq-server is not installed")
        epmd = shutil.which("epmd")
        if not epmd:
            raise StartupError("epmd (Erlang) is not on PATH; RabbitMQ needs it")
        self.binary, self.epmd = found, epmd
        super().__init__(host=host, port=port)
        self.amqp_port, self.dist_port, self.epmd_port = (free_port(host) for _ in range(3))
        self.node = f"splitinfer{self.port}@localhost"

    def _stopped(self) -> None:
        # An epmd the node may have started itself (daemonised, out of our process group)
        # on our port: 'epmd -kill' ends only the one on that port.
        subprocess.run([self.epmd, "-port", str(self.epmd_port), "-kill"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                       timeout=10)

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex)
        cookie.chmod(0o600)
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.dir / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.default = {self.host}:{self.amqp_port}",
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}",
            "mqtt.allow_anonymous = true",
            "loopback_users = none",
        ]) + "\n")
        env = {
            **os.environ, "HOME": str(home), "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port), "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(self.dir / "feature_flags"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.dir / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
        }
        # An epmd of our own (foreground, our child) on our own port, before the node.
        self._spawn([self.epmd, "-port", str(self.epmd_port)], env)
        wait_for_port("127.0.0.1", self.epmd_port, timeout=5)
        return [self.binary], env


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


def nats_binary() -> str | None:
    """``$SPLITINFER_NATS`` if set ("" = none), else ``nats-server`` on PATH or in
    /usr/sbin."""
    return _binary("SPLITINFER_NATS", "nats-server", "/usr/sbin/nats-server")


def rabbitmq_binary() -> str | None:
    """``$SPLITINFER_RABBITMQ`` if set ("" = none), else Debian's rabbitmq-server script
    (the one under /usr/lib/rabbitmq/bin: /usr/sbin's wrapper switches user)."""
    return _binary("SPLITINFER_RABBITMQ", None, "/usr/lib/rabbitmq/bin/rabbitmq-server")


def _binary(env: str, name: str | None, fallback: str) -> str | None:
    configured = os.environ.get(env)
    if configured is not None:
        return configured or None
    found = shutil.which(name) if name else None
    if found:
        return found
    return fallback if Path(fallback).exists() else None


def start_broker(prefer: str = "mosquitto") -> MosquittoBroker | EmbeddedBroker:
    """Start mosquitto when installed (unless ``prefer="embedded"``), else amqtt."""
    if prefer != "embedded" and mosquitto_binary():
        broker: MosquittoBroker | EmbeddedBroker = MosquittoBroker()
    else:
        broker = EmbeddedBroker()
    broker.start()
    return broker
