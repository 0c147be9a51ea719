"""``splitinfer broker``: the generated mosquitto.conf + dynamic-security.json run on a real
mosquitto, passwords in the plugin's own format, run-time changes with mosquitto_ctrl, the
shipped configs' bounds, and the broker-flood figure (a short run)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_acl_matrix import Endpoint, Peer, make_pki

from cloud_service.broker_setup import (
    BOUNDED_TUNING,
    MESSAGE_SIZE_LIMIT,
    Listeners,
    add_device,
    check_password,
    ctrl_commands,
    dynsec_config,
    hash_password,
    mosquitto_conf,
    read_ids,
)
from simulators.support.broker import MosquittoBroker, dynsec_plugin, free_port, mosquitto_binary
from splitinfer.cli import main as cli_main
from splitinfer.errors import BadInputError
from splitinfer.wire import DEFAULT_MAX_PAYLOAD

REPO = Path(__file__).resolve().parents[1]


def needs_dynsec() -> str:
    if not mosquitto_binary():
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does)")
    plugin = dynsec_plugin()
    if not plugin:
        pytest.skip("mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) is "
                    "not installed; Debian's mosquitto package ships it")
    return plugin


# ---------------------------------------------------------------- unit: formats and inputs

def test_password_hash_is_dynsecs_format() -> None:
    entry = hash_password("s3cret", salt=b"\x01" * 12, iterations=101)
    assert entry["iterations"] == 101
    assert base64.b64decode(entry["salt"]) == b"\x01" * 12
    assert len(base64.b64decode(entry["password"])) == 64  # SHA-512
    assert check_password("s3cret", entry) and not check_password("s3cret!", entry)
    with pytest.raises(BadInputError, match="iterations"):
        hash_password("x", iterations=0)


def test_hash_matches_what_mosquitto_ctrl_writes(tmp_path: Path) -> None:
    """Read the other way round: a client that mosquitto's own tool created verifies."""
    if not shutil.which("mosquitto_ctrl"):
        pytest.skip("mosquitto_ctrl is not installed (Debian's mosquitto package ships it)")
    target = tmp_path / "init.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(target), "admin", "pw-from-ctrl"],
                   check=True, capture_output=True, timeout=30)
    client = json.loads(target.read_text())["clients"][0]
    assert check_password("pw-from-ctrl", client) and not check_password("other", client)
    assert len(base64.b64decode(client["salt"])) == 12


def test_config_confines_each_device_to_its_own_topics() -> None:
    config, idents = dynsec_config(devices=["cam-1", "cam-2"], workers=["w"], prefix="p",
                                   passwords={"cam-1": "one"})
    by_name = {c["username"]: c for c in config["clients"]}
    assert by_name["cam-1"]["clientid"] == "cam-1" and "clientid" not in by_name["w"]
    assert check_password("one", by_name["cam-1"])
    roles = {r["rolename"]: r for r in config["roles"]}
    cam1 = {(a["acltype"], a["topic"]) for a in roles["device-cam-1"]["acls"]}
    assert cam1 == {("publishClientSend", "p/v1/req/+/cam-1"),
                    ("publishClientSend", "p/v1/status/cam-1"),
                    ("subscribeLiteral", "p/v1/res/cam-1"),
                    ("publishClientReceive", "p/v1/res/cam-1")}
    assert not any("%" in a["topic"] for r in config["roles"] for a in r["acls"])
    worker = {(a["acltype"], a["topic"]) for a in roles["splitinfer-worker"]["acls"]}
    assert ("subscribePattern", "$share/+/p/v1/req/#") in worker
    assert ("publishClientSend", "p/v1/workers/#") in worker
    assert ("publishClientReceive", "p/v1/workers/#") in worker
    assert config["defaultACLAccess"] == {"publishClientSend": False,
                                          "publishClientReceive": False,
                                          "subscribe": False, "unsubscribe": True}
    assert [i.role for i in idents] == ["device", "device", "worker", "admin"]
    assert len({i.password for i in idents}) == 4  # random unless given


@pytest.mark.parametrize("devices, workers, match", [
    (["cam/1"], ["w"], "device id 'cam/1'"),
    (["cam+"], ["w"], "device id 'cam\\+'"),
    (["a", "a"], ["w"], "listed as device and as device"),
    (["w"], ["w"], "listed as device and as worker"),
    (["admin"], ["w"], "listed as device and as admin"),
    ([], ["w"], "no devices"),
    (["a"], [], "no workers"),
])
def test_bad_identities_are_refused_naming_the_field(devices: list[str], workers: list[str],
                                                     match: str) -> None:
    with pytest.raises(BadInputError, match=match):
        dynsec_config(devices=devices, workers=workers)


