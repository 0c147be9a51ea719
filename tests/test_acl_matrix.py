"""The ACL matrix (issue 10): a real mosquitto with the dynamic-security config that
``splitinfer broker config`` writes, over plain TCP + password, TLS + password and TLS +
client certificate.

Every attack is answered by the broker itself — CONNACK, SUBACK or PUBACK "not
authorized" — and every "0 messages delivered" is read after a barrier: a legitimate
message sent after the forbidden one, on the same path, that has arrived (mosquitto
delivers one publisher's messages to one subscriber in order), so nothing is left in flight
when the count is taken. Legitimate device and worker traffic is checked on every listener.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloud_service.broker_setup import dynsec_config
from simulators.support.broker import MosquittoBroker, TlsListener, dynsec_plugin, mosquitto_binary

pytestmark = pytest.mark.integration

PREFIX = "acl"
DEVICES = ("cam-1", "cam-2")
WORKER = "worker"
PASSWORDS = {"cam-1": "pw-cam-1-" + uuid.uuid4().hex, "cam-2": "pw-cam-2-" + uuid.uuid4().hex,
             WORKER: "pw-worker-" + uuid.uuid4().hex, "admin": "pw-admin-" + uuid.uuid4().hex}
GROUP = "splitinfer-workers"
REQ = f"{PREFIX}/v1/req"
NOT_AUTHORIZED = 0x87
# The listeners with password authentication; "cert" (client certificates) has its own tests.
PASSWORD_LISTENERS = ("plain", "tls")


# ---------------------------------------------------------------- certificates (openssl CLI)

NO_OPENSSL = ("the openssl command is not installed (apt-get install -y openssl; Debian's "
              "ca-certificates brings it): no test certificates, so no TLS listeners")


@dataclass(frozen=True)
class Pki:
    dir: Path | None  # None without openssl: the TLS cases fail saying so, the plain ones run

    def path(self, name: str) -> str:
        if self.dir is None:
            pytest.fail(NO_OPENSSL)
        return str(self.dir / name)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key_and_csr(cwd: Path, name: str, cn: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=cwd)


def _ca(cwd: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=cwd)


def _sign(cwd: Path, name: str, ca: str, ext: str | None = None) -> None:
    args = ["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2"]
    if ext:
        args += ["-extfile", ext]
    _openssl(*args, cwd=cwd)


def make_pki(root: Path) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, device certificates (CN = device
    id) and one device certificate from a CA the broker does not trust."""
    root.mkdir(parents=True, exist_ok=True)
    _ca(root, "ca")
    _key_and_csr(root, "server", "localhost")
    (root / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _sign(root, "server", "ca", "san.ext")
    for dev in DEVICES:
        _key_and_csr(root, dev, dev)
        _sign(root, dev, "ca")
    _ca(root, "rogue-ca")
    _key_and_csr(root, "rogue", "cam-2")
    _sign(root, "rogue", "rogue-ca")
    return Pki(root)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not shutil.which("openssl"):
        return Pki(None)
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(pki: Pki) -> Iterator[MosquittoBroker]:
    if not mosquitto_binary():
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does)")
    if not dynsec_plugin():
        pytest.skip("mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) is "
                    "not installed; Debian's mosquitto package ships it")
    config, _ = dynsec_config(devices=DEVICES, workers=[WORKER], prefix=PREFIX,
                              passwords=PASSWORDS)
    tls: tuple[TlsListener, ...] = ()
    if pki.dir is not None:
        server = dict(cafile=pki.path("ca.pem"), certfile=pki.path("server.pem"),
                      keyfile=pki.path("server.key"))
        tls = (TlsListener(**server), TlsListener(**server, client_certs=True))
    b = MosquittoBroker(dynsec=config, tls=tls)
    b.start()
    yield b
    b.close()


# ---------------------------------------------------------------- a small sync MQTT 5 peer

@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    ca: str | None = None  # TLS when set


def endpoint(broker: MosquittoBroker, pki: Pki, kind: str) -> Endpoint:
    if kind == "plain":
        return Endpoint(broker.host, broker.port)
    ca = pki.path("ca.pem")  # fails without openssl (then the broker has no TLS listener)
    return Endpoint(broker.host, broker.tls_ports[0 if kind == "tls" else 1], ca=ca)


