"""Sub-commands that drive the whole system: ``demo`` and ``fleet``.

Each lives in its own module exposing ``add_parser(subparsers)``; this module only wires
them in. Those modules must stay cheap to import (heavy imports inside their ``run``). One
that cannot be imported is listed and explains itself when run
(:func:`splitinfer.cli.add_module_command`), never hidden. The benchmarks are registered
by :mod:`bench.cli`.
"""

from __future__ import annotations

import argparse

from splitinfer.cli import add_module_command

__all__ = ["register_demo", "register_fleet"]


def register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_module_command(sub, "demo", "simulators.support.demo")


def register_fleet(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_module_command(sub, "fleet", "simulators.fleet_cli")
