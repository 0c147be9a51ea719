"""``splitinfer profile``: time every split of a bundle on the side where it runs.

The planner (``splitinfer plan``) and the device's run-time chooser predict a split's
latency from two profiles: one taken on the device (``--side edge``: the heads, the
request encoding, the bytes that cross) and one on a worker (``--side cloud``: the request
decoding, the tails at batch 1 and at the batch sizes the worker's dynamic batcher forms,
the bytes of the answer). Both are measured with the code paths and session settings the
device and the worker use, so a figure here is what the fleet sees:

- heads run on onnxruntime with :func:`splitinfer.ort_config.apply`, ``--threads``
  intra-op threads (default 1, as the fleet's devices and a small board running one
  model), the edge agent's :class:`~edge_agent.runtime.OrtHead` settings; ``--speed F``
  records F times the measured head time and nothing else, exactly what the fleet's
  ``--speed F`` (``simulators.fleet_support.SlowHead``) does to emulate a slower device;
- a request is the envelope the agent builds (``edge_agent.client``, ``_request``): the cut
  tensors with their quantization and, for a cloud_only split with an ``input_codec``, the
  image codec, compressed with the manifest's ``compression`` when it has one (and the
  codec is installed here), as the agent sends it; ``encode_ms`` times building and
  encoding it (compression included), ``request_bytes`` is its size, ``cut_bytes`` the
  tensor bytes in it (after the codec and the compression); ``decode_ms`` (edge side)
  times decoding the worker's result envelope on the device, which the worker compresses
  in the request's codec (``cloud_service.worker.answer_compression``);
- ``compressed`` (edge side): every installed codec measured on the cut tensors the head
  produced (:func:`splitinfer.compression.report`: raw and compressed bytes per request,
  compress/decompress ms, whether it pays on the reference 4g uplink, the codec
  ``--compression auto`` would keep), whatever the manifest says, so the planner sees
  what compression would save at every cut; ``compression`` is the manifest's codec;
- tails run with the worker's session settings (``cloud_service.registry``:
  ``--threads`` intra-op threads, default 0 = onnxruntime's own choice as the worker's
  ``--threads`` default, pool threads spinning only while a run lasts, sequential), on
  the worker's default providers (CUDA when present); a batch of B requests runs as the
  worker runs it: one concatenated run when the tail is batchable, else one run per
  request (fixed-batch tails padded). Heads spin the same way (``OrtHead``'s default).

A split whose halves have a fixed batch F > 1 sends F samples per request, as the agent
does; its entries say so (``samples_per_request``, 1 otherwise) and every figure is per
request. Inputs: ``--samples NPZ`` (keys = model input names, first axis = samples;
other keys such as ``label`` are ignored with one warning), else random inputs of the
declared shapes (a symbolic non-batch dim is an error naming it; random images are noise,
so a JPEG's size is a worst case: give real samples for codec'd splits). ``DIR`` is a
bundle (with ``bundle.json``), one split folder, or a folder of split folders (ids from
the manifests).

The JSON (``splitinfer.profile/1``; times in ms, each a ``{"p50", "p90", "p99", "mean",
"n"}`` distribution; bytes per request)::

    {"format": "splitinfer.profile/1", "side": "edge", "model": "digits_cnn",
     "source_sha256": "…", "machine": {"hostname", "platform", "machine", "processor",
     "cpus", "onnxruntime", "python"}, "threads": 1, "speed": 8.0, "samples": 32,
     "providers": ["CPUExecutionProvider"], "gap_s": 0.0,
     "measured_at": "2026-12-02T08:00:00Z",
     "splits": {"<split_id>": {
        "kind": "split", "dir": "cut_07", "input_codec": "raw", "samples_per_request": 1,
        # edge side
        "head_ms": {…}, "encode_ms": {…}, "decode_ms": {…},
        "request_bytes": 487, "cut_bytes": 256, "compression": "zstd" | null,
        "compressed": {"requests", "raw_bytes", "link_bps", "codecs": {"zstd": {…}}, "choice"},
        # cloud side instead
        "decode_ms": {…}, "tail_ms": {…}, "result_bytes": 323, "batchable": true,
        "batches": {"1": {"p50_ms": 0.04, "throughput_rps": 25000.0}, "2": {…}, …}}}}

Edge side: cloud_only has a zero head, edge_only has the whole model as its head and no
request (0 bytes, zero encode/decode, ``compressed`` null). Cloud side: edge_only holds
only kind/dir/codec. The cost model (:func:`splitinfer.costmodel.costs_from_profiles`)
takes ``request_bytes``/``result_bytes`` as they are, so a split whose manifest
compresses is priced at its compressed bytes, its codec time in ``encode_ms`` and the
worker's ``decode_ms``.

No ``onnx`` here: this runs on an edge install (onnxruntime, numpy, msgpack). Timers are
injectable (``timer=``) so tests check the arithmetic without wall-clock assertions.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from splitinfer.imagecodec import ImageCodec
    from splitinfer.manifest import Manifest, TensorSpec

    Array = np.ndarray[Any, Any]

__all__ = ["register", "PROFILE_FORMAT", "DEFAULT_BATCHES", "SplitEntry", "SpacedTimer",
           "find_splits",
           "load_samples", "random_samples", "profile", "profile_edge", "profile_cloud",
           "machine_info", "stats_ms"]

log = logging.getLogger(__name__)

PROFILE_FORMAT = "splitinfer.profile/1"
# The worker's batcher closes a batch at --max-batch samples (32 by default); these are the
# sizes its dynamic batches take under load, up to that cap.
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)
DEFAULT_MAX_SAMPLES = 32
WARMUP_RUNS = 3
# As long as the fleet's device ids ("<6 hex>-<5 digits>"), so the envelope's size matches.
DEVICE_ID = "prof00-00000"
Timer = Callable[[], float]
R = TypeVar("R")


# --- what to profile ---------------------------------------------------------------------


@dataclass(frozen=True)
class SplitEntry:
    """One split to time: its id, kind, folder and manifest."""

    split_id: str
    kind: str
    dir: str  # as bundle.json names it (relative to the artifacts folder)
    path: Path
    manifest: Manifest
    input_codec: str = "raw"


def _codecs(manifest: Manifest) -> dict[str, ImageCodec]:
    """Cut tensor name -> the image codec it travels with (``Manifest.input_codec``)."""
    return {s.name: c for s in manifest.cut if (c := manifest.codec_for(s.name)) is not None}


def _codec_label(manifest: Manifest) -> str:
    """The manifest's input codec as a spec string (``raw``, ``png``, ``jpeg:90``)."""
    codecs = list(_codecs(manifest).values())
    return str(codecs[0].spec) if codecs else "raw"


