"""Controller-side ``vetd`` subcommands: controller, nodes, node, excluded, rules, up."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from ClusterShell.NodeSet import NodeSet

from vetd.agent.configfile import ConfigError, parse_duration
from vetd.agent.protocol import BAD_STATUSES
from vetd.controller.config import ControllerConfig, load_controller_config
from vetd.controller.replay import export_events, print_decisions, read_events, replay
from vetd.controller.rules import load_rules
from vetd.controller.silences import parse_matcher
from vetd.controller.store import Store

EXIT_VETD = 2


def dispatch(args: argparse.Namespace, config_path: Path) -> int:
    command = args.command
    if command == "rules" and args.rules_command == "check":
        return rules_check(rule_files(args.files))
    if command == "rules" and args.rules_command == "test":
        return rules_test(args)
    if command == "up":
        from vetd.controller.embedded import up

        return up(args)
    config = load_controller_config(config_path)
    if command == "controller":
        from vetd.controller.service import Controller

        return asyncio.run(Controller(config).run())
    if command in ("drain", "resume", "breaker") or (command == "rules" and args.rules_command == "reload"):
        return operator_request(args, config)
    if command == "silence":
        return silence(args, config)
    try:
        store = Store(config.store.path, readonly=True)
    except FileNotFoundError as exc:
        print(f"vetd: {exc} (has the controller run with this config?)", file=sys.stderr)
        return EXIT_VETD
    try:
        if command == "nodes":
            return show_nodes(store, args.json, sys.stdout)
        if command == "node":
            return show_node(store, config, args.name, args.json, sys.stdout)
        if command == "excluded":
            return show_excluded(store, args.format, sys.stdout)
        if command == "export":
            count = export_events(store, sys.stdout, args.node, args.since or 0.0)
            print(f"vetd: exported {count} lines", file=sys.stderr)
            return 0
    finally:
        store.close()
    raise AssertionError(command)


REQUEST_WAIT_S = 30.0


def _actor() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or getpass.getuser()


def operator_request(args: argparse.Namespace, config: ControllerConfig) -> int:
    """Hand a drain, resume or breaker reset to the running controller and wait for it."""
    store = Store(config.store.path)
    try:
        if args.command == "breaker" and args.action == "status":
            breakers = store.breakers()
            if not breakers:
                print("breaker closed in every partition")
            for row in breakers:
                state = "OPEN" if row["open"] else "closed"
                print(f"{row['partition']}: {state} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row['since']))}"
                      f" ({row['reason']})")
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


def silence(args: argparse.Namespace, config: ControllerConfig) -> int:
    store = Store(config.store.path)
    try:
        if args.silence_command == "add":
            try:
                for matcher in args.matchers:
                    parse_matcher(matcher)
                seconds = parse_duration(args.duration)
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
        for row in rows:
            ends = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["until"]))
            print(f"{row['id']:>4}  until {ends}  {row['author']:10}  {' '.join(row['matchers'])}  {row['comment']}")
        if not rows:
            print("no active silences")
        return 0
    finally:
        store.close()


def rules_test(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger("vetd").setLevel(logging.WARNING)  # the decisions are the output
    config = load_controller_config(args.config) if args.config else None
    try:
        decisions = replay(rule_files(args.files), read_events(Path(args.events)), config)
    except ConfigError as exc:
        print(f"vetd: {exc}", file=sys.stderr)
        return EXIT_VETD
    except UnicodeDecodeError:
        print(f"vetd: {args.events}: not a text file (JSON lines, as `vetd export` writes)", file=sys.stderr)
        return EXIT_VETD
    print_decisions(decisions, args.json, sys.stdout)
    return 0


def rule_files(files: list[str]) -> list[str]:
    """The files named, or the rules vetd ships (what ``vetd up`` and the packaged config use)."""
    return files or [str(resources.files("vetd.controller").joinpath("default_rules.yaml"))]


def rules_check(files: list[str]) -> int:
    """Exit 1: a rule file is invalid (the verdict); 2: a file could not be read."""
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


def node_summaries(store: Store) -> list[dict[str, Any]]:
    failing: dict[tuple[str, str], list[str]] = {}
    for row in store.latest():
        if row["status"] in BAD_STATUSES:
            entity = "" if row["entity"] == "node" else f"[{row['entity']}]"
            failing.setdefault((row["cluster"], row["node"]), []).append(f"{row['check_name']}{entity}")
    return [
        {
            "cluster": n.cluster,
            "node": n.name,
            "state": n.state,
            "online": n.online,
            "last_seen": n.last_seen,
            "failing": sorted(failing.get((n.cluster, n.name), [])),
            "reason": n.reason,
            "labels": n.labels,
            "delivery": store.delivery(n.cluster, n.name),
        }
        for n in store.node_rows()
    ]


def _ago(ts: float) -> str:
    seconds = max(0.0, time.time() - ts)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_nodes(summaries: list[dict[str, Any]]) -> str:
    headers = ("NODE", "STATE", "ONLINE", "LAST SEEN", "FAILING", "REASON")
    many_clusters = len({s["cluster"] for s in summaries}) > 1
    rows = [
        (
            f"{s['cluster']}/{s['node']}" if many_clusters else s["node"],
            s["state"],
            "yes" if s["online"] else "no",
            _ago(s["last_seen"]),
            ",".join(s["failing"]) or "-",
            s["reason"] or "-",
        )
        for s in summaries
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines) + "\n"


def show_nodes(store: Store, as_json: bool, out: TextIO) -> int:
    summaries = node_summaries(store)
    if as_json:
        out.write(json.dumps(summaries, indent=2) + "\n")
    else:
        out.write(format_nodes(summaries) if summaries else "no nodes seen yet\n")
    return 0


def show_node(store: Store, config: ControllerConfig, name: str, as_json: bool, out: TextIO) -> int:
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
    }
    if as_json:
        out.write(json.dumps(detail, indent=2) + "\n")
        return 0
    out.write(f"{name} ({summary['cluster']}): {summary['state']}, "
              f"{'online' if summary['online'] else 'offline'}, last seen {_ago(summary['last_seen'])}\n")
    if summary["reason"]:
        out.write(f"  reason: {summary['reason']}\n")
    delivery = summary["delivery"]
    out.write(f"  delivery: {delivery['received']} received, {delivery['duplicates']} duplicates, "
              f"{delivery['gaps']} missing\n  latest results:\n")
    out.writelines(f"    {row['check_name']:16} {row['entity']:12} {row['status']:8} {row['message']}\n" for row in detail["results"])
    out.write("  audit:\n")
    for row in detail["audit"]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["ts"]))
        out.write(f"    {stamp} {row['actor']} {row['action']} {row['rule']} {row['outcome']} {row['detail']}\n")
    return 0


def show_excluded(store: Store, fmt: str, out: TextIO) -> int:
    excluded = [n for n in store.node_rows() if n.state in ("excluded", "failed")]
    if fmt == "json":
        out.write(json.dumps([{"cluster": n.cluster, "node": n.name, "state": n.state, "reason": n.reason,
                               "since": n.state_since} for n in excluded], indent=2) + "\n")
    elif fmt == "lines":
        out.writelines(f"{name}\n" for name in NodeSet.fromlist([n.name for n in excluded]))
    elif excluded:
        out.write(f"{NodeSet.fromlist([n.name for n in excluded])}\n")
    return 0
