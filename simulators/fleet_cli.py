"""``splitinfer fleet``: a fleet of virtual devices against a broker and cloud workers.

One flag per :class:`~simulators.fleet.FleetConfig` field; each valued flag also reads an
environment variable (``--devices`` <-> ``SPLITINFER_DEVICES``; ``SPLITINFER_LINK`` takes
specs separated by ``;``). Cheap to import: the engine, numpy's
users, paho and matplotlib load only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from splitinfer.cli import env_default

__all__ = ["add_parser", "run", "config_from_args"]

DESCRIPTION = """\
Run N virtual devices (edge agents, one MQTT connection each, one asyncio process) against
a broker and cloud workers, and report what happened: sent, answered, errors, timeouts,
lost (sent - answered - errors - timeouts), latency p50/p95/p99/max from each request's
scheduled arrival, throughput, the per-stage breakdown (measured vs derived), the CPU each
process took, fault events and, with labelled --input, accuracy. Without --broker it starts
a latency-tuned mosquitto (or the embedded amqtt) and --workers 'splitinfer cloud serve'
processes. Writes report.json and fleet.png under --out.

examples:
  splitinfer fleet --artifacts split/ --devices 1000 --rate 1 --duration 60 --replay
  splitinfer fleet --artifacts split/ --devices 200 --link 4g --replay --duration 20
  splitinfer fleet --artifacts split/ --devices 8 --input test.npz --duration 10
  splitinfer fleet --artifacts split/ --devices 50 --replay --faults "cut-link@5s+3s"
  splitinfer fleet --artifacts bundle/ --devices 20 --link-schedule wifi@0s,3g@20s,wifi@40s
  splitinfer fleet --artifacts bundle/ --devices 20 --faults link-cut@20s+10s --link wifi
  splitinfer fleet --artifacts bundle/ --split cut_03 --devices 1 --link 3g --speed 8

With a bundle (splitinfer bundle) the devices are adaptive: each holds every head and
chooses the split per request (EdgeAgent.from_bundle), answering on the device when the
cloud cannot; --split pins one split of the bundle. The report then adds splits_used,
served_locally, per_split, switches and during_faults.

