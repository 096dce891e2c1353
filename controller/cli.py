"""The controller's ``vetd`` commands: controller, nodes, node, jobs, job, campaigns, excluded, drain,
resume, breaker, silence, rules, export, up.

Registered on the root command (:mod:`vetd.core.cli`) through ``vetd_cli_commands``.
This module imports only what every install has; a command that needs the
``controller`` or ``up`` extra imports it when it runs, and the root command
names the extra when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vetd.core.cli import EXIT_VETD, Parser, checked, duration, port, since
from vetd.core.configfile import ConfigError
from vetd.core.hookspecs import hookimpl
from vetd.core.output import clean, table

if TYPE_CHECKING:
    # Imported where a command runs, not here: every `vetd` (`vetd slurm prolog` on each node before each
    # job, `vetd --help`) registers these commands, and the store, its model and the telemetry database
    # cost more to import than the rest of the start-up (tests/test_cli.py holds the line).
    from vetd.controller.config import ControllerConfig
    from vetd.controller.store import Store
    from vetd.controller.telemetry import StoredWindow, TelemetryStore

DEFAULT_CONTROLLER_CONFIG = "/etc/vetd/controller.toml"


def controller_config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("VETD_CONTROLLER_CONFIG") or DEFAULT_CONTROLLER_CONFIG)


def _controller_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"controller TOML config (default {DEFAULT_CONTROLLER_CONFIG})")


def _config(args: argparse.Namespace) -> ControllerConfig:
    from vetd.controller.config import load_controller_config

    return load_controller_config(controller_config_path(getattr(args, "config", None)))


@hookimpl
def vetd_cli_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub = subparsers
    controller = sub.add_parser("controller", help="run the central controller",
                                description="Subscribe to the agents' results, keep fleet state, "
                                "apply rules, drain bad nodes and alert. Env VETD_BROKER overrides "
                                "the broker.")
    _controller_config_arg(controller)
    controller.set_defaults(func=run_controller)

    nodes = sub.add_parser("nodes", help="show every node's state",
                           description="Node, state, online, last seen, failing checks, exclusion reason.")
    _controller_config_arg(nodes)
    nodes.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    nodes.set_defaults(func=reading(lambda store, _config, args: show_nodes(store, args.json, sys.stdout)))

    node = sub.add_parser("node", help="show one node in detail",
                          description="One node's state, latest results and audit history.")
    node.add_argument("name")
    _controller_config_arg(node)
    node.add_argument("--json", action="store_true", help="JSON instead of text")
    node.set_defaults(func=reading(lambda store, config, args: show_node(store, config, args.name, args.json,
                                                                         sys.stdout)))

    jobs = sub.add_parser("jobs", help="list jobs and the nodes their outcome points at",
                          description="Jobs as the agents announced them (vetd slurm prolog/epilog, or the "
                          "control socket), newest first: user, start, runtime, outcome, nodes, and which "
                          "nodes the outcome points at (those that showed something while it ran).")
    _controller_config_arg(jobs)
    jobs.add_argument("--node", type=checked(node_name), help="only jobs that ran on this node")
    jobs.add_argument("--failed", action="store_true", help="only failed jobs ([jobs] failed_states)")
    jobs.add_argument("--since", metavar="WHEN", type=since,
                      help="only jobs running or ended since then: a duration back (24h) or an ISO time")
    jobs.add_argument("--limit", type=at_least(1), default=200, help="at most this many, newest first (200)")
    jobs.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    jobs.set_defaults(func=reading(lambda store, config, args: show_jobs(store, config, args, sys.stdout)))

    # `vetd campaigns` lists, `vetd campaigns show ID` shows one: one parser, as `vetd job` (below).
    campaigns = sub.add_parser(
        "campaigns", help="list the controller's campaigns; `campaigns show ID`: one, node by node",
        usage="%(prog)s [-h] [--config CONFIG] [--json] {[--since WHEN] [--limit N] | show ID}",
        description="`vetd campaigns`: the campaigns the controller ran (`vetd vet NODES`, [campaigns] "
        "interval), newest first: id, start, who asked, state (running, done, failed), pair test, nodes, "
        "how many were good, bad, absent and skipped, the bad nodes and links found. `vetd campaigns show "
        "ID`: one campaign, each node's verdict, why, and the median bandwidth of its pairs.")
    campaigns.add_argument("words", nargs="*", metavar="show ID", help="`show` and a campaign id")
    _controller_config_arg(campaigns)
    campaigns.add_argument("--since", metavar="WHEN", type=since,
                           help="only campaigns running or ended since then: a duration back (24h) or an ISO time")
    campaigns.add_argument("--limit", type=at_least(1), default=None, help="at most this many, newest first (200)")
    campaigns.add_argument("--json", action="store_true", help="JSON instead of a table")
    campaigns.set_defaults(func=lambda args: run_campaigns(campaigns, args))

    # One parser for `vetd job JOBID` (issue 17) and `vetd job report JOBID` (issue 18): a job id is
    # never the word `report` (Slurm's are numbers), and each form refuses the other's options.
    job = sub.add_parser(
        "job", help="show one job (its nodes, what they showed, what it points at); `job report JOBID`: "
        "its telemetry report", usage="%(prog)s [-h] [--config CONFIG] [--json] {JOBID [--run N] | "
        "report JOBID [--png DIR] [--html FILE]}",
        description="`vetd job JOBID`: one job: user, start, end, exit state and code, each node's GPUs and "
        "part, the failed results, events and XIDs its nodes reported while it ran, the node(s) its outcome "
        "points at, and what rules decided on it. `vetd job report JOBID`: from the telemetry windows tagged "
        "with the job, per GPU the mean and p95 of each metric, energy and time throttled; flags (idle GPU, "
        "straggler, memory nearly full, throttling, XIDs and failed checks during the job) with their "
        "evidence; the GSSR saturation score per GPU and for the job (a labelled proxy where GPUs have no "
        "GPM); exit 1 when the job has no telemetry.")
    job.add_argument("words", nargs="+", metavar="JOBID", help="a job id, or `report` and a job id")
    _controller_config_arg(job)
    job.add_argument("--run", type=at_least(0), default=None, metavar="N",
                     help="an earlier run of a job requeued under its id: 1 the one before the latest, …")
    job.add_argument("--json", action="store_true", help="JSON instead of text")
    job.add_argument("--png", metavar="DIR", help="report: write the figures (and the plotted series as JSON) here")
    job.add_argument("--html", metavar="FILE", help="report: write one self-contained HTML page")
    job.set_defaults(func=lambda args: run_job(job, args))

    excluded = sub.add_parser("excluded", help="nodes vetd has excluded (for srun --exclude)",
                              description="Print the nodes vetd has excluded, folded as a hostlist "
                              "(nid[002,017-018]) ready for srun --exclude, one per line, or JSON.")
    _controller_config_arg(excluded)
    excluded.add_argument("--format", choices=("hostlist", "lines", "json"), default="hostlist",
                          help="a folded hostlist (default), one node per line, or JSON")
    excluded.add_argument("--json", action="store_const", const="json", dest="format",
                          help="JSON, as every other command says it (same as --format json)")
    excluded.set_defaults(func=reading(lambda store, _config, args: show_excluded(store, args.format, sys.stdout)))

    drain = sub.add_parser("drain", help="take nodes out of service (through the controller)",
                           description="Exclude NODES (a hostlist, e.g. nid[001-004]) now, through the "
                           "running controller: Slurm drain with reason 'vetd: operator USER: REASON', "
                           "recorded in the audit log. Waits for the controller to take it.")
    drain.add_argument("nodes", metavar="NODES")
    drain.add_argument("--reason", required=True)
    _controller_config_arg(drain)
    drain.set_defaults(func=run_operator_request)

    resume = sub.add_parser("resume", help="return nodes to service (only vetd's drains)",
                            description="Return NODES (a hostlist) to service through the running "
                            "controller. In Slurm only drains whose reason starts with 'vetd:' are "
                            "resumed; a node an operator drained by other means is left alone.")
    resume.add_argument("nodes", metavar="NODES")
    _controller_config_arg(resume)
    resume.set_defaults(func=run_operator_request)

    breaker = sub.add_parser("breaker", help="show or reset the exclusion circuit breaker",
                             description="The breaker stops vetd from excluding more than a set share "
                             "of a partition; once open it stays open until reset.")
    breaker.add_argument("action", choices=("status", "reset"), nargs="?", default="status")
    breaker.add_argument("--partition", action="append", help="only this partition (repeatable)")
    breaker.add_argument("--json", action="store_true", help="status as a JSON array instead of a table")
    _controller_config_arg(breaker)
    breaker.set_defaults(func=run_operator_request)

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
    silence_add.set_defaults(func=run_silence)
    silence_list = silence_sub.add_parser("list", help="list silences")
    silence_list.add_argument("--all", action="store_true", help="expired ones too")
    silence_list.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    _controller_config_arg(silence_list)
    silence_list.set_defaults(func=run_silence)
    silence_expire = silence_sub.add_parser("expire", help="end a silence now")
    silence_expire.add_argument("id", type=int)
    _controller_config_arg(silence_expire)
    silence_expire.set_defaults(func=run_silence)

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
    rules_reload.set_defaults(func=run_operator_request)
    rules_test = rules_sub.add_parser(
        "test", help="replay recorded results/events and print every decision",
        description="Replay an events file (JSON lines; `vetd export --events` writes one) against rule "
        "files, with the messages' own timestamps as the clock, and print every decision the controller "
        "would take: rules firing and resolving, drains, nodes marked failed, breaker trips, alerts, "
        "healing steps, resumes and diagnoses. Besides results, events and states (a new session and "
        "boot_id: a reboot), a line may be an agent's reply to the latest command sent to its node "
        "({\"kind\": \"reply\", \"ok\": true, ...}) or an operator's drain or resume "
        "({\"kind\": \"operator\", \"action\": \"resume\", ...}).")
    rules_test.add_argument("files", nargs="*", metavar="FILE", help="default: the rules vetd ships")
    rules_test.add_argument("--events", required=True, metavar="EVENTS.jsonl")
    rules_test.add_argument("--config", help="controller config whose breaker, repeat, history, healing and "
                            "labels to use")
    rules_test.add_argument("--json", action="store_true", help="one JSON object per decision")
    rules_check.set_defaults(func=lambda args: run_rules_check(rule_files(args.files)))
    rules_test.set_defaults(func=run_rules_test)

    export = sub.add_parser("export", help="export the controller's history",
                            description="Write the controller's stored results and events as JSON lines, "
                            "the format `vetd rules test --events` replays; with --telemetry, telemetry "
                            "windows: a job's in full (--job), else the nodes' downsampled history.")
    export.add_argument("--events", action="store_true",
                        help="results and events as JSON lines: what export writes (kept for old scripts)")
    export.add_argument("--telemetry", action="store_true",
                        help="telemetry windows instead: one line per window per GPU (and per node)")
    export.add_argument("--job", metavar="JOBID", help="with --telemetry: every window of this job, in full")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="with --telemetry: JSON lines (default) or CSV (a column per metric, _min/_max beside)")
    export.add_argument("--node", help="only this node")
    export.add_argument("--since", metavar="WHEN", type=since,
                        help="only since then: a duration back (24h) or an ISO time (2026-12-01T08:00:00Z)")
    _controller_config_arg(export)
    export.set_defaults(func=reading(run_export))

    keys = sub.add_parser("keys", help="command signing keys",
                          description="Each node gets its own command key, derived from the controller's "
                                      "master key (command_key_file) and the node's cluster and name.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION", parser_class=Parser)
    derive = keys_sub.add_parser("derive", help="write (or print) one node's command key",
                                 description="Derive NODE's key from the master key; put it on the node, "
                                             "mode 0600, as [commands] key_file.")
    derive.add_argument("--master", required=True, help="the master key file (the controller's command_key_file)")
    derive.add_argument("--cluster", required=True, type=checked(node_name), help="the node's cluster")
    derive.add_argument("--node", required=True, type=checked(node_name), help="the node's name")
    derive.add_argument("--out", help="write the key to this file, created 0600 (default: print it)")
    derive.set_defaults(func=run_keys_derive)

    up = sub.add_parser("up", help="run everything on this machine with embedded defaults",
                        description="One-machine vetd: an embedded MQTT broker on 127.0.0.1, the "
                        "controller with SQLite state and the default rules, and an agent for this "
                        "machine. Prints where things are, then the node table as it changes.")
    up.add_argument("--state-dir", default=os.environ.get("VETD_STATE_DIR", "vetd-state"),
                    help="where the database, configs and logs go (default ./vetd-state)")
    up.add_argument("--port", type=port, default=0, help="broker port (default: a free one)")
    up.add_argument("--interval", default="10s", type=checked(duration),
                    help="check interval of the local agent (default 10s)")
    up.add_argument("--duration", default=None, type=duration,
                    help="stop after this long (e.g. 30s); default: until Ctrl-C")
    up.set_defaults(func=run_up)


@hookimpl
def vetd_config_samples() -> Mapping[str, Callable[[], str]]:
    def controller_sample() -> str:  # the config structs are imported when the sample is asked for
        from vetd.controller.config import controller_sample

        return controller_sample()

    return {"controller": controller_sample}


def node_name(value: str) -> str:
    """An argparse type: a cluster or node name as the protocol allows it (never an option such as ``-o``)."""
    from vetd.core.protocol import valid_name

    if not valid_name(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a node or cluster name (a letter or digit, then "
                                         "letters, digits, '_', '.', '-'; at most 64)")
    return value


def job_id(value: str) -> str:
    """An argparse type: a job id as the protocol carries it."""
    from vetd.core.protocol import JOB_ID_PATTERN

    if not value or not re.search(JOB_ID_PATTERN, value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a job id (letters, digits, '_.:+-'; at most 64)")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""
    def number(value: str) -> int:
        try:
            found = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if found < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {found}")
        return found
    return number


def run_keys_derive(args: argparse.Namespace) -> int:
    from vetd.core.configfile import read_key
    from vetd.core.files import create_private
    from vetd.core.protocol import node_key

    key = node_key(read_key(args.master, "--master"), args.cluster, args.node) + b"\n"
    if not args.out:
        sys.stdout.buffer.write(key)
        return 0
    create_private(args.out)
    with open(args.out, "r+b") as out:  # noqa: PTH123 - created 0600 above, written in place
        out.truncate()
        out.write(key)
    print(f"wrote {args.node}'s command key to {args.out} (mode 0600); on the node: [commands] key_file",
          file=sys.stderr)
    return 0


def run_controller(args: argparse.Namespace) -> int:
    import asyncio

    from vetd.controller.service import Controller

    return asyncio.run(Controller(_config(args)).run())


def run_up(args: argparse.Namespace) -> int:
    from vetd.controller.embedded import up

    return up(args)


def reading(view: Callable[[Store, ControllerConfig, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command that reads the controller's database (read-only) and prints a view of it."""
    def run(args: argparse.Namespace) -> int:
        from vetd.controller.store import Store

        config = _config(args)
        try:
            store = Store(config.store.path, readonly=True)
        except FileNotFoundError as exc:
            print(f"vetd: {exc} (has the controller run with this config?)", file=sys.stderr)
            return EXIT_VETD
        try:
            return view(store, config, args)
        finally:
            store.close()
    return run


