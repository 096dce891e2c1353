"""``vetd controller``: ingest, fleet state, rules, actions.

Messages from the broker are processed in batches, one SQLite transaction per
batch: decode and validate (bad ones counted and logged, never fatal),
deduplicate by ``(node, session, seq)``, store, evaluate rules, decide. Decisions
(exclude a node, alert) are written to the audit log inside the same
transaction and carried out afterwards by an action worker, so a slow
``scontrol`` or a dead Alertmanager never holds up ingest. A drain decided but
not yet carried out when the controller died is carried out after restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog

from vetd.agent import protocol
from vetd.agent.config import client_options, parse_broker
from vetd.agent.configfile import ConfigError, read_key
from vetd.agent.protocol import Command, Event, ProtocolError, Reply, Result, State, Telemetry, sign_command
from vetd.agent.transport import Backoff
from vetd.controller.actions import (
    REASON_PREFIX,
    AlertSender,
    alert_payload,
    clean_reason,
    make_backend,
)
from vetd.controller.config import ControllerConfig
from vetd.controller.rules import Rule, RuleSet, evaluate_all, load_rules, render
from vetd.controller.silences import matches
from vetd.controller.store import Healing, NodeRow, RuleKey, RuleState, Store

log = structlog.get_logger("vetd.controller")

BATCH_MAX = 1000
#: Node states in which the node is out of service.
OUT_OF_SERVICE = ("excluded", "failed", "healing", "probation")
#: Log the first N malformed messages, then every Nth.
MALFORMED_LOG_EVERY = 100


@dataclass
class Drain:
    cluster: str
    node: str
    reason: str
    rule: str
    audit_id: int


@dataclass
class Resume:
    cluster: str
    node: str
    audit_id: int


@dataclass
class Reboot:
    cluster: str
    node: str
    reason: str
    audit_id: int


@dataclass
class Send:
    """A command to publish to a node's ``cmd`` topic."""

    command: Command

    @property
    def node(self) -> str:
        return self.command.node


@dataclass
class Alert:
    cluster: str
    node: str
    rule: str
    alerts: list[dict[str, Any]]
    #: Re-sends of alerts still firing are counted, not audited.
    resend: bool = False


