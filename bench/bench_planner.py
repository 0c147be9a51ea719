"""``splitinfer bench planner``: the cost model's predictions against the fleet, per split.

For each model (MobileNetV2 int8, ResNet-18 int8 from :mod:`splitter.zoo`, quantized with
``splitinfer quantize``) the bench builds a bundle (``--cuts`` int8 cuts + edge only +
cloud only raw + cloud only JPEG 90), profiles it (``splitinfer profile``'s code, ``--side
edge --speed 8`` and ``--side cloud``, one onnxruntime thread each as the fleet's devices
and the bench's worker, each timed run after ``--profile-gap`` idle seconds as at 1 req/s:
:class:`SpacedTimer`; each split right before it is measured), predicts every split's p50
on each link with :mod:`splitinfer.costmodel` and then *measures* it: one fleet device
(real head slowed ``--speed`` times, :class:`~simulators.fleet_support.SlowHead`) with that
split pinned,
Poisson 1 req/s, through that link's shaping proxy, a tuned mosquitto and one worker
serving the bundle (both started once for all runs of a model). edge_only crosses no
link: it is measured once per model and stands on every link.

Printed: predicted beside measured p50 per (link, split); the MAPE over all pairs
(target <= 10 %); per link the recommended split's measured p50 beside the best measured
one (target within 5 %) and beside the baselines (edge only, cloud only raw, cloud only
JPEG: does splitting pay?). The cost model's two per-machine constants (broker hop, device
overhead) are its defaults, or ``--broker-ms``/``--agent-ms``; ``--calibrate`` measures
them (digits CNN).

Inputs: smooth synthetic images (a random 8x8 field upsampled, plus mild noise), so the
JPEG baseline compresses like a photograph rather than like white noise; the same samples
feed the calibration, the profiles and the fleet.

Also runs as a script::

    python bench/bench_planner.py                       # MobileNetV2 + ResNet-18 int8, 3g/4g/wifi
    python bench/bench_planner.py --models mobilenet_v2 --links wifi --duration 10
    python bench/bench_planner.py --workdir /tmp/planner --plot docs/img/planner.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "main", "SpacedTimer", "build_bundle", "smooth_images",
           "summarize", "MODELS"]

MODELS = ("mobilenet_v2", "resnet18")
TARGET_MAPE = 10.0
TARGET_BEST = 5.0
SETTLE_S = 3.0  # idle seconds after the worker's start-up, before the first profile


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("planner", help="plan's predicted p50 per split and link beside the "
                       "fleet's measured p50 (MAPE, recommended vs best, vs the baselines)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma separated, of {', '.join(MODELS)} (default both)")
    p.add_argument("--resolution", type=int, default=64,
                   help="input H = W (default 64: cloud only raw fits 3g's 1.1 Mbit/s at "
                   "1 req/s, and the whole bench runs in ~15 min on 2 cores)")
    p.add_argument("--links", default="3g,4g,wifi", help="link profiles (default 3g,4g,wifi)")
    p.add_argument("--cuts", type=int, default=3, help="int8 cuts besides the baselines "
                   "(default 3)")
    p.add_argument("--speed", type=float, default=8.0, help="device slowdown (default 8)")
    p.add_argument("--rate", type=float, default=1.0, help="requests/s of the device "
                   "(default 1)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per pair "
                   "(default 20)")
    p.add_argument("--seed", type=int, default=0, help="the arrivals' seed (default 0)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per pair")
    p.add_argument("--profile-gap", type=float, default=0.1, metavar="S",
                   help="idle seconds before each timed run of the profiles (default 0.1: "
                   "as at 1 req/s; 0 = back to back, as `splitinfer profile`)")
    p.add_argument("--broker-ms", type=float, help="one broker hop in ms (default: the cost "
                   "model's constant; --calibrate measures it)")
    p.add_argument("--agent-ms", type=float, help="the device's own overhead per request in "
                   "ms (default: the cost model's constant; --calibrate measures it)")
    p.add_argument("--calibrate", action="store_true", help="only measure the cost model's "
                   "per-machine constants (broker hop, device overhead) with the digits CNN "
                   "and print them (~80 s)")
    p.add_argument("--workdir", help="keep bundles, profiles and fleet reports here (reused "
                   "when present); default a temporary folder")
    p.add_argument("--plot", metavar="PNG", help="the plan's plot of the first model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


# ---- inputs and bundles --------------------------------------------------------------------


def smooth_images(count: int, resolution: int, seed: int = 0) -> Any:
    """``count`` NCHW float32 images, ImageNet-normalised range: a random 8x8 field per
    channel upsampled bilinearly, plus N(0, 0.05) noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((count, 3, 8, 8)).astype(np.float32)
    grid = np.linspace(0, 7, resolution)
    i0 = np.floor(grid).astype(int).clip(0, 6)
    w = (grid - i0).astype(np.float32)
    rows = coarse[:, :, i0, :] * (1 - w)[None, None, :, None] + \
        coarse[:, :, i0 + 1, :] * w[None, None, :, None]
    img = rows[:, :, :, i0] * (1 - w) + rows[:, :, :, i0 + 1] * w
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    return img.astype(np.float32)