def test_read_ids_from_a_list_or_a_file(tmp_path: Path) -> None:
    assert read_ids("a, b,,c", "devices") == ["a", "b", "c"]
    f = tmp_path / "ids.txt"
    f.write_text("# fleet\ncam-1\n\ncam-2  # the back door\n")
    assert read_ids(f"@{f}", "devices") == ["cam-1", "cam-2"]
    with pytest.raises(BadInputError, match=r"--devices @.*cannot read"):
        read_ids(f"@{tmp_path / 'missing'}", "devices")
    with pytest.raises(BadInputError, match="no ids"):
        read_ids(" , ", "devices")


def test_offline_add_device_refuses_a_duplicate() -> None:
    config, _ = dynsec_config(devices=["cam-1"], workers=["w"])
    ident = add_device(config, "cam-2", password="two")
    assert ident.client_id == "cam-2"
    assert check_password("two", next(c for c in config["clients"]
                                      if c["username"] == "cam-2"))
    with pytest.raises(BadInputError, match="exists"):
        add_device(config, "cam-2")


def test_ctrl_commands_quote_and_name_every_acl() -> None:
    cmds = ctrl_commands("cam-3", prefix="p", password="it's", connect="-h b -u admin")
    assert cmds[0].endswith("dynsec createRole device-cam-3")
    assert sum("addRoleACL" in c for c in cmds) == 4
    assert any("createClient cam-3 -c cam-3 -p 'it'\"'\"'s'" in c for c in cmds)
    assert all('-P "$MOSQUITTO_CTRL_PASSWORD"' in c for c in cmds)
    removal = ctrl_commands("cam-3", password="", remove=True)
    assert [c.split()[-2] for c in removal] == ["deleteClient", "deleteRole"]


# ---------------------------------------------------------------- shipped configs

def test_shipped_configs_are_bounded_and_the_limit_is_the_workers() -> None:
    assert MESSAGE_SIZE_LIMIT == DEFAULT_MAX_PAYLOAD
    for name in ("mosquitto.conf", "mosquitto.prod.conf"):
        lines = (REPO / "docker" / "mosquitto" / name).read_text().splitlines()
        for line in BOUNDED_TUNING:
            assert line in lines, f"docker/mosquitto/{name} lacks {line!r}"
        assert "max_queued_bytes 0" not in lines


def test_shipped_prod_config_is_the_generators() -> None:
    """docker/mosquitto/mosquitto.prod.conf == `splitinfer broker config --cert-port 8884`
    with the image's paths, so the two never drift apart."""
    expected = mosquitto_conf(dynsec_file="/mosquitto/data/dynamic-security.json",
                              plugin="/usr/lib/mosquitto_dynamic_security.so",
                              listeners=Listeners(cert_port=8884))
    shipped = (REPO / "docker" / "mosquitto" / "mosquitto.prod.conf").read_text()
    assert shipped == expected
    assert not (REPO / "docker" / "mosquitto" / "acl").exists()  # the %c ACL is gone


# ---------------------------------------------------------------- the generated files, running

class _Running:
    def __init__(self, conf: Path) -> None:
        assert mosquitto_binary()
        self.log = conf.parent / "mosquitto.log"
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([str(mosquitto_binary()), "-c", str(conf)],
                                         stdout=logf, stderr=subprocess.STDOUT)

    def wait_port(self, port: int) -> None:
        end = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < end, self.log.read_text()
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture()
def generated(tmp_path: Path, capsys: pytest.CaptureFixture[str]
              ) -> Iterator[tuple[Path, dict[str, str], dict[str, int], Path]]:
    """`splitinfer broker config --local` with TLS, client certificates and a plain port,
    then that very mosquitto.conf started."""
    needs_dynsec()
    if not shutil.which("openssl"):
        pytest.fail("the openssl command is not installed (apt-get install -y openssl): no "
                    "test certificates")
    pki = make_pki(tmp_path / "pki").dir
    ports = {"tls": free_port(), "cert": free_port(), "plain": free_port()}
    out = tmp_path / "broker"
    argv = ["broker", "config", "--devices", "cam-1,cam-2", "--workers", "worker", "-o",
            str(out), "--local", "--bind", "127.0.0.1", "--tls-dir", str(pki),
            "--port", str(ports["tls"]), "--cert-port", str(ports["cert"]),
            "--plain-port", str(ports["plain"]), "--json"]
    if os.geteuid() == 0:
        argv += ["--user", "root"]  # else mosquitto switches to 'mosquitto': no tmp access
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    passwords = {i["username"]: i["password"] for i in printed["identities"]}
    assert (out / "dynamic-security.json").stat().st_mode & 0o077 == 0
    running = _Running(out / "mosquitto.conf")
    try:
        for port in ports.values():
            running.wait_port(port)
        yield out, passwords, ports, pki
    finally:
        running.stop()