exit codes: 0 done (with --check: and nothing lost, p99 within --max-p99-ms); 1 --check
failed; 2 bad input; 3 could not start (broker, workers, devices).
"""


def _env(flag: str, default: object) -> Any:
    return env_default(flag, None if default is None else str(default))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="a fleet of virtual devices: latency, loss, stages, CPU",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    artifacts = env_default("--artifacts")
    p.add_argument("--artifacts", default=artifacts, required=artifacts is None,
                   help="a split directory, a folder of them (with --split), or a bundle "
                   "(adaptive devices) [SPLITINFER_ARTIFACTS]")
    p.add_argument("--split", default=_env("--split", None),
                   help="split id or directory name under --artifacts; with a bundle, pins "
                   "every device to that split [SPLITINFER_SPLIT]")
    p.add_argument("--link-schedule", default=_env("--link-schedule", ""),
                   metavar="PROFILE@T,...",
                   help="change every device link during the run, e.g. "
                   "'wifi@0s,3g@20s,wifi@40s' (times from the start of the measured window; "
                   "without --link the links start as the first entry)")
    p.add_argument("--edge-profile", default=_env("--edge-profile", None),
                   help="adaptive devices: the edge profile to plan with (splitinfer profile "
                   "--side edge; default: measured at start-up)")
    p.add_argument("--cloud-profile", default=_env("--cloud-profile", None),
                   help="adaptive devices: the cloud profile (default: assumed, then observed)")
    p.add_argument("--devices", type=int, default=_env("--devices", 10),
                   help="virtual devices (default %(default)s)")
    p.add_argument("--rate", type=float, default=_env("--rate", 1.0),
                   help="requests/s per device (default %(default)s)")
    p.add_argument("--duration", type=float, default=_env("--duration", 10.0),
                   help="measured seconds, after --warmup (default %(default)s)")
    p.add_argument("--arrivals", default=_env("--arrivals", "poisson"),
                   help="constant, poisson, bursty or batch, optionally with fields, e.g. "
                   "'bursty,on=2s,off=8s'; --rate sets the mean rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=_env("--seed", 0),
                   help="arrival schedule, link jitter/loss and random inputs (default 0)")
    p.add_argument("--replay", action="store_true",
                   help="send recorded head outputs (no head compute per request)")
    p.add_argument("--speed", type=float, default=_env("--speed", 1.0),
                   help="device compute factor: head time x F (e.g. 8 for a Raspberry Pi "
                   "class board); waits (F-1) x head time extra (default 1)")
    p.add_argument("--link", action="append", default=None, metavar="PROFILE|SPEC",
                   help="emulated link (3g, 4g, wifi, lan or a spec such as "
                   "'4g,loss=1%%'); repeat for groups: devices split evenly between them")
    p.add_argument("--faults", default=_env("--faults", ""),
                   help="e.g. 'broker-restart@20s,kill-worker@30s,cut-link@10s+5s' (times "
                   "from the start of the measured window); also restart-worker@T and "
                   "link-cut@T+D (every device link)")
    p.add_argument("--input", default=_env("--input", None),
                   help="npz: one array per model input (any number of samples), optional "
                        "'label' (accuracy); other keys are ignored with one warning")
    p.add_argument("--reference", default=_env("--reference", None),
                   help="unsplit ONNX model to compare answers with (default: the "
                   "manifest's source model, when found next to the split)")
    p.add_argument("--broker", default=_env("--broker", None),
                   help="use this broker URL (default: start a mosquitto)")
    p.add_argument("--embedded-broker", action="store_true",
                   help="start the embedded amqtt broker even when mosquitto is installed")
    p.add_argument("--workers", type=int, default=_env("--workers", 1),
                   help="cloud worker processes to start (default %(default)s; 0: workers "
                   "already serve --broker)")
    p.add_argument("--worker-threads", type=int, default=_env("--worker-threads", 1),
                   help="onnxruntime threads per worker (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=_env("--max-batch", None),
                   help="worker --max-batch (default: the worker's)")
    p.add_argument("--max-delay-ms", type=float, default=_env("--max-delay-ms", None),
                   help="worker --max-delay-ms (default: the worker's)")
    p.add_argument("--reconnect-max", type=float, default=_env("--reconnect-max", None),
                   help="devices' longest pause between reconnect attempts, s (default: the "
                   "agent's, 2 s)")
    p.add_argument("--retry-s", type=float, default=_env("--retry-s", None),
                   help="devices' first re-send of an unanswered request, s (0 = never; "
                   "default: the agent's)")
    p.add_argument("--retry-max-s", type=float, default=_env("--retry-max-s", None),
                   help="devices' longest pause between re-sends, s (default: the agent's)")
    p.add_argument("--timeout", type=float, default=_env("--timeout", 10.0),
                   help="per-request deadline in s (default %(default)s)")
    p.add_argument("--drain", type=float, default=_env("--drain", None),
                   help="s to wait for answers after the window (default timeout + 1); "
                   "what is still out then counts as lost")
    p.add_argument("--warmup", type=float, default=_env("--warmup", 1.0),
                   help="s of traffic before the window, left out of the figures "
                   "(default %(default)s)")
    p.add_argument("--connect-rate", type=float, default=_env("--connect-rate", 1000.0),
                   help="device connections per second while ramping up (default "
                   "%(default)s)")
    p.add_argument("--prefix", default=_env("--prefix", None),
                   help="topic prefix (default: a fresh one, or 'splitinfer' with "
                   "--workers 0)")
    p.add_argument("--mqtt", choices=("3.1.1", "5", "auto"), default=_env("--mqtt", "3.1.1"),
                   help="MQTT version of devices and workers (default %(default)s: the "
                   "envelope carries everything, and paho's MQTT 5 properties cost "
                   "CPU per message)")
    p.add_argument("--transport", choices=("auto", "paho"), default=_env("--transport", "auto"),
                   help="device MQTT client below the agent: auto = paho, the project's one "
                   "client (splitinfer.mqtt_client, TLS included); kept for scripts that "
                   "name it")
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=_env("--qos", 1))
    p.add_argument("--no-presence", action="store_true",
                   help="no retained online/offline status per device")
    p.add_argument("--record", type=int, default=_env("--record", 16),
                   help="replay: head outputs to record and cycle (default %(default)s)")
    p.add_argument("--out", default=_env("--out", None),
                   help="report directory (default reports/fleet-<time>-<id>)")
    p.add_argument("--no-png", action="store_true", help="skip the plot")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless nothing was lost (and p99 <= --max-p99-ms if given)")
    p.add_argument("--max-p99-ms", type=float, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON only")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~simulators.fleet.FleetConfig` the flags describe."""
    from simulators.fleet import FleetConfig

    links = args.link if args.link is not None else \
        [s for s in (env_default("--link") or "").split(";") if s]
    return FleetConfig(
        artifacts=Path(args.artifacts), split=args.split, devices=args.devices,
        rate=args.rate, duration_s=args.duration, arrivals=args.arrivals, seed=args.seed,
        replay=args.replay, speed=args.speed, links=tuple(links), faults=args.faults,
        link_schedule=args.link_schedule or "", reconnect_max_s=args.reconnect_max,
        retry_s=args.retry_s, retry_max_s=args.retry_max_s,
        edge_profile=Path(args.edge_profile) if args.edge_profile else None,
        cloud_profile=Path(args.cloud_profile) if args.cloud_profile else None,
        input=Path(args.input) if args.input else None,
        reference=Path(args.reference) if args.reference else None,
        broker=args.broker, embedded_broker=args.embedded_broker, workers=args.workers,
        worker_threads=args.worker_threads, max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms, timeout_s=args.timeout, drain_s=args.drain,
        warmup_s=args.warmup, connect_rate=args.connect_rate, prefix=args.prefix,
        mqtt=args.mqtt, transport=args.transport, qos=args.qos,
        presence=not args.no_presence, record=args.record,
        out=Path(args.out) if args.out else None, png=not args.no_png)


