"""``splitinfer edge serve`` settings: one TOML file, environment variables, flags.

::

    # /etc/splitinfer/edge.toml
    broker = "mqtts://broker.example:8883"
    tls_ca = "/etc/splitinfer/ca.pem"
    artifacts = "/var/lib/splitinfer/artifacts/digits_cnn-int8"
    http = "127.0.0.1:8470"

Every key (:data:`KEYS`) is also the environment variable ``SPLITINFER_<KEY>`` (upper case,
``device_id`` → ``SPLITINFER_DEVICE_ID``) and the flag ``--<key>`` (``_`` → ``-``).
Precedence: flag > environment > file > default, key by key. The file itself is
``--config PATH`` or ``SPLITINFER_CONFIG``; with neither, only environment and flags count,
so ``splitinfer edge serve --broker URL --artifacts DIR --device-id cam-7 --http
127.0.0.1:8470`` runs with no file.

:func:`resolve` checks everything at start-up and raises :class:`BadInputError` (exit 2)
naming the key, where its value came from (``edge.toml: threads``, ``SPLITINFER_THREADS``,
``--threads``), what it was and what was expected: an unknown key (with the nearest known
one), a wrong type, a missing or unusable ``artifacts``, a bad broker URL, device id or
``HOST:PORT``, a TLS or password file that is not there, cannot be read or (TLS) holds
no usable PEM. Nothing here imports numpy, onnxruntime or paho.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from splitinfer.errors import BadInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (the edge extra)
    import tomli as tomllib

__all__ = ["KEYS", "Key", "ServeConfig", "resolve", "add_arguments", "default_state_dir",
           "parse_address", "ENV_PREFIX", "DEFAULT_HTTP"]

ENV_PREFIX = "SPLITINFER_"
DEFAULT_HTTP = "127.0.0.1:8470"
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2,
               "mb": 1024 ** 2, "mib": 1024 ** 2}


@dataclass(frozen=True)
class Key:
    """One setting: its name (TOML key; ``SPLITINFER_<NAME>``; ``--name``), type, default."""

    name: str
    kind: str  # "str" | "int" | "float" | "size" (bytes: 16777216 or "16m")
    default: Any
    help: str
    metavar: str = ""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


KEYS: tuple[Key, ...] = (
    Key("broker", "str", "mqtt://127.0.0.1:1883", "broker URL, "
        "mqtt[s]://[user@]host[:port][?protocol=5|3.1.1&max_packet=]", "URL"),
    Key("username", "str", None, "broker user name (overrides the URL's)", "NAME"),
    Key("password", "str", None, "broker password (prefer password_file: a file, not the "
        "process environment or the config)", "SECRET"),
    Key("password_file", "str", None, "file holding the broker password (e.g. a systemd "
        "credential: $CREDENTIALS_DIRECTORY/broker-password)", "PATH"),
    Key("tls_ca", "str", None, "CA bundle that signed the broker's certificate (implies TLS)",
        "PEM"),
    Key("tls_cert", "str", None, "this device's client certificate (mutual TLS)", "PEM"),
    Key("tls_key", "str", None, "the private key of tls_cert", "PEM"),
    Key("device_id", "str", None, "client id and topic level of this device (default: "
        "derived once, kept in state_dir/device_id)", "ID"),
    Key("artifacts", "str", None, "a split directory (splitinfer split) or a bundle "
        "(splitinfer bundle); required", "DIR"),
    Key("split", "str", None, "with a bundle: serve this split only (split id or folder)",
        "ID"),
    Key("prefix", "str", "splitinfer", "topic prefix", "PREFIX"),
    Key("threads", "int", 0, "onnxruntime intra-op threads for the head (0: one per usable "
        "CPU, a cgroup CPU quota such as the unit's CPUQuota= counted)", "N"),
    Key("timeout", "float", 10.0, "deadline of one request, head included, seconds", "S"),
    Key("reconnect_max", "float", 2.0, "longest pause between attempts to reach the broker "
        "(at boot and after a loss), seconds", "S"),
    Key("http", "str", DEFAULT_HTTP, "address of the local HTTP API, HOST:PORT (port 0: any "
        "free one)", "HOST:PORT"),
    Key("max_body", "size", 16 * 1024 ** 2, "largest request body (and its arrays once "
        "unpacked), bytes or 16m / 512k", "BYTES"),
    Key("max_in_flight", "int", 16, "requests answered at once; more get 429", "N"),
    Key("drain_timeout", "float", 4.0, "on SIGTERM, how long requests in flight may still "
        "take before they are answered 503, seconds", "S"),
    Key("state_dir", "str", None, "where the derived device id is kept (default "
        "$STATE_DIRECTORY, else $XDG_STATE_HOME/splitinfer, else "
        "~/.local/state/splitinfer)", "DIR"),
)
_BY_NAME = {k.name: k for k in KEYS}


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The resolved settings (see :data:`KEYS`); ``sources`` says where each came from."""

    broker: str
    username: str | None
    password: str | None
    password_file: str | None
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    device_id: str | None
    artifacts: str
    split: str | None
    prefix: str
    threads: int
    timeout: float
    reconnect_max: float
    http: str
    max_body: int
    max_in_flight: int
    drain_timeout: float
    state_dir: str
    config_file: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def http_address(self) -> tuple[str, int]:
        return parse_address(self.http, "http")

    def public(self) -> dict[str, Any]:
        """The settings without secrets (for the start-up log line)."""
        from splitinfer.mqtt import BrokerConfig

        shown = {k.name: getattr(self, k.name) for k in KEYS}
        shown["broker"] = BrokerConfig.from_url(self.broker).url()
        if self.password is not None:
            shown["password"] = "***"
        return {k: v for k, v in shown.items() if v is not None}

    def broker_config(self) -> Any:
        """The :class:`splitinfer.mqtt.BrokerConfig`: the URL with the credential and TLS
        keys laid over it (a ``tls_*`` key turns TLS on)."""
        from dataclasses import replace

        from splitinfer.mqtt import BrokerConfig

        cfg = BrokerConfig.from_url(self.broker)
        changes: dict[str, Any] = {}
        if self.username is not None:
            changes["username"] = self.username
        password = self.password
        if self.password_file is not None:
            password = Path(self.password_file).read_text().rstrip("\r\n")
        if password is not None:
            changes["password"] = password
        for key, attr in (("tls_ca", "ca_file"), ("tls_cert", "cert_file"),
                          ("tls_key", "key_file")):
            if getattr(self, key) is not None:
                changes[attr] = getattr(self, key)
        if any(getattr(self, k) for k in ("tls_ca", "tls_cert", "tls_key")) and not cfg.tls:
            changes["tls"] = True
            url = self.broker if "://" in self.broker else f"mqtt://{self.broker}"
            if urlsplit(url).port is None:  # mqtt://host: TLS's port, not 1883
                changes["port"] = 8883
        return replace(cfg, **changes) if changes else cfg