def build_bundle(model: str, resolution: int, out: Path, cuts: int) -> tuple[Path, Path]:
    """(bundle folder, samples NPZ) for ``model`` int8 at ``resolution``, reused if there:
    the zoo model, ``splitinfer quantize``'s code on the samples, then ``splitinfer bundle
    --cuts K --input-codec raw,jpeg:90`` (K int8 cuts + edge only + cloud only raw + JPEG)."""
    import numpy as np

    from splitinfer.errors import StartupError
    from splitter import zoo
    from splitter.quantize import quantize_static

    out.mkdir(parents=True, exist_ok=True)
    bundle_dir = out / "bundle"
    samples = out / "samples.npz"
    if (bundle_dir / "bundle.json").is_file() and samples.is_file():
        return bundle_dir, samples
    images = smooth_images(16, resolution)
    np.savez(samples, input=images)
    make = zoo.mobilenet_v2 if model == "mobilenet_v2" else zoo.resnet18
    fp32 = make(out / f"{model}.onnx", resolution=resolution)
    int8 = quantize_static(fp32, {"input": images[:8]}, out / f"{model}_int8.onnx")
    cmd = [sys.executable, "-m", "splitinfer.cli", "bundle", str(int8), "-o", str(bundle_dir),
           "--cuts", str(cuts), "--samples", str(samples), "--input-codec", "raw,jpeg:90"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StartupError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return bundle_dir, samples


class SpacedTimer:
    """A ``perf_counter`` for :func:`splitter.planner.profile.profile` that idles ``gap_s``
    before every timed run (its calls come in start/end pairs): the profile then times
    each head, encode, decode and tail as the device and the worker run them at 1 req/s,
    from an idle CPU. On this 2-core VM a head timed back to back takes about half of what
    it takes after 100 ms or more of idling (docs/planning.md, "Calibration"), and the
    fleet's devices and worker see the idle figure."""

    def __init__(self, gap_s: float) -> None:
        self.gap_s = gap_s
        self._calls = 0

    def __call__(self) -> float:
        if self._calls % 2 == 0 and self.gap_s > 0:
            time.sleep(self.gap_s)
        self._calls += 1
        return time.perf_counter()


def _profile_split(entry: Any, arrays: Mapping[str, Any], side: str, speed: float,
                   gap_s: float) -> dict[str, Any]:
    """One split's entry of ``splitinfer profile --side SIDE`` (its code, one onnxruntime
    thread, 16 samples x 2, each timed run after ``gap_s`` idle: :class:`SpacedTimer`)."""
    from splitter.planner.profile import profile_cloud, profile_edge

    if side == "edge":
        out = profile_edge([entry], arrays, threads=1, speed=speed, repeats=2,
                           timer=SpacedTimer(gap_s))
    else:
        out = profile_cloud([entry], arrays, threads=1, batches=(1, 2, 4, 8), repeats=2,
                            timer=SpacedTimer(gap_s))
    result: dict[str, Any] = out[entry.split_id]
    return result


def _document(side: str, model: str, sha: str, speed: float, gap_s: float,
              splits: Mapping[str, Any]) -> dict[str, Any]:
    """A ``splitinfer.profile/1`` document around per-split entries."""
    from splitter.planner.profile import PROFILE_FORMAT, machine_info

    return {"format": PROFILE_FORMAT, "side": side, "model": model, "source_sha256": sha,
            "machine": machine_info(), "threads": 1,
            "speed": speed if side == "edge" else 1.0, "samples": 16, "gap_s": gap_s,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "splits": dict(splits)}


# ---- the per-machine constants -----------------------------------------------------------


async def _calibrate(work: Path) -> dict[str, float]:
    """The cost model's two constants on this machine, from the digits CNN (its head and
    tail take a fraction of a millisecond, so what is left is overhead), one device at
    1 req/s for 30 s: ``agent`` = the fleet's "other" stage p50 (edge_only, no link;
    cloud_only over "lan"), ``broker`` = half the "broker_queue" p50 over "lan" (two hops,
    with the worker's handling and the shaping proxy's timer lateness)."""
    from simulators.fleet import Fleet, FleetConfig
    from simulators.fleet_support import WorkerPool
    from simulators.support.broker import MosquittoBroker
    from splitinfer.topics import DEFAULT_PREFIX
    from splitter import split_model, zoo

    root = work / "calibrate"
    for kind in ("edge_only", "cloud_only"):
        if not (root / kind / "manifest.json").is_file():
            split_model(zoo.digits_cnn_path(), kind, root / kind)
    broker = MosquittoBroker()
    broker.start()
    pool = WorkerPool(count=1, broker=broker.url, artifacts=root, prefix=DEFAULT_PREFIX,
                      group="bench", log_dir=root / "worker", threads=1)
    stages: dict[str, dict[str, float]] = {}
    try:
        pool.start()
        for kind, links in (("edge_only", ()), ("cloud_only", ("lan",))):
            cfg = FleetConfig(artifacts=root, split=kind, devices=1, rate=1.0, links=links,
                              duration_s=30.0, warmup_s=2.0, broker=broker.url, workers=0,
                              timeout_s=10.0, drain_s=5.0, out=root / f"fleet-{kind}",
                              png=False, seed=0)
            rep = (await Fleet(cfg).run()).report
            stages[kind] = {k: float(v["p50"] or 0.0)
                            for k, v in rep["stages_detail_ms"].items() if isinstance(v, dict)}
    finally:
        pool.stop()
        broker.close()
    return {"agent_ms": (stages["edge_only"]["other"] + stages["cloud_only"]["other"]) / 2,
            "broker_ms": stages["cloud_only"]["broker_queue"] / 2,
            "device_decode_ms": stages["cloud_only"]["decode"]}


# ---- the run ------------------------------------------------------------------------------


async def _measure(bundle: Path, samples: Path, split_dir: str, link: str | None, url: str,
                   args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from simulators.fleet import Fleet, FleetConfig

    cfg = FleetConfig(artifacts=bundle, split=split_dir, devices=1, rate=args.rate,
                      speed=args.speed, links=(link,) if link else (), duration_s=args.duration,
                      warmup_s=args.warmup, broker=url, workers=0, input=samples,
                      timeout_s=10.0, drain_s=5.0, out=out, png=False, seed=args.seed)
    result = await Fleet(cfg).run()
    rep = result.report
    return {"p50_ms": rep.get("p50_ms"), "answered": rep.get("answered"),
            "lost": rep.get("lost"), "timeouts": rep.get("timeouts")}


def _model_rows(model: str, args: argparse.Namespace, work: Path,
                log: Any) -> dict[str, Any]:
    import asyncio

    from simulators.fleet_support import WorkerPool
    from simulators.support.broker import MosquittoBroker
    from splitinfer.bundle import Bundle
    from splitinfer.costmodel import (
        DEFAULT_AGENT_S,
        DEFAULT_BROKER_S,
        LinkEstimate,
        costs_from_profiles,
        predict,
        recommend,
    )
    from splitinfer.link import LinkProfile
    from splitinfer.topics import DEFAULT_PREFIX, Topics, topic_name

    t0 = time.perf_counter()
    bundle_dir, samples = build_bundle(model, args.resolution, work / model, args.cuts)
    bundle = Bundle.load(bundle_dir)
    log(f"{model}: bundle of {len(bundle)} splits ({time.perf_counter() - t0:.0f} s)")
    from splitter.planner.profile import find_splits, load_samples

    name, sha, entries = find_splits(bundle_dir)
    arrays = load_samples(samples, entries[0].manifest.inputs, limit=16)
    by_id = {e.split_id: e for e in entries}
    links = [s.strip() for s in args.links.split(",") if s.strip()]
    topic_len = len(Topics(DEFAULT_PREFIX).request(topic_name(bundle.model), "d" * 12))
    broker = MosquittoBroker()
    broker.start()
    pool = WorkerPool(count=1, broker=broker.url, artifacts=bundle_dir, prefix=DEFAULT_PREFIX,
                      group="bench", log_dir=work / model / "worker", threads=1)
    rows: list[dict[str, Any]] = []
    edge_entries: dict[str, Any] = {}
    cloud_entries: dict[str, Any] = {}
    try:
        pool.start()
        time.sleep(SETTLE_S)  # the worker's start-up kept both cores busy: let them idle
        hop = DEFAULT_BROKER_S if args.broker_ms is None else args.broker_ms / 1e3
        agent = DEFAULT_AGENT_S if args.agent_ms is None else args.agent_ms / 1e3
        # Each split is profiled right before it is measured on every link, so that the
        # machine's drift (other load on the shared cores) separates the two by a minute,
        # not by the quarter hour of the whole bench.
        for s in bundle:
            entry = by_id[s.split_id]
            edge_entries[s.split_id] = _profile_split(entry, arrays, "edge", args.speed,
                                                      args.profile_gap)
            cloud_entries[s.split_id] = _profile_split(entry, arrays, "cloud", args.speed,
                                                       args.profile_gap)
            (cost,) = costs_from_profiles(
                _document("edge", name, sha, args.speed, args.profile_gap,
                          {s.split_id: edge_entries[s.split_id]}),
                _document("cloud", name, sha, args.speed, args.profile_gap,
                          {s.split_id: cloud_entries[s.split_id]}))
            edge_only: dict[str, Any] | None = None
            for link in links:
                estimate = LinkEstimate.from_profile(LinkProfile.parse(link))
                pred = predict(cost, estimate, load_rps=args.rate, device_rps=args.rate,
                               broker_s=hop, agent_s=agent, topic_len=topic_len)
                if s.kind == "edge_only" and edge_only is not None:
                    measured = edge_only  # no link: one measurement stands on every link
                else:
                    measured = asyncio.run(_measure(
                        bundle_dir, samples, s.dir, None if s.kind == "edge_only" else link,
                        broker.url, args, work / model / "fleet" / f"{link}-{s.dir}"))
                    if s.kind == "edge_only":
                        edge_only = measured
                rows.append({"model": model, "link": link, "split_id": s.split_id,
                             "dir": s.dir, "kind": s.kind, "input_codec": s.input_codec,
                             "prediction": pred.to_dict(),
                             "predicted_ms": pred.to_dict()["predicted_ms"], **measured})
                log(f"  {link:5s} {s.dir:18s} predicted {_f(rows[-1]['predicted_ms'])} ms, "
                    f"measured {_f(measured['p50_ms'])} ms ({time.perf_counter() - t0:.0f} s)")
    finally:
        pool.stop()
        broker.close()
    edge = _document("edge", name, sha, args.speed, args.profile_gap, edge_entries)
    cloud = _document("cloud", name, sha, args.speed, args.profile_gap, cloud_entries)
    (work / model / "edge.json").write_text(json.dumps(edge, indent=2) + "\n")
    (work / model / "cloud.json").write_text(json.dumps(cloud, indent=2) + "\n")
    order = {link: i for i, link in enumerate(links)}
    rows.sort(key=lambda r: order[r["link"]])  # stable: bundle order within a link
    recs = {}
    for link in links:
        preds = [r for r in rows if r["link"] == link]
        from splitinfer.costmodel import Prediction

        best = recommend([Prediction(r["split_id"], r["kind"], r["predicted_ms"] or math.inf,
                                     0, 0, 0, 0, 0, 0, 0, 0) for r in preds])
        recs[link] = None if best is None else best.split_id
    return {"model": model, "bundle": str(bundle_dir), "broker_hop_ms": hop * 1e3,
            "agent_ms": agent * 1e3,
            "rows": rows, "recommended": recs, "edge": edge, "cloud": cloud}


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def summarize(models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MAPE over every pair, recommended vs best measured, baselines per (model, link)."""
    errors = []
    per_link = []
    for m in models:
        rows = m["rows"]
        for r in rows:
            if r["p50_ms"] and r["predicted_ms"] is not None:
                r["error_pct"] = 100 * (r["predicted_ms"] - r["p50_ms"]) / r["p50_ms"]
                errors.append(abs(r["error_pct"]))
            else:
                r["error_pct"] = None
        for link, rec_id in m["recommended"].items():
            here = [r for r in rows if r["link"] == link and r["p50_ms"]]
            if not here:
                continue
            best = min(here, key=lambda r: r["p50_ms"])
            rec = next((r for r in here if r["split_id"] == rec_id), None)

            def of(kind: str, codec: str = "raw", here: list[dict[str, Any]] = here,
                   ) -> float | None:
                return next((r["p50_ms"] for r in here if r["kind"] == kind
                             and r["input_codec"] == codec), None)

            jpeg = next((r["p50_ms"] for r in here if r["kind"] == "cloud_only"
                         and r["input_codec"] != "raw"), None)
            per_link.append({
                "model": m["model"], "link": link, "recommended": rec["dir"] if rec else None,
                "recommended_ms": rec["p50_ms"] if rec else None, "best": best["dir"],
                "best_ms": best["p50_ms"],
                "gap_pct": None if rec is None else
                100 * (rec["p50_ms"] - best["p50_ms"]) / best["p50_ms"],
                "edge_only_ms": of("edge_only"), "cloud_only_raw_ms": of("cloud_only"),
                "cloud_only_jpeg_ms": jpeg})
    mape = statistics.fmean(errors) if errors else None
    gaps = [p["gap_pct"] for p in per_link if p["gap_pct"] is not None]
    return {"mape_pct": mape, "pairs": len(errors), "target_mape_pct": TARGET_MAPE,
            "max_gap_pct": max(gaps) if gaps else None, "target_gap_pct": TARGET_BEST,
            "per_link": per_link}


def report_text(models: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    lines = []
    for m in models:
        lines.append(f"\n{m['model']} (bundle {m['bundle']}; broker hop "
                     f"{m['broker_hop_ms']:.2f} ms, device overhead {m['agent_ms']:.2f} ms)")
        lines.append(f"  {'link':5s} {'split':18s} {'kind':10s} {'predicted':>9s} "
                     f"{'measured':>9s} {'error':>7s}")
        for r in m["rows"]:
            err = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
            mark = " <- recommended" if m["recommended"].get(r["link"]) == r["split_id"] else ""
            lines.append(f"  {r['link']:5s} {r['dir']:18s} {r['kind']:10s} "
                         f"{_f(r['predicted_ms']):>9s} {_f(r['p50_ms']):>9s} {err:>7s}{mark}")
    mape = summary["mape_pct"]
    lines.append(f"\nMAPE over {summary['pairs']} (link, split) pairs: "
                 f"{'-' if mape is None else f'{mape:.1f}'} % (target <= {TARGET_MAPE:g} %)")
    for p in summary["per_link"]:
        gap = "-" if p["gap_pct"] is None else f"{p['gap_pct']:+.1f} %"
        lines.append(f"{p['model']:12s} {p['link']:5s} recommended {p['recommended']} "
                     f"{_f(p['recommended_ms'])} ms vs best measured {p['best']} "
                     f"{_f(p['best_ms'])} ms: {gap} (target within {TARGET_BEST:g} %)")
    lines.append("\nit pays? measured p50, recommended split beside the baselines")
    for p in summary["per_link"]:
        rec = p["recommended_ms"]

        def vs(v: float | None, rec: float | None = rec) -> str:
            return "-" if v is None else f"{v:.1f} ms" + ("" if not rec else f" ({v / rec:.2f}x)")

        lines.append(f"{p['model']:12s} {p['link']:5s} recommended {_f(rec)} ms | edge only "
                     f"{vs(p['edge_only_ms'])} | cloud only raw {vs(p['cloud_only_raw_ms'])} | "
                     f"cloud only JPEG {vs(p['cloud_only_jpeg_ms'])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from splitinfer.errors import BadInputError

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise BadInputError(f"--models {m!r}: expected some of {', '.join(MODELS)}")
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-planner-")
        work = Path(tmp.name)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.calibrate:
        import asyncio

        from splitinfer.costmodel import DEFAULT_AGENT_S, DEFAULT_BROKER_S

        found = asyncio.run(_calibrate(work))
        print(f"broker hop        {found['broker_ms']:.2f} ms (the cost model's constant: "
              f"{DEFAULT_BROKER_S * 1e3:.2f} ms)")
        print(f"device overhead   {found['agent_ms']:.2f} ms (the cost model's constant: "
              f"{DEFAULT_AGENT_S * 1e3:.2f} ms)")
        print(f"device decode     {found['device_decode_ms']:.2f} ms (digits result; not in "
              "the profiles)")
        if args.json:
            print(json.dumps(found))
        if tmp is not None:
            tmp.cleanup()
        return 0
    t0 = time.perf_counter()
    log(f"bench planner: {', '.join(models)} at {args.resolution}x{args.resolution}, links "
        f"{args.links}, speed {args.speed:g}, {args.rate:g} req/s, {args.duration:g} s per pair "
        f"(cpus {os.cpu_count()})")
    results = [_model_rows(m, args, work, log) for m in models]
    summary = summarize(results)
    if args.plot and results:
        from splitinfer.link import LinkProfile
        from splitter.planner.plan import load_inputs, plan_link
        from splitter.planner.plot import plot_plan

        first = results[0]
        bundle, costs = load_inputs(first["bundle"], str(work / first["model"] / "edge.json"),
                                    str(work / first["model"] / "cloud.json"))
        plans = [plan_link(bundle, costs, LinkProfile.parse(link), load_rps=args.rate,
                           device_rps=args.rate, broker_s=first["broker_hop_ms"] / 1e3,
                           agent_s=first["agent_ms"] / 1e3)
                 for link in args.links.split(",")]
        plot_plan(plans, args.plot, title=f"{bundle.model} at {args.resolution}x"
                  f"{args.resolution}, device at --speed {args.speed:g}")
    elapsed = time.perf_counter() - t0
    if args.json:
        out = {"models": [{k: v for k, v in m.items() if k not in ("edge", "cloud")}
                          for m in results], "summary": summary, "elapsed_s": elapsed}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report_text(results, summary))
        print(f"\n({elapsed:.0f} s)")
    if tmp is not None:
        tmp.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/bench_planner.py [flags]``: the same as ``splitinfer bench planner``."""
    from splitinfer.errors import SplitInferError

    parser = argparse.ArgumentParser(prog="bench_planner")
    sub = parser.add_subparsers(dest="bench")
    add_parser(sub)
    args = parser.parse_args(["planner", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except SplitInferError as exc:
        print(f"bench planner: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