class Peer:
    """One paho MQTT 5 client on its own network thread; never reconnects by itself."""

    def __init__(self, ep: Endpoint, *, username: str | None = None,
                 password: str | None = None, client_id: str = "",
                 cert: tuple[str, str] | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ep.ca:
            ctx = ssl.create_default_context(cafile=ep.ca)
            if cert:
                ctx.load_cert_chain(*cert)
            self.client.tls_set_context(ctx)
        self.ep = ep
        self.messages: list[tuple[str, bytes]] = []
        self.reason: Any = None
        self.disconnects = 0
        self.connack_props: Any = None
        self._cond = threading.Condition()
        self._acks: dict[int, int] = {}
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish

    # paho callbacks (network thread)
    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, props: Any = None) -> None:
        with self._cond:
            self.reason, self.connack_props = reason, props
            self._cond.notify_all()

    def _on_disconnect(self, *_args: Any) -> None:
        with self._cond:
            self.disconnects += 1
            if self.reason is None:
                self.reason = "disconnected before CONNACK"
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any = None) -> None:
        with self._cond:
            self._acks[mid] = int(codes[0].value)
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any = None) -> None:
        with self._cond:
            self._acks[mid] = int(getattr(reason, "value", reason) or 0)
            self._cond.notify_all()

    def _wait(self, check: Callable[[], bool], timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while not check():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def connect(self) -> str:
        """"Success" or why not (the CONNACK's reason, or the TLS/socket error)."""
        try:
            self.client.connect(self.ep.host, self.ep.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            return f"{type(exc).__name__}: {exc}"
        self.client.loop_start()
        assert self._wait(lambda: self.reason is not None), "no CONNACK"
        if self.disconnects or isinstance(self.reason, str) or self.reason.is_failure:
            self.client.loop_stop()
            return str(self.reason)
        return "Success"

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        assert self._wait(lambda: mid in self._acks), f"no SUBACK for {topic}"
        return self._acks.pop(mid)

    def publish(self, topic: str, payload: bytes = b"x", *, properties: Any = None,
                retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        assert self._wait(lambda: info.mid in self._acks), f"no PUBACK for {topic}"
        return self._acks.pop(info.mid)

    def on(self, topic: str) -> list[bytes]:
        with self._cond:
            return [p for t, p in self.messages if t == topic]

    def wait_count(self, topic: str, n: int, timeout: float = 10.0) -> bool:
        return self._wait(lambda: len([t for t, _ in self.messages if t == topic]) >= n,
                          timeout)

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(ep: Endpoint, **kw: Any) -> Peer:
        peer = Peer(ep, **kw)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def device(make: Callable[..., Peer], ep: Endpoint, dev: str, **kw: Any) -> Peer:
    kw.setdefault("client_id", dev)
    peer = make(ep, username=dev, password=PASSWORDS[dev], **kw)
    assert peer.connect() == "Success"
    return peer


def worker(make: Callable[..., Peer], ep: Endpoint, client_id: str | None = None) -> Peer:
    peer = make(ep, username=WORKER, password=PASSWORDS[WORKER],
                client_id=client_id or f"w-{uuid.uuid4().hex[:6]}")
    assert peer.connect() == "Success"
    assert peer.subscribe(f"$share/{GROUP}/{REQ}/+/+") < 0x80
    assert peer.subscribe(f"{PREFIX}/v1/status/+") < 0x80
    assert peer.subscribe(f"{PREFIX}/v1/workers/+") < 0x80
    return peer


def report(case: str, kind: str, result: object) -> None:
    print(f"ACL {kind:5} {case}: {result}")


# ---------------------------------------------------------------- authentication

@pytest.mark.parametrize("kind", PASSWORD_LISTENERS)
def test_anonymous_wrong_password_and_unknown_user_are_refused(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer], kind: str) -> None:
    ep = endpoint(broker, pki, kind)
    cases = {
        "anonymous": peers(ep, client_id="cam-1"),
        "wrong password": peers(ep, username="cam-1", password="guess", client_id="cam-1"),
        "unknown user": peers(ep, username="cam-9", password="x", client_id="cam-9"),
        "worker name, device password": peers(ep, username=WORKER,
                                               password=PASSWORDS["cam-1"]),
    }
    for case, peer in cases.items():
        got = peer.connect()
        report(case, kind, f"CONNACK {got}")
        assert got == "Not authorized", (case, got)


@pytest.mark.parametrize("kind", PASSWORD_LISTENERS)
def test_a_device_cannot_use_another_client_id(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer], kind: str) -> None:
    ep = endpoint(broker, pki, kind)
    victim = device(peers, ep, "cam-2")
    w = worker(peers, ep)
    for spoof in ("cam-2", "", "cam-1x"):
        got = peers(ep, username="cam-1", password=PASSWORDS["cam-1"],
                    client_id=spoof).connect()
        report(f"spoofed client id {spoof!r}", kind, f"CONNACK {got}")
        assert got == "Not authorized", (spoof, got)
    # the victim was never kicked off: its session still carries a request to the worker
    assert victim.publish(f"{REQ}/m/cam-2", b"still here") == 0
    assert w.wait_count(f"{REQ}/m/cam-2", 1)
    assert victim.connected and victim.disconnects == 0
    assert "cam-2 already connected" not in broker.log_path.read_text()


@pytest.mark.parametrize("kind", PASSWORD_LISTENERS)
def test_workers_may_use_any_client_id(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer], kind: str) -> None:
    """A worker fences a hung peer by connecting with the peer's client id."""
    ep = endpoint(broker, pki, kind)
    peer = worker(peers, ep, client_id="worker-a")
    fencer = peers(ep, username=WORKER, password=PASSWORDS[WORKER], client_id="worker-a")
    assert fencer.connect() == "Success"
    assert peer._wait(lambda: peer.disconnects == 1), "the fenced session was not dropped"


