"""splitinfer.gctune: a serving process's collector, tuned once its models are loaded."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from splitinfer import gctune
from splitinfer.errors import StartupError


def test_tune_for_serving_freezes_the_heap_and_raises_the_young_threshold() -> None:
    # conftest's autouse fixture gives the collector back afterwards
    gc.set_threshold(700, 10, 10)
    keep = [object() for _ in range(100)]  # start-up objects: frozen, never walked again
    assert gctune.tune_for_serving() == (gctune.YOUNG_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() >= len(keep)
    gc.set_threshold(50_000, 10, 10)
    assert gctune.tune_for_serving()[0] == 50_000  # a higher threshold is kept


def test_cloud_serve_tunes_its_process_an_embedded_server_does_not(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``cloud serve`` asks its Server to tune the collector; a Server made in code (a
    worker embedded in someone's program) does not, and one that is asked calls
    tune_for_serving once its tails are loaded."""
    from cloud_service import server as server_module
    from cloud_service.config import Config
    from cloud_service.registry import Registry
    from splitinfer.cli import build_parser

    made: list[dict[str, Any]] = []

    class FakeServer:
        drained_cleanly = True

        def __init__(self, config: Config, **kw: Any) -> None:
            made.append(kw)

        def run(self) -> None:
            return None

    monkeypatch.setattr(server_module, "Server", FakeServer)
    args = build_parser().parse_args(["cloud", "serve", "--artifacts", str(tmp_path)])
    assert args.func(args) == 0
    assert made and made[0].get("tune_gc") is True

    monkeypatch.undo()
    assert server_module.Server(Config(artifacts=tmp_path)).tune_gc is False
    calls: list[int] = []
    monkeypatch.setattr(gctune, "tune_for_serving", lambda: calls.append(1) or (0, 0, 0))
    server = server_module.Server(Config(artifacts=tmp_path, broker="mqtt://127.0.0.1:1"),
                                  registry=Registry([]), tune_gc=True)
    with pytest.raises(StartupError):  # nothing listens on port 1: the connect fails after
        server.run()
    assert calls == [1]
