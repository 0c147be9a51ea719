"""Fault plans and the injector's hooks against a real mosquitto, real processes, a real proxy."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time

import pytest

from simulators.faults import Fault, FaultInjector, FaultPlan
from simulators.shaper import ShapingProxy
from simulators.support.broker import MosquittoBroker, wait_for_port
from splitinfer.errors import BadInputError


def test_plan_from_the_issue() -> None:
    plan = FaultPlan.parse("broker-restart@20s,kill-worker@30s,cut-link@10s+5s")
    assert [f.kind for f in plan] == ["cut-link", "broker-restart", "kill-worker"]  # by time
    assert plan.faults[0] == Fault("cut-link", 10.0, 5.0)
    assert plan.faults[1] == Fault("broker-restart", 20.0)
    assert FaultPlan.parse(plan.spec()) == plan
    assert FaultPlan.parse("term-worker:1@500ms,stall-link:dev-*@1s+250ms").faults == (
        Fault("term-worker", 0.5, None, "1"), Fault("stall-link", 1.0, 0.25, "dev-*"))
    assert len(FaultPlan.parse("")) == 0


def test_worker_fault_plans() -> None:
    plan = FaultPlan.parse("stop-worker:1@8s+20s,kill-worker@2s+3s,term-worker:0@4s+3s,"
                           "kill-worker@9s")
    assert plan.faults == (Fault("kill-worker", 2.0, 3.0), Fault("term-worker", 4.0, 3.0, "0"),
                           Fault("stop-worker", 8.0, 20.0, "1"), Fault("kill-worker", 9.0))
    assert FaultPlan.parse(plan.spec()) == plan


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_stop_worker_stops_then_continues() -> None:
    a, b = _sleeper(), _sleeper()

    async def main() -> tuple[str, str, str]:
        faults = FaultInjector(workers=[a, b])
        task = asyncio.create_task(faults.apply(Fault("stop-worker", 0.0, 0.4, "1")))
        await asyncio.sleep(0.2)
        during = _state(b.pid), _state(a.pid)
        event = await task
        assert event.ok and "SIGSTOP" in event.detail and "SIGCONT after" in event.detail
        return (*during, _state(b.pid))

    try:
        stopped, other, after = asyncio.run(main())
        assert stopped == "T" and other != "T" and after != "T"
        # cancelled mid-stop (the run ended): the worker is continued all the same
        async def cancelled() -> None:
            task = asyncio.create_task(FaultInjector(workers=[a]).stop_worker(
                Fault("stop-worker", 0.0, 30.0)))
            await asyncio.sleep(0.2)
            assert _state(a.pid) == "T"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancelled())
        assert _state(a.pid) != "T"
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_worker_restarts_the_same_worker(sig: signal.Signals) -> None:
    old, other = _sleeper(), _sleeper()
    started: list[tuple[int, float]] = []
    new: list[subprocess.Popen[bytes]] = []

    def restart(index: int) -> subprocess.Popen[bytes]:
        assert old.poll() is not None  # never two processes with one worker id
        started.append((index, time.monotonic()))
        new.append(_sleeper())
        return new[-1]

    try:
        faults = FaultInjector(workers=[old, other], restart_worker=restart)
        t0 = time.monotonic()
        detail = faults.kill_worker(None, sig, down_s=0.3)
        assert old.returncode == -sig
        assert [i for i, _ in started] == [0] and started[0][1] - t0 >= 0.3
        assert faults.workers[0] is new[0] and faults.workers[1] is other
        assert f"sent {sig.name}" in detail and "restarted" in detail and str(new[0].pid) in detail
        with pytest.raises(BadInputError, match="restart_worker"):
            FaultInjector(workers=[other]).kill_worker(None, sig, down_s=1.0)
    finally:
        for p in (old, other, *new):
            p.kill()
            p.wait()


def test_link_cut_cuts_every_device_link() -> None:
    plan = FaultPlan.parse("link-cut@20s+10s")
    assert plan.faults == (Fault("link-cut", 20.0, 10.0),)
    assert FaultPlan.parse(plan.spec()) == plan

    class Link:
        def __init__(self) -> None:
            self.cuts: list[float] = []

        def cut(self, duration_s: float) -> None:
            self.cuts.append(duration_s)

        def stall(self, duration_s: float) -> None:
            raise AssertionError("not a stall")

    links = {f"dev-{i}": Link() for i in range(3)}

    async def main() -> None:
        event = await FaultInjector(links=links).apply(plan.faults[0])
        assert event.ok and event.detail == "cut 3 link(s) for 10 s"

    asyncio.run(main())
    assert all(link.cuts == [10.0] for link in links.values())


@pytest.mark.parametrize(("plan", "says"), [
    ("reboot@1s", "unknown kind 'reboot'"),
    ("cut-link@10s", "needs a duration"),
    ("broker-stop@1s+2s", "takes no duration"),
    ("stop-worker@1s", "needs a duration"),
    ("broker-restart", "expected KIND[:TARGET]@AT"),
    ("broker-restart@soon", "time 'soon'"),
    ("link-cut@20s", "needs a duration"),
    ("link-cut:dev-1@20s+10s", "takes no target"),
])
def test_bad_plans_say_what_was_expected(plan: str, says: str) -> None:
    with pytest.raises(BadInputError, match=re.escape(says)):
        FaultPlan.parse(plan)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_kill_worker_by_popen_and_by_pid() -> None:
    a, b, c = _sleeper(), _sleeper(), _sleeper()
    try:
        faults = FaultInjector(workers=[a, b.pid, c])
        assert "SIGKILL" in faults.kill_worker()  # the first alive one
        assert a.wait(5) == -signal.SIGKILL
        faults.kill_worker("1", signal.SIGTERM)
        assert b.wait(5) == -signal.SIGTERM
        faults.kill_worker()  # a is dead; b is ours to reap, so a pid may look alive
        with pytest.raises(BadInputError, match="index 0-2"):
            faults.kill_worker("7")
    finally:
        for p in (a, b, c):
            p.kill()
            p.wait()


def test_broker_restart_and_kill(fresh_mosquitto: MosquittoBroker) -> None:
    faults = FaultInjector(broker=fresh_mosquitto)
    pid = fresh_mosquitto.pid
    faults.restart_broker(down_s=0.1)
    assert fresh_mosquitto.running and fresh_mosquitto.pid != pid
    wait_for_port(fresh_mosquitto.host, fresh_mosquitto.port, timeout=2)
    faults.kill_broker()
    assert not fresh_mosquitto.running
    faults.start_broker()
    assert fresh_mosquitto.running


def test_a_plan_runs_on_time_and_records_events(fresh_mosquitto: MosquittoBroker) -> None:
    worker = _sleeper()

    async def main() -> list[dict[str, object]]:
        async with ShapingProxy("lan", upstream=(fresh_mosquitto.host, fresh_mosquitto.port),
                                name="dev-1") as link:
            faults = FaultInjector(broker=fresh_mosquitto, workers=[worker],
                                   links={"dev-1": link})
            seen: list[str] = []

            async def note(fault: Fault) -> str:
                seen.append(fault.kind)
                return "noted"

            faults.register("note", note)
            events = await faults.run(FaultPlan.parse(
                "cut-link:dev-*@100ms+300ms,kill-worker@150ms,broker-restart@200ms+100ms,"
                "note@250ms,stall-link:nope@260ms+1s", extra_kinds=["note"]))
            assert link.stats.cuts == 1 and seen == ["note"]
            assert sorted(events, key=lambda e: e.start_s) == events  # in the order they began
            assert len(faults.events) == len(events) and all(e in faults.events for e in events)
            return [e.as_dict() for e in events]

    try:
        events = {e["kind"]: e for e in asyncio.run(main())}
    finally:
        worker.kill()
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert fresh_mosquitto.running
    for kind, planned in [("cut-link", 0.1), ("kill-worker", 0.15), ("broker-restart", 0.2),
                          ("note", 0.25)]:
        event = events[kind]
        assert event["ok"], event
        assert event["planned_s"] == planned
        assert event["start_s"] == pytest.approx(planned, abs=0.1)  # a shared, busy box
    restart = events["broker-restart"]
    assert restart["end_s"] - restart["start_s"] >= 0.1  # type: ignore[operator]
    assert not events["stall-link"]["ok"]  # a failed fault is an event, not a crash
    assert "matches none" in str(events["stall-link"]["detail"])