# ---------------------------------------------------------------- cross-device reads, writes

@pytest.mark.parametrize("kind", PASSWORD_LISTENERS)
def test_cross_device_subscribe_is_refused_and_delivers_nothing(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer], kind: str) -> None:
    ep = endpoint(broker, pki, kind)
    a, b = device(peers, ep, "cam-1"), device(peers, ep, "cam-2")
    w = worker(peers, ep)
    assert b.subscribe(f"{PREFIX}/v1/res/cam-2") < 0x80
    for topic in (f"{PREFIX}/v1/res/cam-2", f"{PREFIX}/v1/res/+", f"{PREFIX}/v1/res/#", "#",
                  "+/v1/res/cam-2", f"$share/g/{PREFIX}/v1/res/cam-2",
                  f"{PREFIX}/v1/status/+", f"{PREFIX}/v1/workers/+", "$SYS/#",
                  "$CONTROL/dynamic-security/#"):
        code = a.subscribe(topic)
        report(f"cam-1 SUBSCRIBE {topic}", kind, f"SUBACK 0x{code:02X}")
        assert code == NOT_AUTHORIZED, (topic, code)
    assert a.subscribe(f"{PREFIX}/v1/res/cam-1") < 0x80
    for i in range(3):
        assert w.publish(f"{PREFIX}/v1/res/cam-2", b"for cam-2 #%d" % i) == 0
    assert w.publish(f"{PREFIX}/v1/res/cam-1", b"for cam-1") == 0  # the barrier
    assert a.wait_count(f"{PREFIX}/v1/res/cam-1", 1) and b.wait_count(f"{PREFIX}/v1/res/cam-2",
                                                                        3)
    report("cam-1 received of cam-2's results", kind, len(a.on(f"{PREFIX}/v1/res/cam-2")))
    assert a.messages == [(f"{PREFIX}/v1/res/cam-1", b"for cam-1")]


