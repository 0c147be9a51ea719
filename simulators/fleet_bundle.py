"""What the fleet runs: one split, one split pinned out of a bundle, or adaptive devices.

:func:`resolve` reads ``--artifacts`` (and ``--split``):

* a split directory, or a plain folder of splits with ``--split``: ``single``, as before;
* a bundle (``bundle.json``, :mod:`splitinfer.bundle`) with ``--split ID`` (a split id or
  the split's directory name): ``pinned``: every device runs that split only, the workers
  serve that split only, so every cut of a bundle is measured on the same path;
* a bundle without ``--split``: ``adaptive``: every device is an agent of
  ``EdgeAgent.from_bundle`` holding every head, choosing the split per request; the
  workers serve every tail of the bundle.

:class:`SplitSizes` holds what crosses the link per split (request and result envelope and
their MQTT PUBLISH sizes), from which :func:`derived_times` gives the one-way link times
the stage breakdown uses. :func:`load_heads` loads each head once for all devices; the
other helpers read the profiles, warm every tail up, and collect what the adaptive
devices did (switches, connectivity, a summary).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.runtime import HeadRuntime, load_head
from simulators.fleet_support import (
    Inputs,
    SlowHead,
    find_source_model,
    mqtt_publish_bytes,
    payload_sizes,
)
from splitinfer.bundle import Bundle, is_bundle
from splitinfer.errors import BadInputError, SplitInferError, StartupError
from splitinfer.link import LinkProfile
from splitinfer.manifest import Manifest, find_split_dirs
from splitinfer.topics import Topics, topic_name

__all__ = ["MODES", "Target", "SplitSizes", "resolve", "split_sizes", "derived_times",
           "load_heads", "source_model", "read_profiles", "warm_up_tails",
           "record_connectivity", "switch_list", "adaptive_summary"]

MODES = ("single", "pinned", "adaptive")


@dataclass(frozen=True)
class Target:
    """What one fleet run drives."""

    mode: str  # one of MODES
    split_dir: Path  # single/pinned: the split's directory; adaptive: the bundle folder
    manifest: Manifest  # single/pinned: the split's; adaptive: the first split's (inputs)
    bundle: Bundle | None = None

    @property
    def worker_artifacts(self) -> Path:
        """What ``cloud serve --artifacts`` gets: the one split, or the whole bundle."""
        return self.split_dir

    @property
    def local(self) -> bool:
        """The whole model on the device (a pinned or single edge_only split): no broker."""
        return self.mode != "adaptive" and self.manifest.kind == "edge_only"

    @property
    def manifests(self) -> dict[str, tuple[Path, Manifest]]:
        """split_id -> (directory, manifest) of every split the devices may use."""
        if self.mode != "adaptive" or self.bundle is None:
            return {self.manifest.split_id: (self.split_dir, self.manifest)}
        return {s.split_id: (self.bundle.path(s), self.bundle.manifest(s))
                for s in self.bundle.splits}


def resolve(artifacts: Path, split: str | None, *, replay: bool = False) -> Target:
    """The :class:`Target` that ``--artifacts`` and ``--split`` name; see the module doc."""
    if is_bundle(artifacts):
        bundle = Bundle.load(artifacts)
        if not bundle.splits:
            raise BadInputError(f"bundle {bundle.root} lists no splits")
        if split:
            chosen = bundle.get(split)  # a split id or a directory name; names the choices
            return Target("pinned", bundle.path(chosen), bundle.manifest(chosen), bundle)
        if replay:
            raise BadInputError(
                f"--replay sends one split's recorded head outputs, but {bundle.root} is a "
                "bundle and its adaptive devices choose the split per request; pin one with "
                f"--split (one of {', '.join(s.dir for s in bundle.splits)}), or drop --replay")
        return Target("adaptive", bundle.root, bundle.manifest(bundle.splits[0]), bundle)
    dirs = find_split_dirs(artifacts)
    if not dirs:
        raise StartupError(f"no split under {artifacts} (no manifest.json); run "
                           "'splitinfer split' (or 'splitinfer bundle') first")
    if split:
        dirs = [d for d in dirs if d.name == split or Manifest.load(d).split_id == split]
        if not dirs:
            raise BadInputError(f"split {split!r} not found under {artifacts}")
    elif len(dirs) > 1:
        raise BadInputError(f"{artifacts} holds {len(dirs)} splits; pick one with --split "
                            f"(one of {[d.name for d in dirs]})")
    return Target("single", dirs[0], Manifest.load(dirs[0]))


@dataclass(frozen=True)
class SplitSizes:
    """Bytes of one request and one result of a split, one sample (0 for edge_only)."""

    split_id: str
    kind: str
    request_bytes: int
    result_bytes: int
    request_wire_bytes: int  # the MQTT PUBLISH carrying the request
    result_wire_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"split_id": self.split_id, "kind": self.kind,
                "request_bytes": self.request_bytes, "result_bytes": self.result_bytes,
                "request_wire_bytes": self.request_wire_bytes,
                "result_wire_bytes": self.result_wire_bytes}


def split_sizes(manifest: Manifest, *, topics: Topics, device_id: str, replay: bool,
                qos: int, codec_bytes: int | None = None) -> SplitSizes:
    """The sizes of ``manifest``'s request and result as ``device_id`` sends and gets them.

    ``codec_bytes``: for a cloud_only split whose inputs travel image-encoded, the mean
    encoded size per sample (the bundle's ``bytes_per_sample``), which replaces the raw
    tensor bytes in the request.
    """
    if manifest.kind == "edge_only":
        return SplitSizes(manifest.split_id, manifest.kind, 0, 0, 0, 0)
    result_topic = topics.result(device_id)
    up, down = payload_sizes(manifest, device_id=device_id, result_topic=result_topic,
                             replay=replay)
    if codec_bytes is not None:
        raw = sum(_tensor_bytes(s) for s in manifest.cut)
        up = max(0, up - raw) + codec_bytes
    request_topic = topics.request(topic_name(manifest.model), device_id)
    return SplitSizes(manifest.split_id, manifest.kind, up, down,
                      mqtt_publish_bytes(request_topic, up, qos=qos),
                      mqtt_publish_bytes(result_topic, down, qos=qos))


def _tensor_bytes(spec: Any) -> int:
    import numpy as np

    count = 1
    for d in spec.shape[1:]:
        count *= d if isinstance(d, int) and d > 0 else 1
    return count * int(np.dtype(spec.dtype).itemsize)


def derived_times(profile: LinkProfile | None, sizes: SplitSizes) -> tuple[float, float]:
    """One-way (uplink, downlink) seconds of one request/result of ``sizes`` on ``profile``:
    bytes / rate + delay + expected loss delay; (0, 0) on loopback or for edge_only."""
    if profile is None or sizes.kind == "edge_only":
        return 0.0, 0.0
    up = profile.transfer_s(sizes.request_wire_bytes, "up") + \
        profile.expected_loss_delay_s(sizes.request_wire_bytes)
    down = profile.transfer_s(sizes.result_wire_bytes, "down") + \
        profile.expected_loss_delay_s(sizes.result_wire_bytes)
    return up, down


def load_heads(manifests: Mapping[str, tuple[Path, Manifest]], *, speed: float,
               threads: int = 1) -> dict[str, HeadRuntime]:
    """split_id -> its head, loaded once for every device (``SlowHead`` when ``speed`` > 1).

    Every split, a cloud_only one's pass-through head too (costs nothing, never slowed):
    an agent given the same head objects as the others measures its heads only once
    (``edge_agent.bundle_agent`` caches the measured profile by bundle and head objects).
    """
    heads: dict[str, HeadRuntime] = {}
    for split_id, (directory, manifest) in manifests.items():
        head = load_head(manifest, directory, threads=threads)
        heads[split_id] = SlowHead(head, speed) if speed > 1.0 and manifest.head else head
    return heads


def source_model(target: Target) -> Path | None:
    """The unsplit model next to the split (or the bundle), sha256 checked; None if absent."""
    for split_dir, manifest in target.manifests.values():
        found = find_source_model(manifest, split_dir)
        if found is not None:
            return found
    return None


def read_profiles(edge: Path | None, cloud: Path | None) -> dict[str, Any]:
    """The edge/cloud profile JSONs for ``from_bundle``, read once for every device."""
    out: dict[str, Any] = {}
    for key, path in (("edge_profile", edge), ("cloud_profile", cloud)):
        if path is None:
            continue
        try:
            out[key] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise BadInputError(f"--{key.replace('_', '-')} {path}: not a readable profile "
                                f"JSON ('splitinfer profile -o'): {exc}") from exc
    return out


async def warm_up_tails(target: Target, heads: Mapping[str, HeadRuntime],
                        inputs: Inputs, *, url: str, prefix: str, device_id: str, qos: int,
                        transport: str, rounds: int) -> None:
    """``rounds`` requests through every tail of the bundle before the clock starts, from a
    plain agent pinned to each cloud split on a direct connection, so that no tail's first
    run (session warm-up) lands in the window, nor in any adaptive device's chooser."""
    from edge_agent import AgentConfig, EdgeAgent
    from simulators.fleet_transport import connector_for

    for split_id, (_, manifest) in target.manifests.items():
        if manifest.kind == "edge_only":
            continue
        config = AgentConfig(device_id=device_id, prefix=prefix, broker=url, qos=qos,
                             presence=False, timeout_s=60.0)
        agent = EdgeAgent(manifest=manifest, head=heads.get(split_id), config=config,
                          connector=connector_for(url, transport))
        try:
            await agent.start()
            for _ in range(rounds):
                await agent.infer(inputs.sample(0))
        except SplitInferError as exc:
            raise StartupError(f"split {split_id}: the first request got no answer: "
                               f"{exc}") from exc
        finally:
            await agent.close()


def record_connectivity(agent: Any, sink: list[tuple[float, str, bool]]) -> None:
    """Append ``(clock, device, connected)`` to ``sink`` whenever ``agent``'s chooser learns
    that the broker connection went or came back (``Policy.set_connected``: on that call it
    falls back to local answers, or resumes splitting), so that the report can say when
    splitting resumed whatever the arrivals. Wraps the one policy object's method."""
    policy = agent.policy
    original = policy.set_connected
    device = agent.device_id
    state = {"connected": True}

    def recorded(t: float, connected: bool) -> None:
        original(t, connected)
        if connected != state["connected"]:
            state["connected"] = connected
            sink.append((t, device, connected))

    setattr(policy, "set_connected", recorded)  # noqa: B010  (this instance only)


def switch_list(agents: Sequence[Any], origin: float) -> list[dict[str, Any]]:
    """Every agent's split changes, ``t_s`` from ``origin`` (the window's start on the
    agents' clock), in time order; a plain agent has none."""
    out = []
    for agent in agents:
        for sw in getattr(agent, "switches", ()):
            out.append({"t_s": round(sw.t_s - origin, 4), "device": sw.device,
                        "from": sw.from_split, "to": sw.to_split,
                        "reason": getattr(sw, "reason", "")})
    return sorted(out, key=lambda s: (s["t_s"], s["device"]))


def adaptive_summary(agents: Sequence[Any], connectivity: list[tuple[float, str, bool]],
                     origin: float) -> dict[str, Any]:
    """What the adaptive devices ended with: the split each is on, their shadow probes, local
    answers by reason (warm-up included), when each learnt the connection went down or came
    back, and one device's predictions and link estimate (alike on a shared link)."""
    current: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    probes = 0
    for agent in agents:
        current[agent.policy.current] += 1
        fallbacks.update(agent.fallbacks)
        probes += agent.probes
    first = agents[0].summary()
    return {"current": dict(current.most_common()), "probes": probes,
            "connectivity": [{"t_s": round(t - origin, 4), "device": d, "connected": up}
                             for t, d, up in sorted(connectivity)],
            "fallbacks": dict(sorted(fallbacks.items())),
            "device0": {k: first.get(k) for k in ("predicted_ms", "link_estimate")}}
