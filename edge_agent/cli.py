"""``splitinfer edge run``: push a file of samples through a split, head here, tail remote.
(``splitinfer edge serve``, the long-running service, is :mod:`edge_agent.serve`.)

::

    splitinfer edge run --broker mqtt://broker:1883 --artifacts artifacts/digits_cnn-… \\
        --input IN.npz --output OUT.npz [--device-id cam-7] [--json]

IN.npz holds one array per model input, keyed by input name, samples along the first axis,
as many as it likes (other keys, e.g. ``label``, are ignored with one note on stderr).
Samples go out ``--batch-size`` per request (default 1; a split whose files are fixed at a
batch size B always sends B, the last request padded), ``--concurrency`` requests in
flight. OUT.npz gets one array per model output, in manifest order, written only when
every request succeeded. ``--json`` prints counts and p50/p95/p99 (ms) of end-to-end
latency and of each stage (see :mod:`edge_agent.stats`).

Re-sending: a request with no answer goes out again (same id, same deadline) after
``--retry-s`` (default 1 s; longer when the measured round trips are), doubling up to
``--retry-max-s`` (default 4 s), never past its deadline; ``--retry-s 0`` re-sends only
after a reconnect or a "no matching subscribers" while a worker is expected back. The
worker answers a copy from its cache; a second answer is dropped (``counters.duplicates``).

Fail fast: the first request that no worker answers — the broker's "no matching
subscribers" (MQTT 5) when this run has not seen a worker for ``worker_grace_s`` (10 s; at
once when none answered yet), or the first deadline passed — stops the run; requests in
flight are cancelled, the rest never sent, and the message names the request topic and the
command that starts a worker. ``--keep-going`` sends every request regardless. An ``edge_only``
split runs wholly here and needs no broker.

Adaptive (a bundle, ``splitinfer bundle``)::

    splitinfer edge run --artifacts BUNDLE --adaptive [--edge-profile E.json]
        [--cloud-profile C.json] [--link wifi] [--split ID] --input IN.npz --output OUT.npz

holds every head of the bundle on one connection and picks the split per request
(:mod:`edge_agent.adaptive`); when the cloud cannot answer in time it answers locally with
the bundle's edge_only split, so the run does not stop at a missing worker. Without
profiles the heads are measured here at start-up and the tails assumed from the bundle's
FLOPs shares (:mod:`edge_agent.bundle_agent`). ``--split ID`` pins one split (a split id or
its folder name). The summary says which split served how many requests, how many were
answered locally and why, and the switches.

Every flag also reads ``SPLITINFER_<FLAG>`` (e.g. ``SPLITINFER_BROKER``). Exit codes: 0 ok,
1 some requests failed or no worker answered, 2 bad input (files, names, dtypes, device
id), 3 broker unreachable.
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

__all__ = ["register", "run", "serve"]

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
        "0 ok, 1 some requests failed or no worker answered (the run stops at the first "
        "such request unless --keep-going), 2 bad input, 3 broker unreachable.")
    add_run_arguments(run_parser)
    run_parser.set_defaults(func=run)
    serve_parser = commands.add_parser(
        "serve", help="the long-running device service: a local HTTP API (POST /v1/infer, "
        "/healthz, /metrics) in front of the split",
        description="Serve a split (or a bundle) to the apps on this device through a local "
        "HTTP API, keeping the broker connection up; settings from a TOML file, the "
        "environment and flags (see docs/deploy-pi.md).",
        epilog="Every key is also SPLITINFER_<KEY> and --<key>; precedence flag > "
        "environment > file > default. Exit codes: 0 stopped by SIGTERM/SIGINT after "
        "draining, 2 bad settings or artifacts, 3 cannot start (address in use, state dir "
        "not writable). A broker that is down is retried, never an exit.")
    from edge_agent.serve_config import add_arguments as add_serve_arguments

    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(func=serve)


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
    flag("--retry-s", "1.0", type=float, metavar="S", dest="retry_s",
         help="re-send a request with no answer after S seconds (longer when the measured "
              "round trips are), doubling; 0: only after a reconnect or 'no matching "
              "subscribers' (default 1.0)")
    flag("--retry-max-s", "4.0", type=float, metavar="S", dest="retry_max_s",
         help="longest wait between re-sends of one request (default 4.0)")
    flag("--batch-size", optional=True, type=int, metavar="N", dest="batch_size",
         help="samples per request (default 1; a split fixed at batch B sends B)")
    flag("--concurrency", "1", type=int, metavar="N",
         help="requests in flight at once (default 1: latency without self-queueing)")
    flag("--threads", "0", type=int, metavar="N",
         help="intra-op threads for the head (default 0: measured at start, one per usable "
              "CPU where that is faster than one thread, else 1; LiteRT: one per core)")
    flag("--head-backend", "auto", choices=("auto", "onnx", "tflite"), dest="head_backend",
         help="run head.onnx on onnxruntime or head.tflite on LiteRT (splitinfer split "
              "--head-format tflite); auto: onnxruntime where installed, else LiteRT")
    p.add_argument("--keep-going", action="store_true", dest="keep_going",
                   default=env_default("--keep-going", "") not in ("", "0", "false"),
                   help="send every request even after one got no worker's answer "
                        "(default: stop at the first)")
    flag("--edge-profile", optional=True, metavar="E.json", dest="edge_profile",
         help="with a bundle: this device's profile (splitinfer profile --side edge; "
              "default: measure the heads at start-up)")
    flag("--cloud-profile", optional=True, metavar="C.json", dest="cloud_profile",
         help="with a bundle: the workers' profile (splitinfer profile --side cloud; "
              "default: tails assumed from the bundle's FLOPs shares)")
    flag("--link", optional=True, metavar="PROFILE|SPEC",
         help="with a bundle: the link to expect before anything is measured (3g, 4g, wifi, "
              "lan or a spec; default wifi)")
    flag("--split", optional=True, metavar="ID",
         help="with a bundle: serve this split only (split id or folder name)")
    p.add_argument("--adaptive", action="store_true",
                   default=env_default("--adaptive", "") not in ("", "0", "false"),
                   help="--artifacts is a bundle: choose the split per request, answer "
                        "locally when the cloud cannot")
    p.add_argument("--json", action="store_true",
                   default=env_default("--json", "") not in ("", "0", "false"),
                   help="print a JSON summary (counts, latency percentiles per stage)")


def serve(args: argparse.Namespace) -> int:
    from edge_agent.serve import main

    return main(args)


def _usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parser.print_help(sys.stderr)
    return EXIT_BAD_INPUT


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import time

    from edge_agent.bundle_agent import BundleAgent
    from edge_agent.client import AgentConfig, EdgeAgent
    from edge_agent.stats import LatencyStats
    from edge_agent.sync import default_device_id

    if (args.batch_size is not None and args.batch_size < 1) or args.concurrency < 1:
        raise BadInputError(f"--batch-size and --concurrency must be >= 1, got "
                            f"{args.batch_size} and {args.concurrency}")
    config = AgentConfig(device_id=args.device_id or default_device_id(), broker=args.broker,
                         prefix=args.prefix, timeout_s=args.timeout, retry_s=args.retry_s,
                         retry_max_s=args.retry_max_s)
    adaptive = _wants_bundle(args)
    agent: EdgeAgent
    if adaptive:
        agent = EdgeAgent.from_bundle(args.artifacts, config=config,
                                      edge_profile=args.edge_profile,
                                      cloud_profile=args.cloud_profile, link=args.link,
                                      split=args.split, threads=args.threads or None)
    else:
        agent = EdgeAgent.from_artifacts(args.artifacts, config=config,
                                         threads=args.threads or None,
                                         head_backend=args.head_backend)
    arrays, ignored = read_inputs(args.input, agent.manifest)
    if ignored:
        print(f"splitinfer edge run: note: ignoring {ignored} in {args.input} (not inputs of "
              f"{agent.manifest.model}: {list(arrays)})", file=sys.stderr)
    # a bundle's splits may differ in fixed batch: each call is chunked by its own split
    batch = (args.batch_size or 1) if adaptive else (agent.batch or args.batch_size or 1)
    if agent.batch and not adaptive and args.batch_size not in (None, agent.batch):
        print(f"splitinfer edge run: note: {agent.manifest.split_id} is fixed at batch "
              f"{agent.batch}; sending {agent.batch} sample(s) per request, not "
              f"{args.batch_size}", file=sys.stderr)
    samples = len(next(iter(arrays.values())))
    started = time.perf_counter()
    results, stopped = asyncio.run(_drive(agent, arrays, samples, batch, args.concurrency,
                                          keep_going=args.keep_going))
    wall = time.perf_counter() - started

    stats = LatencyStats()
    first_error: Exception | None = stopped
    skipped = sum(1 for item in results if item is None)
    for item in results:
        if item is None:
            continue
        if isinstance(item, Exception):
            stats.fail(str(getattr(item, "code", type(item).__name__)))
            first_error = first_error or item
        else:
            stats.add(item.timings, attempts=item.attempts)
    written = None
    outputs: dict[str, Any] = {}
    if first_error is None and not skipped:
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
        "protocol": agent.protocol or None,
        "kind": agent.kind,
        "input": args.input,
        "output": written,
        "samples": samples,
        "batch_size": batch,
        "concurrency": args.concurrency,
        "ignored_keys": ignored,
        **stats.summary(),
        "skipped": skipped,
        "stopped": str(stopped) if stopped is not None else None,
        "counters": agent.counters.as_dict(),
        "wall_s": round(wall, 4),
        "samples_per_s": round(samples / wall, 2) if wall > 0 else None,
        "outputs": {k: {"dtype": v.dtype.name, "shape": list(v.shape)}
                    for k, v in outputs.items()},
    }
    adaptive_summary = agent.summary() if isinstance(agent, BundleAgent) else None
    if adaptive_summary is not None:
        summary["kind"] = "bundle"
        summary["split_id"] = adaptive_summary["current"]
        summary["adaptive"] = adaptive_summary
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        e2e = summary["latency_ms"].get("e2e", {})
        print(f"{stats.ok}/{stats.ok + stats.failed} requests ok; e2e ms p50 "
              f"{e2e.get('p50', float('nan')):.2f} p95 {e2e.get('p95', float('nan')):.2f} "
              f"p99 {e2e.get('p99', float('nan')):.2f}"
              + (f"; wrote {written}" if written else ""))
        if adaptive_summary is not None:
            print(_adaptive_line(adaptive_summary))
    if stopped is not None:
        print(f"splitinfer edge run: error: {stopped}; stopped at the first request no "
              f"worker answered ({skipped} of {len(results)} requests cancelled or not sent; "
              f"--keep-going sends them all); {args.output} not written", file=sys.stderr)
        return EXIT_FAILED
    if first_error is not None:
        print(f"splitinfer edge run: error: {stats.failed} of {stats.ok + stats.failed} "
              f"requests failed (first: {first_error}); {args.output} not written",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _wants_bundle(args: argparse.Namespace) -> bool:
    """A bundle agent: --adaptive, or bundle-only flags, or a bundle folder as artifacts."""
    from pathlib import Path

    from splitinfer.bundle import is_bundle
    from splitinfer.manifest import MANIFEST_NAME

    bundle_flags = [f for f, v in (("--edge-profile", args.edge_profile),
                                   ("--cloud-profile", args.cloud_profile),
                                   ("--link", args.link), ("--split", args.split)) if v]
    bundle = is_bundle(args.artifacts)
    if (args.adaptive or bundle_flags) and not bundle:
        raise BadInputError(f"{args.artifacts}: not a bundle (no bundle.json); "
                            f"{'--adaptive' if args.adaptive else bundle_flags[0]} needs the "
                            "folder `splitinfer bundle MODEL.onnx -o DIR` writes")
    return bool(args.adaptive or bundle_flags or (
        bundle and not (Path(args.artifacts) / MANIFEST_NAME).is_file()))


def _adaptive_line(summary: dict[str, Any]) -> str:
    used = ", ".join(f"{split} {n}" for split, n in summary["splits_used"].items()) or "none"
    why = ", ".join(f"{k} {n}" for k, n in summary["fallbacks"].items())
    return (f"splits: {used}; answered locally {summary['served_locally']}"
            + (f" (fallback: {why})" if why else "")
            + f"; switches {len(summary['switches'])}; probes {summary['probes']}")


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

    check_tensors(arrays, manifest.inputs, f"inputs in {path}", manifest.split_id,
                  any_batch=True)
    return arrays, sorted(set(found) - set(names))


async def _drive(agent: EdgeAgent, arrays: dict[str, npt.NDArray[Any]], samples: int,
                 batch: int, concurrency: int, *, keep_going: bool = False,
                 ) -> tuple[list[InferenceResult | Exception | None], Exception | None]:
    """Every request's result or error, in input order (None: cancelled or never sent), and
    the failure that stopped the run (no worker answered), if one did."""
    import asyncio

    from splitinfer.errors import (
        DeadlineExceeded,
        NoSubscriberError,
        RemoteError,
        TensorError,
        TransportError,
        WireError,
    )

    starts = list(range(0, samples, batch))
    results: list[InferenceResult | Exception | None] = [None] * len(starts)
    queue = iter(range(len(starts)))  # shared: each runner takes the next request
    stopped: list[Exception] = []
    runners: list[asyncio.Task[None]] = []

    async def runner() -> None:
        for k in queue:
            if stopped:
                return
            chunk = {name: array[starts[k]:starts[k] + batch] for name, array in arrays.items()}
            try:
                results[k] = await agent.infer(chunk)
            except (NoSubscriberError, DeadlineExceeded) as exc:
                results[k] = exc
                if not keep_going and not stopped:
                    stopped.append(exc)
                    for task in runners:
                        if task is not asyncio.current_task():
                            task.cancel()
                    return
            except (RemoteError, TransportError, WireError, TensorError) as exc:
                results[k] = exc

    async with agent:
        runners.extend(asyncio.create_task(runner(), name=f"edge-run-{i}")
                       for i in range(min(concurrency, len(starts))))
        await asyncio.gather(*runners, return_exceptions=True)
    return results, stopped[0] if stopped else None


def _concatenate(results: list[InferenceResult | Exception | None],
                 manifest: Manifest) -> dict[str, np.ndarray[Any, Any]]:
    import numpy as np

    done = [r for r in results if r is not None and not isinstance(r, Exception)]
    return {spec.name: np.concatenate([r.outputs[spec.name] for r in done])
            for spec in manifest.outputs}


def _public_url(url: str) -> str:
    from splitinfer.mqtt import BrokerConfig

    return BrokerConfig.from_url(url).url()
