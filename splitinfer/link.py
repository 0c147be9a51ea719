"""Link profiles: what a device's network looks like, as plain data.

A :class:`LinkProfile` holds uplink and downlink rates, one-way propagation delay, jitter,
per-segment loss and outage windows. :mod:`simulators.shaper` turns it into delay on real
sockets. ``up`` is device → broker, ``down`` is broker → device.

Named profiles (``LinkProfile.parse("4g")``)::

    name   up           down        one-way delay  jitter
    3g     1.1 Mbit/s   5 Mbit/s    75 ms          ±10 ms
    4g     5.85 Mbit/s  20 Mbit/s   30 ms          ±5 ms
    wifi   18.88 Mbit/s 50 Mbit/s   5 ms           ±1 ms
    lan    1 Gbit/s     1 Gbit/s    0.1 ms         0

Sources and assumptions. The uplink rates are the ones issue #4 names; they match the
average upload throughputs Kang et al. measured for 3G, LTE and Wi-Fi in *Neurosurgeon*
(ASPLOS 2017), the figures the split-computing literature keeps reusing. The rest are
assumptions within the usual published ranges: HSPA 3G delivers 3-7 Mbit/s down with
100-200 ms round trips; LTE ~20 Mbit/s down with 50-80 ms round trips; a home 802.11n/ac
link ~50 Mbit/s down with a few ms; switched gigabit Ethernet ~0.1 ms. All rates are
*goodput* (what a speed test reports), so the shaper counts payload bytes, not headers.
Named profiles have no loss; add it with an override: ``"4g,loss=1%"``.

Spec grammar (comma separated; an optional profile name first, then overrides)::

    up=5.85mbit,down=20mbit,delay=30ms,jitter=5ms,loss=0.5%
    4g,delay=60ms,outage=10s+5s,outage=40s+2s:cut
    lan,rto=50ms,mss=1400

    rates   bit, kbit, mbit, gbit (also kbps, mbps, gbps), decimal: 1 mbit = 10^6 bit/s
    times   us, ms, s          loss  a percentage: 0.5%
    outage  START+DURATION[:stall|:cut], repeatable; START counts from the proxy's start
    rto     retransmission delay per lost segment; default max(200 ms, 2 * RTT)

A spec without a name starts from an unshaped link (no rate limit, no delay).
Anything unreadable raises :class:`~splitinfer.errors.BadInputError` naming the field and
the form expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Literal

from splitinfer.errors import BadInputError

__all__ = ["LinkProfile", "Outage", "OutageMode", "PROFILES", "ALIASES", "DEFAULT_MSS",
           "MIN_RTO_S", "parse_time", "format_time"]

OutageMode = Literal["stall", "cut"]
OUTAGE_MODES: tuple[OutageMode, ...] = ("stall", "cut")
DEFAULT_MSS = 1460  # Ethernet MTU 1500 - IPv4 20 - TCP 20
MIN_RTO_S = 0.2  # Linux TCP_RTO_MIN

_RATE_UNITS = {"bit": 1, "bps": 1, "kbit": 10**3, "kbps": 10**3, "mbit": 10**6,
               "mbps": 10**6, "gbit": 10**9, "gbps": 10**9}
_TIME_UNITS = {"us": Decimal("1e-6"), "ms": Decimal("1e-3"), "s": Decimal(1)}
_RATE_FORM = "a rate like 5.85mbit (units bit, kbit, mbit, gbit)"
_TIME_FORM = "a time like 30ms (units us, ms, s)"


@dataclass(frozen=True)
class Outage:
    """The link is down during ``[start_s, start_s + duration_s)``, counted from the
    proxy's start (its *epoch*).

    ``stall``: nothing moves, data waits and flows when the window ends (a short radio
    fade; TCP survives). ``cut``: open connections are reset and new ones refused until it
    ends (the device lost its network; clients must reconnect).
    """

    start_s: float
    duration_s: float
    mode: OutageMode = "stall"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise BadInputError(f"outage start {self.start_s!r}: expected seconds >= 0")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise BadInputError(f"outage duration {self.duration_s!r}: expected seconds > 0")
        if self.mode not in OUTAGE_MODES:
            raise BadInputError(f"outage mode {self.mode!r}: expected one of {OUTAGE_MODES}")

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    @classmethod
    def parse(cls, text: str) -> Outage:
        """``START+DURATION[:stall|:cut]``, e.g. ``10s+5s`` or ``500ms+2s:cut``."""
        body, _, mode = text.strip().partition(":")
        start, plus, duration = body.partition("+")
        if not plus:
            raise BadInputError(f"outage {text!r}: expected START+DURATION[:stall|:cut], "
                                "e.g. 10s+5s or 10s+5s:cut")
        mode = mode.strip() or "stall"
        if mode not in OUTAGE_MODES:
            raise BadInputError(f"outage {text!r}: mode {mode!r}, expected stall or cut")
        return cls(parse_time(start, "outage start"), parse_time(duration, "outage duration"),
                   mode)

    def spec(self) -> str:
        mode = "" if self.mode == "stall" else f":{self.mode}"
        return f"{format_time(self.start_s)}+{format_time(self.duration_s)}{mode}"


@dataclass(frozen=True)
class LinkProfile:
    """One emulated link. Rates in bit/s (``math.inf``: not limited), times in seconds."""

    name: str = "custom"
    up_bps: float = math.inf
    down_bps: float = math.inf
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    rto_s: float | None = None
    mss: int = DEFAULT_MSS
    outages: tuple[Outage, ...] = field(default=())

    def __post_init__(self) -> None:
        for what, rate in (("up", self.up_bps), ("down", self.down_bps)):
            if not rate > 0:
                raise BadInputError(f"link {self.name!r}: {what} rate {rate!r} bit/s; "
                                    f"expected > 0 ({_RATE_FORM})")
        for what, t in (("delay", self.delay_s), ("jitter", self.jitter_s)):
            if not (math.isfinite(t) and t >= 0):
                raise BadInputError(f"link {self.name!r}: {what} {t!r} s; expected >= 0")
        if not 0 <= self.loss < 1:
            raise BadInputError(f"link {self.name!r}: loss {self.loss!r}; expected a fraction "
                                "in [0, 1), written as a percentage like 0.5%")
        if self.rto_s is not None and not (math.isfinite(self.rto_s) and self.rto_s >= 0):
            raise BadInputError(f"link {self.name!r}: rto {self.rto_s!r} s; expected >= 0")
        if not 1 <= self.mss <= 65535:
            raise BadInputError(f"link {self.name!r}: mss {self.mss!r}; expected 1-65535 bytes")

    # ---- derived figures -------------------------------------------------------------

    @property
    def rtt_s(self) -> float:
        """Round-trip propagation delay, without serialization or jitter."""
        return 2 * self.delay_s

    @property
    def effective_rto_s(self) -> float:
        """The delay one lost segment adds: ``rto`` if given, else max(200 ms, 2 * RTT)."""
        return self.rto_s if self.rto_s is not None else max(MIN_RTO_S, 2 * self.rtt_s)

    def rate_bps(self, direction: Literal["up", "down"]) -> float:
        return self.up_bps if direction == "up" else self.down_bps

    def transfer_s(self, nbytes: int, direction: Literal["up", "down"] = "up") -> float:
        """Loss-free one-way time for ``nbytes`` on an idle link: bytes * 8 / rate + delay."""
        return nbytes * 8 / self.rate_bps(direction) + self.delay_s

    def expected_loss_delay_s(self, nbytes: int) -> float:
        """Mean retransmission delay ``nbytes`` picks up: segments * p * RTO (first losses)."""
        return math.ceil(nbytes / self.mss) * self.loss * self.effective_rto_s

    # ---- text form -------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> LinkProfile:
        """A profile name (``3g``, ``4g``, ``wifi``, ``lan``) and/or ``key=value`` overrides."""
        parts = [p.strip() for p in str(text).split(",")]
        if not text or not any(parts):
            raise BadInputError("empty link spec; expected a profile name "
                                f"({', '.join(PROFILES)}) or e.g. up=5.85mbit,delay=30ms")
        base = LinkProfile()
        named = False
        if "=" not in parts[0]:
            key = parts[0].lower()
            key = ALIASES.get(key, key)
            if key not in PROFILES:
                raise BadInputError(f"link spec {text!r}: unknown profile {parts[0]!r}; "
                                    f"expected one of {', '.join(PROFILES)} or key=value fields")
            base, parts, named = PROFILES[key], parts[1:], True
        values: dict[str, object] = {}
        outages: list[Outage] = list(base.outages)
        for part in parts:
            key, eq, value = part.partition("=")
            key = key.strip().lower()
            if not eq or not value.strip():
                raise BadInputError(f"link spec {text!r}: field {part!r} is not key=value; "
                                    f"expected fields {', '.join(_FIELDS)}")
            if key not in _FIELDS:
                raise BadInputError(f"link spec {text!r}: unknown field {key!r}; "
                                    f"expected one of {', '.join(_FIELDS)}")
            if key == "outage":
                outages.append(Outage.parse(value))
            else:
                attr, conv = _FIELDS[key]
                values[attr] = conv(value, key)
        changed = replace(base, **values, outages=tuple(outages))  # type: ignore[arg-type]
        if not named:
            return replace(changed, name=changed.spec())
        if changed != base:  # "4g,loss=1%" keeps its text as its name, for reports
            return replace(changed, name=",".join([base.name, *parts]).lower())
        return changed

    def spec(self) -> str:
        """The canonical text form; ``LinkProfile.parse(p.spec())`` gives ``p``'s link back.

        A pristine named profile is its name; anything else spells out every field.
        """
        if PROFILES.get(self.name) == self:
            return self.name
        fields: list[str] = []
        if self.up_bps != math.inf:
            fields.append(f"up={_fmt_rate(self.up_bps)}")
        if self.down_bps != math.inf:
            fields.append(f"down={_fmt_rate(self.down_bps)}")
        if self.delay_s:
            fields.append(f"delay={format_time(self.delay_s)}")
        if self.jitter_s:
            fields.append(f"jitter={format_time(self.jitter_s)}")
        if self.loss:
            fields.append(f"loss={_fmt_decimal(Decimal(repr(self.loss)) * 100)}%")
        if self.rto_s is not None:
            fields.append(f"rto={format_time(self.rto_s)}")
        if self.mss != DEFAULT_MSS:
            fields.append(f"mss={self.mss}")
        fields += [f"outage={o.spec()}" for o in self.outages]
        return ",".join(fields) or "up=inf"

    def __str__(self) -> str:
        return self.name


# ---- field parsers -------------------------------------------------------------------

def _number(text: str, what: str, form: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise BadInputError(f"{what} {text!r}: expected {form}") from None
    if not value.is_finite():
        raise BadInputError(f"{what} {text!r}: expected {form}")
    return value


def _split_unit(text: str) -> tuple[str, str]:
    text = text.strip().lower()
    i = len(text)
    while i and text[i - 1].isalpha():
        i -= 1
    return text[:i].strip(), text[i:]


def _parse_rate(text: str, what: str = "rate") -> float:
    num, unit = _split_unit(text)
    if num == "" and unit == "inf":
        return math.inf
    if unit not in _RATE_UNITS:
        raise BadInputError(f"{what} {text!r}: expected {_RATE_FORM}")
    value = _number(num, what, _RATE_FORM) * _RATE_UNITS[unit]
    if value <= 0:
        raise BadInputError(f"{what} {text!r}: expected a rate > 0 ({_RATE_FORM})")
    return float(value)


def parse_time(text: str, what: str = "time") -> float:
    """Seconds from ``30ms``, ``2s``, ``150us`` (``0`` may go bare); ``what`` names it in errors."""
    num, unit = _split_unit(text)
    if unit == "" and num and _number(num, what, _TIME_FORM) == 0:
        return 0.0
    if unit not in _TIME_UNITS:
        raise BadInputError(f"{what} {text!r}: expected {_TIME_FORM}")
    value = _number(num, what, _TIME_FORM) * _TIME_UNITS[unit]
    if value < 0:
        raise BadInputError(f"{what} {text!r}: expected a time >= 0 ({_TIME_FORM})")
    return float(value)


def _parse_loss(text: str, what: str = "loss") -> float:
    form = "a percentage like 0.5% (0 <= loss < 100%)"
    text = text.strip()
    if not text.endswith("%"):
        if text and _number(text, what, form) == 0:
            return 0.0
        raise BadInputError(f"{what} {text!r}: expected {form}")
    value = _number(text[:-1], what, form)
    if not 0 <= value < 100:
        raise BadInputError(f"{what} {text!r}: expected {form}")
    return float(value / 100)


def _parse_rto(text: str, what: str = "rto") -> float | None:
    return None if text.strip().lower() == "auto" else parse_time(text, what)


def _parse_mss(text: str, what: str = "mss") -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise BadInputError(f"{what} {text!r}: expected a whole number of bytes, "
                            "e.g. 1460") from None
    if not 1 <= value <= 65535:
        raise BadInputError(f"{what} {text!r}: expected 1-65535 bytes")
    return value


_FIELDS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "up": ("up_bps", _parse_rate),
    "down": ("down_bps", _parse_rate),
    "delay": ("delay_s", parse_time),
    "jitter": ("jitter_s", parse_time),
    "loss": ("loss", _parse_loss),
    "rto": ("rto_s", _parse_rto),
    "mss": ("mss", _parse_mss),
    "outage": ("outages", lambda text, what: Outage.parse(text)),  # repeatable: kept apart
}


# ---- formatting that parses back to the same float ------------------------------------

def _fmt_decimal(value: float | Decimal) -> str:
    d = (Decimal(repr(value)) if isinstance(value, float) else value).normalize()
    return format(d, "f") if -12 < d.adjusted() < 15 else str(d)  # 1E-300, not 300 zeros


def _fmt_unit(value: float, units: dict[str, Decimal], parse: Callable[[str], float]) -> str:
    """The largest unit that keeps the number >= 1 and parses back to exactly ``value``."""
    exact = Decimal(repr(value))
    if not exact:
        return f"0{next(iter(units))}"
    for unit, scale in units.items():  # largest first
        text = f"{_fmt_decimal(exact / scale)}{unit}"
        if exact >= scale and parse(text) == value:
            return text
    return f"{_fmt_decimal(exact)}{next(u for u, scale in units.items() if scale == 1)}"


def _fmt_rate(bps: float) -> str:
    units = {"gbit": Decimal(10**9), "mbit": Decimal(10**6), "kbit": Decimal(10**3),
             "bit": Decimal(1)}
    return _fmt_unit(bps, units, _parse_rate)


def format_time(seconds: float) -> str:
    """The shortest of ``2s``/``30ms``/``150us`` that :func:`parse_time` reads back exactly."""
    units = {"s": Decimal(1), "ms": Decimal("1e-3"), "us": Decimal("1e-6")}
    return _fmt_unit(seconds, units, parse_time)


PROFILES: dict[str, LinkProfile] = {
    "3g": LinkProfile(name="3g", up_bps=1.1e6, down_bps=5e6, delay_s=0.075, jitter_s=0.010),
    "4g": LinkProfile(name="4g", up_bps=5.85e6, down_bps=20e6, delay_s=0.030, jitter_s=0.005),
    "wifi": LinkProfile(name="wifi", up_bps=18.88e6, down_bps=50e6, delay_s=0.005,
                        jitter_s=0.001),
    "lan": LinkProfile(name="lan", up_bps=1e9, down_bps=1e9, delay_s=0.0001),
}
ALIASES = {"lte": "4g", "wi-fi": "wifi", "hspa": "3g", "ethernet": "lan"}
