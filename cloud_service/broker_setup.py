"""``splitinfer broker``: a production mosquitto whose identities come from authentication.

Every device is a dynamic-security (dynsec) client whose **username is its device id and
whose client id is fixed to the same value** (the plugin refuses a CONNECT with any other
client id, so a device cannot take another's session), with a role of its own that names
its topics literally: mosquitto 2.0's dynsec does not expand ``%u``/``%c`` in ACL topics
(tested: a ``…/res/%u`` ACL refuses ``…/res/cam-1``), so each device gets one role. Workers
share one role: requests (``…/req/#``, plain and ``$share/+/…``), results, device presence,
heartbeats (``…/workers/#``) and the start-up probe (``…/probe/#``); worker clients have
no fixed client id, so a worker may fence a silent peer by connecting with the peer's
client id. The default ACL access denies everything but UNSUBSCRIBE, so a SUBSCRIBE a role
does not grant is refused in its SUBACK (0x87, *not authorized*) and a refused PUBLISH
gets PUBACK 0x87 — unlike mosquitto's ``acl_file``, which grants every SUBSCRIBE and only
filters deliveries, so a device joining ``$share/<group>/…`` there takes its turn of every
device's requests and drops them.

Passwords are stored as dynsec does (``mosquitto_ctrl dynsec init`` writes the same): the
base64 of PBKDF2-HMAC-SHA512 over the password with a random 12-byte salt (base64 too),
64 bytes, ``iterations`` rounds (the plugin's default is 101; the generated passwords are
random 192-bit tokens, so the round count is not what protects them).

Subcommands: ``config`` writes ``mosquitto.conf`` + ``dynamic-security.json`` for a list
of devices and workers and prints every identity's password; ``add-device`` prints the
``mosquitto_ctrl`` commands that add (or remove) one device on a running broker, or edits
a ``dynamic-security.json`` offline. See docs/security.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitinfer.errors import BadInputError
from splitinfer.topics import DEFAULT_PREFIX, Topics, check_level

__all__ = [
    "BOUNDED_TUNING", "MESSAGE_SIZE_LIMIT", "MAX_PACKET_SIZE", "MAX_INFLIGHT_BYTES",
    "MAX_QUEUED_BYTES", "MAX_QUEUED_MESSAGES", "MEMORY_LIMIT", "DYNSEC_PLUGIN_PATHS",
    "DEFAULT_ITERATIONS", "Identity", "hash_password", "check_password", "device_role",
    "worker_role", "admin_role", "dynsec_config", "add_device", "mosquitto_conf",
    "ctrl_commands", "find_dynsec_plugin", "read_ids", "register",
]

# The broker's bounds (issue 10). What one subscriber that stops reading (a SIGSTOPped
# worker, a device that stops reading) can make the broker hold is at most
# MAX_INFLIGHT_BYTES + MAX_QUEUED_BYTES of payloads (plus some bookkeeping per queued
# message, at most MAX_QUEUED_MESSAGES of them); past that mosquitto drops further
# messages for that client (the device re-sends). A payload is at most the worker's limit
# (splitinfer.wire.DEFAULT_MAX_PAYLOAD, 8 MiB): a bigger one is dropped (MQTT 5 PUBACK
# 0x95 "packet too large", tested on 2.0.11); a packet over MAX_PACKET_SIZE closes the
# connection before mosquitto buffers it; MEMORY_LIMIT caps the whole heap (an allocation past it is
# refused: that message is dropped and its sender disconnected).
MESSAGE_SIZE_LIMIT = 8 * 1024 * 1024  # == splitinfer.wire.DEFAULT_MAX_PAYLOAD (a test checks)
MAX_PACKET_SIZE = MESSAGE_SIZE_LIMIT + 64 * 1024  # payload + topic + properties
MAX_INFLIGHT_BYTES = 16 * 1024 * 1024
MAX_QUEUED_BYTES = 32 * 1024 * 1024
MAX_QUEUED_MESSAGES = 20_000
MEMORY_LIMIT = 1024 * 1024 * 1024

BOUNDED_TUNING = (
    "set_tcp_nodelay true",
    "max_inflight_messages 0",
    f"max_inflight_bytes {MAX_INFLIGHT_BYTES}",
    f"max_queued_messages {MAX_QUEUED_MESSAGES}",
    f"max_queued_bytes {MAX_QUEUED_BYTES}",
    f"message_size_limit {MESSAGE_SIZE_LIMIT}",
    f"max_packet_size {MAX_PACKET_SIZE}",
    f"memory_limit {MEMORY_LIMIT}",
)

DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",  # Debian, Ubuntu
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",  # the eclipse-mosquitto image
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
DOCKER_PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"
DEFAULT_ITERATIONS = 101  # mosquitto 2.0's dynsec default
SALT_BYTES = 12  # as mosquitto 2.0's dynsec
ADMIN_ROLE = "dynsec-admin"
WORKER_ROLE = "splitinfer-worker"


def find_dynsec_plugin() -> str | None:
    """The dynamic-security plugin on this machine: ``$SPLITINFER_MOSQUITTO_DYNSEC`` if set
    ("" = none), else the first of :data:`DYNSEC_PLUGIN_PATHS` that exists."""
    configured = os.environ.get("SPLITINFER_MOSQUITTO_DYNSEC")
    if configured is not None:
        return configured or None
    return next((p for p in DYNSEC_PLUGIN_PATHS if Path(p).exists()), None)


@dataclass(frozen=True)
class Identity:
    """One broker identity: ``role`` is ``device``, ``worker`` or ``admin``."""

    username: str
    password: str
    role: str
    client_id: str | None = None  # fixed client id (devices), None = any


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS,
                  salt: bytes | None = None) -> dict[str, Any]:
    """The ``password``/``salt``/``iterations`` fields of a dynsec client."""
    if iterations < 1:
        raise BadInputError(f"PBKDF2 iterations {iterations}: expected at least 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {"password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": iterations}


def check_password(password: str, client: Mapping[str, Any]) -> bool:
    """Does ``password`` match a dynsec client entry (as the plugin checks it)?"""
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(),
                                 base64.b64decode(client["salt"]), int(client["iterations"]))
    return hmac.compare_digest(digest, base64.b64decode(client["password"]))


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True}


def device_role_name(device_id: str) -> str:
    return f"device-{device_id}"


def device_role(topics: Topics, device_id: str) -> dict[str, Any]:
    """One device's role: publish its own requests and presence, read its own results."""
    result = topics.result(device_id)
    return {"rolename": device_role_name(device_id), "acls": [
        _acl("publishClientSend", f"{topics.prefix}/v1/req/+/{device_id}"),
        _acl("publishClientSend", topics.status(device_id)),
        _acl("subscribeLiteral", result),
        _acl("publishClientReceive", result),
    ]}


