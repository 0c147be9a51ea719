"""Fault plans and the injector's hooks against a real mosquitto, real processes, a real proxy."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys

import pytest

from simulators.broker import MosquittoBroker, wait_for_port
from simulators.faults import Fault, FaultInjector, FaultPlan
from simulators.shaper import ShapingProxy
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
    ("kill-worker@1s+2s", "takes no duration"),
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