@pytest.mark.parametrize("kind", PASSWORD_LISTENERS)
def test_cross_device_publish_is_refused_and_delivers_nothing(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer], kind: str) -> None:
    ep = endpoint(broker, pki, kind)
    a, b = device(peers, ep, "cam-1"), device(peers, ep, "cam-2")
    w = worker(peers, ep)
    assert b.subscribe(f"{PREFIX}/v1/res/cam-2") < 0x80
    assert a.subscribe(f"{PREFIX}/v1/res/cam-1") < 0x80
    forged = {
        f"{REQ}/m/cam-2": "a request as cam-2",
        f"{PREFIX}/v1/status/cam-2": "cam-2's presence",
        f"{PREFIX}/v1/res/cam-2": "a result for cam-2",
        f"{PREFIX}/v1/res/cam-1": "a result for itself",
        f"{PREFIX}/v1/workers/w-1": "a worker heartbeat",
        f"{PREFIX}/v1/req/m/cam-1/x": "a request one level deeper",
    }
    for topic, what in forged.items():
        code = a.publish(topic, what.encode(), retain="status" in topic or "workers" in topic)
        report(f"cam-1 PUBLISH {what} ({topic})", kind, f"PUBACK 0x{code:02X}")
        assert code == NOT_AUTHORIZED, (topic, code)
    assert a.publish(f"{REQ}/m/cam-1", b"legit") == 0  # the barrier, same path
    assert w.wait_count(f"{REQ}/m/cam-1", 1)
    report("worker received of cam-1's forged messages", kind, len(w.messages) - 1)
    assert w.messages == [(f"{REQ}/m/cam-1", b"legit")]
    assert b.messages == [] and a.messages == []
    # no retained forgery either: a fresh worker subscription sees none
    late = worker(peers, ep)
    assert late.publish(f"{PREFIX}/v1/workers/{late.client._client_id.decode()}",
                        b"beat", retain=True) == 0
    assert late.wait_count(f"{PREFIX}/v1/workers/{late.client._client_id.decode()}", 1)
    assert not late.on(f"{PREFIX}/v1/status/cam-2") and not late.on(
        f"{PREFIX}/v1/workers/w-1")
    assert late.publish(f"{PREFIX}/v1/workers/{late.client._client_id.decode()}", b"",
                        retain=True) == 0  # clear the retained heartbeat


@pytest.mark.parametrize("kind", PASSWORD_LISTENERS)
def test_a_device_cannot_receive_requests_plainly_or_by_joining_the_worker_group(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer], kind: str) -> None:
    ep = endpoint(broker, pki, kind)
    a, b = device(peers, ep, "cam-1"), device(peers, ep, "cam-2")
    w = worker(peers, ep)
    for topic in (f"{REQ}/+/+", f"{REQ}/m/cam-2", f"{REQ}/#", f"{PREFIX}/#",
                  f"$share/{GROUP}/{REQ}/+/+", f"$share/{GROUP}/{REQ}/m/+",
                  f"$share/{GROUP}/{REQ}/m/cam-2", f"$share/{GROUP}/{REQ}/#",
                  f"$share/other/{REQ}/+/+", f"$share/{GROUP}/#"):
        code = a.subscribe(topic)
        report(f"cam-1 SUBSCRIBE {topic}", kind, f"SUBACK 0x{code:02X}")
        assert code == NOT_AUTHORIZED, (topic, code)
    n = 12
    for i in range(n):
        assert b.publish(f"{REQ}/m/cam-2", b"req %d" % i) == 0
    # Had cam-1 joined the group it would hold some of the 12 and the worker would not
    # get them all.
    assert w.wait_count(f"{REQ}/m/cam-2", n), f"the worker got {len(w.messages)} of {n}"
    report(f"cam-1 received of {n} requests of cam-2", kind, len(a.messages))
    assert a.messages == []
    assert len(w.on(f"{REQ}/m/cam-2")) == n


def test_the_admin_identity_reads_no_traffic(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer]) -> None:
    ep = endpoint(broker, pki, "tls")
    admin = peers(ep, username="admin", password=PASSWORDS["admin"], client_id="ctl")
    assert admin.connect() == "Success"
    for topic in ("#", f"{REQ}/+/+", f"$share/{GROUP}/{REQ}/+/+"):
        assert admin.subscribe(topic) == NOT_AUTHORIZED, topic
    assert admin.publish(f"{REQ}/m/cam-1") == NOT_AUTHORIZED


# ---------------------------------------------------------------- legitimate traffic

