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
