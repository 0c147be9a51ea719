"""The ``splitinfer`` console script: a dispatcher, nothing more.

Each package registers its subcommands under the ``splitinfer.commands`` entry-point
group (see pyproject.toml). A registering module must be cheap to import: it adds an
argparse sub-parser and sets ``func``; heavy imports (onnx, onnxruntime, paho) happen
inside ``func``. So ``splitinfer --help`` works on an edge install that lacks ``onnx``.

``func(args) -> int`` returns the exit code. Errors derived from
:class:`splitinfer.errors.SplitInferError` become one line on stderr and their
``exit_code`` (2 for bad input, 3 for a failed start-up), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

from splitinfer.errors import EXIT_BAD_INPUT, EXIT_FAILED, SplitInferError

__all__ = ["main", "build_parser", "env_default", "extra_hint", "unavailable",
           "add_module_command", "EXTRAS"]

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
log = logging.getLogger(__name__)


def env_default(flag: str, default: str | None = None) -> str | None:
    """Default for ``--some-flag`` read from ``SPLITINFER_SOME_FLAG`` when set."""
    return os.environ.get("SPLITINFER_" + flag.lstrip("-").replace("-", "_").upper(), default)


# The extra each command needs (the hint when its imports fail). A device needs only
# `edge`; `[all]` would put onnx, matplotlib and amqtt on it.
EXTRAS = {"inspect": "splitter", "split": "splitter", "quantize": "splitter",
          "bundle": "splitter", "profile": "edge", "plan": "edge", "cloud": "cloud",
          "edge": "edge", "broker": "cloud", "demo": "all", "fleet": "all", "bench": "all"}


def extra_hint(command: str) -> str:
    extra = EXTRAS.get(command, "all")
    return f"pip install 'splitinfer[{extra}]'"


def unavailable(name: str, exc: ImportError, *, prog: str | None = None,
                module: str | None = None, extra_of: str | None = None) -> Register:
    """A stand-in for a command whose module cannot be imported: listed in --help as
    unavailable, and running it says why in one line (never hidden).

    ``name`` is the sub-command (``split``, or ``batching`` under ``bench``); ``prog`` what
    the message starts with (default ``splitinfer NAME``); ``module`` the module that failed
    to import, named in the message when given; ``extra_of`` the command whose extra the
    hint names (default ``name``). Used by the top-level dispatcher and by the command
    groups that load their own modules (``splitinfer bench``, ``demo``, ``fleet``)."""
    failed = f"{module} cannot be imported: " if module else ""
    why = f"{failed}{exc}; install the extra it needs: {extra_hint(extra_of or name)}"
    prog = prog or f"splitinfer {name}"

    def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        parser = sub.add_parser(name, help=f"(unavailable: {exc})", add_help=False)

        def func(_args: argparse.Namespace) -> int:
            print(f"{prog}: unavailable: {why}", file=sys.stderr)
            return EXIT_FAILED

        def swallow(args: Sequence[str] | None = None,
                    namespace: argparse.Namespace | None = None,
                    ) -> tuple[argparse.Namespace, list[str]]:
            # whatever follows the command (options included, which nargs=REMAINDER
            # would not take first) is the unavailable command's: run it to say why
            namespace = argparse.Namespace() if namespace is None else namespace
            namespace.func = func
            return namespace, []

        parser.parse_known_args = swallow  # type: ignore[method-assign,assignment]

    return register


def add_module_command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                       module: str, *, prog: str | None = None,
                       extra_of: str | None = None) -> None:
    """Add the sub-command ``name`` that ``module.add_parser(sub)`` defines, importing
    ``module`` now (it must be cheap to import). A module that cannot be imported (its
    extra is missing) or has no ``add_parser`` is added as :func:`unavailable` instead:
    listed, and explaining itself when run, never silently left out."""
    try:
        add_parser = getattr(importlib.import_module(module), "add_parser", None)
        if add_parser is None:
            raise ImportError(f"{module} defines no add_parser(subparsers)")
        add_parser(sub)
    except ImportError as exc:
        log.debug("%s unavailable: %s", module, exc, exc_info=True)
        if name not in sub.choices:  # add_parser may have failed after adding it
            unavailable(name, exc, prog=prog, module=module, extra_of=extra_of)(sub)


def _registrars() -> list[tuple[str, Register]]:
    found = []
    for ep in sorted(metadata.entry_points(group="splitinfer.commands"), key=lambda e: e.name):
        try:
            found.append((ep.name, ep.load()))
        except ImportError as exc:  # a package whose extra is not installed: say so
            log.debug("command %s unavailable: %s", ep.name, exc)
            found.append((ep.name, unavailable(ep.name, exc)))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitinfer",
        description="Split inference for edge fleets: cut an ONNX model, run the head on "
        "devices and the tail on cloud workers over MQTT.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    try:
        version = metadata.version("splitinfer")
    except metadata.PackageNotFoundError:
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"splitinfer {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    prog = f"splitinfer {args.command}"
    try:
        return int(func(args))
    except SplitInferError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ImportError as exc:
        print(f"{prog}: error: {exc}; install the extra this command needs: "
              f"{extra_hint(args.command)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
