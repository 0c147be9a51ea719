"""``splitinfer plan``: the predicted latency of every split of a bundle, per link.

::

    splitinfer plan --artifacts BUNDLE --edge-profile E.json --cloud-profile C.json \\
        --link 3g,4g,wifi [--load RPS] [--deadline-ms D] [--workers N] [--json] [--plot P.png]

Reads the bundle (``bundle.json``), the two profiles (``splitinfer profile --side edge``
on the device, ``--side cloud`` on the worker) and feeds every split into the cost model
(:mod:`splitinfer.costmodel`, term by term in ``docs/planning.md``). Prints, per link, one
row per split (the baselines marked) and the recommendation: the lowest predicted p50
that meets ``--deadline-ms``. Exit 1 when on some link no split meets the deadline (the
table is still printed; ``recommended`` is null there).

``--link`` takes profile names or specs (:mod:`splitinfer.link`), comma separated; a field
with ``=`` belongs to the link before it, so ``--link 3g,4g,loss=1%,wifi`` is three links
(the second ``4g`` with 1% loss), and ``--link up=2mbit,delay=40ms`` one. ``--link`` may be
repeated. Cheap to import: argparse here, the rest inside :func:`run`; never ``onnx``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitinfer.errors import EXIT_FAILED, EXIT_OK, BadInputError

if TYPE_CHECKING:
    from splitinfer.bundle import Bundle
    from splitinfer.costmodel import SplitCosts
    from splitinfer.link import LinkProfile

__all__ = ["register", "run", "split_links", "plan_link", "load_inputs", "DEVICE_ID_LEN"]

DEVICE_ID_LEN = 12  # what the topics are sized for: a fleet device id, "a1b2c3-00001"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "plan", help="predict every split's end-to-end p50 per link and recommend one",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, metavar="DIR",
                   help="the bundle folder (made by 'splitinfer bundle')")
    p.add_argument("--edge-profile", required=True, metavar="E.json",
                   help="'splitinfer profile --side edge' of this bundle")
    p.add_argument("--cloud-profile", required=True, metavar="C.json",
                   help="'splitinfer profile --side cloud' of this bundle")
    p.add_argument("--link", required=True, action="append", metavar="PROFILE|SPEC[,...]",
                   help="link profile(s) or spec(s): 3g, 4g, wifi, lan, or fields like "
                   "up=2mbit,delay=40ms; comma separated, repeatable")
    p.add_argument("--load", type=_positive, default=0.0, metavar="RPS",
                   help="requests/s reaching the workers, all devices together (default 0: "
                   "no queueing)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="workers sharing the load (default 1)")
    p.add_argument("--deadline-ms", type=_positive, metavar="D",
                   help="recommend only splits predicted to answer within D ms")
    p.add_argument("--device-rate", type=_positive, default=0.0, metavar="RPS",
                   help="this device's own request rate: its requests queue behind each "
                   "other on its uplink (default 0: one at a time)")
    p.add_argument("--broker-ms", type=_positive, metavar="MS",
                   help="one broker hop in ms (default: the constant measured on this "
                   "project's tuned mosquitto, see docs/planning.md)")
    p.add_argument("--agent-ms", type=_positive, metavar="MS",
                   help="the device's own time per request outside head, encode and decode "
                   "in ms (default: the constant measured on the dev box, docs/planning.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw the stacked predicted latencies, one panel per link")
    p.set_defaults(func=run)


def split_links(values: Sequence[str]) -> list[str]:
    """``["3g,4g,loss=1%", "wifi"]`` -> ``["3g", "4g,loss=1%", "wifi"]`` (see the module)."""
    links: list[str] = []
    for value in values:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        for i, part in enumerate(parts):
            if "=" in part and i > 0:  # a field of the link before it
                links[-1] += "," + part
            else:
                links.append(part)
    if not links:
        raise BadInputError("--link: empty; expected a profile name (3g, 4g, wifi, lan) or "
                            "a spec like up=2mbit,delay=40ms")
    return links


def _read_json(path: str, what: str) -> Mapping[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(f"{what} {path}: no such file; make it with 'splitinfer profile "
                            f"--artifacts BUNDLE --side {what.split()[0]} -o {path}'") from None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{what} {path}: not readable JSON ({exc})") from None
    if not isinstance(data, Mapping):
        raise BadInputError(f"{what} {path}: expected a JSON object")
    return data


def load_inputs(artifacts: str | Path, edge_path: str, cloud_path: str,
                ) -> tuple[Bundle, list[SplitCosts]]:
    """The bundle and one :class:`SplitCosts` per bundle split, checked: both profiles of
    this bundle's model build (``source_sha256``), each of its side, covering every split."""
    from splitinfer.bundle import Bundle
    from splitinfer.costmodel import costs_from_profiles

    bundle = Bundle.load(artifacts)
    edge = _read_json(edge_path, "edge profile")
    cloud = _read_json(cloud_path, "cloud profile")
    for what, prof in (("edge profile", edge), ("cloud profile", cloud)):
        if prof.get("source_sha256") != bundle.source_sha256:
            raise BadInputError(
                f"{what}: source_sha256 {prof.get('source_sha256')!r} is not the bundle's "
                f"{bundle.source_sha256!r} ({bundle.root}); profile this bundle")
    costs = {c.split_id: c for c in costs_from_profiles(edge, cloud)}
    missing = [s.split_id for s in bundle if s.split_id not in costs]
    if missing:
        raise BadInputError(f"edge profile {edge_path}: no entry for split(s) "
                            f"{', '.join(missing)} of {bundle.root}; profile the bundle again")
    return bundle, [costs[s.split_id] for s in bundle]


