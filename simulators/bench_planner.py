"""``splitinfer bench planner``: the cost model's predictions against the fleet, per split.

For each model (MobileNetV2 int8, ResNet-18 int8 from :mod:`splitter.zoo`, quantized with
``splitinfer quantize``) the bench builds a bundle (``--cuts`` int8 cuts + edge only +
cloud only raw + cloud only JPEG 90), profiles it (``splitinfer profile --side edge
--speed 8`` and ``--side cloud``, one onnxruntime thread each, as the fleet's devices and
the bench's worker), predicts every split's p50 on each link with
:mod:`splitinfer.costmodel` and then *measures* it: one fleet device (real head slowed
``--speed`` times, :class:`~simulators.fleet_support.SlowHead`) with that split pinned,
Poisson 1 req/s, through that link's shaping proxy, a tuned mosquitto and one worker
serving the bundle (both started once for all runs of a model). edge_only crosses no
link: it is measured once per model and stands on every link.

Printed: predicted beside measured p50 per (link, split); the MAPE over all pairs
(target <= 10 %); per link the recommended split's measured p50 beside the best measured
one (target within 5 %) and beside the baselines (edge only, cloud only raw, cloud only
JPEG: does splitting pay?). The broker hop the model charges is measured here too, once,
by a raw MQTT echo through the same mosquitto (half its round trip), unless ``--broker-ms``.

Inputs: smooth synthetic images (a random 8x8 field upsampled, plus mild noise), so the
JPEG baseline compresses like a photograph rather than like white noise; the same samples
feed the calibration, the profiles and the fleet.
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

__all__ = ["add_parser", "run", "main", "build_bundle", "smooth_images", "summarize", "MODELS"]

MODELS = ("mobilenet_v2", "resnet18")
TARGET_MAPE = 10.0
TARGET_BEST = 5.0


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
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per pair "
                   "(default 15)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per pair")
    p.add_argument("--broker-ms", type=float, help="one broker hop in ms (default: measured "
                   "here by a raw MQTT echo)")
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


def _pick_cuts(cuts: Sequence[Any], count: int) -> list[Any]:
    """``count`` int8 single-tensor cuts, Pareto-useful: in each of ``count`` equal bands
    of head FLOPs share, the one with the fewest bytes."""
    pool = [c for c in cuts if c.kind == "split" and c.quantized and len(c.tensors) == 1
            and c.bytes_per_sample and 0.02 < c.head_flops_share < 0.98]
    chosen = []
    for i in range(count):
        lo, hi = 0.02 + i * 0.96 / count, 0.02 + (i + 1) * 0.96 / count
        band = [c for c in pool if lo <= c.head_flops_share < hi]
        if band:
            chosen.append(min(band, key=lambda c: (c.bytes_per_sample, -c.head_flops_share)))
    return chosen


def build_bundle(model: str, resolution: int, out: Path, cuts: int) -> tuple[Path, Path]:
    """(bundle folder, samples NPZ) for ``model`` int8 at ``resolution``; reused if built."""
    import numpy as np

    from splitinfer.bundle import Bundle, BundleSplit
    from splitinfer.manifest import sha256_file
    from splitter import list_cuts, split_model, zoo
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
    name = f"{model}_int8"
    splits = []
    plan: list[tuple[str, str | Sequence[str], str | None, float]] = [
        ("edge_only", "edge_only", None, 1.0)]
    for i, cut in enumerate(_pick_cuts(list_cuts(int8, input_shapes={
            "input": (1, 3, resolution, resolution)}), cuts)):
        plan.append((f"cut_{i + 1:02d}", list(cut.names), None, cut.head_flops_share))
    plan += [("cloud_only", "cloud_only", None, 0.0),
             ("cloud_only_jpeg90", "cloud_only", "jpeg:90", 0.0)]
    for folder, at, codec, share in plan:
        res = split_model(int8, at, bundle_dir / folder, samples=str(samples), model_name=name,
                          input_codec=codec)
        m = res.manifest_obj
        crossing = 0 if m.kind == "edge_only" else sum(
            int(np.prod([d if isinstance(d, int) else 1 for d in s.shape[1:]]))
            * np.dtype(s.dtype).itemsize for s in m.cut)
        extra: dict[str, Any] = {}
        if codec:
            info = json.loads(res.manifest.read_text()).get("verification", {})
            enc = info.get("input_codec", {}) if isinstance(info, Mapping) else {}
            crossing = int(enc.get("bytes_per_sample", crossing)) if isinstance(enc, Mapping) \
                else crossing
            if isinstance(enc, Mapping) and "agreement" in enc:
                extra["agreement"] = enc["agreement"]
        splits.append(BundleSplit(m.split_id, folder, m.kind, crossing, round(share, 4),
                                  input_codec=codec or "raw", extra=extra))
    Bundle(name, sha256_file(int8), tuple(splits), root=bundle_dir).save()
    return bundle_dir, samples


def _profile(bundle: Path, samples: Path, side: str, speed: float, out: Path) -> dict[str, Any]:
    if not out.is_file():
        cmd = [sys.executable, "-m", "splitinfer.cli", "profile", "--artifacts", str(bundle),
               "--side", side, "--threads", "1", "--samples", str(samples), "-o", str(out)]
        if side == "edge":
            cmd += ["--speed", str(speed)]
        else:
            cmd += ["--batches", "1,2,4,8"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            from splitinfer.errors import StartupError

            raise StartupError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    return data


# ---- the broker hop -----------------------------------------------------------------------


async def _broker_hop(url: str, workdir: Path, payload: int = 400, count: int = 60) -> float:
    """Half the p50 round trip of a raw MQTT echo (QoS 1) through the broker: one hop."""
    import asyncio

    from splitinfer.mqtt import BrokerConfig, connect

    echo = subprocess.Popen([sys.executable, "-m", "simulators.echo", "--broker", url,
                             "--listen", "bench/planner/req", "--answer", "bench/planner/res"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines = []
        while echo.stdout is not None:
            line = await asyncio.to_thread(echo.stdout.readline)
            lines.append(line)
            if b"echo ready" in line:
                break
            if not line:
                from splitinfer.errors import StartupError

                raise StartupError(f"echo did not start: {b''.join(lines)[-500:]!r}")
        client, _ = await connect(BrokerConfig.from_url(url), "bench-planner-echo")
        try:
            await client.subscribe("bench/planner/res", qos=1)
            times = []
            body = b"x" * payload
            for _ in range(count):
                t0 = time.perf_counter()
                await client.publish("bench/planner/req", body, qos=1)
                async for _msg in client.messages:
                    break
                times.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)
        finally:
            await client.__aexit__(None, None, None)
        return statistics.median(times[5:]) / 2
    finally:
        echo.terminate()
        echo.wait(10)


# ---- the run ------------------------------------------------------------------------------


async def _measure(bundle: Path, samples: Path, split_dir: str, link: str | None, url: str,
                   args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from simulators.fleet import Fleet, FleetConfig

    cfg = FleetConfig(artifacts=bundle, split=split_dir, devices=1, rate=args.rate,
                      speed=args.speed, links=(link,) if link else (), duration_s=args.duration,
                      warmup_s=args.warmup, broker=url, workers=0, input=samples,
                      timeout_s=10.0, drain_s=5.0, out=out, png=False, seed=1)
    result = await Fleet(cfg).run()
    rep = result.report
    return {"p50_ms": rep.get("p50_ms"), "answered": rep.get("answered"),
            "lost": rep.get("lost"), "timeouts": rep.get("timeouts")}


def _model_rows(model: str, args: argparse.Namespace, work: Path,
                log: Any) -> dict[str, Any]:
    import asyncio

    from simulators.broker import MosquittoBroker
    from simulators.fleet_support import WorkerPool
    from splitinfer.bundle import Bundle
    from splitinfer.costmodel import LinkEstimate, costs_from_profiles, predict, recommend
    from splitinfer.link import LinkProfile
    from splitinfer.topics import DEFAULT_PREFIX, Topics, topic_name

    t0 = time.perf_counter()
    bundle_dir, samples = build_bundle(model, args.resolution, work / model, args.cuts)
    bundle = Bundle.load(bundle_dir)
    log(f"{model}: bundle of {len(bundle)} splits ({time.perf_counter() - t0:.0f} s)")
    edge = _profile(bundle_dir, samples, "edge", args.speed, work / model / "edge.json")
    cloud = _profile(bundle_dir, samples, "cloud", args.speed, work / model / "cloud.json")
    costs = {c.split_id: c for c in costs_from_profiles(edge, cloud)}
    log(f"{model}: profiled ({time.perf_counter() - t0:.0f} s)")
    links = [s.strip() for s in args.links.split(",") if s.strip()]
    topic_len = len(Topics(DEFAULT_PREFIX).request(topic_name(bundle.model), "d" * 12))
    broker = MosquittoBroker()
    broker.start()
    pool = WorkerPool(count=1, broker=broker.url, artifacts=bundle_dir, prefix=DEFAULT_PREFIX,
                      group="bench", log_dir=work / model / "worker", threads=1)
    rows: list[dict[str, Any]] = []
    try:
        pool.start()
        hop = args.broker_ms / 1e3 if args.broker_ms is not None else \
            asyncio.run(_broker_hop(broker.url, work))
        edge_only: dict[str, Any] | None = None
        for link in links:
            estimate = LinkEstimate.from_profile(LinkProfile.parse(link))
            for s in bundle:
                pred = predict(costs[s.split_id], estimate, load_rps=args.rate,
                               device_rps=args.rate, broker_s=hop, topic_len=topic_len)
                if s.kind == "edge_only" and edge_only is not None:
                    measured = edge_only
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
    recs = {}
    for link in links:
        preds = [r for r in rows if r["link"] == link]
        from splitinfer.costmodel import Prediction

        best = recommend([Prediction(r["split_id"], r["kind"], r["predicted_ms"] or math.inf,
                                     0, 0, 0, 0, 0, 0, 0, 0) for r in preds])
        recs[link] = None if best is None else best.split_id
    return {"model": model, "bundle": str(bundle_dir), "broker_hop_ms": hop * 1e3,
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
                     f"{m['broker_hop_ms']:.2f} ms measured by a raw MQTT echo)")
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
                           device_rps=args.rate, broker_s=first["broker_hop_ms"] / 1e3)
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
