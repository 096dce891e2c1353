"""Every ``vetd`` subcommand given bad input: one line on stderr, exit 2, never a traceback."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.support.procs import run_vetd
from vetd.core.cli import build_parser


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command path (``("silence", "add")``...), read from the parser itself."""
    found: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += leaf_commands(sub, (*prefix, name))
    return found or [prefix]


COMMANDS = leaf_commands(build_parser())


def one_line_usage_error(args: list[str] | tuple[str, ...]) -> str:
    done = run_vetd(*args)
    assert done.returncode == 2, (args, done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, (args, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, (args, done.stderr)
    return lines[0]


def test_the_parser_knows_every_command() -> None:
    assert {("agent",), ("check",), ("nodes",), ("rules", "test"), ("silence", "add"), ("up",)} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_an_unknown_option_is_one_line_and_exit_2(command: tuple[str, ...]) -> None:
    line = one_line_usage_error([*command, "--no-such-option"])
    # What argparse names first: the unknown option, or a required argument still missing.
    assert line.startswith("vetd") and ("--no-such-option" in line or "required" in line), line


def test_no_command_and_a_bad_global_option() -> None:
    assert "COMMAND" in one_line_usage_error([]) or "required" in one_line_usage_error([])
    assert "loud" in one_line_usage_error(["--log-level", "loud", "nodes"])


def test_bad_values_are_named(tmp_path: Path) -> None:
    binary = tmp_path / "events.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    missing = str(tmp_path / "missing.toml")
    cases = {
        ("export", "--since", "bogus"): "--since",
        ("up", "--port", "99999"): "65535",
        ("up", "--port", "http"): "port",
        ("up", "--interval", "bogus"): "--interval",
        ("up", "--duration", "forever"): "--duration",
        ("silence", "add", "node=nid001", "--for", "soon"): "--for",
        ("silence", "expire", "first"): "first",
        ("check", "--scenario", "s.yaml", "--at", "later"): "--at",
        ("check", "--expect-gpus", "eight"): "--expect-gpus",
        ("breaker", "explode"): "explode",
        ("node",): "name",
        ("job",): "JOBID",
        ("job", "12 34"): "not a job id",
        ("jobs", "--since", "bogus"): "--since",
        ("jobs", "--node", "-o"): "--node",
        ("jobs", "--limit", "0"): "--limit",
        ("drain", "nid001"): "--reason",
        ("rules", "test", "--events", str(binary)): "not a text file",
        ("check", "--config", str(binary)): "not a text file",
        ("nodes", "--config", str(binary)): "not a text file",
        ("rules", "test", "--events", str(tmp_path / "none.jsonl")): "none.jsonl",
        ("rules", "check", str(tmp_path / "none.yaml")): "none.yaml",
        ("nodes", "--config", missing): "missing.toml",
        ("check", "--config", missing): "missing.toml",
    }
    for args, named in cases.items():
        line = one_line_usage_error(args)
        assert named in line, (args, line)


def test_since_takes_a_duration_or_an_iso_time() -> None:
    from vetd.core.cli import since

    assert abs(since("2026-12-01T08:00:00Z") - 1796112000.0) < 1e-6
    import time

    assert abs(since("1h") - (time.time() - 3600)) < 5
    with pytest.raises(argparse.ArgumentTypeError):
        since("yesterday")