def find_splits(artifacts: str | Path) -> tuple[str, str, list[SplitEntry]]:
    """(model, source sha256, splits) of a bundle, a split folder or a folder of them."""
    from splitinfer.bundle import Bundle, is_bundle
    from splitinfer.errors import BadInputError, ManifestError
    from splitinfer.manifest import Manifest, find_split_dirs

    root = Path(artifacts)
    if not root.exists():
        raise BadInputError(f"--artifacts {root}: no such folder; expected a bundle "
                            "(splitinfer bundle) or split folder(s) (splitinfer split)")
    if is_bundle(root):
        bundle = Bundle.load(root)
        entries = []
        for s in bundle:
            m = bundle.manifest(s)
            codec = s.input_codec if s.input_codec != "raw" else _codec_label(m)
            entries.append(SplitEntry(s.split_id, s.kind, s.dir, bundle.path(s), m, codec))
        return bundle.model, bundle.source_sha256, entries
    dirs = find_split_dirs(root)
    if not dirs:
        raise ManifestError(f"--artifacts {root}: no bundle.json and no manifest.json below "
                            "it; expected a bundle (splitinfer bundle) or split folder(s)")
    entries = []
    for d in dirs:
        m = Manifest.load(d)
        rel = d.name if d == root else str(d.relative_to(root))
        entries.append(SplitEntry(m.split_id, m.kind, rel, d, m, _codec_label(m)))
    models = sorted({(e.manifest.model, e.manifest.source.sha256) for e in entries})
    if len(models) > 1:
        raise BadInputError(f"--artifacts {root}: holds splits of {len(models)} models "
                            f"({', '.join(name for name, _ in models)}); profile one model's "
                            "splits at a time")
    ids = [e.split_id for e in entries]
    if len(set(ids)) != len(ids):
        raise ManifestError(f"--artifacts {root}: a split_id appears in two folders: "
                            f"{sorted(i for i in set(ids) if ids.count(i) > 1)}")
    return models[0][0], models[0][1], entries


# --- inputs ------------------------------------------------------------------------------


