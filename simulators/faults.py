"""Fault injection: break the broker, a worker or a device's link on cue, and say when.

Hooks, callable from tests as they are::

    faults = FaultInjector(broker=broker, workers=[proc0, proc1], links={"dev-3": proxy})
    faults.restart_broker(down_s=2)      # stop (SIGTERM), 2 s down, start on the same port
    faults.kill_worker(0)                # SIGKILL; kill_worker(0, signal.SIGTERM) to drain
    faults.cut_link("dev-3", 5.0)        # reset the link's connections, refuse new ones

A plan, run alongside a fleet (``--faults`` on the fleet CLI)::

    plan = FaultPlan.parse("broker-restart@20s,kill-worker@30s,cut-link@10s+5s")
    events = await faults.run(plan)      # FaultEvent list with timestamps, for the report

Plan grammar: comma separated ``KIND[:TARGET]@AT[+DURATION]``, times with ``ms``/``s``
(``AT`` counts from the start of :meth:`FaultInjector.run`)::

    broker-restart@AT[+DOWN]   stop, stay down DOWN (default 0), start on the same port
    broker-kill@AT[+DOWN]      SIGKILL (no clean disconnects); with DOWN, start again after
    broker-stop@AT, broker-start@AT
    kill-worker[:I]@AT         SIGKILL worker I (default: the first still alive)
    term-worker[:I]@AT         SIGTERM worker I: a graceful drain
    cut-link[:NAME]@AT+T       cut link(s) for T s: connections reset, new ones refused
    link-cut@AT+T              cut every device link for T s (cut-link without a target:
                               the device lost its network; the fleet's offline test)
    stall-link[:NAME]@AT+T     stall link(s) for T s: data waits, connections survive

A link ``NAME`` may be a glob (``dev-1*``); without one every link is hit. Each fault runs
as a task of its own, so a slow broker restart does not delay the fault after it. More
kinds: ``faults.register("restart-worker", fn)`` where ``fn(fault)`` returns a detail
string; a plain function runs in a worker thread (it may block), a coroutine function on
the event loop.
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from splitinfer.errors import BadInputError
from splitinfer.link import format_time, parse_time

__all__ = ["Fault", "FaultPlan", "FaultEvent", "FaultInjector", "FAULT_KINDS"]

log = logging.getLogger(__name__)

# kind -> (needs a duration, may take one)
FAULT_KINDS: dict[str, tuple[bool, bool]] = {
    "broker-restart": (False, True),
    "broker-kill": (False, True),
    "broker-stop": (False, False),
    "broker-start": (False, False),
    "kill-worker": (False, False),
    "term-worker": (False, False),
    "cut-link": (True, True),
    "link-cut": (True, True),
    "stall-link": (True, True),
}
_FORM = "KIND[:TARGET]@AT[+DURATION], e.g. cut-link:dev-3@10s+5s"
_NO_TARGET = ("link-cut",)  # kinds that always hit every link
_LINK_KINDS = ("cut-link", "stall-link", "link-cut")  # applied on the proxies' loop


class BrokerLike(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


class LinkLike(Protocol):
    def cut(self, duration_s: float) -> None: ...
    def stall(self, duration_s: float) -> None: ...


@dataclass(frozen=True)
class Fault:
    kind: str
    at_s: float
    duration_s: float | None = None
    target: str | None = None

    def __post_init__(self) -> None:
        if not self.kind:
            raise BadInputError(f"empty fault kind; expected one of {', '.join(FAULT_KINDS)}")
        if self.at_s < 0 or (self.duration_s is not None and self.duration_s < 0):
            raise BadInputError(f"fault {self.kind}: times must be >= 0")

    @classmethod
    def parse(cls, text: str, extra_kinds: Sequence[str] = ()) -> Fault:
        head, at_sign, when = text.strip().partition("@")
        kind, _, target = head.partition(":")
        kind = kind.strip().lower()
        if not at_sign or not kind:
            raise BadInputError(f"fault {text!r}: expected {_FORM}")
        if kind not in FAULT_KINDS and kind not in extra_kinds:
            raise BadInputError(f"fault {text!r}: unknown kind {kind!r}; expected one of "
                                f"{', '.join([*FAULT_KINDS, *extra_kinds])}")
        at, plus, duration = when.partition("+")
        needs, takes = FAULT_KINDS.get(kind, (False, True))
        if plus and not takes:
            raise BadInputError(f"fault {text!r}: {kind} takes no duration; expected "
                                f"{kind}[:TARGET]@AT")
        if kind in _NO_TARGET and target.strip():
            raise BadInputError(f"fault {text!r}: {kind} takes no target (it hits every "
                                f"link); expected {kind}@AT+DURATION, or cut-link:NAME@AT+T "
                                "for some links")
        if needs and not plus:
            raise BadInputError(f"fault {text!r}: {kind} needs a duration; expected "
                                f"{kind}[:TARGET]@AT+DURATION, e.g. {kind}@10s+5s")
        return cls(kind, parse_time(at, f"fault {kind} time"),
                   parse_time(duration, f"fault {kind} duration") if plus else None,
                   target.strip() or None)

    def spec(self) -> str:
        target = f":{self.target}" if self.target else ""
        duration = f"+{format_time(self.duration_s)}" if self.duration_s is not None else ""
        return f"{self.kind}{target}@{format_time(self.at_s)}{duration}"


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...] = ()

    @classmethod
    def parse(cls, text: str, extra_kinds: Sequence[str] = ()) -> FaultPlan:
        """``"broker-restart@20s,kill-worker@30s,cut-link@10s+5s"``; empty text, no faults."""
        items = [Fault.parse(p, extra_kinds) for p in text.split(",") if p.strip()]
        return cls(tuple(sorted(items, key=lambda f: f.at_s)))

    def spec(self) -> str:
        return ",".join(f.spec() for f in self.faults)

    def __iter__(self) -> Iterator[Fault]:
        return iter(self.faults)

    def __len__(self) -> int:
        return len(self.faults)


@dataclass
class FaultEvent:
    """One fault as it happened; times in seconds from the start of the run."""

    kind: str
    target: str | None
    planned_s: float
    start_s: float
    end_s: float
    ok: bool
    detail: str
    wall_time: float = field(default=0.0)  # time.time() at start, to line up with logs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Handler = Callable[[Fault], "str | Awaitable[str]"]


class FaultInjector:
    """Owns handles to what can be broken; applies one fault, or runs a whole plan."""

    def __init__(self, *, broker: BrokerLike | None = None,
                 workers: Sequence[subprocess.Popen[Any] | asyncio.subprocess.Process | int]
                 = (), links: Mapping[str, LinkLike] | None = None) -> None:
        self.broker = broker
        self.workers = list(workers)
        self.links = dict(links or {})
        self.events: list[FaultEvent] = []
        self.handlers: dict[str, Handler] = {
            "broker-restart": lambda f: self.restart_broker(f.duration_s or 0.0),
            "broker-kill": lambda f: self.kill_broker(f.duration_s),
            "broker-stop": lambda f: self.stop_broker(),
            "broker-start": lambda f: self.start_broker(),
            "kill-worker": lambda f: self.kill_worker(f.target, signal.SIGKILL),
            "term-worker": lambda f: self.kill_worker(f.target, signal.SIGTERM),
            "cut-link": lambda f: self.cut_link(f.target, f.duration_s or 0.0),
            "link-cut": lambda f: self.cut_link(None, f.duration_s or 0.0),
            "stall-link": lambda f: self.stall_link(f.target, f.duration_s or 0.0),
        }

    def register(self, kind: str, handler: Handler) -> None:
        """Add (or replace) a fault kind; plans parse it with ``extra_kinds``."""
        self.handlers[kind] = handler

    # ---- the hooks -----------------------------------------------------------------------

    def _broker(self) -> BrokerLike:
        if self.broker is None:
            raise BadInputError("a broker fault needs FaultInjector(broker=...)")
        return self.broker

    def stop_broker(self) -> str:
        self._broker().stop()
        return "stopped"

    def start_broker(self) -> str:
        self._broker().start()
        return "started"

    def restart_broker(self, down_s: float = 0.0) -> str:
        broker = self._broker()
        broker.stop()
        if down_s:
            time.sleep(down_s)
        broker.start()
        return f"stopped, down {down_s:g} s, started"

    def kill_broker(self, down_s: float | None = None) -> str:
        broker = self._broker()
        kill = getattr(broker, "kill", None)
        if kill is None:
            raise BadInputError(f"{type(broker).__name__} cannot be killed; use broker-stop")
        kill()
        if down_s is None:
            return "killed (SIGKILL)"
        time.sleep(down_s)
        broker.start()
        return f"killed (SIGKILL), down {down_s:g} s, started"

    def kill_worker(self, target: str | int | None = None,
                    sig: signal.Signals = signal.SIGKILL) -> str:
        if not self.workers:
            raise BadInputError("a worker fault needs FaultInjector(workers=[...])")
        if target is None:
            alive = [i for i, w in enumerate(self.workers) if _alive(w)]
            if not alive:
                return "no worker alive"
            index = alive[0]
        else:
            index = int(target) if str(target).isdigit() else -1
            if not 0 <= index < len(self.workers):
                raise BadInputError(f"worker {target!r}: expected an index 0-"
                                    f"{len(self.workers) - 1}")
        worker = self.workers[index]
        pid = worker if isinstance(worker, int) else worker.pid
        try:
            if isinstance(worker, int):
                os.kill(worker, sig)
            else:
                worker.send_signal(sig)
        except ProcessLookupError:
            return f"worker {index} (pid {pid}) already gone"
        return f"worker {index} (pid {pid}) sent {sig.name}"

    def _links(self, target: str | None) -> list[tuple[str, LinkLike]]:
        hits = [(name, link) for name, link in self.links.items()
                if target is None or fnmatch.fnmatchcase(name, target)]
        if not hits:
            raise BadInputError(f"link {target!r} matches none of {sorted(self.links)}")
        return hits

    def cut_link(self, target: str | None, duration_s: float) -> str:
        hits = self._links(target)
        for _, link in hits:
            link.cut(duration_s)
        return f"cut {len(hits)} link(s) for {duration_s:g} s"

    def stall_link(self, target: str | None, duration_s: float) -> str:
        hits = self._links(target)
        for _, link in hits:
            link.stall(duration_s)
        return f"stalled {len(hits)} link(s) for {duration_s:g} s"

    # ---- running -------------------------------------------------------------------------

    async def apply(self, fault: Fault, *, t0: float | None = None) -> FaultEvent:
        """Apply one fault now, off the event loop when it blocks; record and return it."""
        loop = asyncio.get_running_loop()
        t0 = loop.time() if t0 is None else t0
        handler = self.handlers.get(fault.kind)
        start, wall = loop.time(), time.time()
        ok, detail = True, ""
        try:
            if handler is None:
                raise BadInputError(f"no handler for fault kind {fault.kind!r}")
            if fault.kind in _LINK_KINDS or inspect.iscoroutinefunction(handler):
                result = handler(fault)  # cheap, and a proxy wants its own loop's thread
            else:
                result = await asyncio.to_thread(handler, fault)
            detail = await result if inspect.isawaitable(result) else result
        except Exception as exc:  # a fault that fails is an event too, not a crash
            ok, detail = False, f"{type(exc).__name__}: {exc}"
            log.warning("fault %s failed: %s", fault.spec(), detail)
        event = FaultEvent(fault.kind, fault.target, fault.at_s, start - t0, loop.time() - t0,
                           ok, str(detail), wall)
        self.events.append(event)
        log.info("fault %s at %.3f s: %s", fault.spec(), event.start_s, event.detail)
        return event

    async def run(self, plan: FaultPlan | str, *, t0: float | None = None) -> list[FaultEvent]:
        """Apply each fault at ``t0 + at`` (``t0``: the loop time now, unless given).

        Returns the plan's events in the order they began; :attr:`events` keeps every
        event this injector recorded, in the order they finished.
        """
        if isinstance(plan, str):
            plan = FaultPlan.parse(plan, extra_kinds=list(self.handlers))
        loop = asyncio.get_running_loop()
        origin = loop.time() if t0 is None else t0

        async def one(fault: Fault) -> FaultEvent:
            await asyncio.sleep(max(0.0, origin + fault.at_s - loop.time()))
            return await self.apply(fault, t0=origin)

        tasks = [asyncio.create_task(one(f), name=f"fault-{f.spec()}") for f in plan]
        try:
            return sorted(await asyncio.gather(*tasks), key=lambda e: e.start_s)
        finally:
            for task in tasks:
                task.cancel()


def _alive(worker: subprocess.Popen[Any] | asyncio.subprocess.Process | int) -> bool:
    if isinstance(worker, int):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if isinstance(worker, subprocess.Popen):
        return worker.poll() is None
    return worker.returncode is None
