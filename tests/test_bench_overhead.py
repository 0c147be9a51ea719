"""`splitinfer bench overhead`: its figure beside the independent floor (the best of the
onnxruntime settings tried + a plain paho round trip) and beside the agent's and worker's
own settings; the spinning settings do what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.bench_overhead import ECHO_READY, FloorSetting, RawRoundTrip, floor_settings
from cloud_service.registry import session_options
from edge_agent.runtime import OrtHead
from simulators.support.broker import MosquittoBroker
from splitinfer.errors import BadInputError
from splitter import zoo

SPIN = "session.intra_op.allow_spinning"
STOP = "session.force_spinning_stop"


def test_bench_overhead_json_shape() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "splitinfer.cli", "bench", "overhead", "--model", "digits_cnn",
         "--at", "pool", "--requests", "20", "--json"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    for key in ("e2e_p50_ms", "floor_p50_ms", "ratio", "own_floor_p50_ms", "own_ratio",
                "payload_bytes", "reply_bytes", "rtt_p50_ms"):
        assert r[key] > 0, key
    # The independent floor: the best head and the best tail of every setting tried.
    names = [s.name for s in floor_settings() if not s.spins_after_run]
    assert sorted(r["settings_ms"]) == sorted(names)
    # The hot floor: the spinning settings alone, onnxruntime's default among them.
    hot = [s.name for s in floor_settings() if s.threads > 1 and s.spinning != "off"]
    assert sorted(r["hot_settings_ms"]) == sorted(hot)
    if hot:
        best = min(t["head"] for t in r["hot_settings_ms"].values()) + min(
            t["tail"] for t in r["hot_settings_ms"].values()) + r["rtt_p50_ms"]
        assert abs(r["hot_floor_p50_ms"] - best) < 1e-3
        assert abs(r["hot_ratio"] - r["e2e_p50_ms"] / r["hot_floor_p50_ms"]) < 1e-3
    assert r["head_p50_ms"] == min(t["head"] for t in r["settings_ms"].values())
    assert r["tail_p50_ms"] == min(t["tail"] for t in r["settings_ms"].values())
    assert r["settings_ms"][r["best_head"]]["head"] == r["head_p50_ms"]
    assert r["settings_ms"][r["best_tail"]]["tail"] == r["tail_p50_ms"]
    parts = r["head_p50_ms"] + r["tail_p50_ms"] + r["rtt_p50_ms"]
    assert abs(r["floor_p50_ms"] - parts) < 1e-3
    own = r["own_head_p50_ms"] + r["own_tail_p50_ms"] + r["rtt_p50_ms"]
    assert abs(r["own_floor_p50_ms"] - own) < 1e-3
    assert abs(r["ratio"] - r["e2e_p50_ms"] / r["floor_p50_ms"]) < 1e-3
    assert abs(r["own_ratio"] - r["e2e_p50_ms"] / r["own_floor_p50_ms"]) < 1e-3
    # 2048 B of float32 at the cut plus the envelope's header; the answer: 10 logits.
    assert 2048 < r["payload_bytes"] < 2048 + 512
    assert 40 < r["reply_bytes"] < r["payload_bytes"]
    assert r["requests"] == 20
    assert r["threads"] == "defaults"
    assert r["mqtt_protocol"] == "5"
    # what the worker chose for its tail and the agent for its head at load (their logs)
    assert r["worker_tail"] is not None and "thread" in r["worker_tail"], r["worker_tail"]
    assert r["agent_head"] is not None and "thread" in r["agent_head"], r["agent_head"]
    # e2e minus its stages: what no stage names (never much below 0: stages fit in e2e).
    assert -0.1 < r["unaccounted_p50_ms"] < r["e2e_p50_ms"]


def test_floor_settings_cover_all_cores_spinning_and_one_thread() -> None:
    settings = floor_settings(4)
    assert [(s.threads, s.spinning) for s in settings] == [
        (4, "run"), (4, "off"), (1, "off"), (4, "always")]
    assert [s.spins_after_run for s in settings] == [False, False, False, True]
    assert [(s.threads, s.spinning) for s in floor_settings(1)] == [(1, "off")]
    assert floor_settings()[0].threads == (os.cpu_count() or 1)


def test_floor_setting_session_options() -> None:
    path = zoo.digits_cnn_path()
    run = FloorSetting("x", 2, "run").session(path).get_session_options()
    assert (run.intra_op_num_threads, run.get_session_config_entry(SPIN),
            run.get_session_config_entry(STOP)) == (2, "1", "1")
    off = FloorSetting("y", 1, "off").session(path).get_session_options()
    assert (off.intra_op_num_threads, off.get_session_config_entry(SPIN)) == (1, "0")
    always = FloorSetting("z", 2, "always").session(path).get_session_options()
    assert always.get_session_config_entry(SPIN) == "1"
    with pytest.raises(RuntimeError):  # no force_spinning_stop entry at all
        always.get_session_config_entry(STOP)


def test_worker_and_agent_pools_sleep_when_idle_by_default() -> None:
    opts = session_options()
    assert opts.get_session_config_entry(SPIN) == "0"
    run = session_options(spinning="run")
    assert (run.get_session_config_entry(SPIN), run.get_session_config_entry(STOP)) == (
        "1", "1")
    assert session_options(spinning=False).get_session_config_entry(SPIN) == "0"
    always = session_options(spinning=True)
    assert always.get_session_config_entry(SPIN) == "1"
    with pytest.raises(RuntimeError):
        always.get_session_config_entry(STOP)
    with pytest.raises(BadInputError, match="spinning 'sometimes'"):
        session_options(spinning="sometimes")
    # the agent's head: spinning while a run lasts, asleep as soon as it returns
    head = OrtHead(zoo.digits_cnn_path())
    got = head._session.get_session_options()  # our own attribute, not onnxruntime's
    assert (got.get_session_config_entry(SPIN), got.get_session_config_entry(STOP)) == (
        "1", "1")
    off = OrtHead(zoo.digits_cnn_path(), spinning="off")._session.get_session_options()
    assert off.get_session_config_entry(SPIN) == "0"
    with pytest.raises(BadInputError, match="spinning"):
        OrtHead(zoo.digits_cnn_path(), spinning="yes")


def _cpu_after_run(spinning: str, model: Path) -> float:
    """CPU seconds this process burns in the 0.3 s after a 2-thread run returns."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), session_options(2, spinning=spinning),
                                   providers=["CPUExecutionProvider"])
    feed = {i.name: np.random.default_rng(0).random(
        [d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)
        for i in session.get_inputs()}
    for _ in range(3):
        session.run(None, feed)
    before = time.process_time()
    time.sleep(0.3)
    return time.process_time() - before


def test_spinning_stops_when_the_run_returns(tmp_path: Path) -> None:
    """onnxruntime's default keeps pool threads spinning after a run (a core, on this
    machine); "run" stops them when the run returns, "off" never spins."""
    model = zoo.mobilenet_v2(tmp_path / "m.onnx", width=0.35, resolution=96)
    assert _cpu_after_run("run", model) < 0.03
    assert _cpu_after_run("off", model) < 0.03
    if (os.cpu_count() or 1) > 1:
        assert _cpu_after_run("always", model) > 0.01


def test_raw_round_trip_through_a_plain_paho_echo(mosquitto: MosquittoBroker,
                                                  topic_prefix: str, tmp_path: Path) -> None:
    """The raw floor's path: 400 KB out, the echo answers with the result's size."""
    log = tmp_path / "echo.log"
    with open(log, "wb") as out:
        echo = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_overhead", "--raw-echo", mosquitto.url,
             f"{topic_prefix}/req", f"{topic_prefix}/res", "1234"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        while ECHO_READY not in log.read_text():
            assert echo.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        rtt = RawRoundTrip(mosquitto.url, f"{topic_prefix}/req", f"{topic_prefix}/res")
        try:
            assert rtt.protocol == "5"
            for _ in range(3):
                rtt.last_answer = b""
                rtt.round_trip(bytes(409_600), timeout=10)
                assert rtt.last_answer == bytes(1234)
        finally:
            rtt.close()
    finally:
        echo.terminate()
        echo.wait(10)


def test_raw_echo_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_overhead"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--raw-echo" in proc.stderr


def test_worker_spinning_setting_reaches_its_tail_sessions(tmp_path: Path) -> None:
    from cloud_service.config import Config
    from cloud_service.registry import Registry
    from splitter import split_model

    assert Config(artifacts=tmp_path).spinning == "run"
    with pytest.raises(BadInputError, match="spinning = 'fast'"):
        Config(artifacts=tmp_path, spinning="fast")
    split_model(zoo.digits_cnn_path(), ["pool"], tmp_path / "split", num_samples=2)
    for spinning, spin, stop in (("run", "1", "1"), ("off", "0", None)):
        tail = next(iter(Registry.load(tmp_path, spinning=spinning).values()))
        opts = tail.session.get_session_options()
        assert opts.get_session_config_entry(SPIN) == spin
        if stop is not None:
            assert opts.get_session_config_entry(STOP) == stop
    with pytest.raises(BadInputError, match="spinning"):
        Registry.load(tmp_path, spinning="sometimes")


def test_serve_opens_its_tails_with_the_configured_spinning(
        tmp_path: Path, mosquitto: MosquittoBroker, topic_prefix: str) -> None:
    """The setting reaches the sessions through ``cloud serve``'s own path (Server once
    passed only the threads, and every tail ran with the default)."""
    from cloud_service.config import Config
    from cloud_service.server import Server
    from splitter import split_model

    split_model(zoo.digits_cnn_path(), ["pool"], tmp_path / "split", num_samples=2)
    for spinning, spin in (("off", "0"), ("run", "1")):
        server = Server(Config(artifacts=tmp_path, broker=mosquitto.url, prefix=topic_prefix,
                               spinning=spinning))
        thread = server.start_in_thread(30)
        try:
            assert server.registry is not None
            tails = list(server.registry.values())
            assert tails
            for tail in tails:
                opts = tail.session.get_session_options()
                assert opts.get_session_config_entry(SPIN) == spin
        finally:
            server.should_exit = True
            thread.join(30)