@pytest.mark.parametrize("kind", (*PASSWORD_LISTENERS, "cert"))
def test_device_and_worker_traffic_still_flows(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer], kind: str) -> None:
    ep = endpoint(broker, pki, kind)
    w = worker(peers, endpoint(broker, pki, "tls" if kind == "cert" else kind))
    if kind == "cert":
        dev = peers(ep, client_id="cam-1", cert=(pki.path("cam-1.pem"), pki.path("cam-1.key")))
        assert dev.connect() == "Success"
    else:
        dev = device(peers, ep, "cam-1")
    assert dev.subscribe(f"{PREFIX}/v1/res/cam-1") < 0x80
    assert dev.publish(f"{PREFIX}/v1/status/cam-1", b"online", retain=True) == 0
    assert dev.publish(f"{REQ}/m/cam-1", b"request") == 0
    assert w.wait_count(f"{REQ}/m/cam-1", 1) and w.wait_count(f"{PREFIX}/v1/status/cam-1", 1)
    assert w.publish(f"{PREFIX}/v1/res/cam-1", b"result") == 0
    assert dev.wait_count(f"{PREFIX}/v1/res/cam-1", 1)
    assert dev.publish(f"{PREFIX}/v1/status/cam-1", b"", retain=True) == 0
    report("device <-> worker round trip", kind, "ok")


# ---------------------------------------------------------------- client certificates

def test_cert_listener_refuses_no_certificate_and_a_foreign_ca(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer]) -> None:
    ep = endpoint(broker, pki, "cert")
    for case, cert in (("no certificate", None),
                       ("certificate of another CA", (pki.path("rogue.pem"),
                                                      pki.path("rogue.key")))):
        got = peers(ep, client_id="cam-2", cert=cert).connect()
        report(case, "cert", got)
        assert got != "Success", case


def test_cert_identity_is_the_cn_whatever_username_and_client_id_are_sent(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer]) -> None:
    """``use_identity_as_username`` skips the password check, and with it the dynsec
    client-id binding; ``use_username_as_clientid`` puts the binding back: the client id
    becomes the CN, so cam-1's certificate cannot take cam-2's session."""
    victim = device(peers, endpoint(broker, pki, "tls"), "cam-2")
    assert victim.subscribe(f"{PREFIX}/v1/res/cam-2") < 0x80
    w = worker(peers, endpoint(broker, pki, "tls"))
    a = peers(endpoint(broker, pki, "cert"), username="cam-2", password=PASSWORDS["cam-2"],
              client_id="cam-2", cert=(pki.path("cam-1.pem"), pki.path("cam-1.key")))
    assert a.connect() == "Success"
    assert a.subscribe(f"{PREFIX}/v1/res/cam-2") == NOT_AUTHORIZED
    assert a.subscribe(f"{PREFIX}/v1/res/cam-1") < 0x80
    assert a.publish(f"{REQ}/m/cam-2") == NOT_AUTHORIZED
    assert a.publish(f"{REQ}/m/cam-1", b"as cam-1") == 0
    assert w.wait_count(f"{REQ}/m/cam-1", 1)
    assert w.publish(f"{PREFIX}/v1/res/cam-2", b"for cam-2") == 0
    assert w.publish(f"{PREFIX}/v1/res/cam-1", b"for cam-1") == 0
    assert a.wait_count(f"{PREFIX}/v1/res/cam-1", 1) and victim.wait_count(
        f"{PREFIX}/v1/res/cam-2", 1)
    report("cam-1 certificate claiming cam-2: received of cam-2's", "cert",
           len(a.on(f"{PREFIX}/v1/res/cam-2")))
    assert a.messages == [(f"{PREFIX}/v1/res/cam-1", b"for cam-1")]
    assert w.on(f"{REQ}/m/cam-2") == []
    assert victim.connected and victim.disconnects == 0
    log_text = broker.log_path.read_text()
    assert "Client cam-2 already connected" not in log_text


# ---------------------------------------------------------------- a real worker, forged addresses

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("onnxruntime")
    from test_cloud_support import make_split

    root = tmp_path_factory.mktemp("acl-artifacts")
    return root, make_split(root, "split-acl", seed=3)