def worker_role(topics: Topics) -> dict[str, Any]:
    """The workers' role. SUBSCRIBE is checked against the filter as sent, ``$share/…``
    included (mosquitto 2.0), so the shared forms are listed too."""
    p = topics.prefix
    acls = [
        _acl("subscribePattern", f"{p}/v1/req/#"),
        _acl("subscribePattern", f"$share/+/{p}/v1/req/#"),
        _acl("publishClientReceive", f"{p}/v1/req/#"),
        _acl("publishClientSend", f"{p}/v1/res/#"),
        _acl("subscribePattern", f"{p}/v1/status/#"),
        _acl("publishClientReceive", f"{p}/v1/status/#"),
    ]
    # heartbeats (read + write) and the worker's start-up probe of the group and round trip
    for tree in ("workers", "probe"):
        acls += [_acl("subscribePattern", f"{p}/v1/{tree}/#"),
                 _acl("publishClientReceive", f"{p}/v1/{tree}/#"),
                 _acl("publishClientSend", f"{p}/v1/{tree}/#")]
    acls.append(_acl("subscribePattern", f"$share/+/{p}/v1/probe/#"))
    return {"rolename": WORKER_ROLE, "acls": acls}


def admin_role() -> dict[str, Any]:
    """mosquitto_ctrl's access to the plugin's control topic, and nothing else."""
    control = "$CONTROL/dynamic-security/#"
    return {"rolename": ADMIN_ROLE, "acls": [
        _acl("publishClientSend", control), _acl("publishClientReceive", control),
        _acl("subscribePattern", control)]}


