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
(``reason`` for a drain, and ``actor``, default ``replay``, optional).
``vetd export --events`` writes this format from a controller's
history, so an incident can be replayed against new rules. The replay runs
the real controller logic on an in-memory store, with message time as the
clock: no waiting, and ``for:`` and windows behave as they did live.
"""

from __future__ import annotations

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
from vetd.core.output import table

#: Audit actions that are decisions (what `vetd rules test` reports).
DECISIONS = ("rule_fired", "rule_resolved", "drain", "mark_failed", "breaker_open", "heal_step", "healed",
             "heal_end", "resume", "diagnose")


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


def read_events(path: Path) -> Iterator[Line]:
    seqs: dict[tuple[str, str, str], int] = {}
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
            message = msgspec.convert(data, protocol.Message)
            if not protocol.valid_name(message.node) or not protocol.valid_name(message.cluster):
                raise ValueError("invalid node or cluster name")
        except (ValueError, msgspec.ValidationError) as exc:
            raise EventsError(f"{path}:{number}: {exc}") from None
        yield message


def replay(rule_files: list[str], events: Iterable[Line],
           config: ControllerConfig | None = None) -> list[Decision]:
    """Every decision the controller would take on ``events``, in order.

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
                            scheduler=NoScheduler(), alerts=DecideOnly(), commands=DecideOnly())
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
    """Write a controller's history in the replay format; returns the lines written."""
    written = 0
    for row in store.node_rows():
        if node is None or row.name == node:
            first = store.first_history_ts(row.cluster, row.name, since)
            if first is None:
                continue
            out.write(json.dumps({"kind": "state", "ts": first, "cluster": row.cluster, "node": row.name,
                                  "session": row.session, "online": True, "labels": row.labels}) + "\n")
            written += 1
    for stored in store.history_since(since, node):
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
