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
    kill-worker[:I]@AT[+DOWN]  SIGKILL worker I (default: the first still alive); with
                               DOWN, start the same worker again (same command line, same
                               ``--worker-id``) DOWN s after the signal
    term-worker[:I]@AT[+DOWN]  SIGTERM worker I (a graceful drain); DOWN as for kill-worker
    stop-worker[:I]@AT+T       SIGSTOP worker I (a hung replica: its connection stays open),
                               SIGCONT T s later
    cut-link[:NAME]@AT+T       cut link(s) for T s: connections reset, new ones refused
    link-cut@AT+T              cut every device link for T s (cut-link without a target:
                               the device lost its network; the fleet's offline test)
    stall-link[:NAME]@AT+T     stall link(s) for T s: data waits, connections survive

A link ``NAME`` may be a glob (``dev-1*``); without one every link is hit. Each fault runs
as a task of its own, so a slow broker restart does not delay the fault after it. More
kinds: ``faults.register("restart-worker", fn)`` where ``fn(fault)`` returns a detail
string; a plain function runs in a worker thread (it may block), a coroutine function on
the event loop.

Restarting a worker needs ``FaultInjector(restart_worker=fn)``: ``fn(index)`` starts worker
``index`` again, waits until it serves and returns the new process (the fleet passes
:meth:`simulators.fleet_support.WorkerPool.restart`); the injector then aims later faults
at the new process.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    "kill-worker": (False, True),
    "term-worker": (False, True),
    "stop-worker": (True, True),
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
                 = (), links: Mapping[str, LinkLike] | None = None,
                 restart_worker: Callable[[int], Any] | None = None) -> None:
        self.broker = broker
        self.workers = list(workers)
        self.links = dict(links or {})
        self.restarter = restart_worker
        self.events: list[FaultEvent] = []
        self.handlers: dict[str, Handler] = {
            "broker-restart": lambda f: self.restart_broker(f.duration_s or 0.0),
            "broker-kill": lambda f: self.kill_broker(f.duration_s),
            "broker-stop": lambda f: self.stop_broker(),
            "broker-start": lambda f: self.start_broker(),
            "kill-worker": lambda f: self.kill_worker(f.target, signal.SIGKILL, f.duration_s),
            "term-worker": lambda f: self.kill_worker(f.target, signal.SIGTERM, f.duration_s),
            "stop-worker": self.stop_worker,
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

    def _worker_index(self, target: str | int | None) -> int | None:
        """The worker a fault aims at: ``target``, else the first still alive (None: none)."""
        if not self.workers:
            raise BadInputError("a worker fault needs FaultInjector(workers=[...])")
        if target is None:
            alive = [i for i, w in enumerate(self.workers) if _alive(w)]
            return alive[0] if alive else None
        index = int(target) if str(target).isdigit() else -1
        if not 0 <= index < len(self.workers):
            raise BadInputError(f"worker {target!r}: expected an index 0-"
                                f"{len(self.workers) - 1}")
        return index

    def _signal(self, index: int, sig: signal.Signals) -> str | None:
        """Send ``sig`` to worker ``index``; None when it is gone already."""
        worker = self.workers[index]
        try:
            if isinstance(worker, int):
                os.kill(worker, sig)
            else:
                worker.send_signal(sig)
        except ProcessLookupError:
            return None
        return f"worker {index} (pid {_pid(worker)}) sent {sig.name}"

    def kill_worker(self, target: str | int | None = None,
                    sig: signal.Signals = signal.SIGKILL, down_s: float | None = None) -> str:
        """Send ``sig`` (SIGKILL, or SIGTERM: the worker drains); with ``down_s``, start the
        same worker again ``down_s`` after the signal (and after it has exited)."""
        index = self._worker_index(target)
        if index is None:
            return "no worker alive"
        if down_s is not None and self.restarter is None:
            raise BadInputError("restarting a worker needs FaultInjector(restart_worker=...)")
        t0 = time.monotonic()
        sent = self._signal(index, sig)
        detail = sent or f"worker {index} (pid {_pid(self.workers[index])}) already gone"
        if down_s is None:
            return detail
        exited = _wait_exit(self.workers[index], max(down_s, 30.0))
        if exited is None:  # a drain that does not end: the restart must not share its id
            self._signal(index, signal.SIGKILL)
            _wait_exit(self.workers[index], 5.0)
            detail += f"; still running after {max(down_s, 30.0):g} s, SIGKILLed"
        else:
            detail += f"; exited after {exited:.3f} s"
        time.sleep(max(0.0, t0 + down_s - time.monotonic()))
        restarted = time.monotonic() - t0
        new = self.restarter(index)  # type: ignore[misc]
        if new is not None and not isinstance(new, str):
            self.workers[index] = new
        return (f"{detail}; restarted {restarted:.3f} s after the signal, serving again "
                f"{time.monotonic() - t0:.3f} s after it (pid {_pid(self.workers[index])})")

    async def stop_worker(self, fault: Fault) -> str:
        """SIGSTOP worker ``fault.target`` (its connection stays open, it answers nothing),
        SIGCONT ``fault.duration_s`` later (also when the run is cancelled first)."""
        index = self._worker_index(fault.target)
        if index is None:
            return "no worker alive"
        sent = self._signal(index, signal.SIGSTOP)
        if sent is None:
            return f"worker {index} already gone"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            await asyncio.sleep(fault.duration_s or 0.0)
        finally:
            resumed = self._signal(index, signal.SIGCONT)
        return (f"{sent}, SIGCONT after {loop.time() - t0:.3f} s"
                if resumed else f"{sent}; gone before SIGCONT")

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


def _pid(worker: subprocess.Popen[Any] | asyncio.subprocess.Process | int) -> int:
    return worker if isinstance(worker, int) else worker.pid


def _wait_exit(worker: subprocess.Popen[Any] | asyncio.subprocess.Process | int,
               timeout_s: float) -> float | None:
    """Block until ``worker`` has exited (seconds it took), None after ``timeout_s``."""
    t0 = time.monotonic()
    while _alive(worker):
        if time.monotonic() - t0 > timeout_s:
            return None
        if isinstance(worker, subprocess.Popen):
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(0.05)
        else:
            time.sleep(0.05)
    return time.monotonic() - t0