def load_samples(path: str | Path, inputs: Sequence[TensorSpec], *,
                 limit: int = DEFAULT_MAX_SAMPLES) -> dict[str, Array]:
    """The model inputs from an ``.npz`` (first axis = samples), at most ``limit`` of them."""
    import numpy as np

    from splitinfer.errors import BadInputError

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--samples {path}: not a readable .npz file: {exc}") from None
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise BadInputError(f"--samples {path}: no array for input(s) {missing}; it has "
                            f"{sorted(arrays)}; expected one array per model input, keyed "
                            "by input name")
    extra = sorted(set(arrays) - set(names))
    if extra:
        log.warning("--samples %s: ignoring %s (not model inputs)", path, ", ".join(extra))
    out: dict[str, Array] = {}
    for spec in inputs:
        array = arrays[spec.name]
        if array.dtype.name != spec.dtype:
            raise BadInputError(f"--samples {path}: {spec.name!r} is {array.dtype.name}, the "
                                f"model expects {spec.dtype}")
        if array.ndim != len(spec.shape) or array.shape[0] < 1:
            raise BadInputError(f"--samples {path}: {spec.name!r} has shape {array.shape}; "
                                f"expected samples on axis 0 of {list(spec.shape)}")
        out[spec.name] = np.ascontiguousarray(array[:limit])
    counts = {len(a) for a in out.values()}
    if len(counts) != 1:
        raise BadInputError(f"--samples {path}: inputs hold different numbers of samples "
                            f"{ {k: len(a) for k, a in out.items()} }")
    return out


def random_samples(inputs: Sequence[TensorSpec], count: int = DEFAULT_MAX_SAMPLES, *,
                   seed: int = 0) -> dict[str, Array]:
    """``count`` random samples of the declared inputs (images: uniform in [0, 1))."""
    import numpy as np

    from splitinfer.dtypes import numpy_dtype
    from splitinfer.errors import BadInputError

    rng = np.random.default_rng(seed)
    out: dict[str, Array] = {}
    for spec in inputs:
        dims = []
        for i, dim in enumerate(spec.shape[1:], start=1):
            if not isinstance(dim, int):
                raise BadInputError(f"input {spec.name!r} dim {i} is {dim!r} (symbolic) in "
                                    f"{list(spec.shape)}: random inputs need fixed dims; pass "
                                    "--samples NPZ with real inputs")
            dims.append(dim)
        dtype = numpy_dtype(spec.dtype)
        shape = (count, *dims)
        if dtype.kind == "f":
            out[spec.name] = rng.random(shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.random(shape) < 0.5
        else:
            info = np.iinfo(spec.dtype)
            lo, hi = max(int(info.min), -128), min(int(info.max), 255)
            out[spec.name] = rng.integers(lo, hi + 1, size=shape).astype(dtype)
    return out


def _batch_of(specs: Sequence[TensorSpec]) -> int:
    """The fixed batch of a half's inputs (the first dim), 1 when it is dynamic."""
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            return spec.shape[0]
    return 1


def _chunks(arrays: Mapping[str, Array], batch: int) -> list[dict[str, Array]]:
    """Every sample once, in runs of ``batch`` (the last one padded), for batch-1 timing."""
    from splitinfer.batches import padded_chunks

    return padded_chunks(arrays, batch)


# --- statistics and the machine ----------------------------------------------------------


def stats_ms(seconds: Sequence[float], scale: float = 1.0) -> dict[str, float | int]:
    """p50/p90/p99/mean (milliseconds, times ``scale``) and n of measured seconds."""
    import numpy as np

    if not seconds:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "n": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0 * scale
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"p50": round(p50, 6), "p90": round(p90, 6), "p99": round(p99, 6),
            "mean": round(float(ms.mean()), 6), "n": int(ms.size)}


def _zero_stats(n: int) -> dict[str, float | int]:
    return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "n": n}


