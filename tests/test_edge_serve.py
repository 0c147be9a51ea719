"""``splitinfer edge serve``: the device service, as a user runs it (issue 12).

The service runs as its own process (``python -m splitinfer.cli edge serve``) against a
real mosquitto and a real worker (``cloud_service.Server`` in a thread, or ``cloud serve``
as a process where the test must freeze it), on the digits CNN cut at ``pool``:

- POST /v1/infer answers bit-exact with ``edge run`` on the same input;
- a broker that starts 10 s after the service: 503 meanwhile, answered once it is up;
- the derived device id is the same across restarts (one retained presence topic);
- SIGTERM with requests in flight: every one answered, exit 0 within 5 s;
- settings: precedence and every kind of bad value (exit 2);
- the local API's refusals (no broker needed) and the systemd unit (``systemd-analyze``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import pickle
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_adaptive_agent import bundle_dir  # noqa: F401  (the bundle fixture)
from test_adaptive_agent import full_model as digits_full_model
from test_edge_integration import worker

from cloud_service.registry import Registry
from edge_agent.client import InferenceResult
from edge_agent.local_api import LocalAPI, Unavailable, read_npz
from edge_agent.metrics import ServiceMetrics
from edge_agent.serve_config import KEYS, resolve
from edge_agent.systemd import _OneLine, under_journald
from simulators.support.broker import MosquittoBroker, free_port
from splitinfer.bundle import Bundle
from splitinfer.cli import main as cli_main
from splitinfer.errors import EXIT_BAD_INPUT, EXIT_OK, BadInputError
from splitinfer.manifest import Manifest
from splitinfer.mqtt import BrokerConfig
from splitinfer.mqtt_client import open_client
from splitter import split_model, zoo

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "splitinfer-edge.service"
EXAMPLE = REPO / "deploy" / "edge.toml"
Arrays = dict[str, np.ndarray[Any, Any]]


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/fp32``: the digits CNN cut at 'pool' (what every test here serves)."""
    root = tmp_path_factory.mktemp("serve-splits")
    split_model(zoo.digits_cnn_path(), ["pool"], root / "fp32")
    return root


@pytest.fixture(scope="module")
def digits(splits: Path) -> Path:
    return splits / "fp32"