@pytest.fixture()
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(ep: Endpoint, **kw: Any) -> Peer:
        made.append(Peer(ep, **kw))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


@pytest.mark.integration
def test_generated_config_runs_with_tls_certificates_and_passwords(
        generated: tuple[Path, dict[str, str], dict[str, int], Path],
        peers: Callable[..., Peer]) -> None:
    _out, pw, ports, pki = generated
    ca = str(pki / "ca.pem")
    tls, cert, plain = (Endpoint("127.0.0.1", ports[k], ca=None if k == "plain" else ca)
                        for k in ("tls", "cert", "plain"))
    w = peers(tls, username="worker", password=pw["worker"], client_id="any-worker-id")
    assert w.connect() == "Success"
    assert w.subscribe("$share/splitinfer-workers/splitinfer/v1/req/+/+") == 1
    dev = peers(tls, username="cam-1", password=pw["cam-1"], client_id="cam-1")
    assert dev.connect() == "Success"
    assert peers(tls, username="cam-1", password=pw["cam-1"],
                 client_id="cam-2").connect() == "Not authorized"
    assert peers(plain, username="cam-2", password=pw["cam-1"],
                 client_id="cam-2").connect() == "Not authorized"
    by_cert = peers(cert, client_id="whatever", cert=(str(pki / "cam-2.pem"),
                                                      str(pki / "cam-2.key")))
    assert by_cert.connect() == "Success"
    assert by_cert.subscribe("splitinfer/v1/res/cam-2") == 1
    assert by_cert.subscribe("splitinfer/v1/res/cam-1") == 0x87
    assert dev.subscribe("$share/splitinfer-workers/splitinfer/v1/req/+/+") == 0x87
    assert dev.publish("splitinfer/v1/req/m/cam-1", b"r") == 0
    assert by_cert.publish("splitinfer/v1/req/m/cam-2", b"r2") == 0
    assert w.wait_count("splitinfer/v1/req/m/cam-1", 1)
    assert w.wait_count("splitinfer/v1/req/m/cam-2", 1)


@pytest.mark.integration
def test_add_and_remove_a_device_at_run_time_with_mosquitto_ctrl(
        generated: tuple[Path, dict[str, str], dict[str, int], Path],
        peers: Callable[..., Peer], capsys: pytest.CaptureFixture[str]) -> None:
    if not shutil.which("mosquitto_ctrl"):
        pytest.skip("mosquitto_ctrl is not installed (Debian's mosquitto package ships it)")
    out, pw, ports, _ = generated
    plain = Endpoint("127.0.0.1", ports["plain"])
    env = {**os.environ, "MOSQUITTO_CTRL_PASSWORD": pw["admin"]}
    connect = f"-h 127.0.0.1 -p {ports['plain']} -u admin"

    def apply(*args: str) -> None:
        assert cli_main(["broker", "add-device", *args, f"--connect={connect}"]) == 0
        for cmd in capsys.readouterr().out.splitlines():
            done = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True,
                                  text=True, timeout=30)
            assert done.returncode == 0, (cmd, done.stdout, done.stderr)

    assert peers(plain, username="cam-3", password="pw-3",
                 client_id="cam-3").connect() == "Not authorized"
    apply("cam-3", "--password", "pw-3")
    new = peers(plain, username="cam-3", password="pw-3", client_id="cam-3")
    assert new.connect() == "Success"
    assert new.subscribe("splitinfer/v1/res/cam-3") == 1
    assert new.subscribe("splitinfer/v1/res/cam-1") == 0x87
    assert peers(plain, username="cam-3", password="pw-3",
                 client_id="cam-1").connect() == "Not authorized"
    saved = json.loads((out / "dynamic-security.json").read_text())
    assert any(c["username"] == "cam-3" and c.get("clientid") == "cam-3"
               for c in saved["clients"])  # the plugin persisted it
    apply("cam-3", "--remove")
    assert new._wait(lambda: new.disconnects >= 1), "deleteClient left the session up"
    assert peers(plain, username="cam-3", password="pw-3",
                 client_id="cam-3").connect() == "Not authorized"