def _processor() -> str:
    import platform

    name = platform.processor()
    if name and name not in ("x86_64", "aarch64", "arm64"):
        return name
    try:  # Linux leaves platform.processor() empty or the architecture
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return name or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where the profile was taken."""
    import os
    import platform

    import onnxruntime as ort

    return {"hostname": platform.node(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": _processor(),
            "cpus": os.cpu_count() or 1, "onnxruntime": str(ort.__version__),
            "python": platform.python_version()}


# --- sessions ----------------------------------------------------------------------------


class _Session:
    """One onnxruntime session with the settings of the side that runs it."""

    def __init__(self, path: Path, *, side: str, threads: int,
                 providers: Sequence[str]) -> None:
        import onnxruntime as ort

        from splitinfer import ort_config
        from splitinfer.errors import ManifestError

        opts = ort_config.apply(ort.SessionOptions())
        # an explicit count on both sides, as they run (never onnxruntime's pinned pool)
        opts.intra_op_num_threads = ort_config.pool_threads(threads)
        opts.inter_op_num_threads = 1
        if side == "cloud":  # cloud_service.registry.session_options
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # both sides' default: pool threads spin while a run lasts, stop when it returns
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts,
                                                providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own, unrelated types
            raise ManifestError(f"{path}: onnxruntime cannot load it: {exc}") from exc
        self.input_names = [str(i.name) for i in self.session.get_inputs()]
        self.output_names = [str(o.name) for o in self.session.get_outputs()]
        self.fixed_batch: int | None = None
        for node in self.session.get_inputs():
            if node.shape and isinstance(node.shape[0], int) and node.shape[0] > 0:
                self.fixed_batch = int(node.shape[0])

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        import numpy as np

        outs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return {n: np.asarray(v) for n, v in zip(self.output_names, outs, strict=True)}


def _providers(side: str, given: Sequence[str] | None) -> list[str]:
    import onnxruntime as ort

    if given:
        return list(given)
    available = ort.get_available_providers()
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if side == "cloud" else (
        "CPUExecutionProvider",)
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


# --- requests as the agent builds them, results as the worker does -----------------------


def _request(entry: SplitEntry, cut: Mapping[str, Array], *, deadline_s: float = 10.0
             ) -> bytes:
    """The request payload, built exactly as ``EdgeAgent._request`` builds it."""
    import time

    from splitinfer.topics import Topics
    from splitinfer.wire import REQUEST, Envelope, WireTensor, encode, new_request_id

    m = entry.manifest
    tensors = [WireTensor(s.name, cut[s.name], s.quantization, codec=m.codec_for(s.name))
               for s in m.cut]
    now = time.time()
    env = Envelope(kind=REQUEST, request_id=new_request_id(), device_id=DEVICE_ID,
                   split_id=m.split_id, deadline=now + deadline_s,
                   reply_to=Topics().result(DEVICE_ID), tensors=tensors,
                   timestamps={"head_start": now, "head_end": now})
    env.stamp("sent")
    return encode(env, compression=_manifest_codec(m))


def _manifest_codec(manifest: Manifest) -> str | None:
    """The codec the agent compresses this split's requests with here
    (``EdgeAgent.compression_for``): the manifest's, when installed."""
    from splitinfer.compression import supported

    how = manifest.compression
    return how if how is not None and how in supported() else None


def _compressed(manifest: Manifest, cuts: Sequence[Mapping[str, Array]]
                ) -> dict[str, Any]:
    """Every installed codec on the raw bytes of the cut tensors a device sends."""
    import numpy as np

    from splitinfer.compression import report

    raw = [s.name for s in manifest.cut if manifest.codec_for(s.name) is None]
    return report([[np.ascontiguousarray(c[n]).tobytes() for n in raw] for c in cuts])


def _tensor_bytes(payload: bytes) -> int:
    """Bytes of the tensor data in an encoded envelope (after any codec)."""
    import msgpack

    body = msgpack.unpackb(payload, raw=False)
    total = 0
    for entry in body.get("t", []):
        data = entry.get("b", b"")
        if isinstance(data, (list, tuple)):  # one encoded image per sample
            total += sum(len(d) for d in data)
        else:
            total += len(data)
    return total


def _result(request: bytes, outputs: Mapping[str, Array], manifest: Manifest) -> bytes:
    """The result payload, built as ``cloud_service.worker.Worker`` builds it."""
    import time

    from splitinfer.wire import WireTensor, decode, encode

    env = decode(request, codecs={manifest.split_id: _codecs(manifest)})
    now = time.time()
    for stage in ("recv", "batched", "tail_start", "tail_end", "reply"):
        env.timestamps[stage] = now
    tensors = [WireTensor(s.name, outputs[s.name], s.quantization) for s in manifest.outputs]
    # in the request's codec, as cloud_service.worker.answer_compression answers
    how = next((t.compression for t in env.tensors if t.compression), None)
    return encode(env.result(tensors), compression=how)


