"""The plan's picture, Neurosurgeon-style: per link one panel, per split one stacked bar.

Each bar stacks the predicted p50 of a split by where the time goes: *head* (head +
encode on the device), *network* (uplink + broker hops + downlink), *queue* (waiting at
the worker) and *tail* (request decode + tail + result decode). The recommended split is
outlined and starred; the baselines are hatched and named (edge only, cloud only, cloud
only + codec). Input: the ``plan --json`` objects, one per link. matplotlib (the
``splitinfer[all]`` extra) is imported here only, with the Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from splitinfer.errors import BadInputError

__all__ = ["plot_plan", "STACK"]

# (label, colour, keys of the plan's per-split entry summed into it)
STACK: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("head", "#4c72b0", ("head_ms", "encode_ms", "agent_ms")),
    ("network", "#dd8452", ("uplink_ms", "broker_ms", "downlink_ms")),
    ("queue", "#c44e52", ("queue_ms",)),
    ("tail", "#55a868", ("tail_ms", "decode_ms")),
)
_BASELINE_HATCH = {"edge_only": "//", "cloud_only": "\\\\"}


def _label(split: Mapping[str, Any]) -> str:
    kind = split["kind"]
    codec = split.get("input_codec", "raw")
    if kind == "edge_only":
        return "edge only"
    if kind == "cloud_only":
        return "cloud only" + ("" if codec == "raw" else f"\n{codec}")
    return str(split.get("dir", split["split_id"]))


def _part(split: Mapping[str, Any], keys: tuple[str, ...]) -> float:
    return sum(float(split.get(k) or 0.0) for k in keys)


def plot_plan(results: Sequence[Mapping[str, Any]], path: str | Path, *,
              title: str = "") -> Path:
    """Write the PNG; returns its path. A split predicted ``inf`` is drawn as an arrow at
    the panel's top, labelled "overloaded"."""
    try:
        import matplotlib
    except ImportError:
        raise BadInputError("--plot needs matplotlib: pip install 'splitinfer[all]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not results:
        raise BadInputError("plot: no link to draw")
    n = len(results)
    width = max(5.0, 0.75 * max(len(r["splits"]) for r in results) + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(width * n, 4.8), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        splits = result["splits"]
        finite = [s["predicted_ms"] for s in splits if s["predicted_ms"] is not None]
        top = (max(finite) if finite else 1.0) * 1.18
        for i, s in enumerate(splits):
            hatch = _BASELINE_HATCH.get(s["kind"], "")
            if s["predicted_ms"] is None:
                ax.annotate("overloaded", (i, top * 0.97), ha="center", va="top", fontsize=8,
                            rotation=90, color="#c44e52")
                continue
            bottom = 0.0
            for _, colour, keys in STACK:
                value = _part(s, keys)
                if value > 0 and math.isfinite(value):
                    ax.bar(i, value, bottom=bottom, color=colour, hatch=hatch,
                           edgecolor="white" if not hatch else "#333333", linewidth=0.5)
                    bottom += value
            if s["split_id"] == result.get("recommended"):
                ax.bar(i, bottom, fill=False, edgecolor="black", linewidth=2.0)
                ax.annotate(f"\u2605 {bottom:.0f} ms", (i, bottom), xytext=(0, 4),
                            textcoords="offset points", ha="center", fontsize=9,
                            fontweight="bold")
            else:
                ax.annotate(f"{bottom:.0f}", (i, bottom), xytext=(0, 3),
                            textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(range(len(splits)))
        ax.set_xticklabels([_label(s) for s in splits], rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, top)
        link = result["link"]
        load = result.get("load_rps") or 0
        ax.set_title(f"{link['name']}" + (f", load {load:g} req/s" if load else ""),
                     fontsize=10)
        ax.set_ylabel("predicted p50 (ms)")
        ax.grid(axis="y", alpha=0.3)
        deadline = result.get("deadline_ms")
        if deadline is not None:
            ax.axhline(deadline, color="black", linestyle="--", linewidth=0.8)
    handles = [Patch(color=c, label=label) for label, c, _ in STACK]
    handles += [Patch(facecolor="white", edgecolor="#333333", hatch=h, label=k.replace("_", " "))
                for k, h in _BASELINE_HATCH.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2,
                         label="\u2605 recommended"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, y=0.995, fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
