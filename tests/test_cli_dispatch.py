"""The dispatcher: a command whose module cannot be imported is listed and explained, never
hidden; the hint names the extra that command needs, not ``[all]``."""

from __future__ import annotations

from importlib import metadata
from typing import Any

import pytest

from splitinfer import cli


class _BrokenEntryPoint:
    name = "split"
    value = "splitter.cli:register_split"

    def load(self) -> Any:
        raise ImportError("No module named 'onnx'")


def _with_broken_split(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.entry_points

    def entry_points(**kw: Any) -> Any:
        found = [ep for ep in real(**kw) if ep.name != "split"]
        return [*found, _BrokenEntryPoint()] if kw.get("group") == "splitinfer.commands" \
            else real(**kw)

    monkeypatch.setattr(cli.metadata, "entry_points", entry_points)


def test_an_unimportable_command_is_listed_as_unavailable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _with_broken_split(monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "split" in out and "unavailable: No module named 'onnx'" in out
    assert "inspect" in out  # the others are still there


def test_running_it_says_why_in_one_line_naming_the_extra(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _with_broken_split(monkeypatch)
    code = cli.main(["split", "model.onnx", "--at", "x", "-o", "out"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("splitinfer split: unavailable: No module named 'onnx'")
    assert "splitinfer[splitter]" in err and "[all]" not in err


@pytest.mark.parametrize("command, extra", [("edge", "edge"), ("cloud", "cloud"),
                                            ("inspect", "splitter"), ("fleet", "all")])
def test_the_hint_names_the_commands_own_extra(command: str, extra: str) -> None:
    assert cli.extra_hint(command) == f"pip install 'splitinfer[{extra}]'"


# --- command groups that load their own modules: bench (bench.cli), demo/fleet --------


def _failing_import(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    """Importing ``broken`` fails as it does where an extra is missing (onnx absent)."""
    import importlib

    real = importlib.import_module

    def import_module(name: str, package: str | None = None) -> Any:
        if name == broken:
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")
        return real(name, package)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)


def test_bench_help_lists_every_registered_bench_and_none_is_unavailable(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import BENCHES

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    for name in BENCHES:  # each module names its sub-command as the registry does
        assert f"    {name}" in out, name
    assert "unavailable" not in out  # the dev extra has everything


def test_a_bench_that_fails_to_import_is_listed_and_explains_itself(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import cli as bench_cli

    monkeypatch.setitem(bench_cli.BENCHES, "batching", "bench.bench_batching_gone")
    _failing_import(monkeypatch, "bench.bench_batching_gone")
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "batching" in out and "(unavailable: No module named 'onnx')" in out
    assert "planner" in out  # the others are still there

    code = cli.main(["bench", "batching", "--devices", "4", "--json"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("splitinfer bench batching: unavailable: bench.bench_batching_gone "
                          "cannot be imported: No module named 'onnx'"), err
    assert err.endswith("pip install 'splitinfer[all]'"), err


def test_a_bench_module_without_add_parser_is_listed_not_hidden(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import cli as bench_cli

    monkeypatch.setitem(bench_cli.BENCHES, "resplit", "bench")  # a package, no add_parser
    code = cli.main(["bench", "resplit"])
    err = capsys.readouterr().err
    assert code == 1 and "bench defines no add_parser" in err, err


@pytest.mark.parametrize("command, module", [("demo", "simulators.support.demo"),
                                             ("fleet", "simulators.fleet_cli")])
def test_demo_and_fleet_failing_to_import_are_listed_and_explain_themselves(
        command: str, module: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _failing_import(monkeypatch, module)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "(unavailable: No module named 'onnx')" in capsys.readouterr().out
    code = cli.main([command])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"splitinfer {command}: unavailable: {module} cannot be imported: "
                          "No module named 'onnx'"), err
    assert "splitinfer[all]" in err