# --- the two sides -----------------------------------------------------------------------


def _check_speed(speed: float) -> None:
    import math

    from splitinfer.errors import BadInputError

    if not (math.isfinite(speed) and speed > 0):
        raise BadInputError(f"--speed {speed!r}: expected a number > 0 (1 = this machine, "
                            "8 = a device eight times slower)")


def _interleave(calls: Sequence[Sequence[Callable[[], R]]], clock: Timer
                ) -> tuple[list[list[float]], list[list[R]]]:
    """Run every split's calls round-robin (call i of each split, then call i + 1 of
    each), timing each one: a burst of load from elsewhere on the machine then slows every
    split alike instead of biasing one of them. Returns (seconds, results) per split."""
    times: list[list[float]] = [[] for _ in calls]
    results: list[list[R]] = [[] for _ in calls]
    for i in range(max((len(c) for c in calls), default=0)):
        for k, split_calls in enumerate(calls):
            if i < len(split_calls):
                t0 = clock()
                value = split_calls[i]()
                times[k].append(clock() - t0)
                results[k].append(value)
    return times, results


def profile_edge(entries: Sequence[SplitEntry], samples: Mapping[str, Array], *,
                 threads: int = 1, speed: float = 1.0, repeats: int = 1,
                 providers: Sequence[str] | None = None,
                 timer: Timer | None = None) -> dict[str, dict[str, Any]]:
    """Per split: head (x ``speed``), request encode, request and cut bytes, at batch 1."""
    import functools
    import time

    _check_speed(speed)
    clock = timer or time.perf_counter
    provs = _providers("edge", providers)
    heads: list[_Session | None] = []
    runs: list[list[dict[str, Array]]] = []
    batches: list[int] = []
    for e in entries:
        m = e.manifest
        head = None
        if m.kind != "cloud_only":
            head = _Session(m.resolve(e.path, "head"), side="edge", threads=threads,
                            providers=provs)
        batch = (head.fixed_batch or 1) if head is not None else _batch_of(m.inputs)
        split_runs = _chunks({s.name: samples[s.name] for s in m.inputs}, batch)
        if head is not None:
            for _ in range(WARMUP_RUNS):
                head.run(split_runs[0])
        heads.append(head)
        runs.append(split_runs * max(1, repeats))
        batches.append(batch)
    head_s, head_out = _interleave(
        [[functools.partial(h.run, f) for f in r] if h is not None else []
         for h, r in zip(heads, runs, strict=True)], clock)
    out: dict[str, dict[str, Any]] = {}
    for k, e in enumerate(entries):
        m, head, batch = e.manifest, heads[k], batches[k]
        cuts = head_out[k] if head is not None else runs[k]
        entry: dict[str, Any] = {"kind": e.kind, "dir": e.dir, "input_codec": e.input_codec,
                                 "samples_per_request": batch,
                                 "head_ms": stats_ms(head_s[k], speed) if head else
                                 _zero_stats(len(cuts))}
        if m.kind == "edge_only":
            entry.update(encode_ms=_zero_stats(len(cuts)), request_bytes=0, cut_bytes=0,
                         decode_ms=_zero_stats(len(cuts)), compression=None, compressed=None)
        else:
            _request(e, cuts[0])  # warm-up (first-call imports, codec start-up)
            encode_s, sizes, tensor_bytes = [], [], []
            payloads = []
            for cut in cuts:
                t0 = clock()
                payload = _request(e, cut)
                encode_s.append(clock() - t0)
                sizes.append(len(payload))
                tensor_bytes.append(_tensor_bytes(payload))
                payloads.append(payload)
            entry.update(encode_ms=stats_ms(encode_s),
                         request_bytes=round(sum(sizes) / len(sizes)),
                         cut_bytes=round(sum(tensor_bytes) / len(tensor_bytes)),
                         decode_ms=_result_decode(payloads, m, batch, clock),
                         compression=_manifest_codec(m), compressed=_compressed(m, cuts))
        out[e.split_id] = entry
        log.info("edge %s (%s): head p50 %.3f ms, %s request bytes", e.split_id, e.kind,
                 entry["head_ms"]["p50"], entry["request_bytes"])
    return out


