"""The ``vetd`` command.

Node-side subcommands (``agent``, ``check``) need only the agent's light
dependencies. Controller-side ones import ``vetd.controller`` lazily and say
how to install ``vetd[controller]`` when it is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from vetd.agent import __version__

EXIT_VETD = 2

DEFAULT_AGENT_CONFIG = "/etc/vetd/agent.toml"
DEFAULT_CONTROLLER_CONFIG = "/etc/vetd/controller.toml"


def _agent_config_path(value: str | None) -> Path | None:
    """An explicit --config, else $VETD_CONFIG, else /etc/vetd/agent.toml if present."""
    chosen = value or os.environ.get("VETD_CONFIG")
    if chosen:
        return Path(chosen)
    default = Path(DEFAULT_AGENT_CONFIG)
    return default if default.exists() else None


def _controller_config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("VETD_CONTROLLER_CONFIG") or DEFAULT_CONTROLLER_CONFIG)


def _controller_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"controller TOML config (default {DEFAULT_CONTROLLER_CONFIG})")


def _agent_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"agent TOML config (default $VETD_CONFIG or {DEFAULT_AGENT_CONFIG})")


class Parser(argparse.ArgumentParser):
    """argparse with vetd's error convention: one line on stderr, exit 2 (usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_VETD, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def duration(value: str) -> float:
    """An argparse type: a duration such as 30s, 5m, 2h."""
    from vetd.agent.configfile import parse_duration

    try:
        return float(parse_duration(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def since(value: str) -> float:
    """An argparse type: how far back, as a duration (24h) or an ISO 8601 time; a Unix time."""
    import datetime
    import time

    from vetd.agent.configfile import parse_duration

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


def _checked(kind: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that validates with ``kind`` and keeps the text (written into a config as is)."""
    def check(value: str) -> str:
        kind(value)
        return value
    return check


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vetd",
        description="Node health for GPU clusters: vet nodes, exclude bad ones, bring them back.",
    )
    parser.add_argument("--version", action="version", version=f"vetd {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("VETD_LOG_LEVEL", "info").lower(),
                        type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
                        help="debug, info, warning or error (env VETD_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    agent = sub.add_parser("agent", help="run the node daemon (systemd service)",
                           description="Run the node daemon: scheduled checks and telemetry, "
                           "streamed to the controller over MQTT. Env VETD_BROKER, VETD_CLUSTER "
                           "and VETD_NODE override the config file.")
    _agent_config_arg(agent)

    check = sub.add_parser("check", help="run checks once on this node (prolog, preflight)",
                           description="Run checks once on this node and print the results. "
                           "Exit 0: all pass or warn; 1: a check failed, errored or timed out; "
                           "2: vetd itself could not run.")
    _agent_config_arg(check)
    check.add_argument("--profile", help="run the checks of this profile (prolog, periodic, full)")
    check.add_argument("--json", action="store_true", help="one JSON object per result per line")
    check.add_argument("--list", action="store_true", help="list the available checks and exit")
    check.add_argument("--capture", metavar="FILE.xml",
                       help="GPU checks read this `nvidia-smi -q -x` capture instead of NVML "
                       "(triage a dump from a node already out of service)")
    check.add_argument("--scenario", metavar="FILE.yaml", help="GPU checks follow this scenario instead of NVML")
    check.add_argument("--at", metavar="DURATION", type=duration,
                       help="with --scenario: evaluate the state this far into it (default: its end)")
    check.add_argument("--through-nvml", action="store_true",
                       help="with --capture or --scenario: serve it through a simulated libnvidia-ml, "
                       "so the live NVML code path reads it")
    check.add_argument("--expect-gpus", type=int, metavar="N",
                       help="GPUs the node should have (default: sysfs, or the capture's attached_gpus)")
    check.add_argument("checks", nargs="*", metavar="CHECK", help="checks to run (default: all)")

    plugins = sub.add_parser("plugins", help="list the plugins this node loads and what they provide",
                             description="Every plugin the agent would load with this config: its name, where "
                             "it comes from (built-in, an installed package and its version, load_plugins), "
                             "its checks and config tables; and the plugins that failed to load, with why.")
    _agent_config_arg(plugins)
    plugins.add_argument("--json", action="store_true", help="a JSON array instead of a table")

    config = sub.add_parser("config", help="print a full, commented config file",
                            description="Print every key of the agent's or controller's config file at its "
                            "default, with what it means and the values it takes, generated from the config "
                            "structs (packaging/config/ holds the same files).")
    config.add_argument("--sample", required=True, choices=("agent", "controller"),
                        help="which config file")

    controller = sub.add_parser("controller", help="run the central controller",
                                description="Subscribe to the agents' results, keep fleet state, "
                                "apply rules, drain bad nodes and alert. Env VETD_BROKER overrides "
                                "the broker.")
    _controller_config_arg(controller)

    nodes = sub.add_parser("nodes", help="show every node's state",
                           description="Node, state, online, last seen, failing checks, exclusion reason.")
    _controller_config_arg(nodes)
    nodes.add_argument("--json", action="store_true", help="a JSON array instead of a table")

    node = sub.add_parser("node", help="show one node in detail",
                          description="One node's state, latest results and audit history.")
    node.add_argument("name")
    _controller_config_arg(node)
    node.add_argument("--json", action="store_true", help="JSON instead of text")

    excluded = sub.add_parser("excluded", help="nodes vetd has excluded (for srun --exclude)",
                              description="Print the nodes vetd has excluded, folded as a hostlist "
                              "(nid[002,017-018]) ready for srun --exclude, one per line, or JSON.")
    _controller_config_arg(excluded)
    excluded.add_argument("--format", choices=("hostlist", "lines", "json"), default="hostlist",
                          help="a folded hostlist (default), one node per line, or JSON")
    excluded.add_argument("--json", action="store_const", const="json", dest="format",
                          help="JSON, as every other command says it (same as --format json)")

    drain = sub.add_parser("drain", help="take nodes out of service (through the controller)",
                           description="Exclude NODES (a hostlist, e.g. nid[001-004]) now, through the "
                           "running controller: Slurm drain with reason 'vetd: operator USER: REASON', "
                           "recorded in the audit log. Waits for the controller to take it.")
    drain.add_argument("nodes", metavar="NODES")
    drain.add_argument("--reason", required=True)
    _controller_config_arg(drain)

    resume = sub.add_parser("resume", help="return nodes to service (only vetd's drains)",
                            description="Return NODES (a hostlist) to service through the running "
                            "controller. In Slurm only drains whose reason starts with 'vetd:' are "
                            "resumed; a node an operator drained by other means is left alone.")
    resume.add_argument("nodes", metavar="NODES")
    _controller_config_arg(resume)

    breaker = sub.add_parser("breaker", help="show or reset the exclusion circuit breaker",
                             description="The breaker stops vetd from excluding more than a set share "
                             "of a partition; once open it stays open until reset.")
    breaker.add_argument("action", choices=("status", "reset"), nargs="?", default="status")
    breaker.add_argument("--partition", action="append", help="only this partition (repeatable)")
    _controller_config_arg(breaker)

    silence = sub.add_parser("silence", help="hold alerts back for a while",
                             description="Silences hold back alerts whose labels match every matcher "
                             "(label=value, label!=value, label=~regex, label!~regex), until they expire. "
                             "Decisions (drains, healing) go on; only the alerts are held.")
    silence_sub = silence.add_subparsers(dest="silence_command", required=True, metavar="ACTION",
                                         parser_class=Parser)
    silence_add = silence_sub.add_parser("add", help="add a silence")
    silence_add.add_argument("matchers", nargs="+", metavar="MATCHER", help="e.g. node=nid001 alertname=~xid.*")
    silence_add.add_argument("--for", dest="duration", required=True, metavar="DURATION", type=duration,
                             help="e.g. 2h")
    silence_add.add_argument("--comment", default="", help="why (shown with every silenced alert)")
    _controller_config_arg(silence_add)
    silence_list = silence_sub.add_parser("list", help="list silences")
    silence_list.add_argument("--all", action="store_true", help="expired ones too")
    _controller_config_arg(silence_list)
    silence_expire = silence_sub.add_parser("expire", help="end a silence now")
    silence_expire.add_argument("id", type=int)
    _controller_config_arg(silence_expire)

    rules = sub.add_parser("rules", help="validate rule files",
                           description="Work with controller rule files.")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION", parser_class=Parser)
    rules_check = rules_sub.add_parser("check", help="validate rule files (file, line, rule, CEL error)")
    rules_check.add_argument("files", nargs="*", metavar="FILE", help="default: the rules vetd ships")
    rules_reload = rules_sub.add_parser(
        "reload", help="make the running controller load its rule files again",
        description="The running controller re-reads its rule files (as on SIGHUP) and says how many "
        "rules are in force; a bad file leaves the rules in force untouched and says why.")
    _controller_config_arg(rules_reload)
    rules_test = rules_sub.add_parser(
        "test", help="replay recorded results/events and print every decision",
        description="Replay an events file (JSON lines; `vetd export --events` writes one) against rule "
        "files, with the messages' own timestamps as the clock, and print every decision the controller "
        "would take: rules firing and resolving, drains, nodes marked failed, breaker trips, alerts.")
    rules_test.add_argument("files", nargs="*", metavar="FILE", help="default: the rules vetd ships")
    rules_test.add_argument("--events", required=True, metavar="EVENTS.jsonl")
    rules_test.add_argument("--config", help="controller config whose breaker, repeat and labels to use")
    rules_test.add_argument("--json", action="store_true", help="one JSON object per decision")

    export = sub.add_parser("export", help="export the controller's history",
                            description="Write the controller's stored results and events as JSON lines, "
                            "the format `vetd rules test --events` replays.")
    export.add_argument("--events", action="store_true",
                        help="results and events as JSON lines: what export writes (kept for old scripts)")
    export.add_argument("--node", help="only this node")
    export.add_argument("--since", metavar="WHEN", type=since,
                        help="only since then: a duration back (24h) or an ISO time (2026-12-01T08:00:00Z)")
    _controller_config_arg(export)

    up = sub.add_parser("up", help="run everything on this machine with embedded defaults",
                        description="One-machine vetd: an embedded MQTT broker on 127.0.0.1, the "
                        "controller with SQLite state and the default rules, and an agent for this "
                        "machine. Prints where things are, then the node table as it changes.")
    up.add_argument("--state-dir", default=os.environ.get("VETD_STATE_DIR", "vetd-state"),
                    help="where the database, configs and logs go (default ./vetd-state)")
    up.add_argument("--port", type=port, default=0, help="broker port (default: a free one)")
    up.add_argument("--interval", default="10s", type=_checked(duration),
                    help="check interval of the local agent (default 10s)")
    up.add_argument("--duration", default=None, type=duration,
                    help="stop after this long (e.g. 30s); default: until Ctrl-C")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vetd.agent import logs
    from vetd.agent.configfile import ConfigError

    logs.setup(args.log_level)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"vetd: config error: {exc}", file=sys.stderr)
        return EXIT_VETD
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # No traceback reaches a user; --log-level debug shows it to whoever debugs vetd.
        if args.log_level == "debug":
            raise
        print(f"vetd: internal error: {type(exc).__name__}: {exc} (--log-level debug shows where)", file=sys.stderr)
        return EXIT_VETD


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "agent":
        from vetd.agent.daemon import run_agent

        return run_agent(_agent_config_path(args.config))
    if args.command == "check":
        return _check(args)
    if args.command == "plugins":
        return _plugins(args)
    if args.command == "config":
        return _config_sample(args.sample)
    try:
        from vetd.controller import cli as controller_cli
    except ImportError as exc:
        print(f"vetd: '{args.command}' needs the controller extra: pip install 'vetd[controller]' ({exc})",
              file=sys.stderr)
        return EXIT_VETD
    return controller_cli.dispatch(args, _controller_config_path(getattr(args, "config", None)))


def _check(args: argparse.Namespace) -> int:
    from vetd.agent import oneshot
    from vetd.agent.config import load_agent_config
    from vetd.agent.configfile import ConfigError
    from vetd.agent.pluginhost import PluginError, PluginHost

    try:
        config = load_agent_config(_agent_config_path(args.config))
        gpu = _gpu_overrides(args)
        if gpu:
            config.plugins.setdefault("gpu_health", {}).update(gpu)
        if args.list:
            for check in PluginHost(config).register_checks():
                print(f"{check.name:24} {check.plugin:12} {','.join(sorted(check.profiles)):24} {check.description}")
            return 0
        return oneshot.main(config, args.checks, args.profile, args.json)
    except ConfigError as exc:
        print(f"vetd: config error: {exc}", file=sys.stderr)
        return EXIT_VETD
    except (oneshot.SelectionError, PluginError) as exc:
        print(f"vetd: {exc}", file=sys.stderr)
        return EXIT_VETD
    except Exception as exc:  # noqa: BLE001 - exit 2 means "vetd itself failed", never 1
        print(f"vetd: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_VETD


def _plugins(args: argparse.Namespace) -> int:
    import json

    from vetd.agent.config import load_agent_config
    from vetd.agent.pluginhost import PluginHost

    host = PluginHost(load_agent_config(_agent_config_path(args.config)))
    checks = host.register_checks()
    tables = host.table_plugins()
    rows = [{"name": name, "origin": host.origins.get(name, "?"), "status": "broken" if name in host.broken else "ok",
             "checks": sorted(c.name for c in checks if c.plugin == name),
             "tables": sorted(f"plugins.{t}" for t, owner in tables.items() if owner == name),
             "error": host.broken.get(name, "")}
            for name in sorted({*host.names(), *host.broken})]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'PLUGIN':14} {'ORIGIN':22} {'STATUS':7} CHECKS / ERROR")
    for row in rows:
        detail = row["error"] or ", ".join(row["checks"]) or "-"
        print(f"{row['name']:14} {row['origin']:22} {row['status']:7} {detail}")
    return 0


def _config_sample(which: str) -> int:
    if which == "agent":
        from vetd.agent.configsample import agent_sample

        sys.stdout.write(agent_sample())
        return 0
    try:
        from vetd.controller.config import controller_sample
    except ImportError as exc:
        print(f"vetd: the controller sample needs the controller extra: pip install 'vetd[controller]' ({exc})",
              file=sys.stderr)
        return EXIT_VETD
    sys.stdout.write(controller_sample())
    return 0


def _gpu_overrides(args: argparse.Namespace) -> dict[str, object]:
    """``--capture`` and friends are shortcuts for ``[plugins.gpu_health]`` keys."""
    from vetd.agent.configfile import ConfigError

    if args.capture and args.scenario:
        raise ConfigError("--capture and --scenario: choose one")
    overrides: dict[str, object] = {}
    if args.capture:
        overrides.update(source="capture", capture=str(Path(args.capture).resolve()))
    if args.scenario:
        overrides.update(source="scenario", scenario=str(Path(args.scenario).resolve()))
        overrides["scenario_at"] = args.at if args.at is not None else 1e9
    elif args.at is not None:
        raise ConfigError("--at needs --scenario")
    if args.through_nvml:
        if not (args.capture or args.scenario):
            raise ConfigError("--through-nvml needs --capture or --scenario")
        overrides["through_nvml"] = True
    if args.expect_gpus is not None:
        overrides["expected_gpus"] = args.expect_gpus
    return overrides


if __name__ == "__main__":
    sys.exit(main())