@pytest.mark.integration
def test_add_device_to_a_file_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    config, _ = dynsec_config(devices=["cam-1"], workers=["w"])
    path = tmp_path / "dynamic-security.json"
    path.write_text(json.dumps(config))
    assert cli_main(["broker", "add-device", "cam-9", "--file", str(path)]) == 0
    user, password, _ = capsys.readouterr().out.split("\t", 2)
    saved = json.loads(path.read_text())
    entry = next(c for c in saved["clients"] if c["username"] == "cam-9")
    assert user == "cam-9" and check_password(password, entry)
    assert cli_main(["broker", "add-device", "cam-9", "--file", str(path)]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_bad_input_exits_2_naming_the_flag(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["broker", "config", "--devices", "a/b", "-o", str(tmp_path)]) == 2
    assert "device id 'a/b'" in capsys.readouterr().err
    assert cli_main(["broker", "config", "--devices", "a", "--no-tls", "-o",
                     str(tmp_path)]) == 2
    assert "no listener" in capsys.readouterr().err


# ---------------------------------------------------------------- the bounded broker

@pytest.mark.integration
def test_a_payload_over_the_workers_limit_is_refused_by_the_broker(
        fresh_mosquitto: MosquittoBroker, peers: Callable[..., Peer]) -> None:
    """mosquitto 2.0.11 drops it, answers PUBACK 0x95 (packet too large), and paho then
    closes the connection: either way the message reaches nobody."""
    ep = Endpoint(fresh_mosquitto.host, fresh_mosquitto.port)
    sub, big = peers(ep, client_id="sub"), peers(ep, client_id="big")
    assert sub.connect() == "Success" and big.connect() == "Success"
    assert sub.subscribe("big/#") == 1
    info = big.client.publish("big/over", bytes(DEFAULT_MAX_PAYLOAD + 1), qos=1)
    assert big._wait(lambda: big.disconnects > 0 or info.mid in big._acks)
    assert big._acks.get(info.mid, 0x95) >= 0x80
    ok = peers(ep, client_id="ok")
    assert ok.connect() == "Success"
    assert ok.publish("big/at", bytes(DEFAULT_MAX_PAYLOAD)) == 0  # the limit itself passes
    assert sub.wait_count("big/at", 1, timeout=20)
    assert sub.on("big/over") == []


@pytest.mark.integration
def test_broker_flood_stays_within_the_bound() -> None:
    """The short version of the figure (bench/bench_broker.py): what reaches the
    resumed worker is what the bounds allow; the RSS stays below the computed bound."""
    from bench.bench_broker import run_broker_flood
    from simulators.support.broker import MAX_INFLIGHT_BYTES, MAX_QUEUED_BYTES

    payload = 256 * 1024
    r = run_broker_flood(seconds=1.0, payload_bytes=payload)
    held = (MAX_INFLIGHT_BYTES + MAX_QUEUED_BYTES) // payload
    assert r["published"] > held, r  # the flood did overflow the stalled worker's queue
    assert 0 < r["delivered"] <= held + 1, r
    assert r["dropped_or_refused"] == r["published"] - r["delivered"]
    assert r["rss_peak_mb"] <= r["bound_mb"], r
    assert r["within_bound"] is True


@pytest.mark.integration
def test_mosquitto_broker_with_a_password_file(tmp_path: Path,
                                               peers: Callable[..., Peer]) -> None:
    """The plain alternative MosquittoBroker offers (no ACL: every user may do anything,
    so not for a fleet; see docs/security.md)."""
    tool = shutil.which("mosquitto_passwd")
    if not tool:
        pytest.skip("mosquitto_passwd is not installed (Debian: the mosquitto package)")
    passwd = tmp_path / "passwd"
    subprocess.run([tool, "-b", "-c", str(passwd), "dev", "pw"], check=True, timeout=30,
                   capture_output=True)
    b = MosquittoBroker(password_file=passwd)
    b.start()
    try:
        ep = Endpoint(b.host, b.port)
        assert peers(ep, client_id="a").connect() == "Not authorized"
        assert peers(ep, username="dev", password="nope", client_id="b").connect() in (
            "Not authorized", "Bad user name or password")
        assert peers(ep, username="dev", password="pw", client_id="c").connect() == "Success"
    finally:
        b.close()