def _client(ident: Identity, roles: Sequence[str], iterations: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"username": ident.username}
    if ident.client_id is not None:
        entry["clientid"] = ident.client_id
    entry.update(hash_password(ident.password, iterations=iterations))
    entry["roles"] = [{"rolename": r} for r in roles]
    return entry


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def _check_ids(devices: Sequence[str], workers: Sequence[str], admin: str) -> None:
    seen: dict[str, str] = {}
    for kind, names in (("device", devices), ("worker", workers), ("admin", [admin] if admin
                                                                         else [])):
        for name in names:
            check_level(name, f"{kind} id")
            if name in seen:
                raise BadInputError(f"identity {name!r} is listed as {seen[name]} and as "
                                    f"{kind}; expected every username once")
            seen[name] = kind


def dynsec_config(*, devices: Sequence[str], workers: Sequence[str],
                  prefix: str = DEFAULT_PREFIX, admin: str = "admin",
                  passwords: Mapping[str, str] | None = None,
                  iterations: int = DEFAULT_ITERATIONS
                  ) -> tuple[dict[str, Any], list[Identity]]:
    """A ``dynamic-security.json`` and the identities in it (passwords in clear, to hand
    out). ``passwords`` fixes some passwords (tests); the others are random."""
    if not devices:
        raise BadInputError("no devices: expected --devices ID[,ID…] or @FILE")
    if not workers:
        raise BadInputError("no workers: expected --workers NAME[,NAME…]")
    _check_ids(devices, workers, admin)
    topics = Topics(prefix)
    given = dict(passwords or {})
    idents: list[Identity] = []
    clients, roles = [], []
    for dev in devices:
        ident = Identity(dev, given.get(dev) or _new_password(), "device", client_id=dev)
        idents.append(ident)
        roles.append(device_role(topics, dev))
        clients.append(_client(ident, [device_role_name(dev)], iterations))
    roles.append(worker_role(topics))
    for name in workers:
        ident = Identity(name, given.get(name) or _new_password(), "worker")
        idents.append(ident)
        clients.append(_client(ident, [WORKER_ROLE], iterations))
    if admin:
        ident = Identity(admin, given.get(admin) or _new_password(), "admin")
        idents.append(ident)
        roles.append(admin_role())
        clients.append(_client(ident, [ADMIN_ROLE], iterations))
    config = {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": clients, "groups": [], "roles": roles,
    }
    return config, idents


def add_device(config: dict[str, Any], device_id: str, *, prefix: str = DEFAULT_PREFIX,
               password: str | None = None, iterations: int = DEFAULT_ITERATIONS
               ) -> Identity:
    """Add one device to a parsed ``dynamic-security.json`` (offline, broker stopped)."""
    check_level(device_id, "device id")
    clients = config.setdefault("clients", [])
    if any(c.get("username") == device_id for c in clients):
        raise BadInputError(f"device id {device_id!r}: a client with that username exists")
    roles = config.setdefault("roles", [])
    rolename = device_role_name(device_id)
    if any(r.get("rolename") == rolename for r in roles):
        raise BadInputError(f"device id {device_id!r}: the role {rolename!r} exists")
    ident = Identity(device_id, password or _new_password(), "device", client_id=device_id)
    roles.append(device_role(Topics(prefix), device_id))
    clients.append(_client(ident, [rolename], iterations))
    return ident