@pytest.mark.parametrize("kind", PASSWORD_LISTENERS)
def test_forged_dev_rt_and_response_topic_answer_the_sender_only(
        broker: MosquittoBroker, pki: Pki, peers: Callable[..., Peer], tiny: Any,
        kind: str) -> None:
    """cam-1 sends a request on its own topic that claims to be cam-2's everywhere it can
    (envelope ``dev`` and ``rt``, MQTT 5 response topic): the worker answers cam-1."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from test_cloud_support import request_payload, running

    from cloud_service.config import Config
    from cloud_service.server import Server
    from splitinfer.wire import decode

    root, split = tiny
    ep = endpoint(broker, pki, kind)
    scheme = "mqtt" if kind == "plain" else "mqtts"
    query = "" if kind == "plain" else f"?ca={pki.path('ca.pem')}"
    url = f"{scheme}://{WORKER}:{PASSWORDS[WORKER]}@{ep.host}:{ep.port}{query}"
    cfg = Config(artifacts=root, broker=url, prefix=PREFIX, threads=1, metrics_interval_s=0)
    a, b = device(peers, ep, "cam-1"), device(peers, ep, "cam-2")
    for peer, dev in ((a, "cam-1"), (b, "cam-2")):
        assert peer.subscribe(f"{PREFIX}/v1/res/{dev}") < 0x80
    with running(Server(cfg)):
        rid, payload = request_payload(split, split.sample(2, seed=1), device_id="cam-2",
                                       reply_to=f"{PREFIX}/v1/res/cam-2")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"{PREFIX}/v1/res/cam-2"
        props.CorrelationData = b"forged"
        assert a.publish(f"{REQ}/tiny/cam-1", payload, properties=props) == 0
        assert a.wait_count(f"{PREFIX}/v1/res/cam-1", 1, timeout=20)
        answer = decode(a.on(f"{PREFIX}/v1/res/cam-1")[0])
        assert answer.request_id == rid and answer.error is None
        # cam-2's own request afterwards: its single answer is the only thing it gets
        rid2, payload2 = request_payload(split, split.sample(1, seed=2), device_id="cam-2")
        assert b.publish(f"{REQ}/tiny/cam-2", payload2) == 0
        assert b.wait_count(f"{PREFIX}/v1/res/cam-2", 1, timeout=20)
    got = [decode(p).request_id for p in b.on(f"{PREFIX}/v1/res/cam-2")]
    report("forged dev/rt/response topic: answers reaching cam-2", kind, len(got) - 1)
    assert got == [rid2]


# ---------------------------------------------------------------- the agent's ACL hint

def test_the_agent_transport_names_topic_and_identity_on_a_refusal(
        broker: MosquittoBroker, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """dynsec refuses in the SUBACK/PUBACK: the agent's transport says what and who."""
    import asyncio
    import logging

    from edge_agent.transport import NOT_AUTHORIZED as AGENT_NOT_AUTHORIZED
    from edge_agent.transport import MqttConnector
    from splitinfer.errors import TransportError

    url = f"mqtt://cam-1:{PASSWORDS['cam-1']}@{broker.host}:{broker.port}"

    async def main() -> tuple[str, int | None]:
        transport = await MqttConnector(url)(client_id="cam-1", will=None)
        try:
            with pytest.raises(TransportError) as info:
                await transport.subscribe(f"{PREFIX}/v1/res/cam-2")
            await transport.subscribe(f"{PREFIX}/v1/res/cam-1")  # its own: granted
            reason = await transport.publish(f"{REQ}/m/cam-2", b"x")
            await transport.publish(f"{REQ}/m/cam-2", b"x")  # logged once
            return str(info.value), reason
        finally:
            await transport.close()

    with caplog.at_level(logging.WARNING, logger="edge_agent.transport"):
        message, reason = asyncio.run(main())
    for part in (f"{PREFIX}/v1/res/cam-2", "client id 'cam-1'", "username 'cam-1'", "0x87",
                 "not authorized"):
        assert part in message, (part, message)
    assert reason == AGENT_NOT_AUTHORIZED
    warnings = [r.getMessage() for r in caplog.records if "refused a publish" in r.getMessage()]
    assert len(warnings) == 1 and f"{REQ}/m/cam-2" in warnings[0] and "cam-1" in warnings[0]


# ---------------------------------------------------------------- the real agent and worker

