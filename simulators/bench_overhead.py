"""``splitinfer bench overhead``: what splitinfer adds on top of physics.

End-to-end p50 through the real path (edge agent → broker → worker process → back) beside
the floor measured in the same run:

    floor = head alone (onnxruntime) + tail alone (onnxruntime)
            + a raw MQTT echo of the same payload size through the same broker

The worker and the echo each run in their own process. The four measurements are taken
in turn for every request (head, tail, echo, real request), so drift in the machine's speed
and the state of its caches hit all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer.cli import env_default
from splitinfer.errors import BadInputError, StartupError

__all__ = ["add_parser", "run", "resolve_model", "ZOO"]

Array = np.ndarray[Any, Any]
ZOO = ("mobilenet_v2", "resnet18", "digits_cnn")
TARGET_BYTES = 100_000


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("overhead", help="end-to-end p50 beside head + tail + raw MQTT echo",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2",
                   help=f"ONNX file, or a built-in architecture: {', '.join(ZOO)} "
                   "(default mobilenet_v2 at 224x224)")
    p.add_argument("--at", help="cut tensor(s), comma separated (default: the single-tensor "
                   "cut whose activation is closest to 100 KB)")
    p.add_argument("--broker", default=env_default("--broker"),
                   help="broker URL (default: start a latency-tuned mosquitto)")
    p.add_argument("--requests", type=int, default=200, help="measured requests (default 200)")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads for head and tail (default 1)")
    p.add_argument("--head-in-thread", choices=("auto", "yes", "no"), default="auto",
                   help="run the head in a worker thread (frees the agent's event loop) or "
                   "inline; default: as the edge agent decides")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def resolve_model(spec: str, workdir: Path) -> Path:
    if Path(spec).is_file():
        return Path(spec)
    from splitter import zoo

    if spec == "mobilenet_v2":
        return zoo.mobilenet_v2(workdir / "mobilenet_v2.onnx")
    if spec == "resnet18":
        return zoo.resnet18(workdir / "resnet18.onnx")
    if spec == "digits_cnn":
        return zoo.digits_cnn_path()
    raise BadInputError(f"--model {spec!r}: no such file and not one of {', '.join(ZOO)}")


def _p50(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, 50))


def run(args: argparse.Namespace) -> int:
    from splitter import list_cuts, make_samples, split_model

    if args.requests < 1:
        raise BadInputError(f"--requests {args.requests}: expected at least 1")
    with tempfile.TemporaryDirectory(prefix="splitinfer-bench-") as tmp:
        work = Path(tmp)
        model = resolve_model(args.model, work)
        if args.at:
            cut = [n for n in args.at.split(",") if n]
        else:
            singles = [(c, c.bytes_per_sample) for c in list_cuts(model, max_tensors=1)
                       if c.bytes_per_sample and 0 < c.head_flops_share < 1]
            best, _ = min(singles, key=lambda cb: abs(cb[1] - TARGET_BYTES))
            cut = [t.name for t in best.tensors]
        split = split_model(model, cut, work / "split", num_samples=2)
        sample = make_samples(model, 1, seed=1)
        report = asyncio.run(_measure(args, split.manifest.parent, sample))
    report.update({"model": args.model, "cut": cut, "split_id": split.split_id,
                   "activation_bytes": split.manifest_obj.bytes_per_sample})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _spawn(cmd: list[str], log: Path, ready: str, timeout: float = 60.0,
           ) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with its output in ``log``; return once ``ready`` appears there."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise StartupError(f"{' '.join(cmd[2:5])} did not start: "
                               f"{log.read_text(errors='replace')[-800:]}")
        time.sleep(0.05)
    return proc


async def _measure(args: argparse.Namespace, split_dir: Path, sample: Mapping[str, Array],
                   ) -> dict[str, Any]:
    import onnxruntime as ort

    from cloud_service.registry import session_options
    from edge_agent import AgentConfig, EdgeAgent, OrtHead
    from simulators.broker import MosquittoBroker
    from splitinfer.manifest import Manifest
    from splitinfer.mqtt import BrokerConfig, connect
    from splitinfer.wire import REQUEST, Envelope, WireTensor, encode

    manifest = Manifest.load(split_dir)
    broker = None
    url = args.broker
    if url is None:
        broker = MosquittoBroker()
        broker.start()
        url = broker.url
    # The floor runs the head and the tail with the very session settings the edge agent
    # and the worker use, so the ratio measures only what lies between them.
    head = OrtHead(manifest.resolve(split_dir, "head"), threads=args.threads)
    tail = ort.InferenceSession(str(manifest.resolve(split_dir, "tail")),
                                session_options(args.threads),
                                providers=["CPUExecutionProvider"])
    cut = head.run(sample)
    payload = encode(Envelope(
        kind=REQUEST, request_id="0" * 32, device_id="bench-dev", split_id=manifest.split_id,
        tensors=[WireTensor(s.name, cut[s.name], s.quantization) for s in manifest.cut],
        deadline=time.time(), reply_to="splitinfer/v1/res/bench-dev",
        timestamps={"created": 0.0, "head_start": 0.0, "head_end": 0.0, "sent": 0.0}))
    prefix = f"bench{os.getpid()}"
    # -v: the worker logs "serving" at INFO once it has subscribed.
    worker = _spawn([sys.executable, "-m", "splitinfer.cli", "-v", "cloud", "serve",
                     "--broker", url, "--artifacts", str(split_dir), "--group", prefix,
                     "--prefix", prefix, "--max-batch", "1", "--max-delay-ms", "0",
                     "--threads", str(args.threads)], split_dir / "worker.log", "serving")
    echo = _spawn([sys.executable, "-m", "simulators.echo", "--broker", url, "--listen",
                   f"{prefix}/echo/req", "--answer", f"{prefix}/echo/res"],
                  split_dir / "echo.log", "echo ready")
    knobs: dict[str, Any] = {}
    if args.head_in_thread != "auto":
        knobs["head_in_thread"] = args.head_in_thread == "yes"
    agent = EdgeAgent.from_artifacts(split_dir, config=AgentConfig(
        device_id="bench-dev", broker=url, prefix=prefix, timeout_s=30.0, **knobs),
        threads=args.threads)
    client, protocol = await connect(BrokerConfig.from_url(url), f"{prefix}-echo-client")
    times: dict[str, list[float]] = {"head": [], "tail": [], "echo": [], "e2e": []}
    stages: list[dict[str, float]] = []
    try:
        await client.subscribe(f"{prefix}/echo/res", qos=1)
        await agent.start()
        await agent.infer(dict(sample), timeout=60.0)  # worker up, sessions warm
        for _ in range(20):
            await agent.infer(dict(sample))
        # One request at a time, its floor measured right beside it: head, tail, echo,
        # then the real path. Head and tail thus run with the caches the other half and
        # the broker left, as they do in split inference (a floor from tight loops of one
        # model with hot caches is a floor no pipeline of two models could reach).
        for _ in range(args.requests):
            t0 = time.perf_counter()
            head.run(sample)
            t1 = time.perf_counter()
            tail.run(None, cut)
            t2 = time.perf_counter()
            await client.publish(f"{prefix}/echo/req", payload, qos=1)
            async for _msg in client.messages:
                break
            t3 = time.perf_counter()
            result = await agent.infer(dict(sample))
            t4 = time.perf_counter()
            times["head"].append(t1 - t0)
            times["tail"].append(t2 - t1)
            times["echo"].append(t3 - t2)
            times["e2e"].append(t4 - t3)
            stages.append(dict(result.timings))
    finally:
        await agent.close()
        await client.__aexit__(None, None, None)
        for proc in (worker, echo):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if broker is not None:
            broker.close()
    from edge_agent.stats import summarize

    floor = _p50(times["head"]) + _p50(times["tail"]) + _p50(times["echo"])
    e2e = _p50(times["e2e"])
    return {
        "e2e_p50_ms": round(e2e, 4),
        "floor_p50_ms": round(floor, 4),
        "ratio": round(e2e / floor, 4),
        "payload_bytes": len(payload),
        "head_p50_ms": round(_p50(times["head"]), 4),
        "tail_p50_ms": round(_p50(times["tail"]), 4),
        "echo_p50_ms": round(_p50(times["echo"]), 4),
        "requests": len(times["e2e"]),
        "mqtt_protocol": protocol,
        "broker": "external" if broker is None else "mosquitto (latency-tuned, loopback)",
        "stages_ms": {k: v.get("p50") for k, v in summarize(stages).items()},
    }


def _print(r: Mapping[str, Any]) -> None:
    print(f"model {r['model']} cut {','.join(r['cut'])}: activation {r['activation_bytes']} B, "
          f"payload {r['payload_bytes']} B, MQTT {r['mqtt_protocol']}, {r['requests']} requests")
    print(f"  floor p50  {r['floor_p50_ms']:9.3f} ms = head {r['head_p50_ms']:.3f} + tail "
          f"{r['tail_p50_ms']:.3f} + raw MQTT echo {r['echo_p50_ms']:.3f}")
    print(f"  e2e p50    {r['e2e_p50_ms']:9.3f} ms")
    print(f"  ratio      {r['ratio']:9.3f}  (e2e / floor)")
    print("  stages p50 " + ", ".join(f"{k} {v:.3f}" for k, v in r["stages_ms"].items() if v))
