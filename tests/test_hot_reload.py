"""Hot reload of the worker's artifacts (cloud_service.reload) and its readiness.

Unit tests drive the change detector with an injected clock and the reloader tick by tick
on real tails (onnxruntime, tiny splits whose versions answer differently); the
integration test runs ``splitinfer cloud serve`` against a real mosquitto under a load of
50 requests a second from edge agents while the split directory is replaced three ways.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cloud_support import TinySplit, make_split, request_payload

from cloud_service.config import Config
from cloud_service.metrics import Metrics
from cloud_service.registry import Registry, Tail, open_directory, split_directories
from cloud_service.reload import ChangeDetector, Reloader, fingerprint, scan
from cloud_service.worker import Incoming, Worker
from simulators.support.broker import MosquittoBroker, free_port
from splitinfer.errors import RemoteError
from splitinfer.wire import decode

Array = np.ndarray[Any, Any]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the change detector (pure) ----------------------------------------------------------

FP1 = (("", 1, 0, 0, 0), ("manifest.json", 2, 10, 1, 1))
FP2 = (("", 1, 0, 0, 0), ("manifest.json", 3, 11, 2, 2))
FP3 = (("", 1, 0, 0, 0), ("manifest.json", 4, 12, 3, 3))


def test_a_change_is_acted_on_once_it_stayed_the_same_for_settle_s() -> None:
    clock = Clock()
    det = ChangeDetector({"a": FP1}, settle_s=1.0, clock=clock)
    assert det.observe({"a": FP1}) == []
    assert det.observe({"a": FP2}) == []  # first seen: may still be written
    assert det.pending == {"a"}
    clock.now += 0.5
    assert det.observe({"a": FP2}) == []  # same, not long enough
    clock.now += 0.4
    assert det.observe({"a": FP3}) == []  # changed again: the wait starts over
    clock.now += 0.9
    assert det.observe({"a": FP3}) == []
    clock.now += 0.2
    (change,) = det.observe({"a": FP3})
    assert change.directory == "a" and change.fingerprint == FP3 and not change.gone
    assert det.observe({"a": FP3}) == [change]  # until confirmed, it stays due
    det.done(change)
    assert det.observe({"a": FP3}) == [] and det.pending == frozenset()
    assert det.known == {"a": FP3}


def test_a_directory_missing_for_a_moment_is_not_removed() -> None:
    """Moving the old directory aside and the new one in leaves an instant without it."""
    clock = Clock()
    det = ChangeDetector({"a": FP1, "b": FP1}, settle_s=1.0, clock=clock)
    assert det.observe({"b": FP1}) == []  # "a" gone...
    clock.now += 0.3
    assert det.observe({"a": FP1, "b": FP1}) == []  # ...and back unchanged: nothing
    assert det.pending == frozenset()
    assert det.observe({"b": FP1}) == []
    clock.now += 0.3
    assert det.observe({"a": FP2, "b": FP1}) == []  # back as another version: a change
    clock.now += 1.0
    assert [c.fingerprint for c in det.observe({"a": FP2, "b": FP1})] == [FP2]


def test_appearing_and_going_settle_too() -> None:
    clock = Clock()
    det = ChangeDetector({"a": FP1}, settle_s=0.5, clock=clock)
    assert det.observe({"a": FP1, "new": FP2}) == []
    assert det.observe({}) == []  # "a" gone, "new" gone again
    clock.now += 0.6
    (gone,) = det.observe({})
    assert gone.directory == "a" and gone.gone
    det.done(gone)
    assert det.known == {}
    assert det.observe({"new": FP2}) == []
    clock.now += 0.6
    (added,) = det.observe({"new": FP2})
    assert added.directory == "new" and added.fingerprint == FP2


def test_zero_settle_acts_on_the_second_identical_scan() -> None:
    det = ChangeDetector({}, settle_s=0.0, clock=Clock())
    assert det.observe({"a": FP1}) == []
    assert len(det.observe({"a": FP1})) == 1
    with pytest.raises(ValueError, match="settle_s"):
        ChangeDetector({}, settle_s=-1)


# --- flags ---------------------------------------------------------------------------------

def parse(*argv: str) -> Config:
    from cloud_service.cli import config_from_args
    from splitinfer.cli import build_parser

    args = build_parser().parse_args(["cloud", "serve", "--artifacts", ".", *argv])
    return config_from_args(args)


def test_reload_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitinfer.errors import BadInputError

    cfg = parse()
    assert (cfg.reload, cfg.reload_interval_s, cfg.reload_settle_s) == (True, 1.0, 1.0)
    cfg = parse("--no-reload", "--reload-interval", "0.5", "--reload-settle", "0")
    assert (cfg.reload, cfg.reload_interval_s, cfg.reload_settle_s) == (False, 0.5, 0.0)
    monkeypatch.setenv("SPLITINFER_RELOAD", "off")
    monkeypatch.setenv("SPLITINFER_RELOAD_INTERVAL", "2")
    assert (parse().reload, parse().reload_interval_s) == (False, 2.0)
    assert parse("--reload").reload is True  # the flag beats the environment
    monkeypatch.setenv("SPLITINFER_RELOAD", "sometimes")
    with pytest.raises(BadInputError, match="SPLITINFER_RELOAD='sometimes': expected one of"):
        parse()
    monkeypatch.delenv("SPLITINFER_RELOAD")
    with pytest.raises(BadInputError, match="reload_interval_s"):
        parse("--reload-interval", "0")
    with pytest.raises(BadInputError, match="reload_settle_s"):
        parse("--reload-settle", "-1")


# --- the file system side -----------------------------------------------------------------

def test_fingerprint_sees_in_place_and_rename_replacements(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    (d / "tail.onnx").write_bytes(b"v1")
    first = fingerprint(d)
    assert first is not None and fingerprint(d) == first
    tmp = d / ".tail.onnx.tmp"
    tmp.write_bytes(b"v2")
    during = fingerprint(d)
    assert during != first  # a file being written beside it counts: not settled
    os.replace(tmp, d / "tail.onnx")  # same size, new inode
    replaced = fingerprint(d)
    assert replaced not in (first, during)
    staged = tmp_path / ".s.new"
    shutil.copytree(d, staged)
    os.rename(d, tmp_path / ".s.old")
    os.rename(staged, d)
    assert fingerprint(d) not in (first, during, replaced)
    assert fingerprint(tmp_path / "gone") is None


def test_split_directories_follow_links_and_skip_hidden(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    for name in ("a", "nested/b", ".staging/c", "d/.old"):
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text("{}")
    (tmp_path / "versions" / "v7").mkdir(parents=True)
    (tmp_path / "versions" / "v7" / "manifest.json").write_text("{}")
    (root / "linked").symlink_to(tmp_path / "versions" / "v7")
    (root / "loop").symlink_to(root)  # followed once, not forever
    found = split_directories(root)
    assert found == [root / "a", root / "linked", root / "nested" / "b"]
    assert split_directories(root / "a") == [root / "a"]
    seen = scan(root)
    assert seen is not None and sorted(seen) == [str(p) for p in found]
    assert scan(tmp_path / "missing") is None  # nothing concluded from a missing root


# --- the reloader on real tails, tick by tick ---------------------------------------------

def load(directory: Path) -> Tail | None:
    return open_directory(directory, threads=1)


def version(split: TinySplit, root: Path, seed: int) -> TinySplit:
    """Another version of ``split`` (same split id and cut, other weights) under ``root``."""
    return make_split(root, split.split_id, seed=seed)


class Rig:
    """A registry loaded from ``root`` and a reloader on it with a fake clock."""

    def __init__(self, root: Path, settle_s: float = 1.0) -> None:
        self.root = root
        self.clock = Clock()
        known = scan(root) or {}
        self.registry = Registry.load(root, threads=1)
        self.metrics = Metrics()
        self.reloader = Reloader(root, self.registry, self.metrics, load=load, known=known,
                                 interval_s=0.1, settle_s=settle_s, clock=self.clock)

    def settle(self) -> list[Any]:
        """Two scans ``settle_s`` apart: whatever changed is applied."""
        first = asyncio.run(self.reloader.tick())
        self.clock.now += self.reloader.detector.settle_s + 0.01
        return first + asyncio.run(self.reloader.tick())

    def answer(self, split_id: str, x: Array) -> Array:
        tail = self.registry[split_id]
        return tail.run([x])[0]


def test_a_replaced_split_is_served_by_the_new_version_and_the_old_one_retires(
        tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    v1 = make_split(root, "live", seed=1)
    other = make_split(root, "other", seed=5)
    rig = Rig(root)
    x = v1.sample(2, seed=3)
    old = rig.registry["live"]
    np.testing.assert_allclose(rig.answer("live", x), v1.expected(x), rtol=1e-5, atol=1e-5)
    assert rig.reloader.problems() == [] and rig.metrics.snapshot()["splits_served"] == 2

    old.in_flight = 2  # as if the worker had accepted two requests for it
    shutil.rmtree(v1.directory)
    v2 = version(v1, root, seed=2)
    assert asyncio.run(rig.reloader.tick()) == []
    assert rig.registry["live"] is old  # not settled: still the old version
    assert rig.reloader.problems() == []  # ready throughout: the old one serves
    rig.clock.now += 1.1
    (change,) = asyncio.run(rig.reloader.tick())
    assert change.directory == str(v1.directory)
    new = rig.registry["live"]
    assert new is not old and new.version > old.version
    np.testing.assert_allclose(rig.answer("live", x), v2.expected(x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(v1.expected(x), v2.expected(x))
    assert rig.registry["other"].directory == other.directory  # untouched
    assert rig.metrics.reloads == 1 and rig.reloader.retiring == 1
    assert rig.metrics.snapshot()["tails_retiring"] == 1
    asyncio.run(rig.reloader.tick())
    assert rig.reloader.retiring == 1  # still answering its two
    old.in_flight = 0
    asyncio.run(rig.reloader.tick())
    assert rig.reloader.retiring == 0


def test_a_broken_new_version_keeps_the_old_one_serving(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    root = tmp_path / "artifacts"
    v1 = make_split(root, "live", seed=1)
    rig = Rig(root)
    x = v1.sample(1)
    tail = v1.directory / "tail.onnx"
    tail.write_bytes(tail.read_bytes()[:-7])  # truncated: its sha256 no longer matches
    with caplog.at_level("ERROR", logger="cloud_service.reload"):
        rig.settle()
    assert "cannot be served" in caplog.text and "sha256" in caplog.text
    assert "still serving the previous version of split live" in caplog.text
    np.testing.assert_allclose(rig.answer("live", x), v1.expected(x), rtol=1e-5, atol=1e-5)
    assert rig.metrics.reload_failures == 1 and rig.metrics.reloads == 0
    assert rig.reloader.problems() == []  # the previous version serves: still ready
    (stale,) = rig.reloader.stale()
    assert str(v1.directory) in stale and "sha256" in stale
    assert rig.metrics.snapshot()["reload_pending"] == 1
    rig.settle()  # the same broken state is not retried (nor logged) again
    assert rig.metrics.reload_failures == 1
    shutil.rmtree(v1.directory)
    v3 = version(v1, root, seed=3)  # fixed: loaded
    rig.settle()
    np.testing.assert_allclose(rig.answer("live", x), v3.expected(x), rtol=1e-5, atol=1e-5)
    assert rig.reloader.stale() == [] and rig.metrics.snapshot()["reload_pending"] == 0


def test_an_unexpected_load_failure_is_a_failed_version_not_a_stuck_reloader(
        tmp_path: Path) -> None:
    """A file vanishing while it is read (OSError, not a SplitInferError) fails that
    version like any other: logged, counted, the old one serving, tried again on change."""
    root = tmp_path / "artifacts"
    v1 = make_split(root, "live", seed=1)
    rig = Rig(root, settle_s=0.0)
    old = rig.registry["live"]

    def vanishing(directory: Path) -> Tail | None:
        raise FileNotFoundError(2, "No such file or directory", str(directory / "tail.onnx"))

    rig.reloader._load = vanishing
    (v1.directory / "head.onnx").touch()
    rig.settle()
    assert rig.registry["live"] is old and rig.metrics.reload_failures == 1
    (stale,) = rig.reloader.stale()
    assert "FileNotFoundError" in stale
    rig.settle()
    assert rig.metrics.reload_failures == 1  # not retried until it changes
    rig.reloader._load = load
    (v1.directory / "head.onnx").write_bytes((v1.directory / "head.onnx").read_bytes())
    rig.settle()
    assert rig.registry["live"] is not old and rig.reloader.stale() == []


def test_appearing_going_moving_and_conflicting_directories(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    make_split(root, "a", seed=1)
    rig = Rig(root, settle_s=0.5)
    b = make_split(root, "b", seed=2)
    asyncio.run(rig.reloader.tick())
    assert "b" not in rig.registry
    assert rig.reloader.problems() == [f"{b.directory}: loading"]  # new, not yet served
    rig.clock.now += 0.6
    asyncio.run(rig.reloader.tick())
    assert sorted(rig.registry) == ["a", "b"] and rig.reloader.problems() == []
    assert "b" in rig.metrics.splits  # a metrics label now

    # the same split id in a second directory: refused, named, not served from there
    dup = make_split(root / "copy", "b", seed=9)
    rig.settle()
    assert rig.registry["b"].directory == b.directory
    (problem,) = rig.reloader.problems()
    assert str(dup.directory) in problem and "already served from" in problem
    shutil.rmtree(root / "copy")
    rig.settle()
    assert rig.reloader.problems() == []

    # moved to another directory in one go: served from there, never missing
    os.rename(b.directory, root / "b-moved")
    rig.settle()
    assert rig.registry["b"].directory == root / "b-moved"
    assert rig.reloader.problems() == []

    # removed: not served any more (the worker answers unknown_split)
    shutil.rmtree(root / "b-moved")
    rig.settle()
    assert sorted(rig.registry) == ["a"]
    assert "b" in rig.metrics.splits  # its series stay

    # a broken new directory: not ready, and says which and why
    (root / "c").mkdir()
    (root / "c" / "manifest.json").write_text("{not json")
    rig.settle()
    (problem,) = rig.reloader.problems()
    assert problem.startswith(f"{root / 'c'}: not served:")
    shutil.rmtree(root / "c")
    rig.settle()
    assert rig.reloader.problems() == []


def test_a_copy_refused_as_a_duplicate_takes_over_when_the_original_goes(
        tmp_path: Path) -> None:
    """``cp -r live live-v2 && rm -r live``: the copy is refused while both hold split
    'live' (one split id, one directory), and serves it in the very swap that removes the
    original; it used to stay refused, known and not retried, while nothing served 'live'
    (every request unknown_split until someone touched the copy)."""
    root = tmp_path / "artifacts"
    v1 = make_split(root, "live", seed=1)
    rig = Rig(root, settle_s=0.5)
    x = v1.sample(2, seed=3)
    shutil.copytree(v1.directory, root / "live-v2")
    rig.settle()
    assert rig.registry["live"].directory == v1.directory
    (problem,) = rig.reloader.problems()
    assert str(root / "live-v2") in problem and "already served from" in problem
    shutil.rmtree(v1.directory)
    asyncio.run(rig.reloader.tick())
    assert "live" in rig.registry  # not settled: the original still serves
    rig.clock.now += 0.6
    asyncio.run(rig.reloader.tick())
    assert rig.registry["live"].directory == root / "live-v2"  # no tick without 'live'
    np.testing.assert_allclose(rig.answer("live", x), v1.expected(x), rtol=1e-5, atol=1e-5)
    assert rig.reloader.problems() == [] and rig.reloader.stale() == []

    # a duplicate found at start-up has no loaded tail at hand: it is loaded again
    other = make_split(tmp_path / "boot", "b", seed=2)
    shutil.copytree(other.directory, tmp_path / "boot" / "b-copy")
    rig = Rig(tmp_path / "boot", settle_s=0.5)
    assert str(tmp_path / "boot" / "b-copy") in rig.registry.failed
    shutil.rmtree(other.directory)
    rig.settle()  # the original goes; the copy is a change again
    assert "b" not in rig.registry
    rig.settle()
    assert rig.registry["b"].directory == tmp_path / "boot" / "b-copy"
    assert rig.reloader.problems() == []


def test_a_symbolic_link_swap_is_a_replacement(tmp_path: Path) -> None:
    """``digits -> .versions/v1`` re-pointed at ``.versions/v2`` in one rename."""
    root = tmp_path / "artifacts"
    v1 = make_split(root / ".versions" / "v1", "live", seed=1)
    v2 = make_split(root / ".versions" / "v2", "live", seed=2)
    (root / "live").symlink_to(Path(".versions") / "v1" / "live")
    rig = Rig(root, settle_s=0.0)
    assert list(rig.registry.by_directory()) == [str(root / "live")]  # not the hidden ones
    x = v1.sample(1)
    np.testing.assert_allclose(rig.answer("live", x), v1.expected(x), rtol=1e-5, atol=1e-5)
    (root / ".live.tmp").symlink_to(Path(".versions") / "v2" / "live")
    os.replace(root / ".live.tmp", root / "live")
    rig.settle()
    np.testing.assert_allclose(rig.answer("live", x), v2.expected(x), rtol=1e-5, atol=1e-5)
    assert rig.metrics.reloads == 1 and list(rig.registry) == ["live"]


def test_a_kubernetes_volume_update_is_a_replacement(tmp_path: Path) -> None:
    """The layout of a mounted ConfigMap/Secret: the files are links through ``..data``,
    itself a link to a hidden timestamped directory that an update replaces atomically."""
    root = tmp_path / "mount"
    v1 = make_split(tmp_path / "src1", "live", seed=1)
    v2 = make_split(tmp_path / "src2", "live", seed=2)
    root.mkdir()
    shutil.copytree(v1.directory, root / "..2026_12_03_07_00_00.1")
    (root / "..data").symlink_to("..2026_12_03_07_00_00.1")
    for name in ("manifest.json", "tail.onnx", "head.onnx"):
        (root / name).symlink_to(Path("..data") / name)
    rig = Rig(root, settle_s=0.0)
    assert list(rig.registry.by_directory()) == [str(root)]
    x = v1.sample(1)
    np.testing.assert_allclose(rig.answer("live", x), v1.expected(x), rtol=1e-5, atol=1e-5)
    shutil.copytree(v2.directory, root / "..2026_12_03_08_00_00.2")  # what kubelet does
    (root / "..data_tmp").symlink_to("..2026_12_03_08_00_00.2")
    os.replace(root / "..data_tmp", root / "..data")
    shutil.rmtree(root / "..2026_12_03_07_00_00.1")
    rig.settle()
    np.testing.assert_allclose(rig.answer("live", x), v2.expected(x), rtol=1e-5, atol=1e-5)
    assert rig.metrics.reloads == 1 and rig.reloader.problems() == []


def test_an_unreadable_artifacts_directory_removes_nothing(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    root = tmp_path / "artifacts"
    make_split(root, "a", seed=1)
    rig = Rig(root, settle_s=0.0)
    os.rename(root, tmp_path / "elsewhere")
    with caplog.at_level("WARNING", logger="cloud_service.reload"):
        rig.settle()
        rig.settle()
    assert "cannot be read" in caplog.text and list(rig.registry) == ["a"]
    os.rename(tmp_path / "elsewhere", root)
    rig.settle()
    assert list(rig.registry) == ["a"] and rig.metrics.reloads == 0


def test_a_request_accepted_before_the_swap_is_answered_by_its_version(
        tmp_path: Path) -> None:
    """The worker itself (no broker): a request queued behind a busy tail thread when its
    split is swapped is run and answered by the version that accepted it; one received
    after the swap by the new version; both in separate batches."""
    root = tmp_path / "artifacts"
    v1 = make_split(root, "live", seed=1)
    make_split(root, "blocker", seed=4)
    rig = Rig(root, settle_s=0.0)
    release = threading.Event()
    blocker = rig.registry["blocker"]
    real_run = blocker.run

    def slow_run(feeds: Any) -> list[Array]:
        release.wait(10)
        return real_run(feeds)

    blocker.run = slow_run  # type: ignore[method-assign]
    cfg = Config(artifacts=root, threads=1, max_batch=8, tail_workers=1, inline=False,
                 metrics_interval_s=0, heartbeat_s=0, fence_after_s=0)  # the queue's path
    topics = cfg.topics()
    answers: dict[str, Any] = {}

    async def publish(topic: str, payload: bytes, correlation: bytes | None) -> None:
        env = decode(payload)
        answers[env.request_id] = env

    async def main() -> None:
        worker = Worker(cfg, rig.registry, publish, metrics=rig.metrics)
        x = v1.sample(1, seed=8)

        def send(split: str, rid: str) -> None:
            _, payload = request_payload(split, x, request_id=rid, device_id="d1",
                                         quantization=v1.quantization)
            worker.submit(Incoming(topics.request("tiny", "d1"), payload))

        async def answered(*rids: str) -> None:
            for _ in range(500):
                if all(rid in answers for rid in rids):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"no answer to {rids} in 5 s")

        send("blocker", "block")
        await asyncio.sleep(0.05)  # the tail thread is now inside the blocker's run
        send("live", "before")
        old = rig.registry["live"]
        assert old.in_flight == 1
        shutil.rmtree(v1.directory)
        v2 = version(v1, root, seed=2)
        await rig.reloader.tick()
        await rig.reloader.tick()
        assert rig.registry["live"] is not old and rig.reloader.retiring == 1
        send("live", "after")
        release.set()
        await answered("before", "after")
        assert answers["before"].error is None and answers["after"].error is None
        np.testing.assert_allclose(answers["before"].arrays()["logits"], v1.expected(x),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(answers["after"].arrays()["logits"], v2.expected(x),
                                   rtol=1e-5, atol=1e-5)
        assert old.in_flight == 0
        await rig.reloader.tick()
        assert rig.reloader.retiring == 0
        # a removed split: what comes in now is answered unknown_split
        shutil.rmtree(v2.directory)
        await rig.reloader.tick()
        await rig.reloader.tick()
        send("live", "removed")
        await answered("removed")
        await worker.drain()
        assert answers["removed"].error is not None
        assert answers["removed"].error.code == "unknown_split"
        await worker.aclose()

    asyncio.run(main())
    assert rig.metrics.snapshot()["batches"] == 3  # blocker, before, after: never mixed


# --- integration: `splitinfer cloud serve`, mosquitto, edge agents, 50 req/s ------------

def rename_exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    at_fdcwd, rename_exchange_flag = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                      rename_exchange_flag) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening (yet)
        return 0, str(exc)


def scrape(url: str) -> dict[str, float]:
    """The plain (unlabelled) series of a /metrics page."""
    _, text = http_get(url + "/metrics")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture()
def cloud_serve(mosquitto: MosquittoBroker, tmp_path: Path, topic_prefix: str) -> Iterator[Any]:
    """(start, artifacts root, metrics URL): ``start()`` runs ``splitinfer cloud serve``
    on that root with a fast reload (scans every 0.1 s, settle 0.2 s)."""
    root = tmp_path / "artifacts"
    root.mkdir()
    port = free_port()
    env = {**os.environ, "SPLITINFER_ARTIFACTS": str(root),
           "SPLITINFER_BROKER": mosquitto.url, "SPLITINFER_PREFIX": topic_prefix,
           "SPLITINFER_THREADS": "1", "SPLITINFER_GROUP": f"reload{topic_prefix}",
           "SPLITINFER_RELOAD": "1"}
    procs: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitinfer.cli", "-v", "cloud", "serve",
             "--reload-interval", "0.1", "--reload-settle", "0.2",
             "--metrics-port", str(port), "--metrics-interval", "0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    yield start, root, f"http://127.0.0.1:{port}"
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.integration
def test_replacing_a_split_under_50_requests_a_second_loses_nothing(
        mosquitto: MosquittoBroker, cloud_serve: Any, topic_prefix: str,
        tmp_path: Path) -> None:
    from edge_agent import AgentConfig, EdgeAgent, load_head

    start, root, http = cloud_serve
    stage = tmp_path / "stage"
    versions = {1: make_split(root, "live", seed=1)}
    steady = make_split(root, "steady", seed=7)
    for seed in (2, 3, 4):
        versions[seed] = make_split(stage / f"v{seed}", "live", seed=seed)
    agent_dir = tmp_path / "device"  # the devices' own copy (heads are the same)
    shutil.copytree(versions[1].directory, agent_dir / "live")
    shutil.copytree(steady.directory, agent_dir / "steady")
    proc = start()
    deadline = time.monotonic() + 30
    while http_get(http + "/readyz")[0] != 200:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "worker not ready in 30 s"
        time.sleep(0.05)

    rate, devices = 50.0, 5
    x = np.random.default_rng(11).standard_normal((1, 4)).astype(np.float32)
    cut = load_head(versions[1].manifest, versions[1].directory, threads=1).run({"x": x})
    expected = {seed: split.expected(cut["cut"]) for seed, split in versions.items()}
    steady_expected = steady.expected(cut["cut"])
    # (sent at, split, version answered or error text) per request
    log: list[tuple[float, str, int | str]] = []
    swaps: list[tuple[int, float, str]] = []  # (version, when, how)
    ready_during: list[int] = []

    def which(outputs: Array) -> int:
        for seed, want in expected.items():
            if np.allclose(outputs, want, rtol=1e-5, atol=1e-5):
                return seed
        return -1

    async def replace_all() -> None:
        await asyncio.sleep(2.0)
        # 1: copy beside it (hidden), then one atomic exchange of the two directories
        staged = root / ".live.new"
        shutil.copytree(versions[2].directory, staged)
        rename_exchange(staged, root / "live")
        swaps.append((2, time.monotonic(), "copy + atomic exchange"))
        shutil.rmtree(staged)
        await asyncio.sleep(3.0)
        # 2: in place: the tail, then the manifest, each written beside and renamed over
        for name in ("tail.onnx", "head.onnx", "manifest.json"):
            tmp = root / "live" / f".{name}.tmp"
            shutil.copyfile(versions[3].directory / name, tmp)
            os.replace(tmp, root / "live" / name)
            await asyncio.sleep(0.02)  # a writer that takes its time
        swaps.append((3, time.monotonic(), "in place, file by file"))
        await asyncio.sleep(3.0)
        # 3: the old directory moved aside, the new one moved in (an instant without)
        shutil.copytree(versions[4].directory, root / ".live.v4")
        os.rename(root / "live", root / ".live.old")
        os.rename(root / ".live.v4", root / "live")
        swaps.append((4, time.monotonic(), "move aside + move in"))
        shutil.rmtree(root / ".live.old")

    async def watch_ready(stop: asyncio.Event) -> None:
        while not stop.is_set():
            status, _ = await asyncio.to_thread(http_get, http + "/readyz")
            ready_during.append(status)
            await asyncio.sleep(0.1)

    async def main() -> None:
        agents = [EdgeAgent.from_artifacts(
            agent_dir / name, threads=1, config=AgentConfig(
                device_id=f"cam-{i}-{name}", broker=mosquitto.url, prefix=topic_prefix,
                timeout_s=5.0, retry_s=0.0, head_in_thread=False))
            for i in range(devices) for name in ("live", "steady")]
        for agent in agents:
            await agent.start()
        try:
            async def one(agent: EdgeAgent, split: str) -> None:
                sent = time.monotonic()
                try:
                    result = await agent.infer({"x": x})
                except Exception as exc:  # errors and losses alike: counted, reported
                    log.append((sent, split, f"{type(exc).__name__}: {exc}"))
                    return
                out = result.outputs["logits"]
                if split == "steady":
                    ok = np.allclose(out, steady_expected, rtol=1e-5, atol=1e-5)
                    log.append((sent, split, 0 if ok else "wrong steady answer"))
                else:
                    log.append((sent, split, which(out)))

            stop = asyncio.Event()
            side = [asyncio.create_task(replace_all()), asyncio.create_task(watch_ready(stop))]
            tasks = []
            t0 = time.monotonic()
            total = int(rate * 11.5)
            for i in range(total):  # paced: request i leaves at t0 + i / rate
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                live = i % 5 != 4  # four in five on the split being replaced
                agent = agents[2 * (i % devices) + (0 if live else 1)]
                tasks.append(asyncio.create_task(one(agent, "live" if live else "steady")))
            sent_for = time.monotonic() - t0
            await asyncio.gather(*tasks)
            await side[0]
            stop.set()
            await side[1]
            # paced from one loop: on a busy machine it may lag a little, never by much
            assert sent_for < 11.5 * 1.5, f"the load fell behind: {sent_for:.1f} s"

            # a split directory that appears is served, one that goes is not
            make_split(root, "fresh", seed=12)
            shutil.copytree(root / "fresh", agent_dir / "fresh")
            fresh = EdgeAgent.from_artifacts(agent_dir / "fresh", threads=1, config=AgentConfig(
                device_id="cam-fresh", broker=mosquitto.url, prefix=topic_prefix,
                timeout_s=5.0, retry_s=0.0))
            await fresh.start()
            try:
                appeared = time.monotonic()
                while True:
                    try:
                        await fresh.infer({"x": x})
                        break
                    except RemoteError as exc:
                        assert exc.code == "unknown_split"
                        assert time.monotonic() - appeared < 5, "new split not served"
                        await asyncio.sleep(0.05)
                timings["appeared_s"] = time.monotonic() - appeared
                shutil.rmtree(root / "fresh")
                removed = time.monotonic()
                while True:
                    try:
                        await fresh.infer({"x": x})
                    except RemoteError as exc:
                        assert exc.code == "unknown_split"
                        break
                    assert time.monotonic() - removed < 5, "removed split still served"
                    await asyncio.sleep(0.05)
                timings["removed_s"] = time.monotonic() - removed
                # a new directory that cannot be served: /readyz 503 naming it, then 200
                (root / "broken").mkdir()
                (root / "broken" / "manifest.json").write_text("{not json")
                until = time.monotonic() + 5
                seen = set()
                while "not served" not in (got := await asyncio.to_thread(
                        http_get, http + "/readyz"))[1]:
                    seen.add(got[0])
                    assert time.monotonic() < until, f"/readyz said {got}"
                    await asyncio.sleep(0.05)
                assert seen <= {200, 503}  # 503 "loading" first, at most
                broken_readyz.append(f"{got[0]} {got[1]}")
                shutil.rmtree(root / "broken")
                until = time.monotonic() + 5
                while (await asyncio.to_thread(http_get, http + "/readyz"))[0] != 200:
                    assert time.monotonic() < until, "/readyz not back to 200"
                    await asyncio.sleep(0.05)
            finally:
                await fresh.close()
        finally:
            for agent in agents:
                await agent.close()

    timings: dict[str, float] = {}
    broken_readyz: list[str] = []
    asyncio.run(main())
    metrics = scrape(http)
    ready_after = http_get(http + "/readyz")
    proc.terminate()
    out, _ = proc.communicate(timeout=30)

    errors = [entry for entry in log if not isinstance(entry[2], int)]
    lost = [entry for entry in errors if "DeadlineExceeded" in str(entry[2])]
    unknown = [entry for entry in log if entry[2] == -1]
    answered = len(log) - len(errors)
    latencies = []
    for seed, when, how in swaps:
        first_new = min((sent for sent, split, v in log if split == "live" and v == seed
                         and sent >= when), default=None)
        assert first_new is not None, f"version {seed} ({how}) never answered"
        latencies.append((how, first_new - when))
        # once the new version answered, nothing sent later is answered by an older one
        late_old = [v for sent, split, v in log if split == "live" and sent > first_new + 0.3
                    and isinstance(v, int) and v < seed]
        assert not late_old, f"after {how}: {len(late_old)} answers from an older version"
    summary = {
        "sent": len(log), "answered": answered, "errors": len(errors) - len(lost),
        "lost": len(lost),
        "versions_answered": sorted({v for _, s, v in log if s == "live" and
                                     isinstance(v, int)}),
        "reload_latency_s": {how: round(s, 3) for how, s in latencies},
        "readyz_during_load": sorted(set(ready_during)),
        "worker_reloads": metrics.get("splitinfer_worker_reloads_total"),
        "worker_reload_failures": metrics.get("splitinfer_worker_reload_failures_total"),
        **{k: round(v, 3) for k, v in timings.items()},
        "tail_load_ms": [int(m) for m in re.findall(r"replaced from \S+ \(load (\d+) ms", out)],
    }
    print("hot reload under load:", json.dumps(summary))
    assert len(log) == int(rate * 11.5)
    assert not errors, f"{len(errors)} failed: {errors[:5]}"
    assert not unknown, f"{len(unknown)} answers from no known version"
    assert summary["versions_answered"] == [1, 2, 3, 4]
    assert set(ready_during) == {200}, "not ready at some point during the reloads"
    assert ready_after[0] == 200, ready_after
    (body,) = broken_readyz
    assert body.startswith("503 not ready\n") and f"{root / 'broken'}: not served:" in body
    assert metrics["splitinfer_worker_reload_failures_total"] == 1  # the broken one alone
    # 3 replacements + fresh added + fresh removed (in place may count twice if the
    # writer was seen mid-way; never fewer)
    assert metrics["splitinfer_worker_reloads_total"] >= 5
    assert metrics["splitinfer_worker_splits_served"] == 2
    assert metrics["splitinfer_worker_answered_total"] >= answered
    assert proc.returncode == 0, out
    assert "hot reload: split live replaced" in out
