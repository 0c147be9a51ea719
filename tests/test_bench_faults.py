"""``splitinfer bench faults``: its plans and arithmetic, and the quick version for real
(mosquitto, ``splitinfer cloud serve`` workers, real agents; a broker kill -9 and a worker
kill -9 under load)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench.bench_faults import (
    FLEET_SCENARIOS,
    FaultSuiteConfig,
    add_parser,
    config_from_args,
    fault_figures,
    flood_figures,
    format_scenario,
    fuzz_figures,
    run_faults,
    scenario,
    window_s,
)
from simulators.faults import FaultPlan
from splitinfer.errors import BadInputError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["faults", *argv])


def test_the_issue_scenarios_are_valid_plans() -> None:
    cfg = FaultSuiteConfig()
    plans = {name: scenario(name, cfg) for name in FLEET_SCENARIOS}
    assert plans["broker-kill"].plan == "broker-kill@8s+2s"
    assert plans["worker-kill"].plan == "kill-worker:0@8s+3s"
    assert plans["worker-term"].plan == "term-worker:0@8s+3s"
    assert plans["replica-stop"].plan == "stop-worker:1@8s+20s"
    assert plans["replica-stop"].workers == 2 and plans["worker-kill"].workers == 1
    for sc in plans.values():
        (fault,) = FaultPlan.parse(sc.plan).faults
        assert fault.at_s + (fault.duration_s or 0) == sc.fault_end_s
        # the issue's scale: 2,000+ requests, and the window outlasts the fault
        assert window_s(sc, cfg) * cfg.devices * cfg.rate >= 2000
        assert window_s(sc, cfg) >= sc.fault_end_s + cfg.settle_s
    assert window_s(plans["replica-stop"], cfg) == 36.0


def test_flags_and_quick() -> None:
    cfg = config_from_args(_args("--quick", "--scenarios", "broker-kill, worker-kill",
                                 "--devices", "6"))
    assert cfg.quick and cfg.devices == 6 and cfg.requests == 300
    assert cfg.scenarios == ("broker-kill", "worker-kill")
    full = config_from_args(_args())
    assert (full.devices, full.requests, full.deadline_s) == (16, 2000, 10.0)
    assert full.scenarios == ("broker-kill", "worker-kill", "worker-term", "replica-stop",
                              "link-cut", "fuzz", "broker-flood")
    with pytest.raises(BadInputError, match=re.escape("expected a comma list from")):
        config_from_args(_args("--scenarios", "broker-kill,reboot"))
    with pytest.raises(BadInputError, match="deadline_s"):
        FaultSuiteConfig(deadline_s=float("nan"))


def _report(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sent": 100, "answered": 97, "errors": 1, "timeouts": 1, "lost": 1,
        "error_kinds": {"remote:overloaded": 1}, "within_deadline": 95,
        "answered_after_retry": 12, "attempts": {1: 85, 2: 12}, "max_ms": 2500.0,
        "p50_ms": 3.0, "p99_ms": 900.0,
        "retries": {"published": 130, "duplicates": 4, "retries": 30},
        "faults": [{"kind": "broker-kill", "target": None, "planned_s": 8.0, "start_s": 8.01,
                    "end_s": 10.05, "ok": True, "detail": "killed (SIGKILL), down 2 s"}],
        "during_faults": [{"fault": "broker-kill@8s+2s", "sent": 10, "answered": 9,
                           "answered_after_retry": 9, "within_deadline": 9, "timeouts": 1,
                           "errors": 0, "lost": 0, "max_ms": 2500.0}],
        "accuracy": {"agreement": 1.0},
    }
    return {**base, **over}


def test_figures_count_every_request_against_the_targets() -> None:
    fig = fault_figures(_report(), deadline_s=10.0)
    assert fig["sent"] == fig["answered"] + fig["errors"] + fig["timeouts"] + fig["lost"]
    assert (fig["duplicates"], fig["duplicate_answers"], fig["max_latency_s"]) == (4, 0, 2.5)
    assert not fig["pass"]
    assert {k for k, ok in fig["checks"].items() if not ok} == {
        "timeouts", "lost", "errors", "within_deadline"}
    clean = fault_figures(_report(answered=100, errors=0, timeouts=0, lost=0,
                                  within_deadline=100), deadline_s=10.0)
    assert clean["pass"]
    # a fault that failed to apply, or a wrong answer, is a miss however the counts look
    failed = _report(answered=100, errors=0, timeouts=0, lost=0, within_deadline=100)
    failed["faults"] = [{**failed["faults"][0], "ok": False}]
    assert not fault_figures(failed, deadline_s=10.0)["checks"]["fault_applied"]
    wrong = fault_figures(_report(answered=100, errors=0, timeouts=0, lost=0,
                                  within_deadline=100, accuracy={"agreement": 0.99}),
                          deadline_s=10.0)
    assert not wrong["pass"] and not wrong["checks"]["answers_correct"]
    # an agent without the counter: n/a, not 0
    older = fault_figures(_report(retries={"published": 100}), deadline_s=10.0)
    assert older["duplicates"] is None
    fig["run"] = {"what": "mosquitto kill -9", "plan": "broker-kill@8s+2s", "devices": 16,
                  "rate_per_device": 5.0, "arrivals": "constant", "workers": 1,
                  "window_s": 28.0}
    text = format_scenario("broker-kill", fig)
    assert "timeouts 1 (target 0) [MISSED]" in text and "lost 1 (target 0) [MISSED]" in text
    assert "within the deadline 95/100 (target all) [MISSED]" in text
    assert "below the issue's scale" in text  # 100 requests


def test_fuzz_and_flood_figures() -> None:
    good = {"messages": 10000, "kinds": {f"k{i}": 1 for i in range(12)}, "replies": {},
            "internal": 0, "crashes": 0, "max_stall_ms": 12.0, "rss_start_mb": 70.0,
            "rss_end_mb": 75.0, "rss_growth_mb": 5.0, "valid_sent": 500, "valid_correct": 500,
            "seed": 0}
    assert fuzz_figures(good, quick=False)["pass"]
    assert not fuzz_figures({**good, "messages": 1000}, quick=False)["pass"]
    assert fuzz_figures({**good, "messages": 1000}, quick=True)["pass"]
    stalled = fuzz_figures({**good, "max_stall_ms": 4000.0, "internal": 3}, quick=False)
    assert {k for k, ok in stalled["checks"].items() if not ok} == {"max_stall_ms", "internal"}
    assert "internal 3 (target 0) [MISSED]" in format_scenario("fuzz", stalled)
    assert flood_figures({"bound_mb": 64.0, "rss_peak_mb": 40.0})["pass"]
    assert not flood_figures({"bound_mb": 64.0, "rss_peak_mb": 1740.0})["pass"]
    assert not flood_figures({"bound_mb": None, "rss_peak_mb": 10.0})["pass"]
    assert "skipped" in format_scenario("fuzz", {"skipped": "not written yet"})


@pytest.mark.integration
def test_quick_broker_kill_and_worker_kill(tmp_path: Path) -> None:
    cfg = FaultSuiteConfig.quick_config(scenarios=("broker-kill", "worker-kill"))
    report = run_faults(cfg, out=tmp_path)
    json.dumps(report)  # the JSON report
    assert report["failed"] == [] and report["skipped"] == []
    for name in ("broker-kill", "worker-kill"):
        fig = report["scenarios"][name]
        assert fig["sent"] >= 300, fig
        # every request has exactly one outcome: answered, an error or a timeout
        assert fig["sent"] == fig["answered"] + fig["errors"] + fig["timeouts"] + fig["lost"]
        assert fig["lost"] == 0 and fig["duplicate_answers"] == 0, fig
        assert fig["checks"]["fault_applied"], fig["fault"]
        assert fig["checks"]["answers_correct"], fig["accuracy"]
        assert fig["within_deadline"] <= fig["answered"]
        (event,) = fig["fault"]["events"]
        assert event["start_s"] >= cfg.fault_at_s
    # the worker really was down: requests due then were answered only after a re-send
    kill = report["scenarios"]["worker-kill"]
    assert "SIGKILL" in kill["fault"]["events"][0]["detail"]
    assert len(kill["fault"]["worker_restarts"]) == 1
    (during,) = kill["fault"]["during"]
    assert during["sent"] > 0 and kill["answered_after_retry"] > 0


def test_worker_log_events_pick_what_the_workers_did(tmp_path: Path) -> None:
    from bench.bench_faults import worker_log_events

    (tmp_path / "worker-0.log").write_text(
        "INFO cloud_service.server: worker p-w0 serving 1 split(s)\n"
        "WARNING cloud_service.heartbeat: fenced worker 'p-w1': silent for more than 3.0 s\n"
        "INFO cloud_service.server: reconnected to mqtt://127.0.0.1:1 and resubscribed\n")
    (tmp_path / "worker-1.log").write_text("INFO nothing to see\n")
    events = worker_log_events(tmp_path)
    assert len(events) == 2 and events[0].startswith("worker-0.log: WARNING")
    assert "fenced worker 'p-w1'" in events[0] and "resubscribed" in events[1]
    assert len(worker_log_events(tmp_path, limit=1)) == 1
