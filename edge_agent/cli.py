"""``splitinfer edge run``: push a file of samples through a split, head here, tail remote.

::

    splitinfer edge run --broker mqtt://broker:1883 --artifacts artifacts/digits_cnn-… \\
        --input IN.npz --output OUT.npz [--device-id cam-7] [--json]

IN.npz holds one array per model input, keyed by input name, samples along the first axis
(other keys, e.g. ``label``, are ignored with a note). Samples go out ``--batch-size`` per
request, ``--concurrency`` requests in flight. OUT.npz gets one array per model output,
in manifest order, written only when every request succeeded. ``--json`` prints counts and
p50/p95/p99 (ms) of end-to-end latency and of each stage (see :mod:`edge_agent.stats`).

Every flag also reads ``SPLITINFER_<FLAG>`` (e.g. ``SPLITINFER_BROKER``). Exit codes: 0 ok,
1 some requests failed, 2 bad input (files, names, dtypes), 3 broker unreachable.
This module only builds the parser; numpy, onnxruntime and paho load inside ``run``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import TYPE_CHECKING, Any

from splitinfer.cli import env_default
from splitinfer.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, BadInputError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from edge_agent.client import EdgeAgent, InferenceResult
    from splitinfer.manifest import Manifest

__all__ = ["register", "run"]

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("edge", help="the device side: run the head, send the cut over "
                            "MQTT, get the tail's result",
                            description="Device-side commands of splitinfer.")
    parser.set_defaults(func=functools.partial(_usage, parser))
    commands = parser.add_subparsers(dest="edge_command", metavar="COMMAND")
    run_parser = commands.add_parser(
        "run", help="run samples from an .npz through a split (head here, tail remote)",
        description="Push a file of samples through a split: the head runs here, the tail "
        "on cloud workers. OUT.npz is written only when every request succeeded.",
        epilog="Every flag also reads SPLITINFER_<FLAG> (e.g. SPLITINFER_BROKER). Exit codes: "
        "0 ok, 1 some requests failed, 2 bad input, 3 broker unreachable.")
    add_run_arguments(run_parser)
    run_parser.set_defaults(func=run)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    def flag(name: str, default: str | None = None, *, optional: bool = False,
             **kwargs: Any) -> None:
        value = env_default(name, default)
        p.add_argument(name, default=value, required=value is None and not optional, **kwargs)

    flag("--broker", DEFAULT_BROKER, metavar="URL",
         help="mqtt[s]://[user@]host[:port][?protocol=5|3.1.1&ca=&cert=&key=] "
              f"(default {DEFAULT_BROKER})")
    flag("--artifacts", metavar="DIR",
         help="a split directory written by 'splitinfer split' (manifest.json + head.onnx)")
    flag("--input", metavar="IN.npz", help="one array per model input, keyed by input name")
    flag("--output", metavar="OUT.npz", help="where to write one array per model output")
    flag("--device-id", optional=True, metavar="ID", dest="device_id",
         help="client id and topic level of this device (default edge-<hostname>-<random>)")
    flag("--prefix", "splitinfer", help="topic prefix (default splitinfer)")
    flag("--timeout", "10", type=float, metavar="S", help="deadline per request, seconds")
    flag("--batch-size", "1", type=int, metavar="N", dest="batch_size",
         help="samples per request (default 1)")
    flag("--concurrency", "1", type=int, metavar="N",
         help="requests in flight at once (default 1: latency without self-queueing)")
    flag("--threads", "0", type=int, metavar="N",
         help="onnxruntime intra-op threads for the head (default 0: onnxruntime decides)")
    p.add_argument("--json", action="store_true",
                   default=env_default("--json", "") not in ("", "0", "false"),
                   help="print a JSON summary (counts, latency percentiles per stage)")


def _usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parser.print_help(sys.stderr)
    return EXIT_BAD_INPUT


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import time

    from edge_agent.client import AgentConfig, EdgeAgent
    from edge_agent.stats import LatencyStats
    from edge_agent.sync import default_device_id

    if args.batch_size < 1 or args.concurrency < 1:
        raise BadInputError(f"--batch-size and --concurrency must be >= 1, got "
                            f"{args.batch_size} and {args.concurrency}")
    config = AgentConfig(device_id=args.device_id or default_device_id(), broker=args.broker,
                         prefix=args.prefix, timeout_s=args.timeout)
    agent = EdgeAgent.from_artifacts(args.artifacts, config=config,
                                     threads=args.threads or None)
    arrays, ignored = read_inputs(args.input, agent.manifest)
    if ignored:
        print(f"splitinfer edge run: note: ignoring {ignored} in {args.input} (not inputs of "
              f"{agent.manifest.model}: {list(arrays)})", file=sys.stderr)
    samples = len(next(iter(arrays.values())))
    started = time.perf_counter()
    results = asyncio.run(_drive(agent, arrays, samples, args.batch_size, args.concurrency))
    wall = time.perf_counter() - started

    stats = LatencyStats()
    first_error: Exception | None = None
    for item in results:
        if isinstance(item, Exception):
            stats.fail(str(getattr(item, "code", type(item).__name__)))
            first_error = first_error or item
        else:
            stats.add(item.timings)
    written = None
    outputs: dict[str, Any] = {}
    if first_error is None:
        outputs = _concatenate(results, agent.manifest)
        with open(args.output, "wb") as fh:
            import numpy as np

            np.savez(fh, **outputs)  # type: ignore[arg-type]  # numpy stubs match **kw to allow_pickle
        written = args.output
    summary = {
        "split_id": agent.manifest.split_id,
        "model": agent.manifest.model,
        "device_id": config.device_id,
        "broker": _public_url(args.broker),
        "protocol": agent.protocol,
        "input": args.input,
        "output": written,
        "samples": samples,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "ignored_keys": ignored,
        **stats.summary(),
        "wall_s": round(wall, 4),
        "samples_per_s": round(samples / wall, 2) if wall > 0 else None,
        "outputs": {k: {"dtype": v.dtype.name, "shape": list(v.shape)}
                    for k, v in outputs.items()},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        e2e = summary["latency_ms"].get("e2e", {})
        print(f"{stats.ok}/{stats.ok + stats.failed} requests ok; e2e ms p50 "
              f"{e2e.get('p50', float('nan')):.2f} p95 {e2e.get('p95', float('nan')):.2f} "
              f"p99 {e2e.get('p99', float('nan')):.2f}"
              + (f"; wrote {written}" if written else ""))
    if first_error is not None:
        print(f"splitinfer edge run: error: {stats.failed} of {stats.ok + stats.failed} "
              f"requests failed (first: {first_error}); {args.output} not written",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def read_inputs(path: str, manifest: Manifest) -> tuple[dict[str, npt.NDArray[Any]], list[str]]:
    """The model inputs from an .npz (checked against the manifest) and the keys ignored."""
    import zipfile

    import numpy as np

    names = [spec.name for spec in manifest.inputs]
    try:
        with np.load(path, allow_pickle=False) as data:
            found = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file; expected an .npz with arrays {names}") \
            from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BadInputError(f"{path}: not a readable .npz of plain arrays ({exc}); expected "
                            f"arrays {names}") from exc
    missing = [n for n in names if n not in found]
    if missing:
        raise BadInputError(f"{path} lacks input(s) {missing}: expected one array per model "
                            f"input {names}, got keys {sorted(found)}")
    arrays = {n: found[n] for n in names}
    counts = {n: (a.shape[0] if a.ndim else 0) for n, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise BadInputError(f"{path}: every input needs the same, non-zero number of samples "
                            f"along the first axis, got {counts}")
    # the whole file at once: a bad dtype fails here, before any request is sent
    from edge_agent.client import check_tensors

    check_tensors(arrays, manifest.inputs, f"inputs in {path}", manifest.split_id)
    return arrays, sorted(set(found) - set(names))


async def _drive(agent: EdgeAgent, arrays: dict[str, npt.NDArray[Any]], samples: int,
                 batch: int, concurrency: int) -> list[InferenceResult | Exception]:
    import asyncio

    from splitinfer.errors import (
        DeadlineExceeded,
        RemoteError,
        TensorError,
        TransportError,
        WireError,
    )

    gate = asyncio.Semaphore(concurrency)

    async def one(start: int) -> InferenceResult | Exception:
        async with gate:
            chunk = {name: array[start:start + batch] for name, array in arrays.items()}
            try:
                return await agent.infer(chunk)
            except (RemoteError, DeadlineExceeded, TransportError, WireError,
                    TensorError) as exc:
                return exc

    async with agent:
        return list(await asyncio.gather(*(one(i) for i in range(0, samples, batch))))


def _concatenate(results: list[InferenceResult | Exception],
                 manifest: Manifest) -> dict[str, np.ndarray[Any, Any]]:
    import numpy as np

    done = [r for r in results if not isinstance(r, Exception)]
    return {spec.name: np.concatenate([r.outputs[spec.name] for r in done])
            for spec in manifest.outputs}


def _public_url(url: str) -> str:
    from splitinfer.mqtt import BrokerConfig

    return BrokerConfig.from_url(url).url()
