"""``splitinfer bench …``: the registry of benchmark modules.

Each benchmark is a module exposing ``add_parser(subparsers)`` that adds its own
sub-command (named as in :data:`BENCHES`); it must stay cheap to import (heavy imports
inside its ``run``). A module that cannot be imported (an extra missing) is still listed
in ``splitinfer bench --help`` and, when run, says in one line which module failed and the
extra to install (:func:`splitinfer.cli.add_module_command`), never hidden.
"""

from __future__ import annotations

import argparse

from splitinfer.cli import add_module_command

__all__ = ["register", "BENCHES"]

# bench name -> module with add_parser(subparsers). overhead and faults still live in
# simulators/ while they are being reworked; they join bench/ next.
BENCHES = {
    "overhead": "bench.bench_overhead",
    "batching": "bench.bench_batching",
    "planner": "bench.bench_planner",
    "resplit": "bench.bench_resplit",
    "faults": "bench.bench_faults",
    "fuzz": "bench.bench_fuzz",
    "broker-flood": "bench.bench_broker",
    "compression": "bench.bench_compression",
    "tflite": "bench.bench_tflite",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``bench`` command group: one sub-command per entry of :data:`BENCHES`."""
    parser = sub.add_parser("bench", help="benchmarks that print each figure beside its "
                            "physical floor measured in the same run")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name, module in BENCHES.items():
        add_module_command(benches, name, module, prog=f"splitinfer bench {name}",
                           extra_of="bench")


def model_list(text: str, known: tuple[str, ...] | list[str]) -> list[str]:
    """A ``--models a,b`` value as a list; BadInputError unless every name is known."""
    from splitinfer.errors import BadInputError

    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models or set(models) - set(known):
        raise BadInputError(f"--models {text!r}: expected some of {', '.join(known)}")
    return models
