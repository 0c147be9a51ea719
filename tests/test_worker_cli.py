"""``splitinfer cloud serve`` flags and environment for sessions, heartbeats, dedupe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloud_service.cli import config_from_args
from cloud_service.config import Config
from splitinfer.cli import build_parser
from splitinfer.errors import BadInputError


def parse(*argv: str) -> Config:
    args = build_parser().parse_args(["cloud", "serve", "--artifacts", ".", *argv])
    return config_from_args(args)


def test_defaults_are_the_contracts() -> None:
    cfg = parse()
    assert (cfg.worker_id, cfg.session_expiry_s, cfg.heartbeat_s, cfg.fence_after_s,
            cfg.dedupe_size) == ("", 60.0, 1.0, 3.0, 4096)
    assert not cfg.persistent and cfg.heartbeat_id == cfg.client_id
    assert cfg.client_id.startswith("splitinfer-worker-")


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse("--worker-id", "w-7", "--session-expiry", "120", "--heartbeat", "0.5",
                "--fence-after", "2", "--dedupe", "10")
    assert (cfg.worker_id, cfg.client_id, cfg.session_expiry_s, cfg.heartbeat_s,
            cfg.fence_after_s, cfg.dedupe_size) == ("w-7", "w-7", 120.0, 0.5, 2.0, 10)
    assert cfg.persistent and cfg.heartbeat_id == "w-7"
    for name, value in (("WORKER_ID", "env-w"), ("SESSION_EXPIRY", "30"),
                        ("HEARTBEAT", "0"), ("FENCE_AFTER", "0"), ("DEDUPE", "0")):
        monkeypatch.setenv(f"SPLITINFER_{name}", value)
    cfg = parse()
    assert (cfg.client_id, cfg.session_expiry_s, cfg.heartbeat_s, cfg.fence_after_s,
            cfg.dedupe_size) == ("env-w", 30.0, 0.0, 0.0, 0)


@pytest.mark.parametrize(("bad", "field"), [
    ({"worker_id": "a/b"}, "worker id"),
    ({"worker_id": "w+"}, "worker id"),
    ({"session_expiry_s": -1}, "session_expiry_s"),
    ({"session_expiry_s": 2.0**33}, "session_expiry_s"),
    ({"heartbeat_s": float("nan")}, "heartbeat_s"),
    ({"fence_after_s": -3}, "fence_after_s"),
    ({"fence_after_s": 1.0, "heartbeat_s": 1.0}, "fence_after_s"),
    ({"dedupe_size": -1}, "dedupe_size"),
    ({"dedupe_size": True}, "dedupe_size"),
    ({"dedupe_bytes": 1.5}, "dedupe_bytes"),
    ({"client_id": "has space"}, "client id"),
    ({"metrics_port": 70000}, "metrics_port"),
    ({"metrics_port": -1}, "metrics_port"),
    ({"metrics_host": ""}, "metrics_host"),
])
def test_bad_settings_name_the_field(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(BadInputError, match=field):
        Config(artifacts=Path("."), **bad)
    # A client id that is no topic level is fine without heartbeat and fencing.
    if "client_id" in bad:
        Config(artifacts=Path("."), heartbeat_s=0, fence_after_s=0, **bad)


def test_metrics_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse()
    assert (cfg.metrics_port, cfg.metrics_host) == (0, "127.0.0.1")  # off by default
    cfg = parse("--metrics-port", "9464", "--metrics-host", "0.0.0.0")
    assert (cfg.metrics_port, cfg.metrics_host) == (9464, "0.0.0.0")
    monkeypatch.setenv("SPLITINFER_METRICS_PORT", "9100")
    monkeypatch.setenv("SPLITINFER_METRICS_HOST", "::1")
    cfg = parse()
    assert (cfg.metrics_port, cfg.metrics_host) == (9100, "::1")
