"""The cloud tail on a GPU: onnxruntime's CUDA provider beside the CPU, on the same splits.

    python bench/bench_gpu_tail.py                 # needs onnxruntime-gpu and a CUDA GPU
    python bench/bench_gpu_tail.py --json --out DIR

For each split (MobileNetV2 cut at ``block12.add`` with a float cut and with an int8 cut,
ResNet-18 static-int8 QDQ cut in the middle) it loads the tail the way a worker does
(:class:`cloud_service.registry.Tail`) once on ``CUDAExecutionProvider`` and once on the
CPU, then reports:

- **agreement**: max abs diff of the outputs and top-1 agreement on 64 samples (a GPU
  computes a QDQ tail in float and may use TF32: not bit-exact with the CPU's int8 kernels);
- **raw throughput** per batch size, numpy in and out (host↔device copies included);
- **worker throughput**: the worker core (:class:`cloud_service.worker.Worker`: decode,
  checks, dynamic batching, tail, encode; the publisher is a stub, no broker) answering
  ``--requests`` requests from 64 devices, GPU vs CPU; with ``--processes 1,2,4`` also
  the total rate of that many worker cores in separate processes at once, each with its
  own session on the same GPU (what replicas in one ``--group`` are).

With no CUDA provider it says so and exits 2; the CPU figures are still printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer import ort_config

BATCHES = (1, 8, 32, 128)


def _splits(work: Path) -> list[tuple[str, Callable[[], Path]]]:
    """(label, build) per split; building is lazy so one failure costs one row."""
    from splitter import list_cuts, split_model, zoo
    from splitter.quantize import quantize_static
    from splitter.surgery import quantize_cut

    def mnv2(int8: bool) -> Path:
        model = work / "mobilenet_v2.onnx"
        if not model.exists():
            zoo.mobilenet_v2(model)
        out = work / ("mnv2_i8" if int8 else "mnv2_f32")
        split_model(model, "block12.add", out, num_samples=2)
        if int8:
            quantize_cut(out)
        return out

    def resnet_qdq() -> Path:
        resnet = zoo.resnet18(work / "resnet18.onnx")
        rng = np.random.default_rng(1)
        calib = {"input": rng.random((16, 3, 224, 224), np.float32)}
        q_path = quantize_static(resnet, calib, work / "resnet18_int8.onnx")
        cuts = [c for c in list_cuts(q_path) if len(c.tensors) == 1 and c.quantized]
        cut = cuts[len(cuts) // 2]
        out = work / "r18_i8"
        split_model(q_path, list(cut.names), out, num_samples=2)
        return out

    return [("mobilenet_v2 float cut at block12.add", lambda: mnv2(False)),
            ("mobilenet_v2 int8 cut at block12.add", lambda: mnv2(True)),
            ("resnet18 int8 QDQ, middle int8 cut", resnet_qdq)]


def _activations(directory: Path, n: int) -> list[np.ndarray[Any, Any]]:
    import onnxruntime as ort

    from bench.bench_batching import _random_inputs
    from splitinfer.manifest import Manifest

    manifest = Manifest.load(directory)
    head = ort.InferenceSession(str(manifest.resolve(directory, "head")),
                                ort_config.apply(ort.SessionOptions()),
                                providers=["CPUExecutionProvider"])
    return list(head.run([s.name for s in manifest.cut], _random_inputs(manifest, n)))


def _raw(tail: Any, acts: list[np.ndarray[Any, Any]], seconds: float) -> dict[str, float]:
    rates = {}
    for batch in BATCHES:
        reps = -(-batch // acts[0].shape[0])
        feeds = [np.concatenate([a] * reps)[:batch] for a in acts]
        for _ in range(3):
            tail.run(feeds)
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
            tail.run(feeds)
            runs += 1
        rates[str(batch)] = round(runs * batch / elapsed, 1)
    return rates


def _worker(tail: Any, acts: list[np.ndarray[Any, Any]], requests: int,
            max_batch: int, barrier: Any = None) -> dict[str, float]:
    from cloud_service.config import Config
    from cloud_service.registry import Registry
    from cloud_service.worker import Incoming, Worker
    from splitinfer.topics import Topics, topic_name
    from splitinfer.wire import REQUEST, Envelope, WireTensor, encode

    topics = Topics("gpu")
    specs = tail.manifest.cut
    payloads = []
    for i in range(requests):
        device = f"dev-{i % 64}"
        j = i % acts[0].shape[0]
        env = Envelope(kind=REQUEST, request_id=f"r{i}", device_id=device,
                       split_id=tail.split_id,
                       tensors=[WireTensor(s.name, a[j:j + 1], s.quantization)
                                for s, a in zip(specs, acts, strict=True)])
        topic = topics.request(topic_name(tail.manifest.model), device)
        payloads.append(Incoming(topic, encode(env)))
    answered = 0

    async def publish(topic: str, payload: bytes, correlation: bytes | None) -> None:
        nonlocal answered
        answered += 1

    async def main() -> float:
        config = Config(artifacts=Path("."), prefix="gpu", max_batch=max_batch,
                        queue_size=requests + 1)
        worker = Worker(config, Registry([tail]), publish)
        if barrier is not None:
            barrier.wait()  # every process starts together
        start = time.perf_counter()
        for k, msg in enumerate(payloads):
            worker.submit(msg)
            if k % 64 == 63:
                await asyncio.sleep(0)  # let answers out, as a server's loop would
        await worker.drain()
        elapsed = time.perf_counter() - start
        await worker.aclose()
        return elapsed

    elapsed = asyncio.run(main())
    end = time.time()
    if answered != requests:
        raise SystemExit(f"worker answered {answered} of {requests} requests")
    return {"requests": requests, "max_batch": max_batch,
            "samples_per_s": round(requests / elapsed, 1), "start": end - elapsed, "end": end}


def _scaling_child(directory: str, providers: list[str], requests: int, max_batch: int,
                   barrier: Any, results: Any) -> None:
    from cloud_service.registry import Tail

    try:
        tail = Tail.open(directory, providers=providers)
        acts = _activations(Path(directory), 64)
        results.put(_worker(tail, acts, requests, max_batch, barrier))
    except BaseException as exc:
        barrier.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def _scaling(directory: Path, providers: list[str], counts: list[int], requests: int,
             max_batch: int) -> dict[str, Any]:
    """Worker cores in N processes at once, each with its own session on the same
    device (what several ``cloud serve`` replicas in one group are): total rate."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out: dict[str, Any] = {}
    for n in counts:
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_scaling_child, args=(str(directory), providers,
                                                          requests, max_batch, barrier,
                                                          results)) for _ in range(n)]
        for proc in procs:
            proc.start()
        rows = [results.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join(60)
        errors = [r["error"] for r in rows if "error" in r]
        if errors:
            out[str(n)] = {"error": errors[0]}
            continue
        span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
        out[str(n)] = round(sum(r["requests"] for r in rows) / span, 1)
    return out


def _measure(label: str, directory: Path, args: argparse.Namespace,
             has_cuda: bool) -> dict[str, Any]:
    from cloud_service.registry import Tail

    acts = _activations(directory, 64)
    cpu = Tail.open(directory, providers=["CPUExecutionProvider"])
    row: dict[str, Any] = {"split": label, "split_id": cpu.split_id,
                           "cut_bytes": cpu.manifest.bytes_per_sample}
    ref = cpu.run(acts)
    row["cpu_raw_samples_per_s"] = _raw(cpu, acts, args.seconds)
    row["cpu_worker"] = _worker(cpu, acts, args.requests // 4, args.max_batch)
    if has_cuda:
        gpu = Tail.open(directory, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        row["gpu_session_providers"] = gpu.session.get_providers()
        got = gpu.run(acts)
        row["max_abs_diff"] = float(max(np.max(np.abs(a.astype(np.float64) - b))
                                        for a, b in zip(got, ref, strict=True)))
        row["top1_agreement"] = float(np.mean(got[0].reshape(64, -1).argmax(1)
                                              == ref[0].reshape(64, -1).argmax(1)))
        row["gpu_raw_samples_per_s"] = _raw(gpu, acts, args.seconds)
        row["gpu_worker"] = _worker(gpu, acts, args.requests, args.max_batch)
    for key in ("cpu_worker", "gpu_worker"):
        for stamp in ("start", "end"):
            row.get(key, {}).pop(stamp, None)
    if args.processes:
        counts = [int(n) for n in args.processes.split(",")]
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda \
            else ["CPUExecutionProvider"]
        row["worker_processes_samples_per_s"] = _scaling(directory, providers, counts,
                                                         args.requests, args.max_batch)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per raw batch size")
    parser.add_argument("--requests", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--processes", default="",
                        help="also run the worker core in N processes at once, each with "
                        "its own session (comma separated counts, e.g. 1,2,4,8)")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    report: dict[str, Any] = {"onnxruntime": ort.__version__,
                              "available_providers": ort.get_available_providers(),
                              "cpus": os.cpu_count(), "splits": []}
    has_cuda = "CUDAExecutionProvider" in report["available_providers"]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for label, build in _splits(Path(tmp)):
            try:
                row = _measure(label, build(), args, has_cuda)
            except Exception as exc:  # one split's failure is a finding, not the end
                row = {"split": label, "error": f"{type(exc).__name__}: {exc}"}
            report["splits"].append(row)
            if not args.json:
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_tail.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    if not has_cuda:
        print(f"no CUDAExecutionProvider in onnxruntime {ort.__version__} "
              f"({report['available_providers']}): install onnxruntime-gpu", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