@dataclass(frozen=True)
class Listeners:
    """Where the broker listens. ``tls_dir`` holds ``ca.pem``, ``server.pem`` and
    ``server.key``; ``cert_port`` adds a listener for devices with client certificates
    signed by ``device_ca`` (CN = device id)."""

    bind: str = "0.0.0.0"
    tls_port: int | None = 8883
    tls_dir: str = "/mosquitto/certs"
    cert_port: int | None = None
    device_ca: str | None = None
    plain_port: int | None = None


def mosquitto_conf(*, dynsec_file: str, plugin: str, listeners: Listeners,
                   persistence_dir: str | None = "/mosquitto/data/",
                   user: str | None = None) -> str:
    """A production ``mosquitto.conf``: bounded tuning, dynsec, the listeners."""
    if listeners.tls_port is None and listeners.cert_port is None \
            and listeners.plain_port is None:
        raise BadInputError("no listener: expected a TLS port, a client-certificate port "
                            "or a plain port")
    tls = listeners.tls_dir.rstrip("/")
    lines = [
        "# Generated by `splitinfer broker config` (docs/security.md). mosquitto 2.x.",
        "# Identities: the dynamic-security plugin (username = device id = client id,",
        "# one role per device; workers share one role). Memory: bounded (docs/brokers.md).",
        "per_listener_settings false",
        *BOUNDED_TUNING,
    ]
    if user:
        # Started as root, mosquitto switches to this user (default 'mosquitto'), which
        # must be able to read the certificates and read + write the dynsec file.
        lines.append(f"user {user}")
    if persistence_dir:
        lines += ["# Keeps the workers' persistent sessions (MQTT 5 session expiry) across "
                  "a broker restart.", "persistence true",
                  f"persistence_location {persistence_dir}", "autosave_interval 10"]
    else:
        lines.append("persistence false")
    lines += ["allow_anonymous false", f"plugin {plugin}",
              f"plugin_opt_config_file {dynsec_file}", ""]
    server = [f"certfile {tls}/server.pem", f"keyfile {tls}/server.key"]
    if listeners.tls_port is not None:
        lines += ["# TLS + username/password (devices and workers).",
                  f"listener {listeners.tls_port} {listeners.bind}",
                  f"cafile {tls}/ca.pem", *server, "tls_version tlsv1.2", ""]
    if listeners.cert_port is not None:
        lines += ["# TLS + client certificate (devices): the CN is the username and the",
                  "# client id; the CA below must sign device certificates only (a CN that",
                  "# names a worker or the admin would get that role).",
                  f"listener {listeners.cert_port} {listeners.bind}",
                  f"cafile {listeners.device_ca or tls + '/ca.pem'}", *server,
                  "tls_version tlsv1.2", "require_certificate true",
                  "use_identity_as_username true", "use_username_as_clientid true", ""]
    if listeners.plain_port is not None:
        lines += ["# Plain TCP + username/password: for a private network only.",
                  f"listener {listeners.plain_port} {listeners.bind}", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def ctrl_commands(device_id: str, *, prefix: str = DEFAULT_PREFIX, password: str,
                  connect: str = "-h BROKER -p 8883 --cafile ca.pem -u admin",
                  remove: bool = False) -> list[str]:
    """The ``mosquitto_ctrl`` commands that add (or remove) one device at run time. The
    admin password is read from ``$MOSQUITTO_CTRL_PASSWORD`` in the printed commands
    (``-P "$MOSQUITTO_CTRL_PASSWORD"``) so it stays out of the shell history."""
    check_level(device_id, "device id")
    base = f'mosquitto_ctrl {connect} -P "$MOSQUITTO_CTRL_PASSWORD" dynsec'
    role = device_role_name(device_id)
    q = shlex.quote
    if remove:
        # deleteClient also disconnects a connected session of that client.
        return [f"{base} deleteClient {q(device_id)}", f"{base} deleteRole {q(role)}"]
    cmds = [f"{base} createRole {q(role)}"]
    for acl in device_role(Topics(prefix), device_id)["acls"]:
        cmds.append(f"{base} addRoleACL {q(role)} {acl['acltype']} {q(acl['topic'])} allow")
    cmds += [f"{base} createClient {q(device_id)} -c {q(device_id)} -p {q(password)}",
             f"{base} addClientRole {q(device_id)} {q(role)}"]
    return cmds


def read_ids(spec: str, what: str) -> list[str]:
    """``a,b,c`` or ``@FILE`` (one id a line, ``#`` comments)."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise BadInputError(f"--{what} {spec}: cannot read {path}: {exc.strerror}") from exc
        items = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    else:
        items = [item.strip() for item in spec.split(",")]
    ids = [item for item in items if item]
    if not ids:
        raise BadInputError(f"--{what} {spec!r}: no ids; expected ID[,ID…] or @FILE")
    return ids


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


def _cmd_config(args: argparse.Namespace) -> int:
    devices = read_ids(args.devices, "devices")
    workers = read_ids(args.workers, "workers")
    config, idents = dynsec_config(devices=devices, workers=workers, prefix=args.prefix,
                                   admin=args.admin, iterations=args.iterations)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.local:
        plugin = args.plugin or find_dynsec_plugin()
        if not plugin:
            raise BadInputError("--local: mosquitto's dynamic-security plugin is not on this "
                                "machine; expected --plugin PATH")
        dynsec_file = str((out / "dynamic-security.json").resolve())
        persistence = str((out / "data").resolve()) + "/" if args.persistence else None
        if persistence:
            (out / "data").mkdir(exist_ok=True)
    else:
        plugin = args.plugin or DOCKER_PLUGIN
        dynsec_file = args.dynsec_file
        persistence = "/mosquitto/data/" if args.persistence else None
    tls_port = None if args.no_tls else args.port
    listeners = Listeners(bind=args.bind, tls_port=tls_port, tls_dir=args.tls_dir,
                          cert_port=args.cert_port, device_ca=args.device_ca,
                          plain_port=args.plain_port)
    conf = mosquitto_conf(dynsec_file=dynsec_file, plugin=plugin, listeners=listeners,
                          persistence_dir=persistence, user=args.user)
    _write(out / "mosquitto.conf", conf)
    # The broker rewrites this file on every run-time change; hashes only, but keep it private.
    _write(out / "dynamic-security.json", json.dumps(config, indent=1) + "\n", 0o600)
    if args.json:
        print(json.dumps({"files": [str(out / "mosquitto.conf"),
                                    str(out / "dynamic-security.json")],
                          "identities": [{"username": i.username, "password": i.password,
                                          "role": i.role, "client_id": i.client_id}
                                         for i in idents]}, indent=1))
    else:
        print(f"wrote {out / 'mosquitto.conf'} and {out / 'dynamic-security.json'}",
              file=sys.stderr)
        print("# username\tpassword\trole (devices: client id = username)")
        for i in idents:
            print(f"{i.username}\t{i.password}\t{i.role}")
    return 0


def _cmd_add_device(args: argparse.Namespace) -> int:
    password = args.password or _new_password()
    if args.file:
        path = Path(args.file)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BadInputError(f"--file {path}: cannot read a dynamic-security.json: "
                                f"{exc}") from exc
        if not isinstance(config, dict):
            raise BadInputError(f"--file {path}: expected a JSON object")
        add_device(config, args.device, prefix=args.prefix, password=password,
                   iterations=args.iterations)
        tmp = path.with_name(path.name + ".new")
        _write(tmp, json.dumps(config, indent=1) + "\n", 0o600)
        tmp.replace(path)
        print(f"{args.device}\t{password}\tdevice (added to {path}; restart the broker)")
        return 0
    connect = args.connect
    for cmd in ctrl_commands(args.device, prefix=args.prefix, password=password,
                             connect=connect, remove=args.remove):
        print(cmd)
    if not args.remove:
        print(f"# {args.device}\t{password}\tdevice", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = sub.add_parser("broker", help="a production mosquitto: identities, ACLs, bounds")
    commands = broker.add_subparsers(dest="broker_command", metavar="COMMAND")
    config = commands.add_parser(
        "config", help="write mosquitto.conf + dynamic-security.json for a fleet",
        description="Write a mosquitto.conf (TLS, bounded memory, the dynamic-security "
        "plugin) and a dynamic-security.json with one identity per device (username = "
        "device id = client id, its own topics only), the workers' identities and an admin "
        "for mosquitto_ctrl; print every identity's password (stdout; the files hold hashes "
        "only). Paths in mosquitto.conf are those of the eclipse-mosquitto image unless "
        "--local.")
    config.add_argument("--devices", required=True, help="ID[,ID…] or @FILE (one a line)")
    config.add_argument("--workers", default="worker",
                        help="worker usernames, NAME[,NAME…] or @FILE (default %(default)s)")
    config.add_argument("-o", "--output", required=True, help="directory to write")
    config.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help="topic prefix (default %(default)s)")
    config.add_argument("--admin", default="admin",
                        help="mosquitto_ctrl admin username ('' = none; default %(default)s)")
    config.add_argument("--port", type=int, default=8883,
                        help="TLS + password listener (default %(default)s)")
    config.add_argument("--no-tls", action="store_true",
                        help="no TLS + password listener (then give --plain-port)")
    config.add_argument("--cert-port", type=int, default=None,
                        help="also a listener for devices with client certificates "
                        "(CN = device id; e.g. 8884)")
    config.add_argument("--device-ca", default=None,
                        help="CA file for device certificates (default TLS_DIR/ca.pem)")
    config.add_argument("--plain-port", type=int, default=None,
                        help="also a plain TCP listener (private networks, tests)")
    config.add_argument("--bind", default="0.0.0.0", help="listen address (default all)")
    config.add_argument("--tls-dir", default="/mosquitto/certs",
                        help="directory with ca.pem, server.pem, server.key "
                        "(default %(default)s)")
    config.add_argument("--dynsec-file", default="/mosquitto/data/dynamic-security.json",
                        help="where the broker finds (and rewrites) dynamic-security.json; "
                        "a writable volume (default %(default)s)")
    config.add_argument("--plugin", default=None,
                        help=f"the plugin's path (default {DOCKER_PLUGIN}, or this "
                        "machine's with --local)")
    config.add_argument("--local", action="store_true",
                        help="paths for running here: `mosquitto -c DIR/mosquitto.conf`")
    config.add_argument("--no-persistence", dest="persistence", action="store_false",
                        help="no broker persistence (sessions are lost on restart)")
    config.add_argument("--user", default=None,
                        help="the user mosquitto switches to when started as root (default "
                        "mosquitto's: 'mosquitto'); it must read the certificates and read "
                        "+ write the dynsec file")
    config.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help="PBKDF2-SHA512 rounds per password (default %(default)s, "
                        "dynsec's)")
    config.add_argument("--json", action="store_true", help="print JSON")
    config.set_defaults(func=_cmd_config)

    add = commands.add_parser(
        "add-device", help="add (or remove) one device on a running broker",
        description="Print the mosquitto_ctrl commands that add one device (its role and "
        "its client, username = client id = device id) to a running broker, or with "
        "--file add it to a dynamic-security.json while the broker is stopped. The "
        "commands read the admin password from $MOSQUITTO_CTRL_PASSWORD.")
    add.add_argument("device", help="device id")
    add.add_argument("--prefix", default=DEFAULT_PREFIX)
    add.add_argument("--password", default=None, help="(default: a random one, printed)")
    add.add_argument("--connect", default="-h BROKER -p 8883 --cafile ca.pem -u admin",
                     help="mosquitto_ctrl connection options (default '%(default)s')")
    add.add_argument("--remove", action="store_true",
                     help="print the commands that remove the device (and disconnect it)")
    add.add_argument("--file", default=None, help="edit this dynamic-security.json instead")
    add.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    add.set_defaults(func=_cmd_add_device)

    def _help(_args: argparse.Namespace) -> int:
        broker.print_help()
        return 2

    broker.set_defaults(func=_help)
