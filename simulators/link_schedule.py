"""A link that changes during a run: ``--link-schedule "wifi@0s,3g@20s,wifi@40s"``.

The fleet's devices reach the broker through :class:`~simulators.shaper.ShapingProxy`
listeners; a :class:`LinkSchedule` says which :class:`~splitinfer.link.LinkProfile` they
have from when, and :meth:`LinkSchedule.run` applies each change to every proxy
(:meth:`ShapingProxy.set_profile`: open connections and new ones alike, at once), so an
adaptive device sees its uplink fall from Wi-Fi to 3G mid-run and must notice by itself.

Grammar: entries ``PROFILE|SPEC@TIME`` separated by commas (or semicolons); ``TIME`` as
:func:`splitinfer.link.parse_time` reads it (``20s``, ``500ms``), counted from the start
of the run. A spec may hold commas of its own, the ``@TIME`` closes it::

    wifi@0s,3g@20s,wifi@40s
    4g,loss=1%@0s,3g,delay=150ms@30s
    up=2mbit,down=10mbit,delay=40ms@0s;lan@60s

Entries are sorted by time; two at the same time are an error. Without an entry at 0 s
the proxies keep the profile they were started with until the first one. Outage windows
inside an entry's spec are not scheduled by a change (the schedule is the timeline; use
``--faults`` or the proxy's ``add_outage`` for outages).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from splitinfer.errors import BadInputError
from splitinfer.link import LinkProfile, format_time, parse_time

__all__ = ["LinkSchedule", "ProfileSettable", "Change"]

log = logging.getLogger(__name__)

_FORM = "PROFILE|SPEC@TIME entries separated by commas, e.g. wifi@0s,3g@20s,wifi@40s"
Change = tuple[float, LinkProfile]


class ProfileSettable(Protocol):
    """What a schedule drives: :class:`~simulators.shaper.ShapingProxy` is one."""

    def set_profile(self, profile: LinkProfile | str) -> None: ...


@dataclass(frozen=True)
class LinkSchedule:
    """Link profiles by start time (seconds from the start of the run), sorted."""

    entries: tuple[Change, ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise BadInputError(f"empty link schedule; expected {_FORM}")
        times = [t for t, _ in self.entries]
        for t in times:
            if not (t >= 0 and t != float("inf")):
                raise BadInputError(f"link schedule time {t!r}: expected seconds >= 0")
        if times != sorted(times):
            raise BadInputError(f"link schedule times {times}: expected them in order")
        dupes = sorted({t for t in times if times.count(t) > 1})
        if dupes:
            raise BadInputError(f"link schedule: two entries at {format_time(dupes[0])}; "
                                "expected one profile per time")

    @classmethod
    def parse(cls, text: str) -> LinkSchedule:
        """``"wifi@0s,3g@20s,wifi@40s"`` (see the module docstring); BadInputError else."""
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(f"empty link schedule {text!r}: expected {_FORM}")
        entries: list[Change] = []
        pending: list[str] = []  # the spec's comma-separated parts so far
        for part in text.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                raise BadInputError(f"link schedule {text!r}: an empty entry; expected {_FORM}")
            spec_tail, at, when = part.rpartition("@")
            if not at:
                pending.append(part)
                continue
            spec = ",".join([*pending, spec_tail]).strip()
            pending = []
            where = f"link schedule entry {spec}@{when}"
            if not spec:
                raise BadInputError(f"{where}: no profile before '@'; expected {_FORM}")
            if "@" in spec:
                raise BadInputError(f"{where}: two '@' in one entry; expected {_FORM}")
            try:
                at_s = parse_time(when.strip(), "time")
                profile = LinkProfile.parse(spec)
            except BadInputError as exc:
                raise BadInputError(f"{where}: {exc.message}") from None
            entries.append((at_s, profile))
        if pending:
            raise BadInputError(f"link schedule {text!r}: {','.join(pending)!r} has no @TIME; "
                                f"expected {_FORM}")
        times = [t for t, _ in entries]
        dupes = sorted({t for t in times if times.count(t) > 1})
        if dupes:
            raise BadInputError(f"link schedule {text!r}: two entries at "
                                f"{format_time(dupes[0])}; expected one profile per time")
        return cls(tuple(sorted(entries, key=lambda e: e[0])))

    def spec(self) -> str:
        """Text that :meth:`parse` reads back to an equal schedule."""
        return ",".join(f"{p.spec()}@{format_time(t)}" for t, p in self.entries)

    def __iter__(self) -> Iterator[Change]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def changes(self) -> list[Change]:
        """``(t_s, profile)`` per change, in time order."""
        return list(self.entries)

    def profile_at(self, t_s: float) -> LinkProfile | None:
        """The profile in force ``t_s`` seconds into the run; None before the first entry
        (the proxies' own profile then)."""
        i = bisect.bisect_right([t for t, _ in self.entries], t_s)
        return self.entries[i - 1][1] if i else None

    @property
    def change_times(self) -> list[float]:
        return [t for t, _ in self.entries]

    async def run(self, proxies: Iterable[ProfileSettable], t0: float | None = None, *,
                  clock: Callable[[], float] | None = None,
                  sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                  on_change: Callable[[float, LinkProfile], None] | None = None
                  ) -> list[Change]:
        """Apply each change to every proxy at ``t0 + t_s`` on ``clock``.

        ``clock`` defaults to the running loop's time and ``t0`` to now. Changes already
        due (an entry at 0 s) apply at once. Returns ``(applied_at_s, profile)`` per change,
        seconds from ``t0``; ``on_change(applied_at_s, profile)`` is called after each.
        Cancel the task to stop early.
        """
        now = clock or asyncio.get_running_loop().time
        origin = now() if t0 is None else t0
        targets = list(proxies)
        applied: list[Change] = []
        for t_s, profile in self.entries:
            wait = origin + t_s - now()
            if wait > 0:
                await sleep(wait)
            for proxy in targets:
                proxy.set_profile(profile)
            at = now() - origin
            applied.append((at, profile))
            log.info("link schedule: %s at %.3f s on %d link(s)", profile.spec(), at,
                     len(targets))
            if on_change is not None:
                on_change(at, profile)
        return applied
