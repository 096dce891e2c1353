"""Replay recorded results and events against rules: ``vetd rules test``.

The events file is JSON lines, one message per line, oldest first::

    {"kind": "state", "ts": 1700000000, "node": "nid001", "online": true, "labels": {"partition": "gpu"}}
    {"kind": "result", "ts": 1700000060, "node": "nid001", "check": "gpu_health", "entity": "gpu3",
     "status": "fail", "codes": ["ecc_dbe"], "metrics": {"temp_c": 41}, "message": "2 DBEs"}
    {"kind": "event", "ts": "2023-11-14T22:15:00Z", "node": "nid001", "name": "xid", "entity": "gpu1",
     "severity": "warning", "codes": ["xid_31"]}

``ts`` is Unix seconds or ISO 8601. ``cluster`` (default ``replay``),
``session`` and ``seq`` are optional; other fields are those of the wire
messages. A node's reboot is a ``state`` line with a new ``session`` and
``boot_id``; an agent's answer to a command (a healing step, a re-vetting, a
diagnosis) is a ``reply`` line, ``{"kind": "reply", "node": "nid001", "ok":
true}``, whose ``id``, when left out, is that of the latest command sent to
the node. An operator's ``vetd drain`` / ``vetd resume`` is an ``operator``
line, ``{"kind": "operator", "action": "resume", "ts": …, "node": "nid001"}``
(``reason`` for a drain, and ``actor``, default ``replay``, optional). A
``job`` line is a job starting or ending on one node (``node``) or several
(``nodes``, a hostlist): one ``job_start`` or ``job_end`` event per node, as
each node's agent publishes it (:mod:`vetd.core.jobs`)::

    {"kind": "job", "ts": 1700000000, "job_id": "4242", "phase": "start", "nodes": "nid[001-004]",
     "user": "alice", "gpus": "0-3"}
    {"kind": "job", "ts": 1700003600, "job_id": "4242", "phase": "end", "nodes": "nid[001-004]",
     "state": "FAILED", "exit_code": 1}

``vetd export --events`` writes this format from a controller's history and
jobs, so an incident can be replayed against new rules. The replay runs the
real controller logic on an in-memory store, with message time as the clock:
no waiting, and ``for:``, windows and a job's ``[jobs] settle`` behave as they
did live (after the last line, the clock moves on by ``settle``, so a job
some node never reported the end of is decided too).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import msgspec

from vetd.controller.actions import ActionOutcome, NoScheduler, iso
from vetd.controller.config import ControllerConfig, StoreSection
from vetd.controller.decisions import Decisions, Send
from vetd.controller.service import Controller
from vetd.controller.store import Store
from vetd.core import protocol
from vetd.core.configfile import ConfigError, read_text
from vetd.core.jobs import JOB_END, JOB_START, end_fields, start_fields
from vetd.core.output import table

#: Audit actions that are decisions (what `vetd rules test` reports).
DECISIONS = ("rule_fired", "rule_resolved", "drain", "mark_failed", "suspect", "breaker_open", "heal_step",
             "healed", "heal_end", "resume", "diagnose")


class EventsError(ConfigError):
    """An events file that cannot be replayed; names file and line."""


@dataclass
class Decision:
    ts: float
    node: str
    action: str
    rule: str
    outcome: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "time": iso(self.ts), "node": self.node, "action": self.action,
                "rule": self.rule, "outcome": self.outcome, "detail": self.detail}


class Operator(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An operator's request in an events file (not a wire message): what ``vetd drain`` or
    ``vetd resume`` would have asked of the controller at ``ts``."""

    kind: Literal["operator"]
    action: Literal["drain", "resume"]
    ts: float
    node: str
    cluster: str = "replay"
    reason: str = ""
    actor: str = "replay"


#: What an events file holds: wire messages and operators' requests.
Line = protocol.Message | Operator


class DecideOnly:
    """Alert and command backend of a replay: alerts are decided (and reported), nothing is sent."""

    enabled = True

    async def send(self, alerts: list[dict[str, Any]]) -> list[ActionOutcome]:
        return []

    async def publish(self, command: protocol.Command) -> None:
        return None