@pytest.mark.parametrize("kind", PASSWORD_LISTENERS)
def test_the_edge_agent_and_the_worker_work_with_their_own_identities_only(
        broker: MosquittoBroker, pki: Pki, tmp_path: Path, kind: str) -> None:
    """EdgeAgent (device cam-1) + cloud worker through dynsec: the answer is right; the same
    credentials under another device id are refused at start-up, naming why."""
    import asyncio

    import numpy as np
    from fixtures_edge import dynamic_model, run_full, split_at_pool
    from test_cloud_support import running

    from cloud_service.config import Config
    from cloud_service.server import Server
    from edge_agent import AgentConfig, EdgeAgent
    from splitinfer.errors import StartupError

    split = split_at_pool(dynamic_model(tmp_path / "dyn.onnx"), tmp_path / "splits" / "dyn",
                          None)
    ep = endpoint(broker, pki, kind)
    scheme, query = ("mqtt", "") if kind == "plain" else ("mqtts", f"?ca={pki.path('ca.pem')}")

    def url(user: str) -> str:
        return f"{scheme}://{user}:{PASSWORDS[user]}@{ep.host}:{ep.port}{query}"

    x = np.random.default_rng(5).random((2, 3, 8, 8)).astype(np.float32)

    async def infer(device_id: str) -> Any:
        agent = EdgeAgent.from_artifacts(split, threads=1, config=AgentConfig(
            device_id=device_id, broker=url("cam-1"), prefix=PREFIX))
        async with agent:
            return (await agent.infer({"x": x})).outputs["y"]

    cfg = Config(artifacts=split.parent, broker=url(WORKER), prefix=PREFIX, threads=1,
                 metrics_interval_s=0)
    with running(Server(cfg)):
        got = asyncio.run(infer("cam-1"))
        with pytest.raises(StartupError) as info:
            asyncio.run(infer("cam-2"))
    assert float(np.abs(got - run_full(tmp_path / "dyn.onnx", x)).max()) <= 1e-5
    report("EdgeAgent cam-1 with cam-1's credentials", kind, "answered correctly")
    report("EdgeAgent cam-2 with cam-1's credentials", kind, str(info.value)[:120])
    assert "cam-2" in str(info.value) and "authori" in str(info.value).lower()
    assert "client id equals the username" in str(info.value)  # what to check, not just "no"


def test_the_worker_role_covers_everything_a_worker_does(
        tiny: Any, peers: Callable[..., Peer]) -> None:
    """Two workers with stable ids (persistent sessions, heartbeats, the start-up probe of
    the group) serve through dynsec without one refusal in the broker's log."""
    if not dynsec_plugin():
        pytest.skip("mosquitto's dynamic-security plugin is not installed")
    from test_cloud_support import request_payload, running

    from cloud_service.config import Config
    from cloud_service.server import Server

    root, split = tiny
    config, _ = dynsec_config(devices=DEVICES, workers=[WORKER], prefix=PREFIX,
                              passwords=PASSWORDS)
    b = MosquittoBroker(dynsec=config, extra_config=("log_type all",))
    b.start()
    try:
        ep = Endpoint(b.host, b.port)
        url = f"mqtt://{WORKER}:{PASSWORDS[WORKER]}@{b.host}:{b.port}"

        def cfg(worker_id: str) -> Config:
            return Config(artifacts=root, broker=url, prefix=PREFIX, threads=1,
                          metrics_interval_s=0, worker_id=worker_id, heartbeat_s=0.2)

        watcher = peers(ep, username=WORKER, password=PASSWORDS[WORKER], client_id="watch")
        assert watcher.connect() == "Success"  # heartbeats only: not in the group
        assert watcher.subscribe(f"{PREFIX}/v1/workers/+") < 0x80
        dev = device(peers, ep, "cam-1")
        assert dev.subscribe(f"{PREFIX}/v1/res/cam-1") < 0x80
        with running(Server(cfg("w-1"))), running(Server(cfg("w-2"))):
            for wid in ("w-1", "w-2"):  # a few heartbeats of each
                assert watcher.wait_count(f"{PREFIX}/v1/workers/{wid}", 3), wid
            for i in range(4):
                _, payload = request_payload(split, split.sample(1, seed=i), device_id="cam-1")
                assert dev.publish(f"{REQ}/tiny/cam-1", payload) == 0
            assert dev.wait_count(f"{PREFIX}/v1/res/cam-1", 4, timeout=20)
        log = b.log_path.read_text()
    finally:
        b.close()
    denied = [line for line in log.splitlines() if "Denied" in line or "denied" in line]
    report("denials in the broker log while two workers served", "plain", len(denied))
    assert denied == []
