"""`vlm-hpc COMMAND`: every command reachable from the one entry point, errors reported as by `python -m`."""

from __future__ import annotations

import argparse
import importlib
import signal
from pathlib import Path

import pytest

from vlm_hpc import cli
from vlm_hpc.run.stop import STOP_SIGNALS

ROOT = Path(__file__).parent.parent


def test_every_command_has_a_main_and_the_entry_point_is_declared() -> None:
    for command, module in cli.COMMANDS.items():
        assert cli.command_main(command) is importlib.import_module(module).main, command
    assert '[project.scripts]\nvlm-hpc = "vlm_hpc.cli:main"\n' in (ROOT / "pyproject.toml").read_text()


def test_a_command_runs_its_main_with_the_rest_of_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: status: {tmp_path}/manifest.json is missing; no run has started in " \
                                      f"{tmp_path}\n"


def test_unknown_or_missing_commands_are_refused(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["stats"]) == 2
    assert "unknown command 'stats'; choose one of submit, worker, status, verify, report, export, caption, convert, " \
        "tiny-model" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: vlm-hpc {submit,")


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_help_is_complete(command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`--help` exits 0, its description is a whole sentence, every argument says what it is for, and the README's
    table of commands names every flag."""
    parsers: list[argparse.ArgumentParser] = []
    parse_args = argparse.ArgumentParser.parse_args

    def capture(parser: argparse.ArgumentParser, *args, **kwargs):
        parsers.append(parser)
        return parse_args(parser, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}  # the worker records them first
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main([command, "--help"])
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert exited.value.code == 0
    (parser,) = parsers
    assert parser.description.endswith("."), parser.description
    assert " ".join(parser.description.split()) in " ".join(capsys.readouterr().out.split())
    assert [action.dest for action in parser._actions if not action.help or action.help == argparse.SUPPRESS] == []
    readme = (ROOT / "README.md").read_text()
    assert [option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help" and f"`{option}" not in readme] == []