def telemetry_store(config: ControllerConfig) -> TelemetryStore:
    """The telemetry database, read-only (``FileNotFoundError`` when the controller never made it)."""
    from vetd.controller.telemetry import TelemetryStore, default_path

    return TelemetryStore(config.telemetry.path or default_path(config.store.path), readonly=True)


def run_export(store: Store, config: ControllerConfig, args: argparse.Namespace) -> int:
    from vetd.controller.replay import export_events

    if args.telemetry:
        return run_export_telemetry(config, args)
    if args.job or args.format != "jsonl":
        print("vetd: --job and --format go with --telemetry", file=sys.stderr)
        return EXIT_VETD
    count = export_events(store, sys.stdout, args.node, args.since or 0.0)
    print(f"vetd: exported {count} lines", file=sys.stderr)
    return 0


def run_export_telemetry(config: ControllerConfig, args: argparse.Namespace) -> int:
    from vetd.controller.telemetryexport import export_windows

    try:
        telemetry = telemetry_store(config)
    except FileNotFoundError as exc:
        print(f"vetd: {exc} (has the controller run with this config, [telemetry] enabled?)", file=sys.stderr)
        return EXIT_VETD
    start = args.since if args.since is not None else time.time() - 86400.0

    def windows() -> Iterable[StoredWindow]:  # read twice for CSV: its columns, then its rows
        if args.job:
            return telemetry.job_windows(args.job, config.cluster)
        return telemetry.node_windows(start, time.time() + 86400.0, args.node, config.cluster)

    try:
        count = export_windows(windows, sys.stdout, args.format, node=args.node)
    finally:
        telemetry.close()
    if not count and args.job:
        print(f"vetd: no telemetry of job {clean(args.job)!r} in {telemetry.path}", file=sys.stderr)
        return 1
    print(f"vetd: exported {count} windows", file=sys.stderr)
    return 0