def _result_decode(requests: Sequence[bytes], manifest: Manifest, batch: int,
                   clock: Timer) -> dict[str, float | int]:
    """The device's share of an answer: decoding the worker's result envelope.

    The outputs are zeros of the declared output shapes (the size is what matters: raw
    bytes cost the same whatever they hold); n = 0 when an output has a symbolic dim.
    """
    import numpy as np

    from splitinfer.dtypes import numpy_dtype
    from splitinfer.wire import decode

    outputs: dict[str, Array] = {}
    for spec in manifest.outputs:
        dims = [d if isinstance(d, int) else -1 for d in spec.shape]
        if dims and dims[0] < 0:
            dims[0] = batch
        if any(d < 0 for d in dims):
            return _zero_stats(0)
        outputs[spec.name] = np.zeros(dims, dtype=numpy_dtype(spec.dtype))
    results = [_result(p, outputs, manifest) for p in requests]
    decode(results[0])
    times = []
    for r in results:
        t0 = clock()
        decode(r)
        times.append(clock() - t0)
    return stats_ms(times)


def _run_batch(tail: _Session, batchable: bool, jobs: Sequence[Mapping[str, Array]]
               ) -> list[dict[str, Array]]:
    """B requests through the tail as ``cloud_service.worker._run`` runs them."""
    import numpy as np

    from splitinfer.batches import padded_chunks

    if batchable and len(jobs) > 1:
        whole = tail.run({n: np.concatenate([j[n] for j in jobs]) for n in tail.input_names})
        return [whole]
    outs = []
    for job in jobs:
        fixed = tail.fixed_batch
        n = len(next(iter(job.values())))
        if fixed is None or n == fixed:
            outs.append(tail.run(job))
        else:
            parts = [tail.run(chunk) for chunk in padded_chunks(dict(job), fixed)]
            outs.append({k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]})
    return outs


@dataclass
class _CloudSplit:
    """One split's tail and its real requests, decoded, ready for timing."""

    entry: SplitEntry
    tail: _Session
    batchable: bool
    per_request: int
    payloads: list[bytes]
    decode_s: list[float]
    feeds: list[dict[str, Array]]


def _prepare_cloud(e: SplitEntry, samples: Mapping[str, Array], *, threads: int,
                   providers: Sequence[str], repeats: int, clock: Timer) -> _CloudSplit:
    """The split's requests as the device sends them (its head run here, on the CPU),
    decoded as the worker decodes them (timed), and its tail session, warmed up."""
    from splitinfer.wire import decode

    m = e.manifest
    inputs = {s.name: samples[s.name] for s in m.inputs}
    if m.kind == "cloud_only":
        per_request = _batch_of(m.cut)
        cuts = _chunks(inputs, per_request)
    else:
        head = _Session(m.resolve(e.path, "head"), side="edge", threads=threads,
                        providers=["CPUExecutionProvider"])
        per_request = head.fixed_batch or 1
        cuts = [head.run(f) for f in _chunks(inputs, per_request)]
    payloads = [_request(e, c) for c in cuts]
    tail = _Session(m.resolve(e.path, "tail"), side="cloud", threads=threads,
                    providers=providers)
    batchable = tail.fixed_batch is None and not any(
        s.shape and isinstance(s.shape[0], int) for s in m.outputs)
    codecs = {m.split_id: _codecs(m)}  # what the worker's registry passes
    decode(payloads[0], codecs=codecs)
    decode_s: list[float] = []
    feeds: list[dict[str, Array]] = []
    for _ in range(max(1, repeats)):
        for p in payloads:
            t0 = clock()
            env = decode(p, codecs=codecs)
            decode_s.append(clock() - t0)
            feeds.append(env.arrays())
    for _ in range(WARMUP_RUNS):
        tail.run(feeds[0])
    return _CloudSplit(e, tail, batchable, per_request, payloads, decode_s, feeds)


