"""The root ``vetd`` command: one parser that each side and any plugin adds subcommands to.

The agent (:mod:`vetd.agent.cli`), the controller (:mod:`vetd.controller.cli`)
and third-party plugins (entry-point group ``vetd``) implement
``vetd_cli_commands(subparsers)``, as pytest plugins implement
``pytest_addoption``: each adds its subparsers with ``set_defaults(func=...)``,
and nothing here names a command.

Exit codes, the same for every command: 0 fine; 1 a verdict failed (a check
result ``fail``: a node fault; an invalid rule file for ``rules check``); 2 a
usage, config or vetd error, and a check that errored or timed out (vetd could
not reach a verdict: the Slurm prolog logs it and does not drain). A ``fail``
wins over an ``error`` in the same run. A bad argument is one line on stderr, never a
traceback (``--log-level debug`` shows one for an internal error).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import pluggy

from vetd.core import __version__, hookspecs

EXIT_OK, EXIT_FAILED, EXIT_VETD = 0, 1, 2

#: Modules whose commands every vetd has, registered like a third party's.
BUILTIN_COMMANDS = ("vetd.agent.cli", "vetd.controller.cli")
#: The agent's built-in plugins, whose commands (``vetd xid``) every vetd has too.
BUILTIN_PLUGIN_COMMANDS = ("vetd.plugins.gpu_health",)
#: Optional packages a command may need, and the extra that brings them.
EXTRAS = {"cel_expr_python": "controller", "yaml": "controller",
          "amqtt": "up", "pynvml": "gpu"}



class Parser(argparse.ArgumentParser):
    """argparse with vetd's error convention: one line on stderr, exit 2 (usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_VETD, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def duration(value: str) -> float:
    """An argparse type: a duration such as 30s, 5m, 2h."""
    from vetd.core.configfile import parse_duration

    try:
        return float(parse_duration(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def since(value: str) -> float:
    """An argparse type: how far back, as a duration (24h) or an ISO 8601 time; a Unix time."""
    import datetime
    import time

    from vetd.core.configfile import parse_duration

    try:
        return time.time() - float(parse_duration(value))
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 24h or an ISO time such as 2026-12-01T08:00:00Z, got {value!r}") from None
    if when.tzinfo is None:
        when = when.astimezone()  # a local time, as a person types it
    return when.timestamp()


def port(value: str) -> int:
    """An argparse type: a TCP port, 0 for a free one."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {number}")
    return number


LOG_LEVELS = ("debug", "info", "warning", "error")


def checked(kind: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that validates with ``kind`` and keeps the text (written into a config as is)."""
    def check(value: str) -> str:
        kind(value)
        return value
    return check



def build_parser() -> Parser:
    parser = Parser(prog="vetd", description="Node health for GPU clusters: vet nodes, exclude bad ones, "
                    "bring them back. Exit 0: fine; 1: a verdict failed (a node fault); 2: usage, config or "
                    "vetd error, or a check that errored or timed out.")
    parser.add_argument("--version", action="version", version=f"vetd {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("VETD_LOG_LEVEL", "info").lower(),
                        type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
                        help="debug, info, warning or error (env VETD_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    commands = _commands()
    commands.hook.vetd_cli_commands(subparsers=sub)
    samples = {name: sample for found in commands.hook.vetd_config_samples() for name, sample in found.items()}
    config = sub.add_parser("config", help="print a full, commented config file",
                            description="Print every key of a config file at its default, with what it means "
                            "and the values it takes, generated from the config structs (packaging/config/ "
                            "holds the same files).")
    config.add_argument("--sample", required=True, choices=sorted(samples), help="which config file")
    config.set_defaults(func=lambda args: _print(samples[args.sample]()))
    return parser


def _print(text: str) -> int:
    sys.stdout.write(text)
    return EXIT_OK


def _commands() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("vetd")
    pm.add_hookspecs(hookspecs)
    # pluggy calls the last registered first: the built-ins' commands lead the help, the agent's first.
    for found in hookspecs.entry_point_plugins():
        # a broken plugin is the agent's to report (vetd plugins, vetd check)
        if found.plugin is not None and not pm.is_registered(found.plugin):
            pm.register(found.plugin, name=f"cli:{found.name}")
    for module in (*reversed(BUILTIN_PLUGIN_COMMANDS), *reversed(BUILTIN_COMMANDS)):
        pm.register(importlib.import_module(module), name=f"cli:{module}")
    return pm


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vetd.core.configfile import ConfigError

    # A command that logs elsewhere sets ``setup_logs=False`` (vetd slurm: syslog, before every job) and
    # does without structlog's import.
    if getattr(args, "setup_logs", True):
        from vetd.core import logs

        logs.setup(args.log_level)
    run: Callable[[argparse.Namespace], int] = args.func
    try:
        return run(args)
    except ConfigError as exc:
        print(f"vetd: config error: {exc}", file=sys.stderr)
        return EXIT_VETD
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"vetd: '{args.command}' needs the {extra} extra: pip install 'vetd[{extra}]' ({exc})",
              file=sys.stderr)
        return EXIT_VETD
    except Exception as exc:
        # No traceback reaches a user; --log-level debug shows it to whoever debugs vetd.
        if args.log_level == "debug":
            raise
        print(f"vetd: internal error: {type(exc).__name__}: {exc} (--log-level debug shows where)", file=sys.stderr)
        return EXIT_VETD


if __name__ == "__main__":
    sys.exit(main())
