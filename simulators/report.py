"""A fleet run on paper: text tables for the terminal and a PNG for the record.

:func:`format_report` turns a fleet report (the dict of
:class:`~simulators.fleet.FleetResult`) into the tables ``splitinfer fleet`` prints;
:func:`write_png` draws the latency CDF beside stacked per-stage bars (matplotlib, Agg
backend: no display needed). Neither imports the fleet engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from simulators.fleet_stats import FleetResult

__all__ = ["format_report", "format_table", "write_png", "STAGE_COLOURS"]

# Stacked bars, bottom to top, in the order a request lives through them.
STAGE_COLOURS = {
    "head": "#4c72b0", "encode": "#64b5cd", "uplink": "#55a868", "broker_queue": "#c44e52",
    "tail": "#8172b2", "downlink": "#ccb974", "decode": "#937860", "other": "#bbbbbb",
}


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain, right-aligned text table (first column left-aligned)."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]),
                      *(line(r) for r in cells[1:])])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_report(r: Mapping[str, Any]) -> str:
    """The human form of a fleet report: outcome, latency, stages, CPU, faults, accuracy."""
    c = r["config"]
    out = [
        f"fleet   {c['devices']} devices x {c['rate_per_device']:g} req/s ({c['arrivals']}) for "
        f"{c['duration_s']:g} s, {'replay' if c['replay'] else 'head on device'}, speed "
        f"x{c['speed']:g}; MQTT {c['mqtt']} QoS {c['qos']} ({c['transport']}); "
        f"{c['workers']} worker(s); broker {r['broker']['kind']}",
        _split_line(r),
        "",
        format_table([[r["sent"], r["answered"], r["errors"], r["timeouts"], r["lost"],
                       r["throughput_rps"], r["offered_rps"]]],
                     ["sent", "answered", "errors", "timeouts", "lost", "throughput/s",
                      "offered/s"]),
    ]
    if r["error_kinds"]:
        out.append("errors  " + ", ".join(f"{k} {v}" for k, v in r["error_kinds"].items()))
    out += ["", "latency (ms, scheduled arrival -> result)"]
    detail = r["stages_detail_ms"]
    rows = [["e2e", r["p50_ms"], r["p95_ms"], r["p99_ms"], r["max_ms"], "measured"]]
    for stage, source in r["stage_sources"].items():
        q = detail.get(stage, {})
        rows.append([f"  {stage}", q.get("p50"), q.get("p95"), q.get("p99"), q.get("max"),
                     source.split(":")[0].split(" (")[0]])
    for stage in ("network", "queue"):
        q = detail.get(stage, {})
        rows.append([f"  ({stage})", q.get("p50"), q.get("p95"), q.get("p99"), q.get("max"),
                     "measured, as the agent reports it"])
    rows.append(["floor", r.get("floor_p50_ms"), None, None, None,
                 "p50 of head + uplink + tail + downlink"])
    lag = r["schedule_lag_ms"]
    rows.append(["fleet lag", lag.get("p50"), lag.get("p95"), lag.get("p99"), lag.get("max"),
                 "scheduled -> sent"])
    out.append(format_table(rows, ["stage", "p50", "p95", "p99", "max", "source"]))
    out += ["", _cpu_table(r["cpu"])]
    links = [g for g in r["links"] if g.get("spec")]
    if links:
        out += ["", format_table(
            [[g["name"], g["devices"], g["spec"], g["uplink_ms_derived"],
              g["downlink_ms_derived"]] for g in links],
            ["link", "devices", "spec", "uplink ms", "downlink ms"])]
    out += _split_sections(r)
    retries = r["retries"]
    out.append(f"\nretries republished {retries['republished']}, reconnects "
               f"{retries['reconnects']}, late results {retries['late_results']}")
    if r["faults"]:
        out += ["", format_table(
            [[e["kind"], e.get("target") or "", e["planned_s"], round(e["start_s"], 3),
              round(e["end_s"], 3), "ok" if e["ok"] else "FAILED", e["detail"]]
             for e in r["faults"]],
            ["fault", "target", "planned s", "start s", "end s", "", "detail"])]
    acc = r.get("accuracy")
    if acc:
        parts = [f"checked {acc['checked']} answers ({acc['distinct_samples']} samples)"]
        if "accuracy" in acc:
            parts.append(f"accuracy {100 * acc['accuracy']:.2f}%")
        if "reference_accuracy" in acc:
            parts.append(f"unsplit {100 * acc['reference_accuracy']:.2f}%")
        if "agreement" in acc:
            parts.append(f"agreement with unsplit {100 * acc['agreement']:.2f}%")
        out.append("\naccuracy " + ", ".join(parts))
    w = r["warmup"]
    out.append(f"warm-up  {w['seconds']:g} s, {w['sent']} requests left out of the figures")
    if r.get("png"):
        out.append(f"plot     {r['png']}")
    out.append(f"report   {r['report']}")
    return "\n".join(out)


def _split_line(r: Mapping[str, Any]) -> str:
    split = r["split"]
    if r.get("mode") == "adaptive":
        b = r.get("bundle") or {}
        return (f"split   adaptive over bundle {b.get('model')} ({len(b.get('splits', []))} "
                f"splits, {split['dir']})")
    pinned = " (pinned, from a bundle)" if r.get("mode") == "pinned" else ""
    return (f"split   {split['split_id']}{pinned}: request {split['request_bytes']} B, result "
            f"{split['result_bytes']} B")


def _split_sections(r: Mapping[str, Any]) -> list[str]:
    """Which split answered what, where, how fast; the switches; requests due in faults."""
    per = r.get("per_split") or {}
    out: list[str] = []
    if per and (r.get("mode") != "single" or len(per) > 1):
        out += ["", format_table(
            [[sid, q["answered"], q["served_locally"], q["within_deadline"], q.get("p50_ms"),
              q.get("p95_ms"), q.get("p99_ms"), q.get("max_ms")] for sid, q in per.items()],
            ["split", "answered", "on device", "in deadline", "p50 ms", "p95 ms", "p99 ms",
             "max ms"])]
        out.append(f"served locally {r.get('served_locally', 0)} of {r['answered']}")
    switches = r.get("switches") or []
    if r.get("mode") == "adaptive":
        devices = len({s["device"] for s in switches})
        out.append(f"switches {len(switches)} ({devices} devices)")
        for s in switches[:8]:
            out.append(f"  {s['t_s']:8.3f} s  {s['device']}  {s['from']} -> {s['to']}"
                       f"  {s.get('reason', '')}")
        if len(switches) > 8:
            out.append(f"  ... {len(switches) - 8} more in the JSON")
    schedule = r.get("link_schedule") or []
    if schedule:
        out.append("link schedule " + ", ".join(
            f"{e['link']}@{e['t_s']:g}s" + (f" (applied {e['applied_s']:.3f})"
                                            if e.get("applied_s") is not None else "")
            for e in schedule))
    windows = r.get("during_faults") or []
    if windows:
        out += ["", format_table(
            [[w["fault"], w["sent"], w["answered"], w["within_deadline"], w["served_locally"],
              w["timeouts"], w["errors"], w["lost"], w["max_ms"]] for w in windows],
            ["requests due during", "sent", "answered", "in deadline", "on device",
             "timeouts", "errors", "lost", "max ms"])]
    return out


def _cpu_table(cpu: Mapping[str, Any]) -> str:
    rows = []
    for role, entry in cpu.items():
        if isinstance(entry, Mapping):
            share = entry.get("machine_share")
            rows.append([role, entry["cpu_s"], entry.get("core_fraction"),
                         None if share is None else f"{100 * share:.1f}%",
                         ",".join(map(str, entry["pids"]))])
    total = sum(e["cpu_s"] for e in cpu.values() if isinstance(e, Mapping))
    window = cpu["window_s"]
    rows.append(["total", round(total, 3), round(total / window, 4) if window else None,
                 f"{100 * total / window / cpu['cores']:.1f}%" if window else None, ""])
    return format_table(rows, ["process", "cpu s", "cores", f"of {cpu['cores']} cores",
                               "pids"]) + f"\n(over {window:.1f} s: the measured window " \
        "and the drain)"


def write_png(result: FleetResult, path: str | Path) -> Path:
    """Latency CDF (left) and stacked mean stage times per link group (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    r = result.report
    timeline = bool(result.outcomes) and (r.get("mode", "single") != "single"
                                          or bool(result.link_changes or result.fault_spans))
    if timeline:
        fig = plt.figure(figsize=(12, 8.6))
        grid = fig.add_gridspec(2, 2, width_ratios=[3, 2], height_ratios=[1, 0.9])
        ax_cdf, ax_bar = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
        _timeline(fig.add_subplot(grid[1, :]), result)
    else:
        fig, (ax_cdf, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.8),
                                             gridspec_kw={"width_ratios": [3, 2]})
    groups = result.groups
    names = result.group_names
    for index, name in enumerate(names):
        data = np.sort(result.e2e_ms[groups == index]) if len(names) > 1 else \
            np.sort(result.e2e_ms)
        if data.size:
            ax_cdf.plot(data, np.arange(1, data.size + 1) / data.size, label=name, lw=1.5)
    for q, style in ((50, ":"), (99, "--")):
        value = r.get(f"p{q}_ms")
        if value is not None:
            ax_cdf.axvline(value, color="grey", ls=style, lw=1, label=f"p{q} {value:.1f} ms")
    if result.e2e_ms.size and result.e2e_ms.min() > 0:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax_cdf.set_xscale("log")
        ax_cdf.xaxis.set_major_formatter(ScalarFormatter())
        ax_cdf.xaxis.set_minor_formatter(NullFormatter())
    ax_cdf.set_xlabel("latency, scheduled arrival → result (ms)")
    ax_cdf.set_ylabel("fraction of answered requests")
    ax_cdf.set_ylim(0, 1.01)
    ax_cdf.grid(True, which="both", alpha=0.3)
    ax_cdf.legend(loc="lower right", fontsize=8)
    c = r["config"]
    ax_cdf.set_title(f"{c['devices']} devices x {c['rate_per_device']:g}/s, "
                     f"{r['answered']}/{r['sent']} answered, lost {r['lost']}", fontsize=10)

    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for stage, colour in STAGE_COLOURS.items():
        values = result.stages_ms.get(stage)
        if values is None or values.size == 0:
            continue
        means = np.array([values[groups == i].mean() if np.any(groups == i) else 0.0
                          for i in range(len(names))])
        ax_bar.bar(x, means, bottom=bottom, color=colour, label=stage, width=0.6)
        bottom += means
    ax_bar.set_xticks(x, names)
    ax_bar.set_ylabel("mean time per request (ms)")
    ax_bar.set_title("stages (uplink/downlink derived from the link model)", fontsize=10)
    handles, labels = ax_bar.get_legend_handles_labels()
    ax_bar.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _timeline(ax: Any, result: FleetResult) -> None:
    """Answers per split per second of the window (stacked, by scheduled arrival), the
    link schedule's changes as labelled lines, fault windows shaded."""
    from simulators.fleet_stats import per_second

    r = result.report
    seconds = max(1, int(np.ceil(r["config"]["duration_s"])))
    ids, counts = per_second(result.outcomes, seconds)
    names = _short_names(ids, r)
    x = np.arange(counts.shape[1])
    bottom = np.zeros(counts.shape[1])
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2", "#937860", "#da8bc3",
               "#8c8c8c", "#ccb974", "#64b5cd"]
    for i, sid in enumerate(ids):
        ax.bar(x, counts[i], bottom=bottom, width=1.0, align="edge", label=names[sid],
               color=colours[i % len(colours)], linewidth=0)
        bottom += counts[i]
    top = float(bottom.max()) if bottom.size else 1.0
    for start, end, kind in result.fault_spans:
        ax.axvspan(start, end, color="red", alpha=0.12, lw=0)
        ax.text(start, top * 1.02, kind, fontsize=8, color="darkred", va="bottom")
    for t, name in result.link_changes:
        ax.axvline(t, color="black", ls="--", lw=1)
        ax.text(t + 0.2, top * 0.95, name, fontsize=8, va="top")
    ax.set_xlim(0, seconds)
    ax.set_ylim(0, max(1.0, top) * 1.1)
    ax.set_xlabel("second of the measured window (scheduled arrival)")
    ax.set_ylabel("answers per second")
    ax.set_title(f"which split served each second: {r.get('served_locally', 0)} answered on the "
                 f"device, {len(r.get('switches') or [])} switches", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _short_names(ids: Sequence[str], r: Mapping[str, Any]) -> dict[str, str]:
    """A split's bundle directory and kind (``cut_03 (split)``), else its id."""
    bundle = r.get("bundle") or {}
    by_id = {s["split_id"]: s for s in bundle.get("splits", [])}
    out = {}
    for sid in ids:
        s = by_id.get(sid)
        out[sid] = f"{s['dir']} ({s['kind']})" if s else sid
    return out
