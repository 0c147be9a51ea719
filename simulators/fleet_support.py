"""What a fleet run needs around the devices: worker processes, CPU accounting, inputs.

* :class:`WorkerPool` starts ``splitinfer cloud serve`` processes (each its own GIL) and
  waits until each has subscribed;
* :class:`CpuMeter` reads ``utime + stime`` of each process from ``/proc/PID/stat`` (no
  psutil) and sums it per role, following restarted processes;
* :class:`SlowHead` runs a real head, then sleeps ``(factor - 1) * head_time``: a slower
  device on this machine's CPU;
* :func:`load_inputs`, :func:`reference_predictions`, :func:`payload_sizes` prepare what
  devices send and what answers are checked against.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.runtime import HeadRuntime
from splitinfer import ort_config
from splitinfer.batches import padded_chunks
from splitinfer.costmodel import mqtt_publish_bytes  # re-exported: the fleet's sizes
from splitinfer.errors import BadInputError, StartupError
from splitinfer.manifest import Manifest, TensorSpec, sha256_file
from splitinfer.wire import REQUEST, RESULT, Envelope, WireTensor, encode

__all__ = ["WorkerPool", "serve_has_flag", "CpuMeter", "SlowHead", "Inputs", "load_inputs",
           "record_head_outputs",
           "random_inputs", "reference_predictions", "run_in_batches", "find_source_model",
           "payload_sizes",
           "mqtt_publish_bytes"]

log = logging.getLogger(__name__)
Array = npt.NDArray[Any]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
# A worker is ready once subscribed: its ready line (or the server's log of it), not the
# registry's earlier "serving split …" line, which comes before the subscription.
_READY = re.compile(r"(?m)^serving \d+ split|cloud_service\.server: worker \S+ serving")


# ---- worker processes --------------------------------------------------------------------


class WorkerPool:
    """``count`` cloud workers as child processes, logs under ``log_dir``.

    Each runs ``python -m splitinfer.cli -v cloud serve …`` and is ready once its log has
    the ready line ``serving N split(s) …`` (printed after the subscription is in place).
    Worker ``i`` gets ``--worker-id {prefix}-w{i}`` (a stable client id and a persistent
    session) when the installed ``cloud serve`` has that flag (``worker_ids=None``: ask its
    ``--help`` once), so :meth:`restart` brings back the same identity.
    """

    def __init__(self, *, count: int, broker: str, artifacts: Path, prefix: str, group: str,
                 log_dir: Path, threads: int = 1, extra: Sequence[str] = (),
                 worker_ids: bool | None = None) -> None:
        self.count = count
        self.broker = broker
        self.artifacts = artifacts
        self.prefix = prefix
        self.group = group
        self.log_dir = log_dir
        self.threads = threads
        self.extra = tuple(extra)
        self.worker_ids = serve_has_flag("--worker-id") if worker_ids is None else worker_ids
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0
        self.restarts: list[dict[str, Any]] = []  # index, old pid, new pid, seconds to serve

    def worker_id(self, index: int) -> str | None:
        return f"{self.prefix}-w{index}" if self.worker_ids else None

    def command(self, index: int | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "splitinfer.cli", "-v", "cloud", "serve",
               "--broker", self.broker, "--artifacts", str(self.artifacts),
               "--prefix", self.prefix, "--threads", str(self.threads),
               "--metrics-interval", "0"]
        cmd += ["--group", self.group] if self.group else ["--no-group"]
        worker_id = self.worker_id(len(self.procs) if index is None else index)
        if worker_id is not None:
            cmd += ["--worker-id", worker_id]
        return cmd + list(self.extra)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start every worker, in parallel, and wait until all of them serve."""
        pending = [self.spawn() for _ in range(self.count)]
        deadline = time.monotonic() + timeout_s
        for proc, log_path in pending:
            self._wait_serving(proc, log_path, deadline)

    def _popen(self, index: int) -> tuple[subprocess.Popen[bytes], Path]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"worker-{self.started}.log"
        self.started += 1
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(self.command(index), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return proc, log_path

    def spawn(self) -> tuple[subprocess.Popen[bytes], Path]:
        """One more worker (also the fault injection's ``restart-worker``); not waited for."""
        proc, log_path = self._popen(len(self.procs))
        self.procs.append(proc)
        return proc, log_path

    def spawn_and_wait(self, timeout_s: float = 60.0) -> str:
        proc, log_path = self.spawn()
        self._wait_serving(proc, log_path, time.monotonic() + timeout_s)
        return f"worker {len(self.procs) - 1} (pid {proc.pid}) serving"

    def restart(self, index: int, timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
        """Start worker ``index`` again with its own command line (same ``--worker-id``) once
        the old process has exited (SIGKILL after 10 s), wait until it serves, return it."""
        if not 0 <= index < len(self.procs):
            raise BadInputError(f"worker {index}: expected an index 0-{len(self.procs) - 1}")
        old = self.procs[index]
        if old.poll() is None:
            try:
                old.wait(10.0)
            except subprocess.TimeoutExpired:
                old.kill()
                old.wait()
        t0 = time.monotonic()
        proc, log_path = self._popen(index)
        self.procs[index] = proc
        self._wait_serving(proc, log_path, time.monotonic() + timeout_s)
        self.restarts.append({"index": index, "old_pid": old.pid, "pid": proc.pid,
                              "worker_id": self.worker_id(index), "log": str(log_path),
                              "serving_after_s": round(time.monotonic() - t0, 3)})
        return proc

    @staticmethod
    def _wait_serving(proc: subprocess.Popen[bytes], log_path: Path, deadline: float) -> None:
        while not _READY.search(log_path.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = log_path.read_text(errors="replace")[-800:]
                raise StartupError(f"cloud worker (pid {proc.pid}) did not start; its log "
                                   f"{log_path} ends with:\n{tail}")
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the worker drains), then SIGKILL what is still there after ``timeout_s``."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_FLAGS: dict[str, str] = {}


def serve_has_flag(flag: str) -> bool:
    """Whether the installed ``splitinfer cloud serve`` takes ``flag`` (its ``--help``,
    asked once per process)."""
    if "help" not in _FLAGS:
        try:
            done = subprocess.run([sys.executable, "-m", "splitinfer.cli", "cloud", "serve",
                                   "--help"], capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
            _FLAGS["help"] = done.stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("cannot ask cloud serve for its flags: %s", exc)
            return False
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", _FLAGS["help"]) is not None


# ---- CPU accounting ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads) in seconds; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class _Role:
    pids: Callable[[], Iterable[int]]
    last: dict[int, float] = field(default_factory=dict)
    total: float = 0.0
    seen: set[int] = field(default_factory=set)


class CpuMeter:
    """CPU seconds per role between :meth:`start` and :meth:`stop`.

    ``roles`` maps a name to a callable giving that role's current pids, asked at every
    :meth:`sample`, so a restarted broker or an added worker is followed. A process that
    ends between samples loses what it used since the last one: sample every second or so.
    """

    def __init__(self, roles: Mapping[str, Callable[[], Iterable[int]]]) -> None:
        self._roles = {name: _Role(pids) for name, pids in roles.items()}
        self._t0 = 0.0
        self._t1: float | None = None

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._t1 = None
        for role in self._roles.values():
            role.total, role.last, role.seen = 0.0, {}, set()
        self.sample(baseline=True)

    def sample(self, *, baseline: bool = False) -> None:
        for role in self._roles.values():
            for pid in role.pids():
                now = cpu_seconds(pid)
                if now is None:
                    continue
                before = role.last.get(pid)
                if before is None and baseline:
                    before = now
                role.total += now - (before if before is not None else now)
                role.last[pid] = now
                role.seen.add(pid)

    def stop(self) -> None:
        self.sample()
        self._t1 = time.monotonic()

    def report(self) -> dict[str, Any]:
        wall = (self._t1 if self._t1 is not None else time.monotonic()) - self._t0
        cores = os.cpu_count() or 1
        out: dict[str, Any] = {"window_s": round(wall, 3), "cores": cores}
        for name, role in self._roles.items():
            out[name] = {
                "pids": sorted(role.seen),
                "cpu_s": round(role.total, 3),
                # 1.0 = one core busy the whole window; the machine has `cores` of them
                "core_fraction": round(role.total / wall, 4) if wall > 0 else None,
                "machine_share": round(role.total / wall / cores, 4) if wall > 0 else None,
            }
        return out


# ---- devices slower than this machine ---------------------------------------------------


class SlowHead:
    """A head that takes ``factor`` times as long as on this machine.

    It runs the real head, then sleeps ``(factor - 1) * measured`` in the same thread (the
    agent runs heads off the event loop), so the result and the measured time are those
    of a device ``factor`` times slower, without spending that CPU here.
    """

    def __init__(self, head: HeadRuntime, factor: float) -> None:
        if not factor >= 1.0:
            raise BadInputError(f"speed factor {factor!r}: expected >= 1 (1 = this machine)")
        self.head = head
        self.factor = factor

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.head.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.head.output_names

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        t0 = time.perf_counter()
        out = self.head.run(inputs)
        extra = (self.factor - 1.0) * (time.perf_counter() - t0)
        if extra > 0:
            time.sleep(extra)
        return out


# ---- inputs and answers -----------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Samples by model input name (first axis = samples) and optional labels."""

    arrays: dict[str, Array]
    labels: Array | None = None
    source: str = "random"
    ignored: tuple[str, ...] = ()  # keys of the --input file that are neither inputs nor label

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def sample(self, index: int) -> dict[str, Array]:
        i = index % len(self)
        return {name: a[i:i + 1] for name, a in self.arrays.items()}


def _concrete(spec: TensorSpec, n: int) -> tuple[int, ...]:
    return (n, *[d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]])


def random_inputs(manifest: Manifest, count: int, seed: int) -> Inputs:
    """``count`` random samples shaped as the manifest's inputs (floats in [0, 1))."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, Array] = {}
    for spec in manifest.inputs:
        shape = _concrete(spec, count)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays[spec.name] = rng.random(shape).astype(dtype)
        elif dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 8, shape).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            raise BadInputError(f"input {spec.name!r} has dtype {spec.dtype}; give samples "
                                "with --input NPZ")
    return Inputs(arrays, None, "random")


def load_inputs(path: Path, manifest: Manifest) -> Inputs:
    """An ``.npz`` with one array per model input (first axis = samples), optional ``label``;
    other keys are ignored (listed in ``Inputs.ignored``)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--input {path}: not a readable .npz file: {exc}") from exc
    labels = arrays.pop("label", None)
    want = [s.name for s in manifest.inputs]
    missing = [n for n in want if n not in arrays]
    if missing:
        raise BadInputError(f"--input {path}: expected arrays {want} (+ optional 'label'), "
                            f"got {sorted(arrays)}; missing {missing}")
    picked = {n: arrays[n] for n in want}
    ignored = tuple(sorted(set(arrays) - set(want)))
    sizes = {len(a) for a in picked.values()} | ({len(labels)} if labels is not None else set())
    if len(sizes) != 1 or 0 in sizes:
        raise BadInputError(f"--input {path}: arrays must share a non-empty first axis "
                            f"(samples), got lengths {sorted(sizes)}")
    return Inputs(picked, labels, str(path), ignored)


def find_source_model(manifest: Manifest, split_dir: Path) -> Path | None:
    """The unsplit model the manifest names, next to the split or one level up, if its
    sha256 matches; None otherwise."""
    for folder in (split_dir, split_dir.parent):
        path = folder / manifest.source.path
        if path.is_file() and sha256_file(path) == manifest.source.sha256:
            return path
    return None


def reference_predictions(model: Path, inputs: Inputs) -> Array:
    """argmax of the unsplit model's first output on every sample (onnxruntime, CPU)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model), ort_config.apply(ort.SessionOptions()),
                                       providers=["CPUExecutionProvider"])
        out = run_in_batches(session, inputs.arrays)[0]
    except Exception as exc:  # onnxruntime raises its own, unrelated types
        raise BadInputError(f"reference model {model} cannot run on the inputs: {exc}") \
            from exc
    predicted: Array = np.asarray(out).reshape(len(inputs), -1).argmax(axis=-1)
    return predicted


def run_in_batches(session: Any, feeds: Mapping[str, Array]) -> list[Array]:
    """``session.run(None, feeds)`` for any number of samples: a model whose batch dimension
    is fixed at B runs B at a time (the last batch padded with its last sample), outputs
    concatenated and cut back to the samples given."""
    samples = len(next(iter(feeds.values())))
    fixed = {i.shape[0] for i in session.get_inputs()
             if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    batch = fixed.pop() if len(fixed) == 1 else None
    if batch is None or batch == samples:
        return [np.asarray(o) for o in session.run(None, dict(feeds))]
    parts = [session.run(None, chunk) for chunk in padded_chunks(feeds, batch)]
    return [np.concatenate([np.asarray(p[j]) for p in parts])[:samples]
            for j in range(len(parts[0]))]



def payload_sizes(manifest: Manifest, *, device_id: str, result_topic: str,
                  replay: bool) -> tuple[int, int]:
    """(request, result) envelope sizes in bytes for one sample, as the agent and the
    worker build them (ids and stamps of typical length; tensors zero-filled)."""
    cut = [WireTensor(s.name, np.zeros(_concrete(s, 1), s.dtype), s.quantization)
           for s in manifest.cut]
    outs = [WireTensor(s.name, np.zeros(_concrete(s, 1), s.dtype), s.quantization)
            for s in manifest.outputs]
    stamps = {"sent": time.time()} if replay else \
        {"head_start": time.time(), "head_end": time.time(), "sent": time.time()}
    request = Envelope(kind=REQUEST, request_id="0" * 32, device_id=device_id,
                       split_id=manifest.split_id, tensors=cut, deadline=time.time(),
                       reply_to=result_topic, timestamps=dict(stamps))
    worker_stamps = {k: time.time() for k in ("recv", "tail_start", "tail_end", "reply")}
    result = Envelope(kind=RESULT, request_id="0" * 32, device_id=device_id,
                      split_id=manifest.split_id, tensors=outs, deadline=time.time(),
                      timestamps={**stamps, **worker_stamps})
    return len(encode(request)), len(encode(result))


def record_head_outputs(head: HeadRuntime, inputs: Inputs, count: int,
                        ) -> tuple[list[dict[str, Array]], list[float]]:
    """Head outputs of the first ``count`` samples, one sample each, and each one's head time
    (the best of three runs: this machine's speed, not its scheduling noise)."""
    recorded, times = [], []
    for index in range(min(count, len(inputs))):
        sample = inputs.sample(index)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            out = head.run(sample)
            best = min(best, time.perf_counter() - t0)
        recorded.append(out)
        times.append(best)
    return recorded, times