def plan_link(bundle: Bundle, costs: Sequence[SplitCosts], link: LinkProfile, *,
              load_rps: float = 0.0, workers: int = 1, deadline_s: float | None = None,
              device_rps: float = 0.0, broker_s: float | None = None,
              agent_s: float | None = None) -> dict[str, Any]:
    """The ``--json`` object of one link: ``{"link", "recommended", "splits": [...]}``."""
    from splitinfer.costmodel import (
        DEFAULT_AGENT_S,
        DEFAULT_BROKER_S,
        LinkEstimate,
        predict,
        recommend,
    )
    from splitinfer.topics import DEFAULT_PREFIX, Topics, topic_name

    topic_len = len(Topics(DEFAULT_PREFIX).request(topic_name(bundle.model),
                                                   "d" * DEVICE_ID_LEN).encode())
    estimate = LinkEstimate.from_profile(link)
    preds = [predict(c, estimate, load_rps=load_rps, workers=workers, topic_len=topic_len,
                     device_rps=device_rps,
                     broker_s=DEFAULT_BROKER_S if broker_s is None else broker_s,
                     agent_s=DEFAULT_AGENT_S if agent_s is None else agent_s)
             for c in costs]
    best = recommend(preds, deadline_s=deadline_s)
    splits = []
    for pred, bsplit in zip(preds, bundle.splits, strict=True):
        entry = pred.to_dict()
        entry["dir"] = bsplit.dir
        entry["input_codec"] = bsplit.input_codec
        splits.append(entry)
    return {"link": {"name": link.name, "spec": link.spec(), **estimate.to_dict()},
            "load_rps": load_rps, "workers": workers,
            "deadline_ms": None if deadline_s is None else deadline_s * 1e3,
            "recommended": None if best is None else best.split_id, "splits": splits}


def _fmt_ms(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def _rate(bps: float) -> str:
    return "unlimited" if not math.isfinite(bps) else f"{bps / 1e6:g} Mbit/s"


def format_plan(result: Mapping[str, Any]) -> str:
    """The human table of one link."""
    link = result["link"]
    lines = [f"link {link['name']}: up {_rate(link['up_bps'])}, down {_rate(link['down_bps'])}"
             f", delay {link['delay_ms']:g} ms, jitter +-{link['jitter_ms']:g} ms, loss "
             f"{link['loss'] * 100:g}%; load {result['load_rps']:g} req/s on "
             f"{result['workers']} worker(s)"]
    header = ("split", "kind", "bytes", "head", "uplink", "queue", "tail", "downlink",
              "total ms", "")
    rows = []
    for s in result["splits"]:
        kind = s["kind"] + ("" if s.get("input_codec", "raw") == "raw" else
                            f" {s['input_codec']}")
        mark = "<- recommended" if s["split_id"] == result["recommended"] else \
            "(baseline)" if s["kind"] != "split" else ""
        rows.append((s.get("dir", s["split_id"]), kind, str(s["bytes"]),
                     _fmt_ms(s["head_ms"]), _fmt_ms(s["uplink_ms"]), _fmt_ms(s["queue_ms"]),
                     _fmt_ms(s["tail_ms"]), _fmt_ms(s["downlink_ms"]),
                     _fmt_ms(s["predicted_ms"]), mark))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(c.rjust(w) if 2 <= i <= 8 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    rec = next((s for s in result["splits"] if s["split_id"] == result["recommended"]), None)
    if rec is None:
        deadline = result.get("deadline_ms")
        lines.append("recommended: none" + (f" (no split meets the {deadline:g} ms deadline)"
                                             if deadline is not None else ""))
    else:
        base = []
        for s in result["splits"]:
            if s["kind"] != "split" and s["split_id"] != rec["split_id"] and \
                    s["predicted_ms"] is not None and rec["predicted_ms"]:
                name = s.get("dir", s["split_id"])
                base.append(f"{name} {s['predicted_ms']:.1f} ms "
                            f"({s['predicted_ms'] / rec['predicted_ms']:.2f}x)")
        lines.append(f"recommended: {rec.get('dir', rec['split_id'])} ({rec['split_id']}), "
                     f"{rec['predicted_ms']:.1f} ms" + (f"; baselines: {', '.join(base)}"
                                                        if base else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from splitinfer.link import LinkProfile

    if args.workers < 1:
        raise BadInputError(f"--workers {args.workers}: expected at least 1")
    links = [LinkProfile.parse(spec) for spec in split_links(args.link)]
    bundle, costs = load_inputs(args.artifacts, args.edge_profile, args.cloud_profile)
    deadline = None if args.deadline_ms is None else args.deadline_ms / 1e3
    broker = None if args.broker_ms is None else args.broker_ms / 1e3
    agent = None if args.agent_ms is None else args.agent_ms / 1e3
    results = [plan_link(bundle, costs, link, load_rps=args.load, workers=args.workers,
                         deadline_s=deadline, device_rps=args.device_rate, broker_s=broker,
                         agent_s=agent)
               for link in links]
    if args.plot:
        from splitter.planner.plot import plot_plan

        plot_plan(results, args.plot, title=bundle.model)
    if args.json:
        out: Mapping[str, Any] = results[0] if len(results) == 1 else {"links": results}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"model {bundle.model}: {len(bundle)} splits in {bundle.root}")
        for result in results:
            print()
            print(format_plan(result))
        if args.plot:
            print(f"\nplot: {args.plot}")
    return EXIT_OK if all(r["recommended"] is not None for r in results) else EXIT_FAILED
