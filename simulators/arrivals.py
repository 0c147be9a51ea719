"""Arrival processes: when each virtual device sends a request.

=============  ============================================================================
``constant``   one request every ``1/rate`` s, at a phase drawn per device from
               U(0, 1/rate) so a fleet does not fire in lock-step
``poisson``    exponential gaps with mean ``1/rate``: independent users
``bursty``     on/off (a Markov-modulated Poisson process): exponential ON periods (mean
               ``on``) at rate ``rate * (on + off) / on`` and silent OFF periods (mean
               ``off``); the first period's state is drawn from the stationary odds, so
               the mean rate is ``rate`` from t = 0
``batch``      batch Poisson: batches arrive as Poisson at ``rate / size``, each with a
               Geometric number of requests (mean ``size``, at least 1) ``spacing`` apart,
               e.g. a camera sending the frames of one motion event
=============  ============================================================================

Seeding: device ``i`` draws from ``SeedSequence(seed, spawn_key=(i,))``, the same child
``SeedSequence(seed).spawn(n)[i]`` gives, so a device's schedule depends only on
``(seed, i)``: not on the fleet's size, nor on the order devices are built in.

Spec text (``ArrivalProcess.parse``), comma separated, the kind first::

    poisson                      poisson,rate=2
    constant,rate=0.5            bursty,rate=1,on=2s,off=8s
    batch,rate=1,size=5,spacing=20ms
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from splitinfer.errors import BadInputError

__all__ = ["ArrivalProcess", "ArrivalKind", "KINDS", "schedule", "device_rng"]

ArrivalKind = Literal["constant", "poisson", "bursty", "batch"]
KINDS: tuple[ArrivalKind, ...] = ("constant", "poisson", "bursty", "batch")


def device_rng(seed: int, device: int) -> np.random.Generator:
    """Device ``device``'s own stream under ``seed``, independent of every other device's."""
    if seed < 0 or device < 0:
        raise BadInputError(f"seed {seed} / device index {device}: expected integers >= 0")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(device,)))


@dataclass(frozen=True)
class ArrivalProcess:
    kind: ArrivalKind = "poisson"
    rate: float = 1.0  # mean requests per second per device
    on_s: float = 1.0  # bursty: mean ON period
    off_s: float = 4.0  # bursty: mean OFF period
    size: float = 5.0  # batch: mean requests per batch
    spacing_s: float = 0.0  # batch: gap between the requests of one batch

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadInputError(f"arrival kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise BadInputError(f"arrival rate {self.rate!r}: expected requests/s > 0")
        if not (math.isfinite(self.on_s) and self.on_s > 0):
            raise BadInputError(f"bursty on {self.on_s!r} s: expected > 0")
        if not (math.isfinite(self.off_s) and self.off_s >= 0):
            raise BadInputError(f"bursty off {self.off_s!r} s: expected >= 0")
        if not (math.isfinite(self.size) and self.size >= 1):
            raise BadInputError(f"batch size {self.size!r}: expected a mean >= 1")
        if not (math.isfinite(self.spacing_s) and self.spacing_s >= 0):
            raise BadInputError(f"batch spacing {self.spacing_s!r} s: expected >= 0")

    @classmethod
    def parse(cls, text: str) -> ArrivalProcess:
        parts = [p.strip() for p in text.split(",")]
        kind = parts[0].lower()
        if kind not in KINDS:
            raise BadInputError(f"arrival spec {text!r}: kind {parts[0]!r}; expected one of "
                                f"{', '.join(KINDS)}, then key=value fields, e.g. "
                                "bursty,rate=1,on=2s,off=8s")
        values: dict[str, float] = {}
        for part in parts[1:]:
            key, eq, value = part.partition("=")
            key = key.strip().lower()
            if not eq or key not in _FIELDS:
                raise BadInputError(f"arrival spec {text!r}: field {part!r}; expected "
                                    f"key=value with key one of {', '.join(_FIELDS)}")
            attr, unit = _FIELDS[key]
            values[attr] = _number(value, key, unit)
        return cls(kind, **values)

    def spec(self) -> str:
        default = ArrivalProcess(self.kind)
        out: list[str] = [self.kind]
        for key, (attr, unit) in _FIELDS.items():
            value = getattr(self, attr)
            if value != getattr(default, attr) or key == "rate":
                out.append(f"{key}={value!r}{unit}")
        return ",".join(out)

    def with_rate(self, rate: float) -> ArrivalProcess:
        return replace(self, rate=rate)

    def schedule(self, duration_s: float, seed: int, device: int = 0) -> np.ndarray:
        """Sorted send times in ``[0, duration_s)``, seconds from the run's start."""
        if not (math.isfinite(duration_s) and duration_s >= 0):
            raise BadInputError(f"duration {duration_s!r} s: expected >= 0")
        rng = device_rng(seed, device)
        times = _GENERATORS[self.kind](self, duration_s, rng)
        return times[times < duration_s]


