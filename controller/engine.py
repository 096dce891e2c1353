"""The engine: a decoded message and the fleet's state in, decisions out (no I/O).

Each message kind has one short handler (:meth:`Engine.on_result` is "what
happens when a result arrives"). The engine works on an in-memory model,
:class:`~vetd.controller.model.FleetState` (nodes, rule states, firing alerts,
ladders, breakers, recent drains), loaded from the store once at start; its
parts (rule states, fleet view, breaker, node lifecycle, healing ladder) each
have a module, none of them doing I/O. Every entry point returns
:class:`~vetd.controller.decisions.Decisions`: the changes to the model that
the store persists (``changes``) and what must happen in the world (drains,
alerts, commands) for the executor. The caller applies the changes inside one
store transaction and only then hands the actions to the executor::

    with store.transaction():
        history_ids = store.record(messages, now)   # duplicates are None
        decisions = engine.process(zip(messages, history_ids), now)
        store.apply(decisions.changes)
    executor.enqueue(decisions)

Operator requests, healing deadlines and the executor's outcomes come in
through their own entry points (:meth:`Engine.operator_drain`,
:meth:`Engine.heal_tick`, :meth:`Engine.on_outcome`, …) the same way.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from vetd.controller.actions import (
    REASON_PREFIX,
    ActionOutcome,
    HealingStep,
    alert_payload,
    clean_reason,
    iso,
)
from vetd.controller.breaker import OUT_OF_SERVICE, Breaker
from vetd.controller.config import ControllerConfig
from vetd.controller.counters import RULE_ERRORS, Counters
from vetd.controller.decisions import Action, Alert, Decisions, Drain, Reboot
from vetd.controller.diagnose import Asked, Diagnoses
from vetd.controller.fleet import Fleet, static_labels
from vetd.controller.healing import Ladders
from vetd.controller.history import SCOPES, viewing
from vetd.controller.jobs import Jobs
from vetd.controller.lifecycle import Lifecycle, node_labels
from vetd.controller.model import (
    AGENT_CHECK,
    FleetState,
    HistoryRecord,
    Job,
    NodeKey,
    NodeRow,
    PeerGroup,
    PeerMetrics,
)
from vetd.controller.rules import (
    NODE_FIELDS,
    Rule,
    RuleSet,
    evaluate_all,
    explain_error,
    message_view,
    render,
)
from vetd.controller.rulestate import RuleStates
from vetd.core.configfile import ConfigError
from vetd.core.protocol import Event, Message, Reply, Result, State, Telemetry

log = structlog.get_logger("vetd.controller")

NO_FLEET: dict[str, Any] = {"partition": "", "labels": {}, "median": {}, "peers": {}}
#: Results whose metrics are measurements peers can be compared with (not an error, a skip).
MEASURED = frozenset({"pass", "warn", "fail"})
#: The operator alert for a rule that errors live; its ``rule`` label names the rule.
RULE_ERROR_ALERT = "vetd_rule_error"


@dataclass(frozen=True)
class Checkpoint:
    """The engine's own state that the model's changes do not cover (:meth:`Engine.checkpoint`)."""

    counters: tuple[Counter[str], Counter[str]]
    erring_rules: frozenset[str]
    #: The diagnose commands out (kept in memory, not in the model).
    diagnoses: dict[NodeKey, Asked]


class Engine:
    """Decides on messages, time and operator requests over ``state``; reads and writes nothing else.

    ``rules`` loads the rule files (at start and on reload), ``steps`` are the
    healing steps plugins provide: both injected, so the engine does no I/O and
    ``vetd rules test`` runs this very engine.
    """

    def __init__(self, config: ControllerConfig, state: FleetState, counters: Counters, *,
                 rules: Callable[[], RuleSet], steps: Mapping[str, HealingStep], alerting: bool,
                 session: str, command_key: bytes = b"") -> None:
        self.config, self.state, self.counters, self.alerting = config, state, counters, alerting
        self._load_rules = rules
        self.rules: RuleSet = rules()
        self.fleet = Fleet(static_labels(config.labels), state.nodes.values())
        self.rule_states = RuleStates(state)
        self.breaker = Breaker(config.breaker, state, self.fleet, alerting=alerting)
        self.lifecycle = Lifecycle(state, config.repeat, self.fleet, self.breaker, self.rule_states, counters,
                                   alerting=alerting)
        self.ladders = Ladders(state, config.healing, self.lifecycle, session=session, command_key=command_key,
                               steps=steps)
        self.diagnoses = Diagnoses(state, config.healing, session=session, command_key=command_key)
        state.history.keep, state.history.per_kind = float(config.history.keep), config.history.per_kind
        #: Rules that errored since they were loaded: logged and alerted once, then only counted.
        self.erring_rules: set[str] = set()
        #: The latest metrics of each (node, entity) by peer group, for ``fleet.median``/``fleet.peers``.
        self.peer_metrics = PeerMetrics()
        self.session = session
        #: The incident of the message being judged, once a rule fired on it (more rules add their names).
        self._incident: HistoryRecord | None = None
        #: Sequence numbers of the controller's own ``vetd_agent`` results in this session, per node.
        self._agent_seq: dict[NodeKey, int] = {}
        #: Open jobs: started, ended, what their nodes showed (:mod:`~vetd.controller.jobs`).
        self.jobs = Jobs(state, config.jobs, counters)

    @property
    def firing_alerts(self) -> dict[str, dict[str, Any]]:
        """Alerts of result rules still firing, re-sent until they resolve."""
        return self.state.firing_alerts

    def process(self, messages: Iterable[tuple[Message, int | None]], now: float) -> Decisions:
        """One batch of messages, each with its history id (None: a duplicate); the decisions taken."""
        decisions = Decisions()
        for message, history_id in messages:
            self.on_message(message, history_id, now, decisions)
        return self._decided(decisions)

    def checkpoint(self) -> Checkpoint:
        """What :meth:`restore` needs to undo the work that follows, besides the model's changes
        (which name every key they touch: the store puts those back, :meth:`Store.reload`)."""
        return Checkpoint(self.counters.snapshot(), frozenset(self.erring_rules), dict(self.diagnoses.out))

    def restore(self, checkpoint: Checkpoint, nodes: Iterable[NodeKey]) -> None:
        """After the store put the model back (:meth:`Store.reload`): counters, erring rules and the
        fleet's label counts of ``nodes`` as they were at ``checkpoint``; changes noted since, dropped."""
        self.counters.restore(checkpoint.counters)
        self.erring_rules = set(checkpoint.erring_rules)
        self.diagnoses.out = dict(checkpoint.diagnoses)
        self.state.take_changes()
        self.jobs.invalidate()
        for key in nodes:
            self.fleet.count(self.state.nodes.get(key) or NodeRow(*key))

    def _decided(self, decisions: Decisions) -> Decisions:
        """``decisions`` with the model's changes since the last ones, for the store to persist."""
        decisions.changes = self.state.take_changes()
        return decisions

    def on_message(self, message: Message, history_id: int | None, now: float, decisions: Decisions) -> None:
        if isinstance(message, State):
            self.on_state(message, now)
        elif isinstance(message, Result | Event):
            self.on_result(message, history_id, now, decisions)
        elif isinstance(message, Telemetry):
            self.counters.count("telemetry")
        elif isinstance(message, Reply):
            self.counters.count("replies")
            log.info("agent_reply", node=message.node, id=message.id, ok=message.ok, message=message.message)
            if not self.ladders.on_reply(message, now, decisions) and not self.diagnoses.on_reply(message, now):
                self._stray_reply(message)

    def _stray_reply(self, reply: Reply) -> None:
        """A reply that advances nothing: counted; one with another node's command id is logged."""
        owner = next((h for h in self.state.healings.values() if reply.id and h.command_id == reply.id), None)
        if owner is None:
            self.counters.count("replies_unmatched")
            return
        self.counters.count("replies_wrong_node")
        log.warning("reply_from_wrong_node", node=reply.node, id=reply.id, commanded=owner.node)

    def on_state(self, message: State, now: float) -> None:
        """A birth or a death: the node's session, online flag and labels."""
        known = self.state.nodes.get((message.cluster, message.node))
        session, boot = (known.session, known.boot_id) if known is not None else ("", "")
        if not self.state.apply_state(message, now):
            self.counters.count("stale_state")
            return
        if message.online and message.session != session:
            self._remember_birth(message, boot, now)
        if (born := self.state.nodes.get((message.cluster, message.node))) is not None:
            self.fleet.count(born)  # a birth carries the node's labels
        if message.dropped:
            self.state.set_agent_loss(message.cluster, message.node, dict(message.dropped))

    def _remember_birth(self, birth: State, boot_before: str, now: float) -> None:
        """A new agent session in the node's history, and a reboot when its boot id is new.

        History is kept by the controller's clock (in a replay, each line's time), as every
        record the controller makes: a node's clock that is off can neither hide nor forge one."""
        self.state.remember(HistoryRecord(birth.cluster, birth.node, now, "session"))
        if birth.boot_id and boot_before and birth.boot_id != boot_before:
            self.state.remember(HistoryRecord(birth.cluster, birth.node, now, "reboot"))

    def on_result(self, message: Result | Event, history_id: int | None, now: float, decisions: Decisions) -> None:
        """A result or event stored as ``history_id`` (None: seen before): let every rule on it decide."""
        if isinstance(message, Result) and message.check == AGENT_CHECK and message.session == self.session:
            node = self.state.node(message.cluster, message.node, now)  # about the agent, not from it
            if message.status == "pass":
                self.state.agents_late.discard((node.cluster, node.name))
            else:
                self.state.agents_late.add((node.cluster, node.name))
        else:
            node = self.state.heard_from(message, now)
        if history_id is None:
            self.counters.count("duplicates")
            return
        self.counters.count("results" if isinstance(message, Result) else "events")
        if not self.fleet.counted(node):
            self.fleet.count(node)  # first heard of through a result, not a birth
        ended = self.jobs.observe(message, history_id, now)  # a job's start or end, or what its node showed
        kind, name = ("result", message.check) if isinstance(message, Result) else ("event", message.name)
        subject = f"{kind}:{name}:{message.entity}"
        if isinstance(message, Result) and message.status in MEASURED and message.check in self.rules.peer_names:
            self.peer_metrics.record(self.peer_group(node), (node.cluster, node.name), message.entity,
                                     message.check, message.metrics, self.rules.peer_names)
        variables = self.variables(message, node)
        rules = self.rules.for_input(kind)
        self.counters.count("rules_evaluated", len(rules))
        self._incident = None
        with self._history_in_view(node, message.entity, now):
            for rule, matched in evaluate_all(rules, variables):
                if matched is None:
                    self._rule_error(rule, node, subject, history_id, now, decisions, variables)
                elif kind == "event":
                    if matched and self.rule_states.counted(rule, node, message):
                        self._fire(rule, node, message, subject, history_id, now, decisions, variables)
                else:
                    step = self.rule_states.step(rule, node, message, subject, bool(matched))
                    if step.fire:
                        self._fire(rule, node, message, subject, history_id, now, decisions, variables)
                    elif step.resolved_since is not None:
                        self._resolve(rule, node, message, subject, step.resolved_since, history_id, now,
                                      decisions, variables)
        if ended is not None:
            self.decide_job(ended, now, decisions)

    def decide_job(self, job: Job, now: float, decisions: Decisions) -> None:
        """A job has ended (on every node, or ``[jobs] settle`` after the first): every rule on
        jobs decides once per node of the job, seeing the job from that node and its ``job_end``."""
        rules = self.rules.for_input("job")
        if not rules:
            return
        subject = f"job:{job.id}"
        for name in sorted(job.nodes):
            node = self.state.node(job.cluster, name, now)
            event, evidence = self.jobs.end_event(job, name, now)
            variables = self.variables(event, node)
            variables["job"] = msgspec.structs.asdict(self.jobs.context(job, name))
            self.counters.count("rules_evaluated", len(rules))
            self._incident = None
            with self._history_in_view(node, event.entity, now):
                for rule, matched in evaluate_all(rules, variables):
                    if matched is None:
                        self._rule_error(rule, node, subject, evidence, now, decisions, variables)
                    elif matched and self.rule_states.counted(rule, node, event):
                        self._fire(rule, node, event, subject, evidence, now, decisions, variables)

    def job_tick(self, now: float) -> Decisions:
        """Decide on jobs whose nodes had ``[jobs] settle`` to report their ends; close lost ones."""
        decisions = Decisions()
        for job in self.jobs.settled(now):
            self.decide_job(self.jobs.close(job, "done", now), now, decisions)
        for job in self.jobs.lost(now):
            self.jobs.close(job, "lost", now)
        return self._decided(decisions)

    def _history_in_view(self, node: NodeRow, entity: str, now: float) -> contextlib.AbstractContextManager[None]:
        """Where ``history`` functions count: the node's records, for ``entity``, back from ``now``."""
        if not self.rules.uses_history:
            return contextlib.nullcontext()
        return viewing(self.state.history, (node.cluster, node.name), entity, now)

    def _remember_incident(self, node: NodeRow, message: Result | Event, rule: str, now: float) -> None:
        """One incident per message that made rules fire, tagged with them, its name and its codes
        (noted when the first fires, so it comes before what the rules did about it)."""
        if self._incident is not None:
            if rule not in self._incident.tags:
                self._incident.tags = (*self._incident.tags, sys.intern(rule))
            return
        name = message.check if isinstance(message, Result) else message.name
        self._incident = HistoryRecord(node.cluster, node.name, now, "incident", message.entity,
                                       tuple(dict.fromkeys([rule, name, *message.codes])))
        self.state.remember(self._incident)

    def variables(self, message: Result | Event, node: NodeRow) -> dict[str, Any]:
        """What a rule's ``when`` and annotations see."""
        data = message_view(message)  # the fields rule checking declares (rules.SCHEMAS)
        is_result = isinstance(message, Result)
        fleet = self.fleet.of(node) if self.rules.uses_fleet else NO_FLEET
        if self.rules.uses_peers:
            # The node's own value is left out: a slow GPU must not pull down the median it is held to.
            median, peers = self.peer_metrics.view(self.peer_group(node), node.name, message.entity)
            fleet = {**fleet, "median": median, "peers": peers}
        return {
            "result": data if is_result else {},
            "event": {} if is_result else data,
            "node": {**{name: getattr(node, name) for name in NODE_FIELDS},
                     "labels": self.fleet.labels_of(node)},
            "fleet": fleet,
            "history": SCOPES if self.rules.uses_history else {},
        }

    def peer_group(self, node: NodeRow) -> PeerGroup:
        """Whom ``node`` is compared with in ``fleet.median``: its cluster, partition and GPU model
        (label ``gpu_model``, which gpu_health sends at birth; ``""`` without one)."""
        return (node.cluster, self.fleet.partition_of(node), self.fleet.labels_of(node).get("gpu_model", ""))

    def _rule_error(self, rule: Rule, node: NodeRow, subject: str, history_id: int, now: float,
                    decisions: Decisions, variables: dict[str, Any]) -> None:
        """A condition that errored: counted per rule; the first time, logged, audited and alerted."""
        self.counters.count("rule_errors")
        self.counters.count(RULE_ERRORS + rule.name)
        if rule.name in self.erring_rules:
            return
        self.erring_rules.add(rule.name)
        error = explain_error(rule, variables)
        log.warning("rule_error", rule=rule.name, node=node.name, subject=subject, error=error)
        self.state.audit(node.cluster, node.name, "rule_error", rule=rule.name, detail=f"{subject}: {error}",
                         evidence=[history_id], now=now)
        if self.alerting:
            payload = alert_payload(
                rule=RULE_ERROR_ALERT, cluster=node.cluster, node=node.name, severity="warning",
                summary=f"vetd rule {rule.name} cannot be evaluated",
                description=f"{rule.source}:{rule.line}: {error} (on {subject}; later errors are only "
                            f"counted, in vetd_rule_errors_total)",
                starts_at=now, ends_at=now + float(self.config.alerts.event_alert_for),
                labels={"rule": rule.name},
            )
            decisions.alerts.append(Alert(node.cluster, node.name, RULE_ERROR_ALERT, [payload]))

    def _fire(self, rule: Rule, node: NodeRow, message: Result | Event, subject: str, history_id: int,
              now: float, decisions: Decisions, variables: dict[str, Any]) -> None:
        self.counters.count("rules_fired")
        self._remember_incident(node, message, rule.name, now)
        was_out = node.state in OUT_OF_SERVICE
        self.state.audit(node.cluster, node.name, "rule_fired", rule=rule.name, detail=subject,
                         evidence=[history_id], now=now)
        log.info("rule_fired", rule=rule.name, node=node.name, subject=subject, severity=rule.spec.severity)
        actions = rule.spec.actions
        what = message.check if isinstance(message, Result) else message.name
        entity = "" if message.entity == "node" else f"[{message.entity}]"
        reason = clean_reason(f"{REASON_PREFIX} {rule.name}: {what}{entity} {message.message}")
        if "mark_failed" in actions:
            self.lifecycle.exclude(rule.name, node, reason, history_id, now, decisions, failed=True,
                                   entity=message.entity)
        elif "drain" in actions or "heal" in actions:
            excluded = self.lifecycle.exclude(rule.name, node, reason, history_id, now, decisions, failed=False,
                                              entity=message.entity)
            if excluded and "heal" in actions and node.state == "excluded":
                self.ladders.start(rule.name, list(rule.spec.heal), node, message, now)
        elif "suspect" in actions:
            self.lifecycle.suspect(rule.name, node, reason, history_id, now)
        if "diagnose" in actions:
            self.diagnoses.request(rule.name, node, message, now, decisions)
        if "alert" in actions and self.alerting:
            if message.entity != "node" and (was_out or not node.online):
                # Inhibition: a per-GPU (per-entity) alert adds nothing while the node
                # itself is down or out of service; its own alert already went out.
                self.counters.count("alerts_inhibited")
                self.state.audit(node.cluster, node.name, "alert", rule=rule.name, outcome="inhibited",
                                 detail=f"{subject}: node {'offline' if not node.online else node.state}", now=now)
            elif isinstance(message, Event):
                ends = now + float(self.config.alerts.event_alert_for)
                decisions.alerts.append(self._alert(rule, node, message, now, ends, variables))
            else:
                alert = self._alert(rule, node, message, now, None, variables)
                key = alert_key(rule, node, subject)
                self.state.save_firing_alert(key, node.cluster, node.name, alert.alerts[0], now)
                decisions.alerts.append(alert)

    def _resolve(self, rule: Rule, node: NodeRow, message: Result | Event, subject: str, since: float,
                 history_id: int, now: float, decisions: Decisions, variables: dict[str, Any]) -> None:
        self.state.audit(node.cluster, node.name, "rule_resolved", rule=rule.name,
                         detail=subject, evidence=[history_id], now=now)
        key = alert_key(rule, node, subject)
        if key in self.firing_alerts:
            self.state.save_firing_alert(key, node.cluster, node.name, None, now)
            # A node's clock sets `since` (message time): an alert never starts after it ends.
            decisions.alerts.append(self._alert(rule, node, message, min(since, now), now, variables))

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
            description=annotations.pop("description",
                                        render(rule.spec.description, variables) or message.message),
            starts_at=since,
            ends_at=ended,
            labels={**node_labels(self.fleet.labels_of(node)), **rule.spec.labels},
            entity=message.entity,
            annotations=annotations,
        )
        return Alert(node.cluster, node.name, rule.name, [payload])

    def agent_checks(self, now: float) -> list[Result]:
        """The controller's own check of every node's agent, as results for the rules: ``timeout``
        for an agent offline (its Last Will or a death, nothing heard since) for ``[alerts]
        agent_offline_after``, ``pass`` once it is back. Only changes are reported; they go through
        ingest like any result (stored, deduplicated, evaluated), which notes them in
        :attr:`FleetState.agents_late`."""
        after = float(self.config.alerts.agent_offline_after)
        if not after:
            return []
        late = self.state.agents_late
        checks = []
        for key, node in self.state.nodes.items():
            if not node.session:
                continue  # never heard from an agent (a node an operator named)
            if not node.online and now - node.last_seen >= after and key not in late:
                status, text = "timeout", f"agent offline since {iso(node.last_seen)}"
            elif node.online and key in late:
                status, text = "pass", "agent back"
            else:
                continue
            self._agent_seq[key] = seq = self._agent_seq.get(key, 0) + 1
            checks.append(Result(cluster=node.cluster, node=node.name, session=self.session, seq=seq, ts=now,
                                 check=AGENT_CHECK, status=status, message=text))  # type: ignore[arg-type]
        return checks

    def heal_tick(self, now: float) -> Decisions:
        """Advance every healing ladder that waits on time."""
        decisions = Decisions()
        self.ladders.tick(now, decisions)
        return self._decided(decisions)

    def on_outcome(self, action: Action, outcome: ActionOutcome, now: float) -> Decisions:
        """What carrying out ``action`` gave (already in its audit row): a drain that failed no
        longer counts towards repeat offences and the breaker; a failed reboot fails its step."""
        if isinstance(action, Drain):
            self.state.drain_carried_out(action.audit.id, outcome.outcome)
        elif isinstance(action, Reboot) and not outcome.ok:
            self.ladders.reboot_failed(action.cluster, action.node, outcome.detail, now)
        return self._decided(Decisions())

    # -- operator requests ----------------------------------------------------

    def node_state(self, cluster: str, name: str) -> str:
        node = self.state.nodes.get((cluster, name))
        return "healthy" if node is None else node.state

    def operator_drain(self, cluster: str, name: str, reason: str, actor: str, now: float) -> Decisions:
        """An operator's drain: no breaker, no repeat counting."""
        decisions = Decisions()
        self.lifecycle.operator_drain(self.state.node(cluster, name, now), reason, actor, now, decisions)
        return self._decided(decisions)

    def operator_resume(self, cluster: str, name: str, actor: str, now: float) -> Decisions:
        """An operator's resume: ends any ladder, and the node starts afresh."""
        decisions = Decisions()
        node = self.state.node(cluster, name, now)
        previous = node.state
        self.state.end_healing(cluster, name)
        self.lifecycle.return_to_service(node, f"was {previous}", now, decisions, actor=actor)
        return self._decided(decisions)

    def breaker_reset(self, partition: str, actor: str, now: float) -> Decisions:
        """Close a partition's breaker; the nodes it held as ``suspect`` go back to healthy
        and their rules may fire again (for those still failing)."""
        decisions = Decisions()
        for node in self.breaker.reset(partition, actor, now, decisions):
            self.rule_states.forget(node)
        return self._decided(decisions)

    def reload_rules(self) -> str:
        """Load the rule files again; on any error keep the rules in force and say why."""
        try:
            self.rules = self._load_rules()
            self.erring_rules.clear()  # a rule fixed and erring again is news
        except ConfigError as exc:
            log.error("rules_reload_failed", error=str(exc), kept=len(self.rules.rules))
            return f"{exc} (the {len(self.rules.rules)} rules in force are kept)"
        log.info("rules_reloaded", rules=len(self.rules.rules))
        return ""


def alert_key(rule: Rule, node: NodeRow, subject: str) -> str:
    return f"{rule.name}|{node.cluster}|{node.name}|{subject}"