def default_state_dir(env: Mapping[str, str] | None = None) -> str:
    """``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``; the first of a list), else
    ``$XDG_STATE_HOME/splitinfer``, else ``~/.local/state/splitinfer``."""
    env = os.environ if env is None else env
    systemd = env.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return systemd
    xdg = env.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return str(base / "splitinfer")


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8470`` for IPv6) as (host, port); BadInputError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise BadInputError(f"{what} {text!r}: expected HOST:PORT, e.g. {DEFAULT_HTTP} "
                            "(port 0-65535; [::1]:8470 for IPv6)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per key; every default is None (resolved later)."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"TOML file of the keys below (also {ENV_PREFIX}CONFIG)")
    for key in KEYS:
        default = f" (default {key.default})" if key.default is not None else ""
        parser.add_argument(key.flag, dest=key.name, default=None,
                            metavar=key.metavar or None,
                            help=f"{key.help}{default} [{key.env}]".replace("%", "%%"))


def resolve(flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
            config_file: str | Path | None = None) -> ServeConfig:
    """Lay flags (non-None values) over ``env`` (``SPLITINFER_*``) over the TOML file over
    the defaults; check and convert every value. ``config_file`` None: ``flags['config']``,
    then ``SPLITINFER_CONFIG``; no file is fine."""
    env = os.environ if env is None else env
    path = config_file or flags.get("config") or env.get(ENV_PREFIX + "CONFIG") or None
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in _read_file(Path(path)).items() if path else ():
        values[name], sources[name] = _convert(_BY_NAME[name], value, f"{path}: {name}"), \
            str(path)
    for key in KEYS:
        raw = env.get(key.env)
        if raw is not None and raw != "":
            values[key.name], sources[key.name] = _convert(key, raw, key.env), key.env
    for key in KEYS:
        raw = flags.get(key.name)
        if raw is not None:
            values[key.name], sources[key.name] = _convert(key, raw, key.flag), key.flag
    for key in KEYS:
        if key.name not in values:
            values[key.name] = key.default
            sources[key.name] = "default"
    if values["state_dir"] is None:
        values["state_dir"] = default_state_dir(env)
    config = ServeConfig(**values, config_file=str(path) if path else None, sources=sources)
    _check(config)
    return config


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"config file {path}: no such file; expected a TOML file of "
                            f"keys {[k.name for k in KEYS]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"config file {path}: cannot be read ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"config file {path}: not valid TOML: {exc}") from exc
    unknown = [k for k in data if k not in _BY_NAME]
    if unknown:
        hints = []
        for k in unknown:
            near = difflib.get_close_matches(k, list(_BY_NAME), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise BadInputError(f"config file {path}: unknown key(s) {', '.join(hints)}; "
                            f"expected only {[k.name for k in KEYS]} (all at top level)")
    return data


def _convert(key: Key, value: Any, where: str) -> Any:
    """``value`` (a TOML value, or a string from the environment or a flag) as ``key.kind``."""
    text = isinstance(value, str)
    got = f"{value!r} ({type(value).__name__})"
    if key.kind == "str":
        if not text:
            raise BadInputError(f"{where}: expected a string, got {got}")
        return value
    if key.kind == "int":
        if text and value.strip().isascii():
            try:
                return int(value)
            except ValueError:  # '+-1', '4.5', '²' (isdigit says yes, int says no)
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise BadInputError(f"{where}: expected an integer, got {got}")
    if key.kind == "float":
        number: float | None = None
        if text:
            try:
                number = float(value)
            except ValueError:
                number = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None or not math.isfinite(number):
            raise BadInputError(f"{where}: expected a number of seconds, got {got}")
        return number
    if key.kind == "size":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text:
            digits = value.strip().lower()
            unit = digits.lstrip("0123456789")
            number_text = digits[:len(digits) - len(unit)]
            if number_text and unit.strip() in _SIZE_UNITS:
                return int(number_text) * _SIZE_UNITS[unit.strip()]
        raise BadInputError(f"{where}: expected a size in bytes (16777216, '16m', '512k'), "
                            f"got {got}")
    raise AssertionError(key.kind)  # pragma: no cover - the table above is fixed


def _check(config: ServeConfig) -> None:
    from splitinfer.bundle import BUNDLE_NAME
    from splitinfer.manifest import MANIFEST_NAME
    from splitinfer.mqtt import BrokerConfig
    from splitinfer.topics import Topics, check_level

    src = config.sources

    def where(name: str) -> str:
        how = src.get(name, "default")
        return f"{name} (from {how})" if how != "default" else name

    if not config.artifacts:
        raise BadInputError(f"no artifacts: set 'artifacts' in the config file, "
                            f"{_BY_NAME['artifacts'].env} or --artifacts to a split directory "
                            "(splitinfer split) or a bundle (splitinfer bundle)")
    artifacts = Path(config.artifacts)
    if not artifacts.is_dir():
        raise BadInputError(f"{where('artifacts')} {config.artifacts!r}: no such directory; "
                            "expected a split directory (manifest.json + head) or a bundle "
                            "(bundle.json)")
    if not ((artifacts / MANIFEST_NAME).is_file() or (artifacts / BUNDLE_NAME).is_file()):
        raise BadInputError(f"{where('artifacts')} {config.artifacts!r} holds no "
                            f"{MANIFEST_NAME} or {BUNDLE_NAME}; expected a split directory "
                            "(splitinfer split) or a bundle (splitinfer bundle)")
    try:
        BrokerConfig.from_url(config.broker)
    except BadInputError as exc:
        raise BadInputError(f"{where('broker')}: {exc}") from None
    if config.device_id is not None:
        check_level(config.device_id, where("device_id"))
    try:
        Topics(config.prefix)
    except BadInputError as exc:
        raise BadInputError(f"{where('prefix')}: {exc}") from None
    parse_address(config.http, where("http"))
    for name in ("password_file", "tls_ca", "tls_cert", "tls_key"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_file():
            raise BadInputError(f"{where(name)} {value!r}: no such file")
    if config.tls_key is not None and config.tls_cert is None:
        raise BadInputError(f"{where('tls_key')} is set but tls_cert is not; a client key "
                            "needs its certificate")
    if config.password is not None and config.password_file is not None:
        raise BadInputError("password and password_file are both set; keep one")
    # read the files now, as the service's user: one it cannot read (a root-only 0600 key)
    # or that holds no PEM is exit 2 naming the key, not a connect that fails forever
    try:
        broker = config.broker_config()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{where('password_file')} {config.password_file!r}: cannot be "
                            f"read ({exc}); expected a UTF-8 file this user can read "
                            "(systemd: LoadCredential=)") from None
    try:
        broker.tls_context()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        tls = ", ".join(f"{where(k)} {getattr(config, k)!r}"
                        for k in ("tls_ca", "tls_cert", "tls_key")
                        if getattr(config, k) is not None) or "the system's CA store"
        raise BadInputError(f"TLS set-up from {tls} failed ({exc}); expected PEM files this "
                            "user can read: tls_ca the CA that signed the broker's "
                            "certificate, tls_cert and tls_key this device's certificate and "
                            "its private key") from None
    for name, low in (("threads", 0), ("max_in_flight", 1), ("max_body", 1024)):
        if getattr(config, name) < low:
            raise BadInputError(f"{where(name)}: expected an integer >= {low}, got "
                                f"{getattr(config, name)}")
    for name in ("timeout", "reconnect_max", "drain_timeout"):
        if not getattr(config, name) > 0:
            raise BadInputError(f"{where(name)}: expected seconds > 0, got "
                                f"{getattr(config, name)}")
    if config.split is not None and not (artifacts / BUNDLE_NAME).is_file():
        raise BadInputError(f"{where('split')}: {config.artifacts} is not a bundle (no "
                            f"{BUNDLE_NAME}); 'split' picks one split of a bundle")
