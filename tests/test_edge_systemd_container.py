"""The systemd unit under a real systemd: PID 1 of a container built on the edge image.

Opt-in (``SPLITINFER_SYSTEMD_CONTAINER=1``; needs ``docker`` and the ``splitinfer-edge``
image of docker/edge.Dockerfile): a layer adds Debian's systemd, the dedicated user, the
working tree's ``splitinfer`` and ``edge_agent``, the digits split and
deploy/systemd/splitinfer-edge.service (ExecStart pointed at the image's venv,
``WatchdogSec=3`` to keep the test short); the container runs ``/lib/systemd/systemd`` on
the host network, the broker (mosquitto) and the worker run here. Checked:

- ``Type=notify``: started (READY) while the broker is still down, ``StatusText`` says so,
  and the API answers 503; then ready once the broker and a worker are up;
- the journal: our warning line is found by ``journalctl -p warning`` (priority prefix);
- the watchdog: a SIGSTOPped service is killed and restarted (``NRestarts=1``) and keeps its
  device id (``StateDirectory=``);
- ``systemctl stop`` with 4 requests held in flight by a frozen worker: all answered 200,
  ``Result=success``, exit status 0;
- the sandbox that a container can apply: no capabilities, ``NoNewPrivs``, a seccomp filter
  (``SystemCallFilter=``) that Python, onnxruntime and paho live with. The mount-namespace
  options (``ProtectSystem=`` …) need privileges this container lacks and are not checked.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_edge_serve import _npz, worker_process

from simulators.support.broker import MosquittoBroker, free_port
from splitter import split_model, zoo

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("SPLITINFER_EDGE_IMAGE", "splitinfer-edge")
TAG = "splitinfer-edge-systemd-test"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.environ.get("SPLITINFER_SYSTEMD_CONTAINER") != "1",
                       reason="opt-in: SPLITINFER_SYSTEMD_CONTAINER=1 (needs docker and the "
                              "splitinfer-edge image)"),
]

DOCKERFILE = f"""\
FROM {IMAGE}
USER root
RUN apt-get update && apt-get install -y --no-install-recommends systemd systemd-sysv \\
    && rm -rf /var/lib/apt/lists/* \\
    && useradd --system --home-dir /var/lib/splitinfer --shell /usr/sbin/nologin splitinfer
COPY splitinfer /opt/splitinfer/lib/python3.11/site-packages/splitinfer
COPY edge_agent /opt/splitinfer/lib/python3.11/site-packages/edge_agent
COPY split /opt/splitinfer/artifacts/digits_cnn
COPY splitinfer-edge.service /etc/systemd/system/splitinfer-edge.service
RUN systemctl enable splitinfer-edge \\
    && systemctl mask systemd-logind.service getty.target console-getty.service
ENTRYPOINT ["/lib/systemd/systemd"]
"""


def _run(*args: str, timeout: float = 60, check: bool = True) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def _show(name: str, *props: str) -> dict[str, str]:
    """The unit's properties; {} while systemd is still booting (no bus yet)."""
    out = _run("docker", "exec", name, "systemctl", "show", "splitinfer-edge",
               *(f"-p{p}" for p in props), check=False)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _get(port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _until(what: str, check: Any, timeout: float = 30.0) -> Any:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        with_value = check()
        if with_value:
            return with_value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        pytest.skip(f"no {IMAGE} image: docker build -f docker/edge.Dockerfile -t {IMAGE} .")
    context = tmp_path_factory.mktemp("systemd-image")
    shutil.copytree(REPO / "splitinfer", context / "splitinfer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "edge_agent", context / "edge_agent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    split_model(zoo.digits_cnn_path(), ["pool"], context / "split")
    unit = (REPO / "deploy" / "systemd" / "splitinfer-edge.service").read_text()
    unit = unit.replace("/opt/splitinfer/venv/bin/splitinfer", "/opt/splitinfer/bin/splitinfer")
    assert "WatchdogSec=30" in unit
    (context / "splitinfer-edge.service").write_text(unit.replace("WatchdogSec=30",
                                                                  "WatchdogSec=3"))
    (context / "Dockerfile").write_text(DOCKERFILE)
    _run("docker", "build", "--network", "host", "-t", TAG, str(context), timeout=900)
    return TAG


def test_the_unit_under_systemd(image: str, tmp_path: Path) -> None:
    broker_port, http_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    prefix = f"sd{uuid.uuid4().hex[:8]}"
    url = f"mqtt://127.0.0.1:{broker_port}"
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    (etc / "edge.toml").write_text(
        f'broker = "{url}"\nartifacts = "/opt/splitinfer/artifacts/digits_cnn"\n'
        f'prefix = "{prefix}"\nthreads = 1\nhttp = "127.0.0.1:{http_port}"\n')
    splits = tmp_path / "splits"
    split_model(zoo.digits_cnn_path(), ["pool"], splits / "fp32")
    x, _ = zoo.digits_test_set()
    body = _npz(image=x[:2])
    name = f"splitinfer-systemd-{uuid.uuid4().hex[:8]}"
    broker = MosquittoBroker(port=broker_port)
    with contextlib.ExitStack() as stack:
        _run("docker", "run", "-d", "--name", name, "--network", "host", "-e",
             "container=docker", "--tmpfs", "/run", "--tmpfs", "/run/lock", "-v",
             "/sys/fs/cgroup:/sys/fs/cgroup:ro", "-v", f"{etc}:/etc/splitinfer:ro", image)
        stack.callback(subprocess.run, ["docker", "rm", "-f", name], capture_output=True)
        stack.callback(broker.close)
        # 1. started (READY=1) with the broker down; the API says why it cannot answer
        _until("the unit active",
               lambda: _show(name, "ActiveState").get("ActiveState") == "active", 60)
        assert _show(name, "StatusText")["StatusText"].startswith("connecting to ")
        status, answer = _until("the API listening", lambda: _try_get(http_port, "/healthz"))
        assert status == 503 and json.loads(answer)["status"] == "connecting"
        # 2. the broker and a worker come: ready, answering; the warning is in the journal
        broker.start()
        worker_proc = stack.enter_context(
            worker_process(url, prefix, splits / "fp32", tmp_path / "worker.log"))
        _until("ready", lambda: (_try_get(http_port, "/healthz") or (0,))[0] == 200, 30)
        assert _show(name, "StatusText")["StatusText"] == f"ready; connected to {url}"
        status, reference = _get(http_port, "/v1/infer", body)
        assert status == 200, reference
        warnings = _run("docker", "exec", name, "journalctl", "-u", "splitinfer-edge", "-p",
                        "warning", "-o", "cat", "--no-pager")
        assert "edge_agent.serve: broker " in warnings and "unreachable" in warnings
        device_id = json.loads(_get(http_port, "/healthz")[1])["device_id"]
        # 3. the sandbox a container can apply
        pid = _show(name, "MainPID")["MainPID"]
        status_file = _run("docker", "exec", name, "cat", f"/proc/{pid}/status")
        assert "NoNewPrivs:\t1" in status_file and "Seccomp:\t2" in status_file
        assert "CapEff:\t0000000000000000" in status_file
        # 4. the watchdog: a stopped process is killed and restarted, with the same id
        _run("docker", "exec", name, "sh", "-c", f"kill -STOP {pid}")
        _until("a watchdog restart", lambda: _show(name, "NRestarts").get("NRestarts") == "1", 20)
        _until("ready again", lambda: (_try_get(http_port, "/healthz") or (0,))[0] == 200, 30)
        assert json.loads(_get(http_port, "/healthz")[1])["device_id"] == device_id
        # 5. systemctl stop with 4 requests held in flight by a frozen worker
        worker_proc.send_signal(signal.SIGSTOP)
        results: list[Any] = [None] * 4

        def post(i: int) -> None:
            results[i] = _get(http_port, "/v1/infer", body)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        threading.Timer(0.5, worker_proc.send_signal, (signal.SIGCONT,)).start()
        began = time.monotonic()
        _run("docker", "exec", name, "systemctl", "stop", "splitinfer-edge", timeout=30)
        took = time.monotonic() - began
        for t in threads:
            t.join(10)
        shown = _show(name, "ActiveState", "Result", "ExecMainStatus")
    assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert took < 5.0, took
    assert [r[0] for r in results] == [200] * 4 and all(r[1] == reference for r in results)
    print(f"systemctl stop with 4 requests in flight: {took:.2f} s, all answered")


def _try_get(port: int, path: str) -> tuple[int, bytes] | None:
    try:
        return _get(port, path)
    except OSError:
        return None
