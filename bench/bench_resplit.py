"""``splitinfer bench resplit``: adaptive devices re-splitting and answering offline (issue 9).

Two fleet runs of adaptive devices (``EdgeAgent.from_bundle``) over a bundle, each figure
printed beside its target:

* **re-split**: ``--devices`` (20) devices, ``--link-schedule wifi@0s,3g@20s,wifi@40s``,
  ``--duration`` (60) s. Per link change: every device changes split within 2 s (max and
  p95 of the delay from the change, as the proxies applied it, to each device's first
  switch after it), at most 2 switches per device per change, and 0 lost over the run.
* **offline**: the same devices on ``--link wifi`` with ``--faults link-cut@20s+10s``:
  every request due in the outage answered (on the device) within its deadline, splitting
  resumes within 2 s after the link returns (per device: the first request due after the
  return that the cloud served, and no local answer due later than 2 s after it), 0 lost.

**The bundle**: the digits CNN, int8 (static QDQ), bundled by ``splitinfer bundle`` (auto
cuts, the two baselines). Its whole model takes ~0.2 ms on this machine, far below any
network, so at ``--speed 60`` (a device 60 times slower: a microcontroller-class board) the
model takes ~12 ms on the device: on wifi the cloud (cloud_only, ~17 ms with the 5 ms
one-way delay) beats it, on 3g (75 ms each way) edge_only wins by far, so the best split
flips with each link change. A bigger model (MobileNetV2 int8 at --speed 8) flips too, but
20 devices of it would run 20 real heads and their tails on this machine's 2 cores, and
the figures would measure CPU contention rather than the chooser; ``--model mobilenet_v2``
(int8 at ``--resolution`` 128, 3 cuts + baselines + cloud_only JPEG, as the planner bench
builds it; devices at x8 sending its smooth sample images) runs it anyway: there the plan
flips between cloud_only JPEG (wifi, ~33 ms predicted) and edge_only (3g, ~128 ms).
``--bundle DIR`` runs any other bundle.

The devices plan with costs measured at start-up (no profiles: ``edge_agent.bundle_agent``
measures the heads once, the tails are assumed, then observed), exactly as a device given
only the bundle does. The per-request deadline is ``--timeout`` (1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "build_digits_bundle", "resplit_figures", "offline_figures"]

log = logging.getLogger(__name__)

SWITCH_TARGET_S = 2.0
MAX_SWITCHES = 2
RESUME_TARGET_S = 2.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("resplit", help="adaptive devices: re-split on link changes, answer "
                       "offline during a link cut (issue 9's two fleet targets)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle folder (default: build --model's "
                   "int8 bundle in a temporary folder)")
    p.add_argument("--model", choices=("digits", "mobilenet_v2"), default="digits",
                   help="the bundle to build (default digits; see above)")
    p.add_argument("--resolution", type=int, default=128,
                   help="mobilenet_v2 input size (default 128)")
    p.add_argument("--input", default=None,
                   help="npz of samples the devices send (default: the model's own samples; "
                   "random inputs with --bundle)")
    p.add_argument("--only", choices=("resplit", "offline"), default=None,
                   help="run one of the two (default both)")
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--rate", type=float, default=1.0, help="requests/s per device (default 1)")
    p.add_argument("--arrivals", default="poisson")
    p.add_argument("--speed", type=float, default=None,
                   help="device compute factor (default 60 for digits, 8 for mobilenet_v2)")
    p.add_argument("--timeout", type=float, default=1.0, help="per-request deadline, s")
    p.add_argument("--duration", type=float, default=60.0, help="re-split run, s (default 60)")
    p.add_argument("--schedule", default="wifi@0s,3g@20s,wifi@40s")
    p.add_argument("--offline-duration", type=float, default=40.0,
                   help="offline run, s (default 40: 20 s before the cut, 10 s after it)")
    p.add_argument("--offline-link", default="wifi")
    p.add_argument("--faults", default="link-cut@20s+10s")
    p.add_argument("--offline-rate", type=float, default=None,
                   help="requests/s per device in the offline run (default --rate)")
    p.add_argument("--edge-profile", default=None,
                   help="profile JSONs the devices plan with (default: the agent's own "
                   "start-up measurement and assumptions)")
    p.add_argument("--cloud-profile", default=None)
    p.add_argument("--reconnect-max", type=float, default=1.0,
                   help="devices' longest reconnect pause, s (default 1; the agent's own "
                   "default of 2 s alone may use up the 2 s resume target)")
    p.add_argument("--broker", default=None, help="broker URL (default: start a mosquitto)")
    p.add_argument("--out", default=None, help="reports here (default reports/bench-resplit-*)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON only")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.set_defaults(func=run)


def build_digits_bundle(out: Path) -> Path:
    """The digits CNN, int8, as ``splitinfer bundle`` writes it (auto cuts + baselines)."""
    from splitter.bundle import build_bundle
    from splitter.quantize import quantize_static
    from splitter.zoo import digits_calibration_path, digits_cnn_path

    out.mkdir(parents=True, exist_ok=True)
    int8 = quantize_static(digits_cnn_path(), digits_calibration_path(),
                           out / "digits_cnn.int8.onnx")
    build_bundle(int8, out / "bundle", num_samples=4)
    return out / "bundle"


# ---- figures ---------------------------------------------------------------------------


def _p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    import numpy as np

    return round(float(np.percentile(np.asarray(values), 95)), 4)


def resplit_figures(report: Mapping[str, Any], devices: Sequence[str], *,
                    end_s: float) -> dict[str, Any]:
    """Per link change after the first entry: which devices switched, how soon, how often.

    ``devices``: every device id of the run (a device that never switched counts as a
    miss); ``end_s``: the end of the measured window (the last change's segment ends there).
    """
    schedule = report["link_schedule"]
    by_dir = {s["split_id"]: s["dir"] for s in (report.get("bundle") or {}).get("splits", [])}
    changes = []
    for k, entry in enumerate(schedule):
        if entry["t_s"] <= 0 and k == 0:
            continue  # the starting link, not a change
        t = entry["applied_s"] if entry.get("applied_s") is not None else entry["t_s"]
        nxt = schedule[k + 1] if k + 1 < len(schedule) else None
        until = (nxt["applied_s"] if nxt and nxt.get("applied_s") is not None else
                 nxt["t_s"] if nxt else end_s)
        inside = [s for s in report["switches"] if t <= s["t_s"] < until]
        first: dict[str, float] = {}
        count: Counter[str] = Counter()
        last: dict[str, str] = {}
        for s in inside:
            first.setdefault(s["device"], s["t_s"] - t)
            count[s["device"]] += 1
            last[s["device"]] = s["to"]
        delays = [first[d] for d in devices if d in first]
        missing = [d for d in devices if d not in first]
        changes.append({
            "link": entry["link"], "at_s": round(t, 4), "until_s": round(until, 4),
            "devices": len(devices), "switched": len(delays), "not_switched": len(missing),
            "max_delay_s": round(max(delays), 4) if delays else None,
            "p95_delay_s": _p95(delays),
            "within_target": sum(1 for v in delays if v <= SWITCH_TARGET_S),
            "max_switches_per_device": max(count.values(), default=0),
            "switches": len(inside),
            "ended_on": dict(Counter(by_dir.get(v, v) for v in last.values())),
            "ok": not missing and bool(delays) and max(delays) <= SWITCH_TARGET_S
            and max(count.values(), default=0) <= MAX_SWITCHES,
        })
    return {"changes": changes, "lost": report["lost"],
            "ok": bool(changes) and all(c["ok"] for c in changes) and report["lost"] == 0}


def offline_figures(report: Mapping[str, Any], outcomes: Sequence[Any], devices: int, *,
                    timeout_s: float) -> dict[str, Any]:
    """During every lasting fault: requests due answered (locally) within the deadline; after
    it: when each device's requests went back to the cloud."""
    windows = []
    for w in report["during_faults"]:
        back = w["end_s"]
        first_cloud: dict[int, float] = {}
        late_local: dict[int, float] = {}
        for o in sorted(outcomes, key=lambda o: o.due_s):
            if o.kind != "answered" or o.due_s < back:
                continue
            if o.served_by == "cloud":
                first_cloud.setdefault(o.device, o.due_s - back)
            elif o.due_s - back > RESUME_TARGET_S:
                late_local[o.device] = max(late_local.get(o.device, 0.0), o.due_s - back)
        resumed = list(first_cloud.values())
        # when each device's chooser learnt the connection was back (it resumes splitting
        # on that call): arrival-free, unlike the first cloud answer
        reconnected: dict[str, float] = {}
        for e in (report.get("adaptive") or {}).get("connectivity", []):
            if e["connected"] and e["t_s"] >= w["start_s"]:
                reconnected.setdefault(e["device"], e["t_s"] - back)
        resume = list(reconnected.values())
        windows.append({
            **w, "deadline_s": timeout_s,
            "all_answered_in_deadline": w["sent"] > 0 and w["within_deadline"] == w["sent"],
            "all_local": w["served_locally"] == w["answered"],
            "devices": devices, "devices_reconnected": len(resume),
            "max_resume_s": round(max(resume), 4) if resume else None,
            "p95_resume_s": _p95(resume),
            "devices_cloud_again": len(resumed),
            "max_first_cloud_answer_s": round(max(resumed), 4) if resumed else None,
            "p95_first_cloud_answer_s": _p95(resumed),
            "local_answers_due_later_than_target": len(late_local),
            "ok": (w["sent"] > 0 and w["within_deadline"] == w["sent"] and w["lost"] == 0
                   and len(resume) == devices and max(resume) <= RESUME_TARGET_S
                   and not late_local),
        })
    return {"windows": windows, "lost": report["lost"],
            "ok": bool(windows) and all(w["ok"] for w in windows) and report["lost"] == 0}


# ---- the runs --------------------------------------------------------------------------


def _fleet(args: argparse.Namespace, bundle: Path, out: Path, **kwargs: Any) -> Any:
    from simulators.fleet import Fleet, FleetConfig

    config = FleetConfig(artifacts=bundle, devices=args.devices, speed=args.speed,
                         input=Path(args.input) if args.input else None,
                         edge_profile=Path(args.edge_profile) if args.edge_profile else None,
                         cloud_profile=Path(args.cloud_profile) if args.cloud_profile else None,
                         timeout_s=args.timeout, arrivals=args.arrivals, warmup_s=3.0,
                         broker=args.broker, workers=1, out=out,
                         reconnect_max_s=args.reconnect_max, **kwargs)
    fleet = Fleet(config)
    result = asyncio.run(fleet.run())
    return result, [d.agent.device_id for d in fleet._devices]


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def format_resplit(fig: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    c = report["config"]
    links = ", ".join(f"{e['link']}@{e['t_s']:g}s" for e in report["link_schedule"])
    lines = [f"re-split: {c['devices']} adaptive devices x {c['rate_per_device']:g}/s "
             f"({c['arrivals']}), {c['duration_s']:g} s, speed x{c['speed']:g}, links {links}"]
    lines.append(f"  splits used {_dirs(report)}; served locally {report['served_locally']} "
                 f"of {report['answered']}; p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms")
    for c in fig["changes"]:
        lines.append(f"  -> {c['link']} at {c['at_s']:.3f} s: {c['switched']}/{c['devices']} "
                     f"devices switched (target all)  max delay {c['max_delay_s']} s, p95 "
                     f"{c['p95_delay_s']} s (target <= {SWITCH_TARGET_S:g} s)  max switches/"
                     f"device {c['max_switches_per_device']} (target <= {MAX_SWITCHES})  "
                     f"ended on {c['ended_on']}  [{_mark(c['ok'])}]")
    lines.append(f"  lost {fig['lost']} (target 0)  [{_mark(fig['lost'] == 0)}]")
    return "\n".join(lines)


def format_offline(fig: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    c = report["config"]
    lines = [f"offline: {c['devices']} adaptive devices x {c['rate_per_device']:g}/s, "
             f"{c['duration_s']:g} s, deadline {c['timeout_s']:g} s"]
    lines.append(f"  splits used {_dirs(report)}; served locally {report['served_locally']} "
                 f"of {report['answered']}; p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms")
    for w in fig["windows"]:
        lines.append(f"  {w['fault']}: due {w['sent']}, answered {w['answered']}, within the "
                     f"deadline {w['within_deadline']} (target all), on the device "
                     f"{w['served_locally']} {w['fallbacks']}, max {w['max_ms']} ms, lost "
                     f"{w['lost']}  [{_mark(w['all_answered_in_deadline'] and w['lost'] == 0)}]")
        lines.append(f"  after the link returned at {w['end_s']:.3f} s: splitting resumed on "
                     f"{w['devices_reconnected']}/{w['devices']} devices, max "
                     f"{w['max_resume_s']} s, p95 {w['p95_resume_s']} s after (target <= "
                     f"{RESUME_TARGET_S:g} s)  [{_mark(w['ok'])}]")
        lines.append(f"    request view: {w['devices_cloud_again']}/{w['devices']} devices' "
                     f"first cloud answer due max {w['max_first_cloud_answer_s']} s, p95 "
                     f"{w['p95_first_cloud_answer_s']} s after (includes the wait for the "
                     f"device's next request); devices with a local answer due > "
                     f"{RESUME_TARGET_S:g} s after: {w['local_answers_due_later_than_target']}"
                     " (target 0)")
    lines.append(f"  lost {fig['lost']} (target 0)  [{_mark(fig['lost'] == 0)}]")
    return "\n".join(lines)


def _dirs(report: Mapping[str, Any]) -> dict[str, int]:
    by_dir = {s["split_id"]: s["dir"] for s in (report.get("bundle") or {}).get("splits", [])}
    return {by_dir.get(k, k): v for k, v in report["splits_used"].items()}


def run(args: argparse.Namespace) -> int:
    logging.getLogger("edge_agent").setLevel(logging.ERROR)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    out = Path(args.out or f"reports/bench-resplit-{time.strftime('%Y%m%d-%H%M%S')}")
    figures: dict[str, Any] = {}
    texts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="splitinfer-bench-resplit-") as tmp:
        if args.speed is None:
            args.speed = 8.0 if args.model == "mobilenet_v2" else 60.0
        if args.bundle:
            bundle = Path(args.bundle)
        elif args.model == "mobilenet_v2":
            from bench.bench_planner import build_bundle

            bundle, samples = build_bundle("mobilenet_v2", args.resolution, Path(tmp) / "mnv2", 3)
            args.input = args.input or str(samples)
        else:
            bundle = build_digits_bundle(Path(tmp))
        if args.only in (None, "resplit"):
            result, ids = _fleet(args, bundle, out / "resplit", rate=args.rate,
                                 duration_s=args.duration, link_schedule=args.schedule)
            fig = resplit_figures(result.report, ids, end_s=args.duration)
            figures["resplit"] = {**fig, "report": str(out / "resplit" / "report.json")}
            texts.append(format_resplit(fig, result.report))
        if args.only in (None, "offline"):
            result, ids = _fleet(args, bundle, out / "offline",
                                 rate=args.offline_rate or args.rate,
                                 duration_s=args.offline_duration,
                                 links=(args.offline_link,), faults=args.faults)
            fig = offline_figures(result.report, result.outcomes, len(ids),
                                  timeout_s=args.timeout)
            figures["offline"] = {**fig, "report": str(out / "offline" / "report.json")}
            texts.append(format_offline(fig, result.report))
    ok = all(f["ok"] for f in figures.values())
    figures["ok"] = ok
    (out / "bench_resplit.json").write_text(json.dumps(figures, indent=2) + "\n")
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print("\n\n".join(texts))
        print(f"\nall targets met: {'yes' if ok else 'NO'}   (figures: "
              f"{out / 'bench_resplit.json'})")
    return 1 if args.check and not ok else 0
