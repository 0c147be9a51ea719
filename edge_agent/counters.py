"""An edge agent's counters: publishes, re-sends, duplicates, late results, failed calls.

:class:`_Counters` is the agent's own mutable record (its request bookkeeping and its
connection count into it); :class:`AgentCounters` the read-only live view that
``EdgeAgent.counters`` hands out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["AgentCounters"]


@dataclass
class _Counters:
    published: int = 0
    republished: int = 0
    retries: int = 0
    no_subscriber: int = 0
    duplicates: int = 0
    late_results: int = 0
    reconnects: int = 0
    chunks_sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class AgentCounters:
    """A read-only, live view of an agent's counters (``EdgeAgent.counters``).

    ``published`` every PUBLISH of a request (first tries and re-sends), ``republished``
    the re-publishes on a new connection after a reconnect, ``retries`` the re-sends on the
    same connection (no answer within the retry interval, or "no matching subscribers"),
    ``no_subscriber`` the PUBACKs with reason 16, ``duplicates`` the answers dropped
    because their request had been answered already, ``late_results`` results for no
    pending request (after its deadline, or stray), ``reconnects``, ``chunks_sent`` (the
    PUBLISHes of requests sent in chunks, past the broker's packet limit) and ``errors``
    (failed calls by code).
    """

    __slots__ = ("_c",)

    def __init__(self, counters: _Counters) -> None:
        self._c = counters

    @property
    def published(self) -> int:
        return self._c.published

    @property
    def republished(self) -> int:
        return self._c.republished

    @property
    def retries(self) -> int:
        return self._c.retries

    @property
    def no_subscriber(self) -> int:
        return self._c.no_subscriber

    @property
    def duplicates(self) -> int:
        return self._c.duplicates

    @property
    def late_results(self) -> int:
        return self._c.late_results

    @property
    def reconnects(self) -> int:
        return self._c.reconnects

    @property
    def chunks_sent(self) -> int:
        return self._c.chunks_sent

    @property
    def errors(self) -> Mapping[str, int]:
        return MappingProxyType(self._c.errors)

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain JSON-ready values (``errors`` sorted by code)."""
        c = self._c
        return {"published": c.published, "republished": c.republished,
                "retries": c.retries, "no_subscriber": c.no_subscriber,
                "duplicates": c.duplicates, "late_results": c.late_results,
                "reconnects": c.reconnects, "chunks_sent": c.chunks_sent,
                "errors": dict(sorted(c.errors.items()))}

    def __repr__(self) -> str:
        return f"AgentCounters({self.as_dict()})"