@pytest.fixture(scope="module")
def images() -> np.ndarray[Any, Any]:
    x, _ = zoo.digits_test_set()
    return x[:16]


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any SPLITINFER_* (the service reads them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITINFER_")}
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitinfer.cli", *args]


class Service:
    """``splitinfer edge serve`` in a process of its own, its output in a log file."""

    def __init__(self, args: list[str], log: Path, *, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port("127.0.0.1")
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            _cli("edge", "serve", "--http", f"127.0.0.1:{self.port}", "--threads", "1",
                 *args), env=env or _clean_env(), stdout=self._log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 30.0, headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        sent = {"Content-Type": "application/x-npz"} if body else {}
        try:
            conn.request(method, path, body=body, headers={**sent, **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def health(self) -> tuple[int, dict[str, Any]]:
        status, _, body = self.request("GET", "/healthz", timeout=5)
        return status, json.loads(body)

    def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", "/v1/infer", body)

    def wait_listening(self, timeout: float = 60.0) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            assert self.proc.poll() is None, f"edge serve exited: {self.log()}"
            with contextlib.suppress(OSError):
                self.health()
                return
            time.sleep(0.05)
        raise AssertionError(f"edge serve did not listen within {timeout} s: {self.log()}")

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        self.wait_listening(timeout)
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            status, body = self.health()
            if status == 200:
                return body
            time.sleep(0.05)
        raise AssertionError(f"edge serve not ready within {timeout} s: {body}; {self.log()}")

    def metric(self, name: str) -> float:
        _, _, text = self.request("GET", "/metrics", timeout=5)
        match = re.search(rf"^{re.escape(name)} (\S+)$", text.decode(), re.M)
        assert match, f"no {name} in /metrics"
        return float(match.group(1))

    def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds from the signal to the exit)."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"edge serve ignored SIGTERM for {timeout} s: "
                                 f"{self.log()}") from None
        return code, time.monotonic() - sent

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def service(args: list[str], log: Path, **kwargs: Any) -> Iterator[Service]:
    svc = Service(args, log, **kwargs)
    try:
        yield svc
    finally:
        svc.close()


@contextlib.contextmanager
def worker_process(url: str, prefix: str, artifacts: Path, log: Path) -> Iterator[
        subprocess.Popen[str]]:
    """``cloud serve`` as a process (so a test can SIGSTOP it), once it printed ready."""
    with log.open("w") as err:
        proc = subprocess.Popen(_cli("cloud", "serve", "--artifacts", str(artifacts),
                                     "--broker", url, "--prefix", prefix, "--threads", "1"),
                                env=_clean_env(), stdout=subprocess.PIPE, stderr=err,
                                text=True)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, f"cloud serve printed no ready line: {log.read_text()}"
            proc.stdout.readline()
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def _outputs(body: bytes) -> Arrays:
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# ---------------------------------------------------------------- (a) bit-exact with edge run

@pytest.mark.integration
def test_post_infer_is_bit_exact_with_edge_run(mosquitto: MosquittoBroker, splits: Path,
                                               digits: Path, images: np.ndarray[Any, Any],
                                               topic_prefix: str, tmp_path: Path) -> None:
    x = images[:8]
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, image=x, label=np.arange(8))
    common = ["--broker", mosquitto.url, "--prefix", topic_prefix, "--artifacts", str(digits)]
    with worker(mosquitto.url, topic_prefix, Registry.load(splits, threads=1)):
        code = cli_main(["edge", "run", *common, "--input", str(inp), "--output", str(out),
                         "--batch-size", "8", "--threads", "1", "--device-id", "run-1"])
        assert code == EXIT_OK
        with service([*common, "--device-id", "serve-1"], tmp_path / "serve.log") as svc:
            ready = svc.wait_ready()
            status, headers, body = svc.post(inp.read_bytes())
            late = svc.request("POST", "/v1/infer", inp.read_bytes(),
                               headers={"X-Splitinfer-Timeout": "0.000001"})
            _, _, info = svc.request("GET", "/v1/split")
            requests_ok = svc.metric('splitinfer_edge_requests_total{outcome="ok"}')
            code, _ = svc.terminate()
    assert code == 0, svc.log()
    assert ready["device_id"] == "serve-1" and ready["connected"] is True
    assert status == 200, body
    assert headers["Content-Type"] == "application/x-npz"
    got = _outputs(body)
    with np.load(out) as data:
        want = data["logits"]
    assert list(got) == ["logits"]
    assert got["logits"].dtype == want.dtype and got["logits"].shape == (8, 10)
    assert got["logits"].tobytes() == want.tobytes()  # bit-exact
    timings = json.loads(headers["X-Splitinfer-Timings"])
    assert {"e2e", "head", "encode", "network", "tail", "decode"} <= set(timings)
    assert timings["e2e"] >= timings["head"] > 0
    assert headers["X-Splitinfer-Served-By"] == "cloud"
    assert headers["X-Splitinfer-Ignored"] == "label"
    assert headers["X-Splitinfer-Split-Id"] == Manifest.load(digits).split_id
    assert json.loads(info)["inputs"] == [{"name": "image", "dtype": "float32",
                                           "shape": ["N", 1, 8, 8]}]
    assert requests_ok == 1.0
    # a request's own deadline (X-Splitinfer-Timeout) that the head alone overruns: 504
    assert late[0] == 504 and json.loads(late[2])["error"] == "deadline_expired", late


# ---------------------------------------------------------------- (b) broker 10 s late

@pytest.mark.integration
def test_broker_that_starts_10_s_later(splits: Path, digits: Path,
                                       images: np.ndarray[Any, Any], topic_prefix: str,
                                       tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    url = f"mqtt://127.0.0.1:{port}"
    body = _npz(image=images[:4])
    with service(["--broker", url, "--prefix", topic_prefix, "--artifacts", str(digits),
                  "--device-id", "late-1", "--reconnect-max", "1"],
                 tmp_path / "serve.log") as svc:
        svc.wait_listening()
        status, health = svc.health()
        assert status == 503 and health["status"] == "connecting", health
        assert f"127.0.0.1:{port}" in health["reason"], health
        status, headers, answer = svc.post(body)
        assert status == 503 and headers["Retry-After"] == "1"
        assert json.loads(answer)["error"] == "connecting"
        time.sleep(max(0.0, svc.started + 10.0 - time.monotonic()))
        assert svc.proc.poll() is None, "edge serve exited while the broker was down"
        broker = MosquittoBroker(port=port)
        broker.start()
        try:
            up = time.monotonic()
            svc.wait_ready(30)
            after = time.monotonic() - up
            with worker(url, topic_prefix, Registry.load(splits, threads=1)):
                status, _, answer = svc.post(body)
            code, _ = svc.terminate()
        finally:
            broker.close()
    assert status == 200, answer
    assert _outputs(answer)["logits"].shape == (4, 10)
    # backoff capped at --reconnect-max 1 s: reached within about 1 s of the broker's start
    assert after < 3.0, f"ready {after:.2f} s after the broker started"
    print(f"ready {after:.2f} s after the broker started (10 s after the service)")
    assert code == 0
    warnings = [line for line in svc.log().splitlines() if "unreachable" in line]
    assert len(warnings) == 1, warnings  # one line, not one per attempt


# ---------------------------------------------------------------- (c) the same device id

@pytest.mark.integration
def test_device_id_is_kept_across_restarts(mosquitto: MosquittoBroker, digits: Path,
                                           topic_prefix: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def systemd() -> None:  # what the manager reads from $NOTIFY_SOCKET
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                messages.append(notify.recv(4096).decode())

    reader = threading.Thread(target=systemd)
    reader.start()
    args = ["--broker", mosquitto.url, "--prefix", topic_prefix, "--artifacts", str(digits),
            "--state-dir", str(state)]
    ids = []
    try:
        for run in range(2):
            env = _clean_env(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="300000")
            with service(args, tmp_path / f"serve-{run}.log", env=env) as svc:
                ids.append(svc.wait_ready()["device_id"])
                time.sleep(0.3)  # a watchdog ping or three
                code, _ = svc.terminate()
                assert code == 0, svc.log()
    finally:
        done.set()
        reader.join(5)
        notify.close()
    assert ids[0] == ids[1] and ids[0].startswith("edge-"), ids
    assert (state / "device_id").read_text().strip() == ids[0]
    assert "(new)" in (tmp_path / "serve-0.log").read_text()
    assert "(persisted)" in (tmp_path / "serve-1.log").read_text()
    joined = "\n".join(messages)
    assert joined.count("READY=1") == 2 and joined.count("STOPPING=1") == 2, messages
    assert "WATCHDOG=1" in joined

    async def retained() -> dict[str, bytes]:
        client = await open_client(BrokerConfig.from_url(mosquitto.url), f"r-{uuid.uuid4()}")
        found: dict[str, bytes] = {}
        try:
            await client.subscribe(f"{topic_prefix}/v1/status/+", qos=1)
            stream = aiter(client.messages())
            with contextlib.suppress(asyncio.TimeoutError):
                while True:  # retained messages come at once; 1 s of silence ends it
                    message = await asyncio.wait_for(anext(stream), 1.0)
                    found[str(message.topic)] = bytes(message.payload)
        finally:
            await client.disconnect()
        return found

    # one presence topic for the device, not one per start
    assert asyncio.run(retained()) == {f"{topic_prefix}/v1/status/{ids[0]}": b"offline"}


# ---------------------------------------------------------------- (d) SIGTERM, requests in flight

@pytest.fixture(scope="module")
def frozen_worker(mosquitto: MosquittoBroker, digits: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with worker_process(mosquitto.url, prefix, digits, log) as proc:
        yield prefix, proc


def _post_all(svc: Service, body: bytes, n: int) -> tuple[list[threading.Thread],
                                                          list[Any]]:
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        try:
            results[i] = svc.post(body)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _wait_in_flight(svc: Service, n: int) -> None:
    until = time.monotonic() + 15
    while svc.metric("splitinfer_edge_in_flight") < n:
        assert time.monotonic() < until, "the requests never were in flight together"
        time.sleep(0.02)


@pytest.mark.integration
def test_sigterm_answers_every_request_in_flight(mosquitto: MosquittoBroker, digits: Path,
                                                 images: np.ndarray[Any, Any],
                                                 frozen_worker: tuple[str, Any],
                                                 tmp_path: Path) -> None:
    prefix, worker_proc = frozen_worker
    body = _npz(image=images[:2])
    n = 6
    with service(["--broker", mosquitto.url, "--prefix", prefix, "--artifacts", str(digits),
                  "--device-id", "drain-1"], tmp_path / "serve.log") as svc:
        svc.wait_ready()
        status, _, reference = svc.post(body)
        assert status == 200
        worker_proc.send_signal(signal.SIGSTOP)  # the worker holds every answer back
        try:
            threads, results = _post_all(svc, body, n)
            _wait_in_flight(svc, n)
            resume = threading.Timer(0.5, worker_proc.send_signal, (signal.SIGCONT,))
            resume.start()
            code, took = svc.terminate()
        finally:
            worker_proc.send_signal(signal.SIGCONT)
        for t in threads:
            t.join(10)
        with pytest.raises(ConnectionRefusedError):
            svc.health()
    assert code == 0 and took < 5.0, (code, took, svc.log())
    print(f"SIGTERM with {n} requests in flight: exit {code} after {took:.2f} s")
    for result in results:
        assert not isinstance(result, Exception), result
        status, _, answer = result
        assert status == 200, answer
        assert answer == reference
    assert f"stopping: {n} request(s) in flight" in svc.log()


@pytest.mark.integration
def test_sigterm_past_the_drain_timeout_answers_503(mosquitto: MosquittoBroker, digits: Path,
                                                    images: np.ndarray[Any, Any],
                                                    frozen_worker: tuple[str, Any],
                                                    tmp_path: Path) -> None:
    """A worker that never answers: the drain runs out, the requests still get an answer."""
    prefix, worker_proc = frozen_worker
    n = 3
    with service(["--broker", mosquitto.url, "--prefix", prefix, "--artifacts", str(digits),
                  "--device-id", "drain-2", "--drain-timeout", "1"],
                 tmp_path / "serve.log") as svc:
        svc.wait_ready()
        worker_proc.send_signal(signal.SIGSTOP)
        try:
            threads, results = _post_all(svc, _npz(image=images[:1]), n)
            _wait_in_flight(svc, n)
            code, took = svc.terminate()
            for t in threads:
                t.join(10)
        finally:
            worker_proc.send_signal(signal.SIGCONT)
    assert code == 0 and 1.0 <= took < 5.0, (code, took)
    print(f"SIGTERM past a 1 s drain: exit {code} after {took:.2f} s")
    for result in results:
        assert not isinstance(result, Exception), result
        status, _, answer = result
        assert status == 503 and json.loads(answer)["error"] == "shutting_down", answer


# ---------------------------------------------------------------- (e) settings

def _resolve(tmp_path: Path, text: str | None = None, env: dict[str, str] | None = None,
             **flags: Any) -> Any:
    path = None
    if text is not None:
        path = tmp_path / "edge.toml"
        path.write_text(text)
    return resolve(flags, env or {}, path)


def test_settings_precedence_flag_env_file_default(tmp_path: Path, digits: Path) -> None:
    file = f'artifacts = "{digits}"\nbroker = "mqtt://file:1883"\nthreads = 2\n'
    env = {"SPLITINFER_BROKER": "mqtt://env:1883", "SPLITINFER_TIMEOUT": "3.5"}
    cfg = _resolve(tmp_path, file, env, broker="mqtt://flag:1883")
    assert cfg.broker == "mqtt://flag:1883" and cfg.sources["broker"] == "--broker"
    cfg = _resolve(tmp_path, file, env)
    assert cfg.broker == "mqtt://env:1883" and cfg.timeout == 3.5 and cfg.threads == 2
    cfg = _resolve(tmp_path, file)
    assert cfg.broker == "mqtt://file:1883" and cfg.timeout == 10.0
    cfg = _resolve(tmp_path, None, {"SPLITINFER_ARTIFACTS": str(digits),
                                    "STATE_DIRECTORY": "/var/lib/splitinfer"},
                   max_body="512k", http="[::1]:0")
    assert cfg.broker == "mqtt://127.0.0.1:1883" and cfg.max_body == 512 * 1024
    assert cfg.state_dir == "/var/lib/splitinfer" and cfg.http_address == ("::1", 0)
    # the file named by SPLITINFER_CONFIG
    (tmp_path / "other.toml").write_text(f'artifacts = "{digits}"\ndevice_id = "cam-7"\n')
    cfg = resolve({}, {"SPLITINFER_CONFIG": str(tmp_path / "other.toml")})
    assert cfg.device_id == "cam-7" and cfg.config_file == str(tmp_path / "other.toml")


def test_example_config_and_every_key_has_a_flag(tmp_path: Path, digits: Path) -> None:
    cfg = resolve({"artifacts": str(digits)}, {}, EXAMPLE)
    assert cfg.http_address == ("127.0.0.1", 8470) and cfg.max_body == 16 * 1024 ** 2
    assert cfg.sources["broker"] == str(EXAMPLE)
    text = EXAMPLE.read_text()
    for key in KEYS:  # the example documents every key
        assert re.search(rf"^#? ?{key.name} = ", text, re.M), key.name


@pytest.mark.parametrize(("text", "env", "flags", "message"), [
    ('brokr = "mqtt://x"', {}, {}, r"unknown key\(s\) 'brokr' \(did you mean 'broker'\?\)"),
    ('threads = "four"', {}, {}, r"edge.toml: threads: expected an integer, got 'four' \(str\)"),
    ("timeout = true", {}, {}, r"timeout: expected a number of seconds, got True \(bool\)"),
    ("", {"SPLITINFER_THREADS": "4.5"}, {}, r"SPLITINFER_THREADS: expected an integer"),
    ("", {}, {"timeout": "soon"}, r"--timeout: expected a number of seconds, got 'soon'"),
    ("", {}, {"max_body": "lots"}, r"--max-body: expected a size in bytes"),
    ("", {}, {"http": "localhost"}, r"http \(from --http\) 'localhost': expected HOST:PORT"),
    ("", {}, {"device_id": "cam.7"}, r"device_id \(from --device-id\) 'cam.7' is not usable"),
    ("", {}, {"broker": "http://x"}, r"broker \(from --broker\).*scheme 'http' unsupported"),
    ("", {}, {"timeout": "0"}, r"timeout \(from --timeout\): expected seconds > 0"),
    ("", {}, {"tls_ca": "/nonexistent/ca.pem"}, r"tls_ca.*'/nonexistent/ca.pem': no such file"),
    ("", {}, {"split": "x"}, r"split \(from --split\): .* is not a bundle"),
    ("threads = ", {}, {}, r"edge.toml: not valid TOML"),
])
def test_bad_settings_name_the_key(tmp_path: Path, digits: Path, text: str,
                                   env: dict[str, str], flags: dict[str, Any],
                                   message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        _resolve(tmp_path, text, env, **{"artifacts": str(digits), **flags})


def test_missing_or_unusable_artifacts(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no artifacts: set 'artifacts'"):
        _resolve(tmp_path, 'broker = "mqtt://x:1883"')
    with pytest.raises(BadInputError, match="no such directory"):
        _resolve(tmp_path, None, artifacts=str(tmp_path / "nope"))
    with pytest.raises(BadInputError, match=r"holds no manifest\.json or bundle\.json"):
        _resolve(tmp_path, None, artifacts=str(tmp_path))


def test_cli_exits_2_on_bad_settings(tmp_path: Path, digits: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "edge.toml"
    bad.write_text(f'artifacts = "{digits}"\nthreads = "four"\n')
    assert cli_main(["edge", "serve", "--config", str(bad)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "threads: expected an integer, got 'four'" in err and str(bad) in err
    assert cli_main(["edge", "serve", "--config", str(tmp_path / "none.toml")]) == \
        EXIT_BAD_INPUT
    assert "none.toml: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- the local API, no broker

class FakeBackend:
    """Answers with the inputs' sample count; blocks while ``hold`` is clear."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.metrics = ServiceMetrics(connected=lambda: True, counters=lambda: None)
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.unavailable: str | None = None
        self.timeouts: list[float | None] = []

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"status": "ready"}

    def infer(self, arrays: Arrays, timeout: float | None = None) -> InferenceResult:
        self.timeouts.append(timeout)
        if self.unavailable:
            raise Unavailable(self.unavailable, status="connecting")
        self.entered.set()
        self.hold.wait(10)
        n = len(arrays["image"])
        return InferenceResult("r1", {"logits": np.zeros((n, 10), np.float32)}, {"e2e": 0.001})


@pytest.fixture()
def api(digits: Path) -> Iterator[tuple[LocalAPI, FakeBackend]]:
    backend = FakeBackend(Manifest.load(digits))
    local = LocalAPI(backend, host="127.0.0.1", port=0, max_body=64 * 1024,
                     max_in_flight=1).start()
    try:
        yield local, backend
    finally:
        local.close()


def _call(local: LocalAPI, method: str, path: str, body: bytes | None = None
          ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*local.address, timeout=10)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_local_api_refuses_bad_bodies(api: tuple[LocalAPI, FakeBackend],
                                      images: np.ndarray[Any, Any]) -> None:
    local, _ = api
    ok = _npz(image=images[:3])
    status, headers, body = _call(local, "POST", "/v1/infer", ok)
    assert status == 200 and _outputs(body)["logits"].shape == (3, 10)
    npy = io.BytesIO()
    np.save(npy, images[:1])
    bomb = io.BytesIO()
    np.savez_compressed(bomb, image=np.zeros((4096, 1, 8, 8), np.float32))  # 1 MiB unpacked
    cases = [
        (npy.getvalue(), 400, "a single .npy array"),
        (pickle.dumps({"image": images[:1]}), 400, "not an .npz"),
        (_npz(image=np.array([{"a": 1}], dtype=object)), 400, "no object arrays"),
        (_npz(pixels=images[:1]), 400, r"lacks input\(s\) \['image'\].*got keys \['pixels'\]"),
        (_npz(image=images[:1].astype(np.float64)), 200, ""),  # the fake does not check dtypes
        (bomb.getvalue(), 413, r"unpacks to 10487\d\d bytes, over the 65536 byte limit"),
        (b"x" * (64 * 1024 + 1), 413, "body of 65537 bytes is over the 65536 byte limit"),
    ]
    for payload, want, message in cases:
        status, headers, body = _call(local, "POST", "/v1/infer", payload)
        assert status == want, (status, body)
        if want != 200:
            assert headers["Content-Type"] == "application/json"
            assert re.search(message, json.loads(body)["message"]), body
    assert len(bomb.getvalue()) < 64 * 1024  # the bomb fits the body limit: caught unpacked
    # no Content-Length (chunked) -> 411
    conn = http.client.HTTPConnection(*local.address, timeout=10)
    conn.putrequest("POST", "/v1/infer")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 411
    conn.close()
    conn = http.client.HTTPConnection(*local.address, timeout=10)
    conn.request("POST", "/v1/infer", body=b'{"image": [[0.5]]}',
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    message = json.loads(response.read())["message"]
    conn.close()
    assert response.status == 400
    assert "not an .npz (File is not a zip file, sent as Content-Type application/json)" \
        in message and "sent as application/x-npz" in message, message
    assert _call(local, "GET", "/v1/infer")[0] == 405
    assert _call(local, "POST", "/healthz", b"")[0] == 405
    assert _call(local, "GET", "/nope")[0] == 404


def test_read_npz_names_what_is_wrong(images: np.ndarray[Any, Any]) -> None:
    arrays, ignored = read_npz(_npz(image=images[:2], label=np.arange(2)), ["image"], 1 << 20)
    assert list(arrays) == ["image"] and ignored == ["label"]
    with pytest.raises(BadInputError, match="same, non-zero number of samples"):
        read_npz(_npz(image=images[:0]), ["image"], 1 << 20)


def test_local_api_429_when_full_and_503_when_unavailable(
        api: tuple[LocalAPI, FakeBackend], images: np.ndarray[Any, Any]) -> None:
    local, backend = api
    body = _npz(image=images[:1])
    backend.hold.clear()
    first: list[Any] = []
    t = threading.Thread(target=lambda: first.append(_call(local, "POST", "/v1/infer", body)))
    t.start()
    assert backend.entered.wait(10)
    status, headers, answer = _call(local, "POST", "/v1/infer", body)
    assert status == 429 and headers["Retry-After"] == "1"
    assert json.loads(answer)["error"] == "overloaded"
    until = time.monotonic() + 5  # the refused one leaves the count after its answer is out
    while local.in_flight != 1 and time.monotonic() < until:
        time.sleep(0.01)
    assert local.in_flight == 1
    backend.hold.set()
    t.join(10)
    assert first[0][0] == 200 and local.wait_idle(5)
    backend.unavailable = "not connected to the broker mqtt://x:1883 yet"
    status, headers, answer = _call(local, "POST", "/v1/infer", body)
    assert status == 503 and headers["Retry-After"] == "1"
    assert json.loads(answer) == {"error": "connecting",
                                  "message": "not connected to the broker mqtt://x:1883 yet"}
    _, _, metrics = _call(local, "GET", "/metrics")
    text = metrics.decode()
    assert 'splitinfer_edge_requests_total{outcome="ok"} 1.0' in text
    assert 'splitinfer_edge_requests_total{outcome="overloaded"} 1.0' in text
    assert 'splitinfer_edge_requests_total{outcome="unavailable"} 1.0' in text


# ---------------------------------------------------------------- logs and the systemd unit

def test_journald_lines_carry_priority_and_no_time(tmp_path: Path) -> None:
    import logging

    with (tmp_path / "stream").open("w") as stream:
        st = os.fstat(stream.fileno())
        assert under_journald(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not under_journald(stream, {"JOURNAL_STREAM": f"{st.st_dev}:1"})
        assert not under_journald(stream, {})
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("edge_agent.serve", logging.WARNING, __file__, 1,
                                   "broker %s unreachable", ("x",), sys.exc_info())
    line = _OneLine(journal=True).format(record)
    assert line.startswith("<4>edge_agent.serve: broker x unreachable | Traceback")
    assert "\n" not in line and "ValueError: boom" in line
    plain = _OneLine(journal=False).format(record)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ WARNING edge_agent.serve: ", plain)


def test_systemd_unit_has_what_the_service_needs() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=splitinfer",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=splitinfer",
                 "RestartPreventExitStatus=2",
                 "ExecStart=/opt/splitinfer/venv/bin/splitinfer edge serve --config "
                 "/etc/splitinfer/edge.toml"):
        assert line in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here (apt-get install systemd)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` checks that ExecStart exists: the unit is verified with
    the venv's own ``splitinfer`` in place of /opt/splitinfer/venv/bin/splitinfer."""
    binary = Path(sys.executable).parent / "splitinfer"
    assert binary.is_file()
    text = UNIT.read_text().replace("/opt/splitinfer/venv/bin/splitinfer", str(binary))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    run = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr
    broken = tmp_path / "broken" / UNIT.name  # the check bites: a typo fails it
    broken.parent.mkdir()
    broken.write_text(text.replace("Type=notify", "Type=notifyy"))
    run = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0 or "notifyy" in run.stderr, run.stderr


def test_sd_notify_never_blocks_on_a_full_queue(tmp_path: Path) -> None:
    from edge_agent.systemd import notify, watchdog_interval

    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        env = {"NOTIFY_SOCKET": str(path)}
        started = time.monotonic()
        sent = [notify("WATCHDOG=1", environ=env) for _ in range(500)]  # nobody reads
        assert time.monotonic() - started < 2.0
        assert sent[0] and not all(sent)  # the queue filled; later pings were dropped
        assert receiver.recv(100) == b"WATCHDOG=1"
    assert not notify("READY=1", environ={})  # not under systemd: nothing, no error
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None


def test_missing_onnxruntime_names_the_edge_extra(tmp_path: Path, digits: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A device without onnxruntime is told to install splitinfer[edge], never [all] (which
    would put onnx, matplotlib and amqtt on it)."""
    import logging

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = cli_main(["edge", "serve", "--artifacts", str(digits), "--device-id", "cam-7",
                         "--state-dir", str(tmp_path), "--http", "127.0.0.1:0"])
    finally:  # the service set up root logging for itself
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert code in (1, 3), err  # an ImportError (1), or a start-up error naming it (3)
    assert "pip install 'splitinfer[edge]'" in err and "[all]" not in err, err


@pytest.mark.integration
def test_broker_lost_after_boot_503_then_back(fresh_mosquitto: MosquittoBroker, splits: Path,
                                              digits: Path, images: np.ndarray[Any, Any],
                                              topic_prefix: str, tmp_path: Path) -> None:
    """The connection lost later: /healthz and new requests say 'disconnected' (503) until
    the agent's supervisor is back, then requests are answered again."""
    url = fresh_mosquitto.url
    body = _npz(image=images[:1])
    with service(["--broker", url, "--prefix", topic_prefix, "--artifacts", str(digits),
                  "--device-id", "lost-1", "--reconnect-max", "0.5"],
                 tmp_path / "serve.log") as svc:
        svc.wait_ready()
        fresh_mosquitto.stop()
        until = time.monotonic() + 10
        while (health := svc.health())[0] == 200 and time.monotonic() < until:
            time.sleep(0.05)
        status, headers, answer = svc.post(body)
        retry_after = headers.get("Retry-After")
        fresh_mosquitto.start()
        svc.wait_ready(15)
        with worker(url, topic_prefix, Registry.load(splits, threads=1)):
            after = svc.post(body)
        code, _ = svc.terminate()
    assert health[0] == 503 and health[1]["status"] == "disconnected", health
    assert "lost the connection" in health[1]["reason"]
    assert status == 503 and json.loads(answer)["error"] == "disconnected", answer
    assert retry_after == "1"
    assert after[0] == 200 and code == 0


# a self-signed CA certificate (no key anywhere): something ssl can load as tls_ca
CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBkDCCATegAwIBAgIUa1zaxEsFX6ypclYC/7AOIjKkVDkwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSc3BsaXRpbmZlci10ZXN0LWNhMCAXDTI2MTIwMzE0MDkzMloY
DzIxMjYxMTA5MTQwOTMyWjAdMRswGQYDVQQDDBJzcGxpdGluZmVyLXRlc3QtY2Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAT+7+8JnPCe5WamJYERab+I2eeG6rx/
2UixVjwDKy054ONZDF9Nih+RfN+ep9gUPg9wdGDch4Div1v5cZ5poJeEo1MwUTAd
BgNVHQ4EFgQUpJsXuhy1lbRqkoWG9ZchcfJ/bpIwHwYDVR0jBBgwFoAUpJsXuhy1
lbRqkoWG9ZchcfJ/bpIwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBE
AiBWazubHpq3MCvBe97Ixh0cfK9eh7npceA3ENKTnjKqsQIgWEGKWI/gHI9quRvR
2mDc3HZGjDbCy/D+S8ePrQO2QUs=
-----END CERTIFICATE-----
"""


def test_credentials_and_tls_keys_lay_over_the_url(tmp_path: Path, digits: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text(CA_PEM)
    cfg = _resolve(tmp_path, None, artifacts=str(digits), broker="mqtt://b.example",
                   username="cam-7", password_file=str(secret), tls_ca=str(ca))
    broker = cfg.broker_config()
    assert (broker.host, broker.port, broker.tls) == ("b.example", 8883, True)
    assert (broker.username, broker.password, broker.ca_file) == ("cam-7", "s3cret", str(ca))
    assert "s3cret" not in json.dumps(cfg.public())
    explicit = _resolve(tmp_path, None, artifacts=str(digits), broker="mqtt://b.example:1884",
                        tls_ca=str(ca)).broker_config()
    assert (explicit.port, explicit.tls) == (1884, True)
    with pytest.raises(BadInputError, match="password and password_file are both set"):
        _resolve(tmp_path, None, artifacts=str(digits), password="x",
                 password_file=str(secret))


@pytest.mark.integration
def test_a_bundle_answers_locally_while_no_broker(bundle_dir: Path,  # noqa: F811
                                                  images: np.ndarray[Any, Any],
                                                  topic_prefix: str, tmp_path: Path) -> None:
    """A bundle with an edge_only split: ready with no broker at all, answered on the
    device (Served-By edge) as the full model would."""
    url = f"mqtt://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    x = np.ascontiguousarray(images[:3])
    with service(["--broker", url, "--prefix", topic_prefix, "--artifacts", str(bundle_dir),
                  "--device-id", "bundle-1"], tmp_path / "serve.log") as svc:
        health = svc.wait_ready()
        status, headers, body = svc.post(_npz(image=x))
        code, _ = svc.terminate()
    assert health["connected"] is False and health["answering"] == "locally", health
    assert status == 200, body
    assert headers["X-Splitinfer-Served-By"] == "edge"
    # the policy knows the cloud is down: it picks the edge_only split (no fallback needed)
    edge_only = [e.split_id for e in Bundle.load(bundle_dir) if e.kind == "edge_only"]
    assert headers["X-Splitinfer-Split-Id"] in edge_only
    np.testing.assert_allclose(_outputs(body)["logits"], digits_full_model(x), atol=1e-5)
    assert code == 0


def test_local_api_per_request_deadline(api: tuple[LocalAPI, FakeBackend],
                                        images: np.ndarray[Any, Any]) -> None:
    local, backend = api
    body = _npz(image=images[:1])

    def post(value: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(*local.address, timeout=10)
        try:
            conn.request("POST", "/v1/infer", body=body,
                         headers={"X-Splitinfer-Timeout": value})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    assert post("2.5")[0] == 200 and backend.timeouts == [2.5]
    for bad in ("0", "-1", "soon", "nan", "7200"):
        status, answer = post(bad)
        assert status == 400, (bad, answer)
        assert "X-Splitinfer-Timeout" in json.loads(answer)["message"]
    assert backend.timeouts == [2.5]  # refused before the backend


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_read_npz_refuses_damaged_and_forged_members(images: np.ndarray[Any, Any]) -> None:
    """Every malformed .npz is a 400 naming what is wrong, never a 500 from numpy or zlib,
    and a forged .npy header cannot make numpy allocate what the body does not hold."""
    npy = io.BytesIO()
    np.save(npy, np.ascontiguousarray(images[:2]))
    good = npy.getvalue()
    forged = io.BytesIO()
    np.lib.format.write_array_header_1_0(forged, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2 ** 28, 1, 8, 8)})  # 64 GiB
    deflated = bytearray(_zip({"image.npy": good}, zipfile.ZIP_DEFLATED))
    start = deflated.index(b"image.npy") + len("image.npy") + 8
    deflated[start:start + 24] = b"\xff" * 24  # a broken deflate stream
    unsupported = bytearray(_zip({"image.npy": good}))
    central = unsupported.rindex(b"PK\x01\x02")
    for at in (8, central + 10):  # compression method 99 (AES) in both headers
        unsupported[at:at + 2] = (99).to_bytes(2, "little")
    cases = [
        (_zip({"image.npy": b"not an array"}), r"input 'image' \(image.npy\) is not a .npy"),
        (_zip({"image.npy": forged.getvalue() + b"\0" * 64}),
         r"declares shape \(268435456, 1, 8, 8\) float32 \(68719476736 bytes\) but the "
         r"member holds 64 bytes"),
        (_zip({"image.npy": good[:-7]}), r"but the member holds \d+ bytes"),
        (bytes(deflated), r"cannot be read \((error|BadZipFile): "),
        (bytes(unsupported), r"cannot be read \(NotImplementedError"),
    ]
    for body, message in cases:
        with pytest.raises(BadInputError, match=message):
            read_npz(body, ["image"], 1 << 20)
    # members that are not inputs are listed, never read (here: not even arrays)
    arrays, ignored = read_npz(_zip({"image.npy": good, "notes.txt": b"hi"}), ["image"],
                               1 << 20)
    assert ignored == ["notes.txt"] and arrays["image"].tobytes() == images[:2].tobytes()


def test_local_api_headers_never_carry_raw_body_keys(api: tuple[LocalAPI, FakeBackend],
                                                     images: np.ndarray[Any, Any]) -> None:
    """X-Splitinfer-Ignored names keys the client chose: a CR LF in one cannot add a header,
    a non-Latin-1 one cannot drop the answer."""
    local, _ = api
    body = _npz(**{"image": images[:1], "a\r\nX-Evil: 1": np.arange(1), "ラベル": np.arange(1)})
    status, headers, answer = _call(local, "POST", "/v1/infer", body)
    assert status == 200, answer
    assert "X-Evil" not in headers
    assert headers["X-Splitinfer-Ignored"] == "a%0D%0AX-Evil%3A%201,%E3%83%A9%E3%83%99%E3%83%AB"


def test_local_api_answers_protocol_errors_in_json(api: tuple[LocalAPI, FakeBackend]) -> None:
    local, _ = api
    conn = http.client.HTTPConnection(*local.address, timeout=10)
    try:  # a Content-Length of a non-ASCII digit: str.isdigit takes it, int() does not
        conn.putrequest("POST", "/v1/infer")
        conn.putheader("Content-Length", "\u00b2")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 411
        assert json.loads(response.read())["error"] == "length_required"
    finally:
        conn.close()
    status, headers, answer = _call(local, "PUT", "/v1/infer", b"x")
    assert status == 501 and headers["Content-Type"] == "application/json"
    error = json.loads(answer)
    assert error["error"] == "not_implemented" and "POST /v1/infer" in error["message"]


def test_unusable_tls_password_and_number_settings_are_exit_2(tmp_path: Path,
                                                              digits: Path) -> None:
    """Files are read at start as the service's user: one that holds no PEM, or a password
    that is no text, stops the start naming the key (they used to pass the is_file check
    and fail every connect attempt, or raise a traceback)."""
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("-----BEGIN CERTIFICATE-----\n")
    ca = tmp_path / "real-ca.pem"
    ca.write_text(CA_PEM)
    binary = tmp_path / "pw"
    binary.write_bytes(b"\xff\xfe\x00")
    cases = [
        ({"tls_ca": str(not_pem)}, r"TLS set-up from tls_ca \(from --tls-ca\) '.*ca.pem' "
                                   r"failed \(.*\); expected PEM files"),
        ({"tls_ca": str(ca), "tls_cert": str(ca)},  # a certificate without its key
         r"TLS set-up from tls_ca .*, tls_cert \(from --tls-cert\) .* failed"),
        ({"password_file": str(binary)}, r"password_file \(from --password-file\) '.*pw': "
                                         r"cannot be read"),
        ({"threads": "+-1"}, r"--threads: expected an integer, got '\+-1'"),
        ({"max_in_flight": "\u00b2"}, r"--max-in-flight: expected an integer"),
    ]
    for flags, message in cases:
        with pytest.raises(BadInputError, match=message):
            _resolve(tmp_path, None, artifacts=str(digits), **flags)
    assert _resolve(tmp_path, None, artifacts=str(digits), tls_ca=str(ca)).tls_ca == str(ca)


class _StartFails:
    """An agent whose start() raises ``errors`` in turn, then connects."""

    def __init__(self, manifest: Manifest, errors: list[BaseException]) -> None:
        self.manifest, self.kind, self.device_id = manifest, "split", "cam-7"
        self.counters, self.protocol, self.connected = None, "5", False
        self.errors = errors

    async def start(self) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.connected = True


def test_boot_retry_survives_an_error_other_than_startup_error(
        tmp_path: Path, digits: Path, caplog: pytest.LogCaptureFixture) -> None:
    """agent.start() raising, say, PermissionError (a TLS key made root-only after the
    start) used to end the connecting task unseen: 'connecting' for ever, no log line."""
    from edge_agent.serve import EdgeService
    from splitinfer.errors import StartupError

    cfg = _resolve(tmp_path, None, artifacts=str(digits), reconnect_max="0.05",
                   device_id="cam-7")
    agent = _StartFails(Manifest.load(digits), [
        PermissionError(13, "Permission denied", "/etc/splitinfer/cam-7.key"),
        StartupError("cannot reach the broker")])
    svc = EdgeService(cfg, agent)  # type: ignore[arg-type]
    healths: list[dict[str, Any]] = []

    async def scenario() -> None:
        task = asyncio.create_task(svc._keep_connecting())
        while len(agent.errors) == 2 and not task.done():  # until the first one raised
            await asyncio.sleep(0.001)
        healths.append(svc.health()[1])
        await asyncio.wait_for(task, 5)

    with caplog.at_level("WARNING", logger="edge_agent.serve"):
        asyncio.run(scenario())
    assert agent.connected and svc.health()[0] and svc._attempts == 3
    assert "PermissionError" in caplog.text and "cam-7.key" in caplog.text
    assert healths[0]["status"] == "connecting", healths
    assert "(last error: PermissionError: [Errno 13] Permission denied" in \
        healths[0]["reason"], healths


@contextlib.contextmanager
def _blackhole() -> Iterator[int]:
    """A port whose accept queue is full: a connect() to it hangs as to a broker whose
    packets are dropped (no network at boot)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    try:
        for _ in range(3):
            client = socket.socket()
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", port))
            held.append(client)
        time.sleep(0.2)
        probe = socket.create_connection  # the premise: a new connect hangs
        with pytest.raises(TimeoutError):
            probe(("127.0.0.1", port), timeout=0.5).close()
        yield port
    finally:
        for client in held:
            client.close()
        listener.close()


@pytest.mark.integration
def test_sigterm_while_the_connect_hangs_exits_at_once(digits: Path, topic_prefix: str,
                                                       tmp_path: Path) -> None:
    """A blocking connect (TLS, or a broker not on loopback) runs in an executor thread;
    SIGTERM while it hangs used to wait out its 10 s connect timeout (asyncio.run and the
    interpreter join the pool's threads): exit 8 s after the signal, not within 5 s."""
    ca = tmp_path / "ca.pem"
    ca.write_text(CA_PEM)
    with _blackhole() as port, service(
            ["--broker", f"mqtts://127.0.0.1:{port}", "--tls-ca", str(ca), "--prefix",
             topic_prefix, "--artifacts", str(digits), "--device-id", "hang-1"],
            tmp_path / "serve.log") as svc:
        svc.wait_listening()
        status, health = svc.health()
        time.sleep(1.0)  # the first connect attempt is under way, hanging
        code, took = svc.terminate(timeout=20)
    assert status == 503 and health["status"] == "connecting", health
    assert code == 0 and took < 3.0, (code, took, svc.log())


def test_derived_device_id_one_winner_and_synced_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two starts deriving at once keep one id (the second reads the first's, instead of
    renaming its own over it while the first runs under another), and the new directory
    entry is fsynced (a power cut soon after the first start must not lose it)."""
    import edge_agent.identity as identity

    state = tmp_path / "state"
    real_derive = identity.derive_device_id

    def derive_while_another_start_writes() -> str:
        mine = real_derive()
        state.mkdir(parents=True, exist_ok=True)
        (state / "device_id").write_text("edge-other-start\n")  # it won the race
        return mine

    monkeypatch.setattr(identity, "derive_device_id", derive_while_another_start_writes)
    assert identity.stable_device_id(None, state) == ("edge-other-start", "persisted")
    assert (state / "device_id").read_text() == "edge-other-start\n"
    assert [p.name for p in state.iterdir()] == ["device_id"]  # no temporary left
    monkeypatch.setattr(identity, "derive_device_id", real_derive)
    synced: list[bool] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(
        stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd))[1])
    fresh = tmp_path / "fresh"
    device_id, how = identity.stable_device_id(None, fresh)
    assert how == "new" and (fresh / "device_id").read_text() == device_id + "\n"
    assert synced == [False, True], synced  # the file, then its directory


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_local_api_listens_on_ipv6(digits: Path, images: np.ndarray[Any, Any]) -> None:
    """http = "[::1]:8470" is documented; ThreadingHTTPServer alone binds IPv4 only, and
    the start failed: 'cannot listen on [::1]:8470 ... Address family for hostname not
    supported' (exit 3)."""
    local = LocalAPI(FakeBackend(Manifest.load(digits)), host="::1", port=0).start()
    try:
        assert local.url.startswith("http://[::1]:")
        conn = http.client.HTTPConnection("::1", local.address[1], timeout=10)
        try:
            conn.request("POST", "/v1/infer", body=_npz(image=images[:2]))
            response = conn.getresponse()
            assert response.status == 200
            assert _outputs(response.read())["logits"].shape == (2, 10)
        finally:
            conn.close()
    finally:
        local.close()


def test_local_api_a_trickled_body_gets_408_within_body_timeout(
        digits: Path, images: np.ndarray[Any, Any]) -> None:
    """The socket timeout is per read: a client sending one byte at a time, each well
    inside it, used to hold its thread (and the in-flight count a SIGTERM drain waits on)
    for as long as it liked. The whole body has body_timeout_s."""
    local = LocalAPI(FakeBackend(Manifest.load(digits)), host="127.0.0.1", port=0).start()
    local.body_timeout_s = 0.5  # read per request (the constructor's default is 30 s)
    try:
        body = _npz(image=images[:1])
        with socket.create_connection(local.address, timeout=10) as sock:
            sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n")
            started = time.monotonic()
            answer = b""
            for byte in body[:40]:  # 40 bytes over 2 s: never 0.5 s without one
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # answered and closed: the server stopped reading
                    break
                time.sleep(0.05)
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                while chunk := sock.recv(4096):
                    answer += chunk
            took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"request_timeout"' in answer and b"within 0.5 s" in answer
        assert took < 2.5, took
        assert local.wait_idle(1)  # no longer in flight
        # a body sent at once is answered as before
        assert _call(local, "POST", "/v1/infer", body)[0] == 200
    finally:
        local.close()