class _Bar:
    """tqdm when installed, else one self-rewriting line; both on stderr."""

    def __init__(self, total: float) -> None:
        self.total = total
        self._tqdm: Any = None
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed
        except ImportError:
            return
        self._tqdm = tqdm(total=round(total, 1), unit="s", file=sys.stderr, leave=False,
                          bar_format="{desc} {bar} {n:.0f}/{total:.0f} s {postfix}")

    def __call__(self, p: Any) -> None:
        text = f"sent {p.sent} answered {p.answered} failed {p.failed}"
        if self._tqdm is not None:
            self._tqdm.set_description_str(p.phase)
            self._tqdm.n = round(min(p.elapsed_s, self.total), 1)
            self._tqdm.set_postfix_str(text, refresh=False)
            self._tqdm.refresh()
        else:
            done = min(1.0, p.elapsed_s / self.total) if self.total else 1.0
            bar = "#" * int(30 * done)
            sys.stderr.write(f"\r{p.phase:6} [{bar:30}] {p.elapsed_s:5.0f}/{self.total:.0f} s "
                             f"{text}")
            sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\n")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from simulators.fleet import Fleet
    from simulators.report import format_report

    config = config_from_args(args)
    if getattr(args, "verbose", 0) == 0:
        # 1,000 agents each logging their reconnect after a broker restart drown the
        # report; the report counts reconnects and re-published requests instead.
        logging.getLogger("edge_agent").setLevel(logging.ERROR)
    # amqtt logs every health-check connection as an error
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    bar = _Bar(config.warmup_s + config.duration_s) \
        if sys.stderr.isatty() and not args.json else None
    try:
        result = asyncio.run(Fleet(config, progress=bar).run())
    finally:
        if bar is not None:
            bar.close()
    report = result.report
    if args.json:
        from simulators.fleet_stats import jsonable

        print(json.dumps(jsonable(report), indent=2))
    else:
        print(format_report(report))
    if args.check:
        failed = report["lost"] != 0 or (args.max_p99_ms is not None and (
            report["p99_ms"] is None or report["p99_ms"] > args.max_p99_ms))
        return 1 if failed else 0
    return 0