def static_labels(table: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """``{"nid[0001-0004]": {...}}`` → labels per node name (later entries win)."""
    from ClusterShell.NodeSet import NodeSet

    labels: dict[str, dict[str, str]] = {}
    for hostlist, values in table.items():
        for name in NodeSet(hostlist):
            labels.setdefault(str(name), {}).update(values)
    return labels


Action = Drain | Resume | Reboot | Send | Alert


@dataclass
class Decisions:
    drains: list[Drain] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    #: Healing: commands to send, reboots and resumes to carry out.
    other: list[Action] = field(default_factory=list)


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.rules: RuleSet = load_rules(config.rules)
        self.store = Store(config.store.path)
        self.backend = make_backend(
            config.scheduler.backend, config.scheduler.scontrol, float(config.scheduler.timeout)
        )
        self.alerts = AlertSender(config.alerts.urls, timeout=float(config.alerts.timeout))
        self.counters: Counter[str] = Counter()
        self._unflushed: Counter[str] = Counter()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._client_options = client_options(parse_broker(config.broker), config.auth, f"{config.source}: auth")
        self._command_key = (read_key(config.command_key_file, f"{config.source}: command_key_file")
                             if config.command_key_file else b"")
        self._states: dict[RuleKey, RuleState] = self.store.rule_states()
        self._firing_alerts: dict[str, dict[str, Any]] = self.store.firing_alerts()
        self._windows: dict[RuleKey, list[float]] = self.store.rule_windows()
        self._static_labels = static_labels(config.labels)
        #: (cluster, partition) → label → value → nodes, kept as labels change (``fleet`` in rules).
        self._label_counts: dict[tuple[str, str], dict[str, Counter[str]]] = {}
        #: (cluster, node) → the labels counted for it.
        self._labels_counted: dict[tuple[str, str], dict[str, str]] = {}
        #: (cluster, partition) → the ``fleet`` rules see, until a count there changes.
        self._fleets: dict[tuple[str, str], dict[str, Any]] = {}
        for known in self.store.nodes.values():
            self._count_labels(known)
        self._actions: asyncio.Queue[Action] | None = None
        self._client: aiomqtt.Client | None = None
        #: This controller run, as the session of the commands it sends.
        self.session = uuid.uuid4().hex[:16]
        self.connected = asyncio.Event()
        self.stop = asyncio.Event()

    # -- processing (synchronous, one transaction per batch) ----------------

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
        self._unflushed[name] += n

    def admit(self, topic_name: str, now: float) -> bool:
        """Per-node token bucket, on the topic alone (no decoding for a flood)."""
        parts = topic_name.split("/", 6)
        key = "/".join(parts[2:5]) if len(parts) >= 5 else topic_name[:100]
        limits = self.config.limits
        tokens, last = self._buckets.get(key, (limits.per_node_burst, now))
        tokens = min(limits.per_node_burst, tokens + (now - last) * limits.per_node_rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            self._count("rate_limited")
            if self.counters["rate_limited"] in (1, 10, 100) or self.counters["rate_limited"] % 10_000 == 0:
                log.warning("node_rate_limited", source=key, dropped=self.counters["rate_limited"],
                            rate=limits.per_node_rate)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def process(self, batch: Sequence[tuple[str, bytes]], now: float | None = None) -> Decisions:
        """Ingest a batch of ``(topic, payload)``; returns the actions decided."""
        now = time.time() if now is None else now
        decisions = Decisions()
        with self.store.transaction():
            for topic_name, payload in batch:
                self._count("received")
                try:
                    message = protocol.decode_from(topic_name, payload)
                except ProtocolError as exc:
                    self._malformed(topic_name, exc)
                    continue
                if isinstance(message, State):
                    if not self.store.apply_state(message, now):
                        self._count("stale_state")
                        continue
                    if (born := self.store.nodes.get((message.cluster, message.node))) is not None:
                        self._count_labels(born)  # a birth carries the node's labels
                    if message.dropped:
                        self.store.set_agent_loss(message.cluster, message.node, message.dropped)
                elif isinstance(message, Result | Event):
                    history_id = self.store.record(message, now)
                    if history_id is None:
                        self._count("duplicates")
                        continue
                    self._count("results" if isinstance(message, Result) else "events")
                    self._evaluate(message, history_id, now, decisions)
                elif isinstance(message, Telemetry):
                    self._count("telemetry")
                elif isinstance(message, Reply):
                    self._count("replies")
                    log.info("agent_reply", node=message.node, id=message.id, ok=message.ok,
                             message=message.message)
                    self._on_reply(message, now, decisions)
            self.store.add_counters(self._unflushed)
        self._unflushed.clear()
        return decisions

    def _malformed(self, topic_name: str, exc: ProtocolError) -> None:
        self._count("malformed")
        count = self.counters["malformed"]
        if count <= 10 or count % MALFORMED_LOG_EVERY == 0:
            log.warning("message_malformed", topic=topic_name[:200], error=str(exc)[:300], count=count)

    def _evaluate(self, message: Result | Event, history_id: int, now: float, decisions: Decisions) -> None:
        node = self.store.node(message.cluster, message.node, now)
        if (node.cluster, node.name) not in self._labels_counted:
            self._count_labels(node)  # first heard of through a result, not a birth
        if isinstance(message, Result):
            kind, name = "result", message.check
            data: dict[str, Any] = {
                "check": message.check, "entity": message.entity, "status": message.status,
                "codes": list(message.codes), "metrics": dict(message.metrics),
                "message": message.message, "duration_s": message.duration_s,
                "profile": message.profile, "job_id": message.job_id or "", "ts": message.ts,
            }
        else:
            kind, name = "event", message.name
            data = {
                "name": message.name, "entity": message.entity, "severity": message.severity,
                "codes": list(message.codes), "metrics": dict(message.metrics),
                "message": message.message, "job_id": message.job_id or "", "ts": message.ts,
            }
        variables = {
            "result": data if kind == "result" else {},
            "event": data if kind == "event" else {},
            "node": {
                "name": node.name, "cluster": node.cluster, "state": node.state,
                "online": node.online, "labels": self.labels_of(node),
            },
            "fleet": self.fleet_of(node) if self.rules.uses_fleet else {"partition": "", "labels": {}},
        }
        rules = self.rules.for_input(kind)
        self._count("rules_evaluated", len(rules))
        for rule, matched in evaluate_all(rules, variables):
            if matched is None:
                self._count("rule_errors")
                continue
            subject = f"{kind}:{name}:{message.entity}"
            if kind == "event":
                if matched and self._counted(rule, node, message):
                    self._fire(rule, node, message, subject, history_id, now, decisions, variables)
                continue
            self._step(rule, node, message, subject, bool(matched), history_id, now, decisions, variables)

    def _counted(self, rule: Rule, node: NodeRow, message: Result | Event) -> bool:
        """Record a match; True once ``count`` matches fall within ``within``."""
        spec = rule.spec
        if spec.count <= 1:
            return True
        per = message.entity if spec.per == "entity" else "*"
        key = (rule.name, node.cluster, node.name, f"count:{per}")
        stamps = [t for t in self._windows.get(key, []) if t > message.ts - spec.within] + [message.ts]
        reached = len(stamps) >= spec.count
        if reached:
            stamps = []  # the next firing needs a fresh set of matches
        self._windows[key] = stamps
        self.store.save_rule_window(key, stamps)
        return reached

    def _step(self, rule: Rule, node: NodeRow, message: Result | Event, subject: str, matched: bool,
              history_id: int, now: float, decisions: Decisions, variables: dict[str, Any]) -> None:
        """Advance a result rule for one subject, by message time (Prometheus semantics)."""
        key = (rule.name, node.cluster, node.name, subject)
        state = self._states.get(key)
        t = message.ts
        spec = rule.spec
        if matched:
            if state is None:
                if not self._counted(rule, node, message):
                    return
                state = RuleState("pending" if spec.for_ else "firing", t)
                if not spec.for_:
                    self._fire(rule, node, message, subject, history_id, now, decisions, variables)
            elif state.phase == "pending" and t - state.since >= spec.for_:
                state = RuleState("firing", t)
                self._fire(rule, node, message, subject, history_id, now, decisions, variables)
            elif state.phase == "firing" and state.cleared_at is not None:
                state = RuleState("firing", state.since)  # back before keep_firing_for ran out
            else:
                return
        else:
            if state is None:
                return
            if state.phase == "firing" and spec.keep_firing_for:
                cleared = state.cleared_at if state.cleared_at is not None else t
                if t - cleared < spec.keep_firing_for:
                    if state.cleared_at is None:
                        state = RuleState("firing", state.since, cleared)
                        self._save_state(key, state)
                    return
            if state.phase == "firing":
                self._resolve(rule, node, message, subject, state.since, history_id, now, decisions, variables)
            state = None
        self._save_state(key, state)

    def _save_state(self, key: RuleKey, state: RuleState | None) -> None:
        if state is None:
            self._states.pop(key, None)
        else:
            self._states[key] = state
        self.store.save_rule_state(key, state)

    def _resolve(self, rule: Rule, node: NodeRow, message: Result | Event, subject: str, since: float,
                 history_id: int, now: float, decisions: Decisions, variables: dict[str, Any]) -> None:
        self.store.audit(node.cluster, node.name, "rule_resolved", rule=rule.name,
                         detail=subject, evidence=[history_id], now=now)
        key = self._alert_key(rule, node, subject)
        if key in self._firing_alerts:
            del self._firing_alerts[key]
            self.store.save_firing_alert(key, node.cluster, node.name, None, now)
            decisions.alerts.append(self._alert(rule, node, message, since, now, variables))

    @staticmethod
    def _alert_key(rule: Rule, node: NodeRow, subject: str) -> str:
        return f"{rule.name}|{node.cluster}|{node.name}|{subject}"

    def fleet_of(self, node: NodeRow) -> dict[str, Any]:
        """What most nodes of ``node``'s cluster and partition have: for each
        label, the value more than half of the nodes that have the label hold.

        A rule compares a node with it (a GPU driver that drifted from the
        fleet's); with no majority there is nothing to drift from.
        """
        partition = self.labels_of(node).get("partition", "default")
        key = (node.cluster, partition)
        fleet = self._fleets.get(key)
        if fleet is None:
            majority = {}
            for name, values in self._label_counts.get(key, {}).items():
                if values:
                    value, held = values.most_common(1)[0]
                    if 2 * held > values.total():
                        majority[name] = value
            fleet = self._fleets[key] = {"partition": partition, "labels": majority}
        return fleet

    def _count_labels(self, node: NodeRow) -> None:
        """Keep the per-partition label counts in step with ``node``'s labels."""
        labels = self.labels_of(node)
        old = self._labels_counted.get((node.cluster, node.name))
        if old == labels:
            return
        for counted, sign in ((old or {}, -1), (labels, 1)):
            key = (node.cluster, counted.get("partition", "default"))
            counts = self._label_counts.setdefault(key, {})
            for name, value in counted.items():
                counts.setdefault(name, Counter())[value] += sign
                if counts[name][value] <= 0:
                    del counts[name][value]
            self._fleets.pop(key, None)
        self._labels_counted[(node.cluster, node.name)] = labels

    def labels_of(self, node: NodeRow) -> dict[str, str]:
        """The agent's labels, overridden by the controller's static ``[labels]``."""
        return {**node.labels, **self._static_labels.get(node.name, {})}

    def _fire(self, rule: Rule, node: NodeRow, message: Result | Event, subject: str, history_id: int,
              now: float, decisions: Decisions, variables: dict[str, Any]) -> None:
        self._count("rules_fired")
        was_out = node.state in OUT_OF_SERVICE
        self.store.audit(node.cluster, node.name, "rule_fired", rule=rule.name, detail=subject,
                         evidence=[history_id], now=now)
        log.info("rule_fired", rule=rule.name, node=node.name, subject=subject, severity=rule.spec.severity)
        actions = rule.spec.actions
        what = message.check if isinstance(message, Result) else message.name
        entity = "" if message.entity == "node" else f"[{message.entity}]"
        reason = clean_reason(f"{REASON_PREFIX} {rule.name}: {what}{entity} {message.message}")
        if "mark_failed" in actions:
            self._exclude(rule, node, reason, history_id, now, decisions, failed=True)
        elif "drain" in actions or "heal" in actions:
            excluded = self._exclude(rule, node, reason, history_id, now, decisions, failed=False)
            if excluded and "heal" in actions and node.state == "excluded":
                gpu = message.entity[3:] if message.entity.startswith("gpu") and message.entity[3:].isdigit() else "all"
                healing = Healing(node.cluster, node.name, rule.name, list(rule.spec.heal), 0, "next", now, gpu=gpu)
                self.store.save_healing(healing)
                self.store.audit(node.cluster, node.name, "heal_start", rule=rule.name,
                                 detail=f"ladder: {', '.join(rule.spec.heal)}; gpu {gpu}", now=now)
                self._set_state(node, "healing", now)
        if "alert" in actions and self.alerts.urls:
            if message.entity != "node" and (was_out or not node.online):
                # Inhibition: a per-GPU (per-entity) alert adds nothing while the node
                # itself is down or out of service; its own alert already went out.
                self._count("alerts_inhibited")
                self.store.audit(node.cluster, node.name, "alert", rule=rule.name, outcome="inhibited",
                                 detail=f"{subject}: node {'offline' if not node.online else node.state}", now=now)
            elif isinstance(message, Event):
                ends = now + float(self.config.alerts.event_alert_for)
                decisions.alerts.append(self._alert(rule, node, message, now, ends, variables))
            else:
                alert = self._alert(rule, node, message, now, None, variables)
                key = self._alert_key(rule, node, subject)
                self._firing_alerts[key] = alert.alerts[0]
                self.store.save_firing_alert(key, node.cluster, node.name, alert.alerts[0], now)
                decisions.alerts.append(alert)

    def _exclude(self, rule: Rule, node: NodeRow, reason: str, history_id: int, now: float,
                 decisions: Decisions, *, failed: bool) -> bool:
        """Take the node out of service (once), minding the breaker and repeat offences."""
        if node.state in OUT_OF_SERVICE:
            if failed and node.state != "failed":
                self._mark_failed(node, reason, rule.name, history_id, now, decisions)
            self._count("drains_already_excluded")
            return False
        blocked = self._breaker_blocks(node, now, decisions)
        if blocked:
            node.state, node.reason, node.state_since = "suspect", reason, now
            self.store.save_node(node)
            self.store.audit(node.cluster, node.name, "drain", rule=rule.name, outcome="would_have",
                             detail=f"{reason} | breaker: {blocked}", evidence=[history_id], now=now)
            self._count("drains_blocked_by_breaker")
            return False
        repeat = self.config.repeat
        previous = self.store.exclusions_since(node.cluster, node.name, now - repeat.window)
        if repeat.count and previous + 1 >= repeat.count and not failed:
            failed = True
            reason = clean_reason(f"{REASON_PREFIX} repeat offender ({previous + 1} exclusions in "
                                  f"{repeat.window / 86400:g}d): {reason.removeprefix(REASON_PREFIX).strip()}")
        audit_id = self.store.audit(node.cluster, node.name, "drain", rule=rule.name, outcome="pending",
                                    detail=reason, evidence=[history_id], now=now)
        node.state, node.reason, node.state_since = "excluded", reason, now
        if failed:
            self._mark_failed(node, reason, rule.name, history_id, now, decisions)
        self.store.save_node(node)
        decisions.drains.append(Drain(node.cluster, node.name, reason, rule.name, audit_id))
        return True

    def _mark_failed(self, node: NodeRow, reason: str, rule: str, history_id: int, now: float,
                     decisions: Decisions) -> None:
        node.state, node.reason, node.state_since = "failed", reason, now
        self.store.save_node(node)
        self.store.audit(node.cluster, node.name, "mark_failed", rule=rule, outcome="failed",
                         detail=reason, evidence=[history_id], now=now)
        self._count("marked_failed")
        log.error("node_failed", node=node.name, reason=reason)
        if self.alerts.urls:
            decisions.alerts.append(Alert(node.cluster, node.name, "vetd-node-failed", [alert_payload(
                rule="vetd-node-failed", cluster=node.cluster, node=node.name, severity="critical",
                summary=f"{node.name} needs a person", description=reason, starts_at=now,
                labels=self.labels_of(node))]))

    def _breaker_blocks(self, node: NodeRow, now: float, decisions: Decisions) -> str:
        """Why the circuit breaker forbids excluding ``node`` now ("" if it does not)."""
        partition = self.labels_of(node).get("partition", "default")
        already = self.store.breaker_open(partition)
        if already is not None:
            return f"open since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(already['since']))}"
        members = [n for n in self.store.nodes.values()
                   if self.labels_of(n).get("partition", "default") == partition]
        excluded = sum(1 for n in members if n.state in OUT_OF_SERVICE)
        config = self.config.breaker
        allowed = max(config.always_allow, int(config.max_fraction * len(members)))
        why = ""
        if excluded + 1 > allowed:
            why = (f"partition {partition!r} would have {excluded + 1} of {len(members)} nodes excluded "
                   f"(allowed {allowed})")
        elif config.max_drains:
            recent = self.store.drains_since(now - config.window, [(n.cluster, n.name) for n in members])
            if recent + 1 > config.max_drains:
                why = (f"partition {partition!r} would have {recent + 1} drains in "
                       f"{config.window:g}s (allowed {config.max_drains})")
        if why:
            self.store.set_breaker(partition, True, why, now)
            self.store.audit(node.cluster, node.name, "breaker_open", outcome="open", detail=why, now=now)
            log.error("breaker_open", partition=partition, reason=why)
            if self.alerts.urls:
                decisions.alerts.append(Alert(node.cluster, node.name, "vetd-circuit-breaker", [alert_payload(
                    rule="vetd-circuit-breaker", cluster=node.cluster, node=node.name, severity="critical",
                    summary=f"vetd stopped excluding nodes in partition {partition}",
                    description=f"{why}; nothing more is drained there until `vetd breaker reset`",
                    starts_at=now, labels={"partition": partition})]))
        return why

    def _alert(self, rule: Rule, node: NodeRow, message: Result | Event, since: float,
               ended: float | None, variables: dict[str, Any]) -> Alert:
        what = message.check if isinstance(message, Result) else message.name
        annotations = {key: render(text, variables) for key, text in rule.spec.annotations.items()}
        payload = alert_payload(
            rule=rule.name,
            cluster=node.cluster,
            node=node.name,
            severity=rule.spec.severity,
            summary=annotations.pop("summary", f"{rule.name} on {node.name}: {what} {message.entity}"),
            description=annotations.pop("description", rule.spec.description or message.message),
            starts_at=since,
            ends_at=ended,
            labels={**self.labels_of(node), **rule.spec.labels},
            entity=message.entity,
            annotations=annotations,
        )
        return Alert(node.cluster, node.name, rule.name, [payload])

    def pending_drains(self) -> list[Drain]:
        """Drains decided but not carried out (controller died in between)."""
        return [Drain(r["cluster"], r["node"], r["detail"], r["rule"], r["id"]) for r in self.store.pending_drains()]

    # -- actions -----------------------------------------------------------

    async def carry_out(self, action: Action) -> None:
        if isinstance(action, Send):
            await self._publish(action.command)
        elif isinstance(action, Reboot):
            result = await self.backend.reboot(action.node, action.reason)
            self.store.record_outcome(action.audit_id, result.outcome, f" | {self.backend.name}: {result.detail}",
                                      append=True)
            if not result.ok:
                for healing in self.store.healings():
                    if (healing.cluster, healing.node) == (action.cluster, action.node) and healing.phase == "rebooting":
                        decisions = Decisions()
                        self._step_failed(healing, result.detail, time.time(), decisions)
                        self._enqueue(decisions)
        elif isinstance(action, Resume):
            result = await self.backend.resume(action.node)
            self.store.record_outcome(action.audit_id, result.outcome, f" | {self.backend.name}: {result.detail}",
                                      append=True)
            self._count(f"resume_{result.outcome}")
            (log.info if result.ok else log.error)("resume_" + result.outcome, node=action.node,
                                                   detail=result.detail)
        elif isinstance(action, Drain):
            result = await self.backend.drain(action.node, action.reason)
            self.store.record_outcome(action.audit_id, result.outcome,
                                      f"{action.reason} | {self.backend.name}: {result.detail}")
            self._count(f"drain_{result.outcome}")
            (log.info if result.ok else log.error)(
                "drain_" + result.outcome, node=action.node, rule=action.rule, detail=result.detail
            )
        else:
            silences = self.store.silences(time.time())
            loud = []
            for payload in action.alerts:
                silence = next((s for s in silences if matches(s["matchers"], payload["labels"])), None)
                if silence is None:
                    loud.append(payload)
                    continue
                self._count("alerts_silenced")
                if not action.resend:
                    self.store.audit(action.cluster, action.node, "alert", rule=action.rule, outcome="silenced",
                                     detail=f"silence {silence['id']} by {silence['author']}: {silence['comment']}")
            for result in await self.alerts.send(loud) if loud else []:
                self._count(f"alert_{result.outcome}")
                if not action.resend or not result.ok:
                    self.store.audit(action.cluster, action.node, "alert", rule=action.rule,
                                     outcome=result.outcome, detail=result.detail)
        self.store.add_counters(self._unflushed)
        self._unflushed.clear()

    async def _action_worker(self) -> None:
        assert self._actions is not None
        async with asyncio.TaskGroup() as group:
            limit = asyncio.Semaphore(8)
            while True:
                action = await self._actions.get()

                async def run(action: Action = action) -> None:
                    async with limit:
                        try:
                            await self.carry_out(action)
                        except Exception as exc:
                            log.exception("action_failed", node=action.node, error=str(exc))

                group.create_task(run(), name=f"vetd.action.{type(action).__name__.lower()}.{action.node}")

    def _enqueue(self, decisions: Decisions) -> None:
        assert self._actions is not None
        for drain in decisions.drains:
            self._actions.put_nowait(drain)
        for alert in decisions.alerts:
            self._actions.put_nowait(alert)
        for other in decisions.other:
            self._actions.put_nowait(other)

    # -- MQTT ingest -------------------------------------------------------

    async def _ingest(self) -> None:
        broker = parse_broker(self.config.broker)
        backoff = Backoff()
        while True:
            try:
                async with aiomqtt.Client(
                    broker.host,
                    broker.port,
                    identifier=self.config.client_id,
                    clean_session=False,
                    keepalive=30,
                    max_queued_incoming_messages=100_000,
                    **self._client_options,
                ) as client:
                    await client.subscribe(protocol.subscription(self.config.cluster or None), qos=1)
                    self._client = client
                    self.connected.set()
                    backoff.reset()
                    log.info("broker_connected", broker=self.config.broker,
                             cluster=self.config.cluster or "*", rules=len(self.rules.rules))
                    batch: list[tuple[str, bytes]] = []
                    async for raw in client.messages:
                        if not self.admit(raw.topic.value, time.monotonic()):
                            continue
                        payload = raw.payload if isinstance(raw.payload, bytes | bytearray) else b""
                        batch.append((raw.topic.value, bytes(payload)))
                        if len(client.messages) == 0 or len(batch) >= BATCH_MAX:
                            self._enqueue(self.process(batch))
                            batch = []
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self._client = None
                delay = backoff.next()
                log.warning("broker_unavailable", broker=self.config.broker, error=str(exc),
                            retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)

    # -- operator requests (vetd drain / resume / breaker reset) ----------------

    REQUEST_TTL_S = 60.0

    def handle_requests(self, now: float | None = None) -> None:
        """Carry out what operators asked for through the CLI."""
        now = time.time() if now is None else now
        assert self._actions is not None
        for request in self.store.pending_requests():
            if now - request["ts"] > self.REQUEST_TTL_S:
                self.store.finish_request(request["id"], "expired", "the controller was not running in time")
                continue
            actor = f"operator:{request['actor']}"
            results: list[dict[str, Any]] = []
            if request["action"] == "rules_reload":
                error = self.reload_rules()
                self.store.audit("", "", "rules_reload", actor=actor, outcome="failed" if error else "done",
                                 detail=error or f"{len(self.rules.rules)} rules", now=now)
                self.store.finish_request(request["id"], "failed" if error else "done",
                                          error or [{"rules": len(self.rules.rules)}])
                continue
            if request["action"] == "breaker_reset":
                partitions = request["nodes"] or [b["partition"] for b in self.store.breakers()]
                for partition in partitions:
                    self.store.set_breaker(partition, False, "reset by operator", now)
                    self.store.audit("", "", "breaker_reset", actor=actor, detail=partition, now=now)
                    # Nodes held as "suspect" by the breaker go back to healthy; the
                    # rules will fire again for those still failing.
                    for node in self.store.nodes.values():
                        if node.state == "suspect" and self.labels_of(node).get("partition", "default") == partition:
                            node.state, node.reason, node.state_since = "healthy", "", now
                            self.store.save_node(node)
                            self._forget_rules(node)
                    results.append({"partition": partition, "outcome": "closed"})
            for cluster, name in request["nodes"] if request["action"] != "breaker_reset" else []:
                node = self.store.node(cluster, name, now)
                if request["action"] == "drain":
                    reason = clean_reason(f"{REASON_PREFIX} operator {request['actor']}: {request['reason']}")
                    node.state, node.reason, node.state_since = "excluded", reason, now
                    self.store.save_node(node)
                    audit_id = self.store.audit(cluster, name, "drain", actor=actor, outcome="pending",
                                                detail=reason, now=now)
                    self._actions.put_nowait(Drain(cluster, name, reason, "", audit_id))
                    results.append({"node": name, "outcome": "draining"})
                elif request["action"] == "resume":
                    previous = node.state
                    self.store.end_healing(cluster, name)  # an operator's resume ends any ladder
                    decisions = Decisions()
                    self._return_to_service(node, f"was {previous}", now, decisions, actor=actor)
                    self._enqueue(decisions)
                    results.append({"node": name, "outcome": "resuming", "was": previous})
            self.store.finish_request(request["id"], "done", results)
            log.info("operator_request", action=request["action"], actor=request["actor"], results=results)

    def _forget_rules(self, node: NodeRow) -> None:
        """A node back in service starts with a clean slate: its rules may fire again."""
        for key in [k for k in self._states if k[1] == node.cluster and k[2] == node.name]:
            self._save_state(key, None)

    async def _publish(self, command: Command) -> None:
        """Publish a command; one the broker does not take fails its step at the deadline."""
        client = self._client
        if client is None:
            log.warning("command_not_sent", node=command.node, action=command.action, reason="broker away")
            return
        try:
            await client.publish(protocol.topic_for(command), protocol.encode(command), qos=1, timeout=10)
        except aiomqtt.MqttError as exc:
            log.warning("command_not_sent", node=command.node, action=command.action, reason=str(exc))
            return
        log.info("command_sent", node=command.node, action=command.action, id=command.id)

    def _http(self, group: asyncio.TaskGroup) -> asyncio.Task[None] | None:
        if not self.config.http.listen:
            return None
        from vetd.controller.cli import node_summaries
        from vetd.controller.http import HttpApi

        token = read_key(self.config.http.token_file, f"{self.config.source}: http.token_file").decode() \
            if self.config.http.token_file else ""
        host, _, port = self.config.http.listen.rpartition(":")
        api = HttpApi(self.store, lambda: self.store.counters(), lambda: node_summaries(self.store), token,
                      self.config.cluster)
        return group.create_task(api.serve(host.strip("[]"), int(port)), name="vetd.controller.http")

    async def _resend_loop(self) -> None:
        """Alertmanager forgets an alert not re-sent within its resolve_timeout: keep firing ones alive."""
        while True:
            await asyncio.sleep(float(self.config.alerts.resend_interval))
            if self._firing_alerts and self.alerts.urls and self._actions is not None:
                by_node: dict[tuple[str, str], list[dict[str, Any]]] = {}
                for payload in self._firing_alerts.values():
                    key = (payload["labels"].get("cluster", ""), payload["labels"].get("node", ""))
                    by_node.setdefault(key, []).append(payload)
                for (cluster, node), payloads in by_node.items():
                    self._actions.put_nowait(Alert(cluster, node, "resend", payloads, resend=True))

    async def _requests_loop(self) -> None:
        while True:
            try:
                self.handle_requests()
                self.heal_tick()
            except Exception as exc:  # noqa: BLE001 - a bad request must not stop the controller
                log.exception("housekeeping_failed", error=str(exc))
            await asyncio.sleep(0.25)

    # -- healing: step → probation → resume, or the next step → failed ---------

    def _set_state(self, node: NodeRow, state: str, now: float) -> None:
        node.state, node.state_since = state, now
        self.store.save_node(node)

    def _command(self, node: NodeRow, action: str, args: dict[str, str], now: float) -> Command:
        timeout = float(self.config.healing.reply_timeout)
        command = Command(cluster=node.cluster, node=node.name, session=self.session, seq=0, ts=now,
                          id=uuid.uuid4().hex, action=action, args=args, expires=now + timeout)
        return sign_command(command, self._command_key) if self._command_key else command

    def _send(self, healing: Healing, node: NodeRow, action: str, args: dict[str, str], phase: str,
              now: float, decisions: Decisions) -> None:
        command = self._command(node, action, args, now)
        healing.command_id, healing.phase = command.id, phase
        healing.deadline = now + float(self.config.healing.reply_timeout)
        self.store.save_healing(healing)
        self.store.audit(node.cluster, node.name, "heal_command", rule=healing.rule, outcome="sent",
                         detail=f"{action} {', '.join(f'{k}={v}' for k, v in args.items())} (id {command.id})",
                         now=now)
        decisions.other.append(Send(command))

    def _step_failed(self, healing: Healing, why: str, now: float, decisions: Decisions) -> None:
        step = healing.ladder[healing.step] if healing.step < len(healing.ladder) else "?"
        self.store.audit(healing.cluster, healing.node, "heal_step", rule=healing.rule, outcome="failed",
                         detail=f"{step} (step {healing.step + 1}/{len(healing.ladder)}): {why}", now=now)
        healing.step += 1
        healing.phase, healing.command_id = "next", ""
        self.store.save_healing(healing)

    def _probation(self, healing: Healing, node: NodeRow, profile: str, now: float, decisions: Decisions) -> None:
        self._set_state(node, "probation", now)
        self._send(healing, node, "revet", {"profile": profile}, "probation", now, decisions)

    def _on_reply(self, reply: Reply, now: float, decisions: Decisions) -> None:
        healing = next((h for h in self.store.healings() if h.command_id == reply.id), None)
        if healing is None:
            return
        node = self.store.node(healing.cluster, healing.node, now)
        step = healing.ladder[healing.step]
        if healing.phase == "step":
            if not reply.ok:
                self._step_failed(healing, reply.message, now, decisions)
                return
            self.store.audit(node.cluster, node.name, "heal_step", rule=healing.rule, outcome="done",
                             detail=f"{step}: {reply.message}", now=now)
            self._probation(healing, node, self.config.healing.probation_profile, now, decisions)
        elif healing.phase == "probation":
            if not reply.ok:
                self._step_failed(healing, f"re-vetting failed: {reply.message}", now, decisions)
                self._set_state(node, "healing", now)
                return
            self.store.end_healing(node.cluster, node.name)
            self.store.audit(node.cluster, node.name, "healed", rule=healing.rule, outcome="done",
                             detail=f"after {step}: {reply.message}", now=now)
            self._return_to_service(node, f"healed by {step}", now, decisions)

    def _return_to_service(self, node: NodeRow, why: str, now: float, decisions: Decisions,
                           actor: str = "controller") -> None:
        node.state, node.reason, node.state_since = "healthy", "", now
        self.store.save_node(node)
        self._forget_rules(node)
        audit_id = self.store.audit(node.cluster, node.name, "resume", actor=actor, outcome="pending",
                                    detail=why, now=now)
        decisions.other.append(Resume(node.cluster, node.name, audit_id))

    def heal_tick(self, now: float | None = None) -> Decisions:
        """Advance every healing ladder that waits on time (start, deadline, reboot)."""
        now = time.time() if now is None else now
        decisions = Decisions()
        for healing in self.store.healings():
            node = self.store.node(healing.cluster, healing.node, now)
            if healing.phase in ("step", "probation") and now > healing.deadline:
                self._step_failed(healing, "no answer from the node in time", now, decisions)
                self._set_state(node, "healing", now)
            elif healing.phase == "rebooting":
                if node.online and node.session != healing.session:
                    self.store.audit(node.cluster, node.name, "heal_step", rule=healing.rule, outcome="done",
                                     detail=f"reboot: back with a new session {node.session}", now=now)
                    self._probation(healing, node, self.config.healing.probation_profile, now, decisions)
                elif now > healing.deadline:
                    self._step_failed(healing, "the node did not come back in time", now, decisions)
            if healing.phase == "next":
                self._start_step(healing, node, now, decisions)
        self._enqueue(decisions)
        return decisions

    def _start_step(self, healing: Healing, node: NodeRow, now: float, decisions: Decisions) -> None:
        if healing.step >= len(healing.ladder):
            self.store.end_healing(node.cluster, node.name)
            reason = clean_reason(f"{REASON_PREFIX} healing exhausted ({', '.join(healing.ladder)}): {node.reason}")
            self._mark_failed(node, reason, healing.rule, 0, now, decisions)
            return
        verb, _, arg = healing.ladder[healing.step].partition(" ")
        self._set_state(node, "healing", now)
        if verb == "gpu_reset":
            self._send(healing, node, "gpu_reset", {"gpu": healing.gpu}, "step", now, decisions)
        elif verb == "restart_service":
            self._send(healing, node, "restart_service", {"service": arg.strip()}, "step", now, decisions)
        elif verb == "revet":
            self._probation(healing, node, arg.strip(), now, decisions)
        elif verb == "reboot":
            healing.phase, healing.session = "rebooting", node.session
            healing.deadline = now + float(self.config.healing.reboot_timeout)
            self.store.save_healing(healing)
            audit_id = self.store.audit(node.cluster, node.name, "heal_command", rule=healing.rule,
                                        outcome="pending", detail="reboot", now=now)
            decisions.other.append(Reboot(node.cluster, node.name,
                                          f"{REASON_PREFIX} healing {healing.rule}: reboot", audit_id))

    def reload_rules(self) -> str:
        """Load the rule files again; on any error keep the rules in force and say why."""
        try:
            self.rules = load_rules(self.config.rules)
        except ConfigError as exc:
            log.error("rules_reload_failed", error=str(exc), kept=len(self.rules.rules))
            return f"{exc} (the {len(self.rules.rules)} rules in force are kept)"
        log.info("rules_reloaded", rules=len(self.rules.rules))
        return ""

    async def run(self, *, signals: bool = True) -> int:
        """Run until ``stop`` is set (by SIGTERM/SIGINT when ``signals``)."""
        loop = asyncio.get_running_loop()
        if signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: self.reload_rules() and None)
        self._actions = asyncio.Queue()
        for drain in self.pending_drains():
            log.info("drain_resumed_after_restart", node=drain.node, rule=drain.rule)
            self._actions.put_nowait(drain)
        log.info("controller_starting", store=str(self.store.path), backend=self.backend.name,
                 rules=[rule.name for rule in self.rules.rules])
        try:
            async with asyncio.TaskGroup() as group:
                ingest = group.create_task(self._ingest(), name="vetd.controller.ingest")
                worker = group.create_task(self._action_worker(), name="vetd.controller.actions")
                requests = group.create_task(self._requests_loop(), name="vetd.controller.requests")
                resend = group.create_task(self._resend_loop(), name="vetd.controller.alerts.resend")
                http = self._http(group)
                await self.stop.wait()
                ingest.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ingest
                deadline = time.monotonic() + 5
                while not self._actions.empty() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                worker.cancel()
                requests.cancel()
                resend.cancel()
                if http is not None:
                    http.cancel()
        finally:
            if signals:
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(signum)
                # Already stopping: a repeated SIGTERM must not kill us mid-exit.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.store.close()
        log.info("controller_stopped", **dict(self.counters))
        return 0