def run_job(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``vetd job JOBID`` or ``vetd job report JOBID``; a bad word or option is one line, exit 2."""
    words = args.words
    report = words[0] == "report" and len(words) == 2
    if words == ["report"]:
        parser.error("`vetd job report` needs a JOBID")
    if len(words) != 1 and not report:
        parser.error(f"expected JOBID or `report JOBID`, got {' '.join(map(repr, words))}")
    try:
        args.job_id = job_id(words[-1])
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument JOBID: {exc}")
    if report and args.run is not None:
        parser.error("--run goes with `vetd job JOBID`; a report is of the job's telemetry, every run")
    if not report and (args.png or args.html):
        parser.error("--png and --html go with `vetd job report JOBID`")
    if report:
        return reading(run_job_report)(args)
    return reading(lambda store, config, args: show_job(store, config, args.job_id, args.json, sys.stdout,
                                                        args.run or 0))(args)


#: A campaign's id as the controller makes them (12 hex digits), or any other word of letters and digits.
CAMPAIGN_ID = re.compile(r"[A-Za-z0-9]{1,64}")


def run_campaigns(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``vetd campaigns`` or ``vetd campaigns show ID``; a bad word or option is one line, exit 2."""
    words = args.words
    if not words:
        return reading(lambda store, config, args: show_campaigns(store, config, args, sys.stdout))(args)
    if words[0] != "show":
        parser.error(f"expected `show ID` or nothing, got {' '.join(map(repr, words))}")
    if len(words) != 2:
        parser.error("`vetd campaigns show` takes one campaign ID")
    if not CAMPAIGN_ID.fullmatch(words[1]):
        parser.error(f"argument ID: {clean(words[1])[:64]!r} is not a campaign id (letters and digits)")
    if args.since is not None or args.limit is not None:
        parser.error("--since and --limit go with `vetd campaigns`, not with `show ID`")
    return reading(lambda store, config, args: show_campaign(store, config, words[1], args.json, sys.stdout))(args)


def run_job_report(store: Store, config: ControllerConfig, args: argparse.Namespace) -> int:
    from vetd.controller.jobreport import run_report

    try:
        telemetry = telemetry_store(config)
    except FileNotFoundError as exc:
        print(f"vetd: {exc} (has the controller run with this config, [telemetry] enabled?)", file=sys.stderr)
        return EXIT_VETD
    try:
        return run_report(store, telemetry, config, args)
    finally:
        telemetry.close()


REQUEST_WAIT_S = 30.0


def _actor() -> str:
    import getpass

    return os.environ.get("SUDO_USER") or os.environ.get("USER") or getpass.getuser()


def run_operator_request(args: argparse.Namespace) -> int:
    """Hand a drain, resume or breaker reset to the running controller and wait for it."""
    from ClusterShell.NodeSet import NodeSet

    from vetd.controller.store import Store

    config = _config(args)
    store = Store(config.store.path)
    try:
        if args.command == "breaker" and args.action == "status":
            breakers = store.breakers()
            if args.json:
                print(json.dumps([dict(row) for row in breakers], indent=1))
            elif not breakers:
                print("breaker closed in every partition")
            else:
                sys.stdout.write(table(("PARTITION", "STATE", "SINCE", "REASON"), [
                    (row["partition"], "OPEN" if row["open"] else "closed", _when(row["since"]), row["reason"])
                    for row in breakers]))
            return 0
        if args.command == "breaker":
            request_id = store.submit(_actor(), "breaker_reset", args.partition or [])
        elif args.command == "rules":
            request_id = store.submit(_actor(), "rules_reload")
        else:
            try:
                names = list(NodeSet(args.nodes))
            except Exception as exc:  # noqa: BLE001 - ClusterShell raises several parse errors
                print(f"vetd: {args.nodes!r} is not a hostlist: {exc}", file=sys.stderr)
                return EXIT_VETD
            from vetd.core.protocol import valid_name

            bad = [name for name in names if not valid_name(name)]
            if bad:  # a name such as `-o…` must never reach scontrol as an option
                print(f"vetd: {clean(bad[0])!r} is not a node name (a letter or digit, then letters, digits, "
                      "'_', '.', '-'; at most 64)", file=sys.stderr)
                return EXIT_VETD
            targets, problems = store.resolve_nodes(names, config.cluster)
            if problems:
                print(f"vetd: {problems[0]}; set `cluster` in {config.source}", file=sys.stderr)
                return EXIT_VETD
            request_id = store.submit(_actor(), args.command, targets, getattr(args, "reason", "") or "")
        deadline = time.monotonic() + REQUEST_WAIT_S
        while time.monotonic() < deadline:
            request = store.request(request_id)
            if request is not None and request["status"] != "pending":
                results = json.loads(request["result"]) if request["result"] else []
                if request["status"] != "done":
                    print(f"vetd: request {request['status']}: {results}", file=sys.stderr)
                    return 1
                for item in results if isinstance(results, list) else []:
                    print(" ".join(f"{k}={v}" for k, v in item.items()))
                return 0
            time.sleep(0.1)
        print(f"vetd: the controller has not taken request {request_id} within {REQUEST_WAIT_S:g}s "
              "(is `vetd controller` running with this config?); it expires unapplied", file=sys.stderr)
        return 1
    finally:
        store.close()


def run_campaign(args: argparse.Namespace) -> int:
    """``vetd vet NODES --config C``: the running controller runs a campaign on the idle ones among NODES;
    print its verdicts (as ``vetd vet`` in a job does) and write the good and bad node lists."""
    from ClusterShell.NodeSet import NodeSet

    for option, given in (("--protocol", args.protocol), ("--port", args.port)):
        if given is not None:
            print(f"vetd: vet: {option} is for a job's vetd vet; a campaign (NODES) measures pairs only, through "
                  "the agents", file=sys.stderr)
            return EXIT_VETD
    try:
        names = list(NodeSet(args.nodes))
    except Exception as exc:  # noqa: BLE001 - ClusterShell raises several parse errors
        print(f"vetd: {args.nodes!r} is not a hostlist: {exc}", file=sys.stderr)
        return EXIT_VETD
    from vetd.core.protocol import valid_name

    if bad := [name for name in names if not valid_name(name)]:
        print(f"vetd: {clean(bad[0])!r} is not a node name", file=sys.stderr)
        return EXIT_VETD
    if args.need is not None and not 0 <= args.need <= len(names):
        print(f"vetd: vet: --need {args.need}: NODES has {len(names)} nodes", file=sys.stderr)
        return EXIT_VETD
    params: dict[str, object] = {}
    if hasattr(args, "test"):
        params["test"] = args.test
    if hasattr(args, "rounds"):
        params["rounds"] = args.rounds or 0  # 0: every pair
    for key in ("deadline", "slow_fraction", "min_gbps"):
        if hasattr(args, key):
            params[key] = float(getattr(args, key))
    from vetd.controller.config import load_controller_config
    from vetd.controller.store import Store

    config = load_controller_config(controller_config_path(args.config))
    store = Store(config.store.path)
    try:
        targets, problems = store.resolve_nodes(names, config.cluster)
        if problems:
            print(f"vetd: {problems[0]}; set `cluster` in {config.source}", file=sys.stderr)
            return EXIT_VETD
        request_id = store.submit(_actor(), "vet", targets, params=params)
        request = _campaign_answer(store, request_id)
    finally:
        store.close()
    if isinstance(request, str):
        print(f"vetd: vet: {request}", file=sys.stderr)
        return EXIT_VETD
    report = request
    if args.json:
        for row in report["nodes"]:
            print(json.dumps({**row, "campaign": report["campaign"]}))
    else:
        from vetd.controller.views import format_report

        sys.stdout.write(format_report(report))
    from vetd.agent.vet import write_list

    write_list(args.good_file, report["good"])
    write_list(args.bad_file, report["bad"])
    measured = len(report["nodes"]) - len(report["skipped"])
    if not measured:
        return EXIT_VETD
    if report["bad"] or (args.need is not None and len(report["good"]) < args.need):
        return 1
    return 0


def _campaign_answer(store: Store, request_id: int) -> dict[str, Any] | str:
    """The report of a campaign request once the controller carried it out, or why there is none."""
    taken_by = time.monotonic() + REQUEST_WAIT_S
    done_by = float("inf")
    while time.monotonic() < min(taken_by, done_by):
        request = store.request(request_id)
        status = request["status"] if request else "gone"
        result = json.loads(request["result"]) if request and request["result"] else None
        if status == "running" and done_by == float("inf"):
            expected = float(result.get("expected_s", 600.0)) if isinstance(result, dict) else 600.0
            taken_by, done_by = float("inf"), time.monotonic() + expected + REQUEST_WAIT_S
        elif status == "done" and isinstance(result, dict):
            return result
        elif status not in ("pending", "running"):
            return f"the controller's campaign {status}: {result}"
        time.sleep(0.2)
    if done_by != float("inf"):
        return f"the controller took request {request_id} but has not finished it in time"
    return (f"the controller has not taken request {request_id} within {REQUEST_WAIT_S:g}s (is `vetd controller` "
            "running with this config?); it expires unapplied")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def run_silence(args: argparse.Namespace) -> int:
    from vetd.controller.silences import parse_matcher
    from vetd.controller.store import Store

    config = _config(args)
    store = Store(config.store.path)
    try:
        if args.silence_command == "add":
            try:
                for matcher in args.matchers:
                    parse_matcher(matcher)
                seconds = float(args.duration)
            except ValueError as exc:
                print(f"vetd: {exc}", file=sys.stderr)
                return EXIT_VETD
            until = time.time() + seconds
            silence_id = store.add_silence(args.matchers, until, _actor(), args.comment)
            print(f"silence {silence_id} until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(until))}")
            return 0
        if args.silence_command == "expire":
            if not store.expire_silence(args.id):
                print(f"vetd: no active silence {args.id}", file=sys.stderr)
                return 1
            print(f"silence {args.id} expired")
            return 0
        rows = store.silences(None if args.all else time.time())
        if args.json:
            print(json.dumps([dict(row) for row in rows], indent=1))
        elif not rows:
            print("no active silences")
        else:
            sys.stdout.write(table(("ID", "UNTIL", "AUTHOR", "MATCHERS", "COMMENT"), [
                (str(row["id"]), _when(row["until"]), row["author"], " ".join(row["matchers"]), row["comment"])
                for row in rows]))
        return 0
    finally:
        store.close()


def run_rules_test(args: argparse.Namespace) -> int:
    import logging

    from vetd.controller.config import load_controller_config
    from vetd.controller.replay import print_decisions, read_events, replay

    logging.getLogger("vetd").setLevel(logging.WARNING)  # the decisions are the output
    config = load_controller_config(args.config) if args.config else None
    try:
        decisions = replay(rule_files(args.files), read_events(Path(args.events)), config)
    except ConfigError as exc:
        print(f"vetd: {exc}", file=sys.stderr)
        return EXIT_VETD
    print_decisions(decisions, args.json, sys.stdout)
    return 0


def rule_files(files: list[str]) -> list[str]:
    """The files named, or the rules vetd ships (what ``vetd up`` and the packaged config use)."""
    return files or [str(resources.files("vetd.controller").joinpath("default_rules.yaml"))]


def run_rules_check(files: list[str]) -> int:
    """Exit 1: a rule file is invalid (the verdict); 2: a file could not be read."""
    from vetd.controller.rules import load_rules

    unreadable = [name for name in files if not os.access(name, os.R_OK) or not Path(name).is_file()]
    if unreadable:
        print(f"vetd: cannot read rule file(s): {', '.join(unreadable)}", file=sys.stderr)
        return EXIT_VETD
    try:
        ruleset = load_rules(files)
    except ConfigError as exc:
        print(f"vetd: {exc}", file=sys.stderr)
        return 1
    for rule in ruleset.rules:
        print(f"{rule.source}:{rule.line}: {rule.name}: ok ({rule.input}; "
              f"{rule.spec.severity}; {', '.join(rule.spec.actions)})")
    print(f"{len(ruleset.rules)} rules in {len(files)} file(s) valid")
    return 0


def show_nodes(store: Store, as_json: bool, out: TextIO) -> int:
    from vetd.controller.views import format_nodes, node_summaries

    summaries = node_summaries(store)
    if as_json:
        out.write(json.dumps(summaries, indent=2) + "\n")
    else:
        out.write(format_nodes(summaries) if summaries else "no nodes seen yet\n")
    return 0


def show_node(store: Store, config: ControllerConfig, name: str, as_json: bool, out: TextIO) -> int:
    from vetd.controller.views import ago, node_summaries, pending_text

    matches = [s for s in node_summaries(store) if s["node"] == name
               and (not config.cluster or s["cluster"] == config.cluster)]
    if not matches:
        print(f"vetd: no node {name!r} in {store.path}", file=sys.stderr)
        return 1
    summary = matches[0]
    detail = {
        **summary,
        "results": store.latest(summary["cluster"], name),
        "history": store.history(summary["cluster"], name, limit=20),
        "audit": store.audit_log(summary["cluster"], name, limit=50),
        # What `history` in rules counts for the node (incidents, remediations, reboots…), newest first.
        "node_history": store.node_history(summary["cluster"], name, limit=50),
    }
    if as_json:
        out.write(json.dumps(detail, indent=2) + "\n")
        return 0
    # what nodes wrote reaches the terminal only through clean(): one line per field, no escapes
    summary = {k: clean(v) if isinstance(v, str) else v for k, v in summary.items()}
    detail = {k: [{f: clean(v) if isinstance(v, str) else v for f, v in row.items()} for row in rows]
              for k, rows in detail.items() if k in ("results", "audit")}
    name = clean(name)
    out.write(f"{name} ({summary['cluster']}): {summary['state']}, "
              f"{'online' if summary['online'] else 'offline'}, last seen {ago(summary['last_seen'])}\n")
    if summary["reason"]:
        out.write(f"  reason: {summary['reason']}\n")
    if summary["pending"]:
        out.write(f"  {clean(pending_text(summary['pending']))}\n")
    delivery = summary["delivery"]
    out.write(f"  delivery: {delivery['received']} received, {delivery['duplicates']} duplicates, "
              f"{delivery['gaps']} missing\n  latest results:\n")
    out.writelines(f"    {row['check_name']:16} {row['entity']:12} {row['status']:8} {row['message']}\n" for row in detail["results"])
    out.write("  audit:\n")
    for row in detail["audit"]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["ts"]))
        out.write(f"    {stamp} {row['actor']} {row['action']} {row['rule']} {row['outcome']} {row['detail']}\n")
    return 0