def _ts(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    raise ValueError(f"ts must be Unix seconds or ISO 8601, got {value!r}")


class JobLine(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A ``job`` line: a job starting or ending on ``node`` or on each of ``nodes``."""

    kind: Literal["job"]
    ts: float
    job_id: protocol.JobId
    phase: Literal["start", "end"]
    node: str = ""
    nodes: str = ""
    cluster: str = "replay"
    session: str = "replay"
    user: str = ""
    gpus: str = ""
    state: str = ""
    exit_code: int | None = None


def read_events(path: Path) -> Iterator[Line]:
    seqs: dict[tuple[str, str, str], int] = {}
    #: (cluster, job, node) → when its start line said the job started there (for ``runtime_s``).
    starts: dict[tuple[str, str, str], float] = {}
    lines = read_text(path, "events", EventsError).splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("each line is a JSON object")
            data["ts"] = _ts(data.get("ts"))
            if data.get("kind") == "operator":
                request = msgspec.convert(data, Operator)
                if not protocol.valid_name(request.node) or not protocol.valid_name(request.cluster):
                    raise ValueError("invalid node or cluster name")
                yield request
                continue
            if data.get("kind") == "job":
                messages = _job_events(msgspec.convert(data, JobLine), seqs, starts)
            else:
                data.setdefault("cluster", "replay")
                data.setdefault("session", "replay")
                if data.get("kind") == "reply":
                    data.setdefault("id", "")  # the latest command sent to the node (replay())
                key = (data["cluster"], str(data.get("node")), data["session"])
                if data.get("kind") == "state":
                    data["seq"] = 0
                    data.setdefault("started", data["ts"])
                elif "seq" not in data:
                    seqs[key] = seqs.get(key, 0) + 1
                    data["seq"] = seqs[key]
                messages = [msgspec.convert(data, protocol.Message)]
            for message in messages:
                if not protocol.valid_name(message.node) or not protocol.valid_name(message.cluster):
                    raise ValueError(f"invalid node or cluster name: {message.node[:64]!r}")
        except (ValueError, msgspec.ValidationError) as exc:
            raise EventsError(f"{path}:{number}: {exc}") from None
        yield from messages


def _job_events(line: JobLine, seqs: dict[tuple[str, str, str], int],
                starts: dict[tuple[str, str, str], float]) -> list[protocol.Message]:
    """The ``job_start`` or ``job_end`` event of each node of a ``job`` line, as its agent makes it."""
    from ClusterShell.NodeSet import NodeSet, NodeSetException

    if not line.job_id:
        raise ValueError("a job line needs a job_id")
    if bool(line.node) == bool(line.nodes):
        raise ValueError("a job line names `node` or `nodes` (a hostlist), one of them")
    try:
        names = [line.node] if line.node else list(NodeSet(line.nodes))
    except NodeSetException as exc:
        raise ValueError(f"nodes: {line.nodes!r} is not a hostlist: {exc}") from None
    events: list[protocol.Message] = []
    for name in names:
        key = (line.cluster, name, line.session)
        seqs[key] = seqs.get(key, 0) + 1
        started = (line.cluster, line.job_id, name)
        if line.phase == "start":
            starts[started] = line.ts
            fields = start_fields(line.job_id, line.user, line.gpus)
        else:
            began = starts.pop(started, None)
            fields = end_fields(line.job_id, line.state, line.exit_code,
                                None if began is None else line.ts - began, announced=began is not None)
        events.append(msgspec.convert({"kind": "event", "cluster": line.cluster, "node": name,
                                       "session": line.session, "seq": seqs[key], "ts": line.ts,
                                       "job_id": line.job_id, **fields}, protocol.Message))
    return events


def replay(rule_files: list[str], events: Iterable[Line],
           config: ControllerConfig | None = None, keep: Store | None = None) -> list[Decision]:
    """Every decision the controller would take on ``events``, in order; ``keep``: into this store
    (left open) rather than a throwaway one, so that ``vetd job`` and friends can read what it made.

    The controller's periodic look for agents offline too long (``[alerts] agent_offline_after``)
    runs before and after each message, at its time: ``state`` lines with ``"online": false``
    replay into ``agent-offline`` once a later line is that much later. So do healing ladders'
    (their steps start, time out, see a rebooted node back), and a ``reply`` line without an
    ``id`` answers the latest command sent to its node; an ``operator`` line goes through the
    controller's operator requests, as ``vetd drain`` / ``vetd resume`` do.
    """
    messages = list(events)
    clusters = sorted({m.cluster for m in messages})
    if len(clusters) > 1:
        raise EventsError(f"events of several clusters ({', '.join(clusters)}): a controller owns one; "
                          "replay them one cluster at a time")
    base = config or ControllerConfig()
    controller = Controller(msgspec.structs.replace(base, rules=rule_files, store=StoreSection(path=":memory:"),
                                                    cluster=clusters[0] if clusters else base.cluster),
                            store=keep, scheduler=NoScheduler(), alerts=DecideOnly(), commands=DecideOnly())
    decisions: list[Decision] = []
    seen = 0
    #: The latest command sent to each node, which a reply line without an id answers.
    commands: dict[tuple[str, str], str] = {}

    def decided(what: Decisions, now: float) -> None:
        nonlocal seen
        commands.update({(a.command.cluster, a.node): a.command.id for a in what.other if isinstance(a, Send)})
        for row in controller.store.audit_after(seen):
            seen = row["id"]
            if row["action"] in DECISIONS:
                outcome = "decided" if row["outcome"] == "pending" else row["outcome"]
                decisions.append(Decision(row["ts"], row["node"], row["action"], row["rule"],
                                          outcome, row["detail"]))
        for alert in what.alerts:
            for payload in alert.alerts:
                # Event alerts carry a future endsAt (they end by themselves); resolved ones end now.
                ends = payload.get("endsAt")
                state = "resolved" if ends is not None and ends <= iso(now) else "firing"
                decisions.append(Decision(now, alert.node, "alert", alert.rule, state,
                                          payload["annotations"]["summary"]))

    for message in messages:
        decided(controller.agent_tick(now=message.ts), message.ts)
        decided(controller.job_tick(now=message.ts), message.ts)
        decided(controller.heal_tick(now=message.ts, carry_out=False), message.ts)
        if isinstance(message, Operator):
            controller.store.submit(message.actor, message.action, [(message.cluster, message.node)],
                                    message.reason, now=message.ts)
            controller.requests.handle(message.ts)
            decided(Decisions(), message.ts)
            continue
        sent = message
        if isinstance(message, protocol.Reply) and not message.id:
            sent = msgspec.structs.replace(message, id=commands.get((message.cluster, message.node), ""))
        decided(controller.process([(protocol.topic_for(sent), protocol.encode(sent))], now=message.ts), message.ts)
        decided(controller.agent_tick(now=message.ts), message.ts)
        decided(controller.heal_tick(now=message.ts, carry_out=False), message.ts)
    if messages:  # the clock moves on: jobs some node never reported the end of are decided too
        end = messages[-1].ts + float(base.jobs.settle)
        decided(controller.job_tick(now=end), end)
    if keep is None:
        controller.store.close()
    return decisions


def print_decisions(decisions: list[Decision], as_json: bool, out: TextIO) -> None:
    if as_json:
        for decision in decisions:
            out.write(json.dumps(decision.as_dict()) + "\n")
        return
    headers = ("TIME", "NODE", "ACTION", "RULE", "OUTCOME", "DETAIL")
    rows = [(iso(d.ts), d.node, d.action, d.rule or "-", d.outcome or "-", d.detail) for d in decisions]
    out.write(table(headers, rows))
    if not decisions:
        out.write("no decisions\n")


def export_events(store: Store, out: TextIO, node: str | None = None, since: float = 0.0) -> int:
    """Write a controller's history in the replay format; returns the lines written.

    Jobs are written as ``job`` lines (one per node's start and end, from the store's jobs, which
    keep the user, GPUs and state) in place of the ``job_start``/``job_end`` events of the history.
    """
    written = 0
    for row in store.node_rows():
        if node is None or row.name == node:
            first = store.first_history_ts(row.cluster, row.name, since)
            if first is None:
                continue
            out.write(json.dumps({"kind": "state", "ts": first, "cluster": row.cluster, "node": row.name,
                                  "session": row.session, "online": True, "labels": row.labels}) + "\n")
            written += 1
    for stored in _merged(store.history_since(since, node), _job_lines(store, since, node)):
        if "phase" in stored:  # a job line, as it is
            if stored["ts"] >= since:
                out.write(json.dumps(stored) + "\n")
                written += 1
            continue
        if stored["kind"] == "event" and stored["name"] in (JOB_START, JOB_END):
            continue  # written as job lines
        line: dict[str, Any] = {"kind": stored["kind"], "ts": stored["ts"], "cluster": stored["cluster"],
                                "node": stored["node"], "session": stored["session"], "seq": stored["seq"],
                                "entity": stored["entity"], "codes": stored["codes"],
                                "metrics": {k: v for k, v in stored["metrics"].items() if v is not None},
                                "message": stored["message"]}
        if stored["kind"] == "result":
            line.update(check=stored["name"], status=stored["status"])
        else:
            line.update(name=stored["name"], severity=stored["status"])
        out.write(json.dumps(line) + "\n")
        written += 1
    return written


def _job_lines(store: Store, since: float, node: str | None) -> list[dict[str, Any]]:
    """Each node's start and end of every job since ``since`` as ``job`` lines, oldest first."""
    lines = []
    for part in store.job_parts_between(since, node):
        base = {"kind": "job", "cluster": part["cluster"], "job_id": part["job_id"], "node": part["node"]}
        if part["started"] is not None:
            lines.append({**base, "ts": part["started"], "phase": "start", "user": part["user"],
                          "gpus": part["gpus"]})
        if part["ended"] is not None:
            lines.append({**base, "ts": part["ended"], "phase": "end", "state": part["state"],
                          "exit_code": part["exit_code"]})
    return sorted(lines, key=lambda line: line["ts"])


def _merged(history: Iterable[dict[str, Any]], jobs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """History rows and job lines in time order; at one time, a job's start first and its end last
    (what a node reported during the job lies between its start and its end)."""
    def order(row: dict[str, Any]) -> tuple[float, int]:
        return row["ts"], {"start": 0, "end": 2}.get(row.get("phase", ""), 1)

    return heapq.merge(history, jobs, key=order)