def schedule(duration_s: float, rate: float, seed: int, *, kind: ArrivalKind = "poisson",
             device: int = 0, **params: float) -> np.ndarray:
    """Send times of device ``device``: ``ArrivalProcess(kind, rate, **params).schedule``."""
    return ArrivalProcess(kind, rate, **params).schedule(duration_s, seed, device)


def _poisson_points(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    expected = rate * duration_s
    chunks: list[np.ndarray] = []
    t = 0.0
    while t < duration_s:
        gaps = rng.exponential(1.0 / rate, int(expected + 6 * math.sqrt(expected) + 16))
        points = t + np.cumsum(gaps)
        chunks.append(points)
        t = float(points[-1])
    return np.concatenate(chunks) if chunks else np.empty(0)


def _constant(p: ArrivalProcess, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    period = 1.0 / p.rate
    phase = rng.uniform(0.0, period)
    return phase + period * np.arange(max(0, math.ceil((duration_s - phase) / period)))


def _poisson(p: ArrivalProcess, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    return _poisson_points(p.rate, duration_s, rng)


def _bursty(p: ArrivalProcess, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    cycle = p.on_s + p.off_s
    rate_on = p.rate * cycle / p.on_s
    on = bool(rng.random() < p.on_s / cycle)
    t = 0.0
    out: list[np.ndarray] = []
    while t < duration_s:
        length = float(rng.exponential(p.on_s if on else p.off_s)) if (on or p.off_s) else 0.0
        if on:
            end = min(t + length, duration_s)
            n = int(rng.poisson(rate_on * (end - t)))
            out.append(np.sort(rng.uniform(t, end, n)))
        t += length
        on = not on
    return np.concatenate(out) if out else np.empty(0)


def _batch(p: ArrivalProcess, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    epochs = _poisson_points(p.rate / p.size, duration_s, rng)
    epochs = epochs[epochs < duration_s]
    sizes = rng.geometric(1.0 / p.size, len(epochs))
    starts = np.repeat(epochs, sizes)
    # index of each request within its batch: 0, 1, ... sizes[k] - 1
    offsets = np.arange(len(starts)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.sort(starts + offsets * p.spacing_s)


_GENERATORS = {"constant": _constant, "poisson": _poisson, "bursty": _bursty,
               "batch": _batch}

_FIELDS = {"rate": ("rate", "/s"), "on": ("on_s", "s"), "off": ("off_s", "s"),
           "size": ("size", ""), "spacing": ("spacing_s", "s")}


def _number(text: str, key: str, unit: str) -> float:
    raw = text.strip().lower()
    scale = 1.0
    if unit == "s" and raw.endswith("ms"):
        raw, scale = raw[:-2], 1e-3
    elif unit and raw.endswith(unit):
        raw = raw[: -len(unit)]
    try:
        value = float(raw) * scale
    except ValueError:
        example = {"/s": "2 or 2/s", "s": "500ms or 2s", "": "5"}[unit]
        raise BadInputError(f"arrival {key} {text!r}: expected a number like {example}") \
            from None
    return value