def show_jobs(store: Store, config: ControllerConfig, args: argparse.Namespace, out: TextIO) -> int:
    from vetd.controller.views import format_jobs, job_summaries

    summaries = job_summaries(store, config.cluster, node=args.node, failed=args.failed, since=args.since,
                              limit=args.limit)
    if args.json:
        out.write(json.dumps(summaries, indent=2) + "\n")
    else:
        out.write(format_jobs(summaries) if summaries else "no jobs\n")
    return 0


def show_campaigns(store: Store, config: ControllerConfig, args: argparse.Namespace, out: TextIO) -> int:
    from vetd.controller.views import campaign_summaries, format_campaigns

    summaries = campaign_summaries(store, config.cluster, since=args.since,
                                   limit=200 if args.limit is None else args.limit)
    if args.json:
        out.write(json.dumps(summaries, indent=2) + "\n")
    else:
        out.write(format_campaigns(summaries) if summaries else "no campaigns\n")
    return 0


def show_campaign(store: Store, config: ControllerConfig, campaign: str, as_json: bool, out: TextIO) -> int:
    from vetd.controller.views import campaign_detail, format_campaign

    detail = campaign_detail(store, config.cluster, campaign)
    if detail is None:
        print(f"vetd: no campaign {campaign!r} in {store.path}" + (f" (cluster {config.cluster})" if config.cluster
                                                                    else ""), file=sys.stderr)
        return 1
    out.write(json.dumps(detail, indent=2) + "\n" if as_json else format_campaign(detail))
    return 0


def show_job(store: Store, config: ControllerConfig, job: str, as_json: bool, out: TextIO, run: int = 0) -> int:
    from vetd.controller.views import format_job, job_detail

    detail = job_detail(store, config.cluster, job, run)
    if detail is None:
        print(f"vetd: no job {job!r}" + (f" run -{run}" if run else "") + f" in {store.path} "
              f"(cluster {config.cluster})", file=sys.stderr)
        return 1
    out.write(json.dumps(detail, indent=2) + "\n" if as_json else format_job(detail))
    return 0


def show_excluded(store: Store, fmt: str, out: TextIO) -> int:
    from ClusterShell.NodeSet import NodeSet

    excluded = [n for n in store.node_rows() if n.state in ("excluded", "failed")]
    if fmt == "json":
        out.write(json.dumps([{"cluster": n.cluster, "node": n.name, "state": n.state, "reason": n.reason,
                               "since": n.state_since} for n in excluded], indent=2) + "\n")
    elif fmt == "lines":
        out.writelines(f"{name}\n" for name in NodeSet.fromlist([n.name for n in excluded]))
    elif excluded:
        out.write(f"{NodeSet.fromlist([n.name for n in excluded])}\n")
    return 0