def profile_cloud(entries: Sequence[SplitEntry], samples: Mapping[str, Array], *,
                  threads: int = 0, batches: Sequence[int] = DEFAULT_BATCHES,
                  repeats: int = 3, providers: Sequence[str] | None = None,
                  timer: Timer | None = None) -> dict[str, dict[str, Any]]:
    """Per split with a tail: request decode, tail at batch 1 and per batch, result bytes.

    The requests are real: each split's head (when its folder has one) runs on the
    samples on this machine first, and the cut goes into the envelope the agent builds.
    """
    import functools
    import time

    clock = timer or time.perf_counter
    provs = _providers("cloud", providers)
    work = [_prepare_cloud(e, samples, threads=threads, providers=provs, repeats=repeats,
                           clock=clock) for e in entries if e.manifest.kind != "edge_only"]
    tail_s, tail_out = _interleave(
        [[functools.partial(_run_batch, w.tail, w.batchable, [f]) for f in w.feeds]
         for w in work], clock)
    per_batch: list[dict[str, dict[str, float]]] = [{} for _ in work]
    for b in sorted(set(batches)):
        calls = []
        for w in work:
            jobs = [w.feeds[i % len(w.feeds)] for i in range(b)]
            if b > 1:
                _run_batch(w.tail, w.batchable, jobs)  # warm-up at this shape
            calls.append([functools.partial(_run_batch, w.tail, w.batchable, jobs)] *
                         max(1, repeats) if b > 1 else [])
        times, _ = _interleave(calls, clock)
        for k in range(len(work)):
            p50 = float(stats_ms(times[k] if b > 1 else tail_s[k])["p50"])  # 1: as tail_ms
            per_batch[k][str(b)] = {"p50_ms": p50, "throughput_rps":
                                    round(b * 1000.0 / p50, 3) if p50 > 0 else 0.0}
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        out[e.split_id] = {"kind": e.kind, "dir": e.dir, "input_codec": e.input_codec}
    for k, w in enumerate(work):
        m = w.entry.manifest
        sizes = [len(_result(p, r[0], m)) for p, r in zip(w.payloads, tail_out[k],
                                                          strict=False)]
        out[m.split_id].update(
            samples_per_request=w.per_request, decode_ms=stats_ms(w.decode_s),
            tail_ms=stats_ms(tail_s[k]), result_bytes=round(sum(sizes) / len(sizes)),
            batchable=w.batchable, batches=per_batch[k])
        log.info("cloud %s (%s): tail p50 %.3f ms", m.split_id, m.kind,
                 out[m.split_id]["tail_ms"]["p50"])
    return out


class SpacedTimer:
    """A timer that idles ``gap_s`` before every timed span (every span here is a pair of
    calls, start and end): the runs then start from an idle CPU, as at a low rate."""

    def __init__(self, gap_s: float, base: Timer | None = None,
                 sleep: Callable[[float], object] | None = None) -> None:
        import time

        self.gap_s = gap_s
        self.base = base or time.perf_counter
        self.sleep = sleep or time.sleep
        self._calls = 0

    def __call__(self) -> float:
        if self._calls % 2 == 0:
            self.sleep(self.gap_s)
        self._calls += 1
        return self.base()


