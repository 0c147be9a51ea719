"""Sub-commands that drive the whole system: ``demo``, ``fleet`` and ``bench …``.

Each lives in its own module exposing ``add_parser(subparsers)``; this module only wires
them in. Those modules must stay cheap to import (heavy imports inside their ``run``).
"""

from __future__ import annotations

import argparse
import importlib
import logging

__all__ = ["register_demo", "register_fleet", "register_bench", "BENCHES"]

log = logging.getLogger(__name__)


# bench name -> module with add_parser(subparsers)
BENCHES = {
    "overhead": "simulators.bench_overhead",
    "batching": "simulators.bench_batching",
    "planner": "simulators.bench_planner",
    "resplit": "simulators.bench_resplit",
    "faults": "simulators.bench_faults",
    "fuzz": "simulators.bench_fuzz",
    "broker-flood": "simulators.bench_broker",
}


def _add(module: str, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:  # not written yet, or its extra is missing
        log.debug("%s unavailable: %s", module, exc)
        return
    add_parser = getattr(loaded, "add_parser", None)
    if add_parser is None:  # a module being written, without its command yet
        log.debug("%s has no add_parser yet", module)
        return
    try:
        add_parser(sub)
    except ImportError as exc:
        log.debug("%s unavailable: %s", module, exc)


def register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add("simulators.demo", sub)


def register_fleet(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add("simulators.fleet_cli", sub)


def register_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("bench", help="benchmarks that print each figure beside its "
                            "physical floor measured in the same run")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    for module in BENCHES.values():
        _add(module, benches)