def profile(artifacts: str | Path, side: str, *, threads: int | None = None,
            speed: float = 1.0, samples: str | Path | None = None,
            batches: Sequence[int] = DEFAULT_BATCHES, repeats: int | None = None,
            max_samples: int = DEFAULT_MAX_SAMPLES, providers: Sequence[str] | None = None,
            gap_s: float = 0.0, timer: Timer | None = None) -> dict[str, Any]:
    """The whole profile document of ``artifacts`` measured on this machine.

    ``gap_s`` idles that long before every timed run (:class:`SpacedTimer`), so each
    figure is what a device or a worker sees at a low request rate, from an idle CPU
    (on a small VM a head timed back to back can take half as long as after 100 ms idle).
    """
    import datetime
    import math

    from splitinfer.errors import BadInputError

    if side not in ("edge", "cloud"):
        raise BadInputError(f"--side {side!r}: expected edge or cloud")
    if max_samples < 1 or (repeats is not None and repeats < 1) or any(
            b < 1 for b in batches):
        raise BadInputError("expected --max-samples, --repeats and every --batches entry "
                            ">= 1")
    model, sha, entries = find_splits(artifacts)
    specs = entries[0].manifest.inputs
    arrays = (load_samples(samples, specs, limit=max_samples) if samples is not None
              else random_samples(specs, max_samples))
    n = len(next(iter(arrays.values())))
    if threads is None:
        threads = 1 if side == "edge" else 0
    if threads < 0:
        raise BadInputError(f"--threads {threads}: expected >= 0 (0 = onnxruntime's default)")
    if not (math.isfinite(gap_s) and gap_s >= 0):
        raise BadInputError(f"--gap-ms {gap_s * 1e3!r}: expected milliseconds >= 0")
    if gap_s > 0:
        timer = SpacedTimer(gap_s, timer)
    if side == "edge":
        splits = profile_edge(entries, arrays, threads=threads, speed=speed,
                              repeats=repeats or 1, providers=providers, timer=timer)
    else:
        splits = profile_cloud(entries, arrays, threads=threads, batches=batches,
                               repeats=repeats or 3, providers=providers, timer=timer)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {"format": PROFILE_FORMAT, "side": side, "model": model, "source_sha256": sha,
            "machine": machine_info(), "threads": threads,
            "speed": float(speed) if side == "edge" else 1.0, "samples": n,
            "providers": _providers(side, providers), "gap_s": gap_s,
            "measured_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "splits": splits}


# --- CLI ---------------------------------------------------------------------------------


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,2,4,8, got {text!r}")
    return values


def format_table(doc: Mapping[str, Any]) -> str:
    """One line per split: the figures a reader checks first."""
    lines = [f"{doc['side']} profile of {doc['model']} on {doc['machine']['hostname']} "
             f"({doc['threads']} threads, speed {doc['speed']:g}, {doc['samples']} samples)"]
    for sid, s in doc["splits"].items():
        if doc["side"] == "edge":
            lines.append(f"  {sid:<44} {s['kind']:<10} head p50 {s['head_ms']['p50']:9.3f} ms"
                         f"  encode {s['encode_ms']['p50']:7.3f} ms  "
                         f"{s['request_bytes']:>9} B")
        elif "tail_ms" in s:
            top = max(s["batches"], key=int)
            lines.append(f"  {sid:<44} {s['kind']:<10} tail p50 {s['tail_ms']['p50']:9.3f} ms"
                         f"  decode {s['decode_ms']['p50']:7.3f} ms  batch {top}: "
                         f"{s['batches'][top]['throughput_rps']:.0f} req/s")
        else:
            lines.append(f"  {sid:<44} {s['kind']:<10} (runs on the device)")
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> int:
    import json

    from splitinfer.errors import EXIT_OK

    doc = profile(args.artifacts, args.side, threads=args.threads, speed=args.speed,
                  samples=args.samples, batches=args.batches, repeats=args.repeats,
                  max_samples=args.max_samples, gap_s=args.gap_ms / 1e3,
                  providers=[p for p in args.providers.split(",") if p] if args.providers
                  else None)
    text = json.dumps(doc, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text if args.json else format_table(doc))
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "profile", help="time every split of a bundle on this machine (edge or cloud side)",
        description="Measure, on the machine that runs them, the heads (--side edge) or the "
        "tails (--side cloud) of every split in a bundle, and the bytes that cross; the "
        "JSON feeds `splitinfer plan` and the adaptive edge agent.")
    p.add_argument("--artifacts", required=True, metavar="DIR",
                   help="a bundle (splitinfer bundle), a split folder or a folder of them")
    p.add_argument("--side", required=True, choices=("edge", "cloud"))
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="onnxruntime intra-op threads (default: 1 on the edge side, as a "
                   "fleet device; 0 = onnxruntime's default on the cloud side, as the worker)")
    p.add_argument("--speed", type=float, default=1.0, metavar="F",
                   help="record F times the measured head time (the fleet's --speed: a "
                   "device F times slower); edge side only")
    p.add_argument("--samples", metavar="NPZ", help="model inputs by name (default: random "
                   "inputs of the declared shapes)")
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES, metavar="N",
                   help=f"samples used (default {DEFAULT_MAX_SAMPLES})")
    p.add_argument("--batches", type=_batches, default=DEFAULT_BATCHES, metavar="1,2,4,8",
                   help="cloud side: batch sizes timed (default "
                   f"{','.join(map(str, DEFAULT_BATCHES))}, up to the worker's --max-batch)")
    p.add_argument("--repeats", type=int, default=None, metavar="R",
                   help="passes over the samples (default 1 on the edge side, 3 on the cloud "
                   "side; also the runs per batch size)")
    p.add_argument("--gap-ms", type=float, default=0.0, metavar="MS",
                   help="idle this long before every timed run, so the figures are those "
                   "of a device or worker at a low request rate (e.g. 100 for 1 req/s; "
                   "default 0: back to back)")
    p.add_argument("--providers", default=None, metavar="P1,P2",
                   help="onnxruntime execution providers (default: CPU on the edge side, "
                   "CUDA when present else CPU on the cloud side, as the worker)")
    p.add_argument("-o", "--output", metavar="PROFILE.json", help="write the profile here")
    p.add_argument("--json", action="store_true", help="print the profile JSON")
    p.set_defaults(func=_command)
