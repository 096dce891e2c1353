"""A node's way in and out of service: exclude, mark failed, return (no I/O).

Each move updates the node row and the audit log in the engine's model and adds
what must be carried out (a drain, a resume, a ``vetd-node-failed`` alert) to the
decisions. Rules, the healing ladder and operators all move nodes through here.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from vetd.controller.actions import REASON_PREFIX, alert_payload, clean_reason, resolved
from vetd.controller.breaker import OUT_OF_SERVICE, Breaker
from vetd.controller.config import RepeatSection
from vetd.controller.counters import Counters
from vetd.controller.decisions import Alert, Decisions, Drain, Resume
from vetd.controller.fleet import Fleet
from vetd.controller.model import FleetState, HistoryRecord, NodeRow
from vetd.controller.rulestate import RuleStates

log = structlog.get_logger("vetd.controller")

#: Alert labels that say what an alert is about and whose it is: a node's own labels (from its
#: agent's birth) never replace them, or a node could pin its alerts on another.
IDENTITY_LABELS = frozenset({"alertname", "cluster", "node", "severity", "rule", "entity"})


def node_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A node's labels as an alert carries them: all but the identity labels."""
    return {key: value for key, value in labels.items() if key not in IDENTITY_LABELS}


class Lifecycle:
    def __init__(self, state: FleetState, repeat: RepeatSection, fleet: Fleet, breaker: Breaker,
                 rule_states: RuleStates, counters: Counters, *, alerting: bool) -> None:
        self.state, self.repeat, self.fleet, self.breaker = state, repeat, fleet, breaker
        self.rule_states, self.counters, self.alerting = rule_states, counters, alerting

    def set_state(self, node: NodeRow, state: str, now: float) -> None:
        node.state, node.state_since = state, now
        self.state.save_node(node)

    def exclude(self, rule: str, node: NodeRow, reason: str, history_id: int, now: float,
                decisions: Decisions, *, failed: bool, entity: str = "") -> bool:
        """Take the node out of service (once), minding the breaker and repeat offences;
        ``entity`` is what the rule judged (``gpu3``), for the node's history."""
        if node.state in OUT_OF_SERVICE:
            if failed and node.state != "failed":
                self.mark_failed(node, reason, rule, history_id, now, decisions)
            self.counters.count("drains_already_excluded")
            return False
        blocked = self.breaker.blocks(node, now, decisions)
        if blocked:
            node.state, node.reason, node.state_since = "suspect", reason, now
            self.state.save_node(node)
            self.state.audit(node.cluster, node.name, "drain", rule=rule, outcome="would_have",
                             detail=f"{reason} | breaker: {blocked}", evidence=[history_id], now=now)
            self.counters.count("drains_blocked_by_breaker")
            return False
        repeat = self.repeat
        previous = self.state.exclusions_since(node.cluster, node.name, now - repeat.window)
        if repeat.count and previous + 1 >= repeat.count and not failed:
            failed = True
            reason = clean_reason(f"{REASON_PREFIX} repeat offender ({previous + 1} exclusions in "
                                  f"{repeat.window / 86400:g}d): {reason.removeprefix(REASON_PREFIX).strip()}")
        audit = self.state.audit(node.cluster, node.name, "drain", rule=rule, outcome="pending",
                                 detail=reason, evidence=[history_id], now=now)
        node.state, node.reason, node.state_since = "excluded", reason, now
        if failed:
            self.mark_failed(node, reason, rule, history_id, now, decisions)
        self.state.save_node(node)
        self.state.remember(HistoryRecord(node.cluster, node.name, now, "drain", entity, (rule,)))
        decisions.drains.append(Drain(node.cluster, node.name, reason, rule, audit))
        return True

    def suspect(self, rule: str, node: NodeRow, reason: str, history_id: int, now: float) -> bool:
        """Mark a healthy node ``suspect``: a person should look; it stays in service (no drain).
        An operator's ``vetd resume`` makes it healthy again."""
        if node.state != "healthy":
            return False
        node.state, node.reason, node.state_since = "suspect", reason, now
        self.state.save_node(node)
        self.state.audit(node.cluster, node.name, "suspect", rule=rule, outcome="done", detail=reason,
                         evidence=[history_id], now=now)
        self.counters.count("marked_suspect")
        return True

    def operator_drain(self, node: NodeRow, reason: str, actor: str, now: float, decisions: Decisions) -> None:
        """An operator's drain: no breaker, no repeat counting."""
        node.state, node.reason, node.state_since = "excluded", reason, now
        self.state.save_node(node)
        audit = self.state.audit(node.cluster, node.name, "drain", actor=actor, outcome="pending",
                                 detail=reason, now=now)
        self.state.remember(HistoryRecord(node.cluster, node.name, now, "drain", "", ("operator",)))
        decisions.drains.append(Drain(node.cluster, node.name, reason, "", audit))

    def mark_failed(self, node: NodeRow, reason: str, rule: str, history_id: int, now: float,
                    decisions: Decisions) -> None:
        """The node needs a person: out of service, and no healing ladder goes on (a rule that marks a
        node failed mid-ladder, e.g. one counting its remediations, must not see the ladder resume it)."""
        node.state, node.reason, node.state_since = "failed", reason, now
        self.state.save_node(node)
        self.state.audit(node.cluster, node.name, "mark_failed", rule=rule, outcome="failed",
                         detail=reason, evidence=[history_id], now=now)
        if (ladder := self.state.healings.get((node.cluster, node.name))) is not None:
            self.state.end_healing(node.cluster, node.name)
            self.state.audit(node.cluster, node.name, "heal_end", rule=ladder.rule, outcome="stopped",
                             detail=f"the node is marked failed by {rule}", now=now)
        self.counters.count("marked_failed")
        log.error("node_failed", node=node.name, reason=reason)
        if self.alerting:
            payload = alert_payload(
                rule="vetd-node-failed", cluster=node.cluster, node=node.name, severity="critical",
                summary=f"{node.name} needs a person", description=reason, starts_at=now,
                labels=node_labels(self.fleet.labels_of(node)))
            # Firing until the node is back in service: re-sent like a rule's alert, so an
            # Alertmanager outage longer than the sender's retries cannot lose it.
            self.state.save_firing_alert(failed_key(node), node.cluster, node.name, payload, now)
            decisions.alerts.append(Alert(node.cluster, node.name, "vetd-node-failed", [payload]))

    def return_to_service(self, node: NodeRow, why: str, now: float, decisions: Decisions,
                          actor: str = "controller") -> None:
        node.state, node.reason, node.state_since = "healthy", "", now
        self.state.save_node(node)
        if (firing := self.state.end_firing_alert(failed_key(node), now)) is not None:
            decisions.alerts.append(resolved(firing, now))
        self.rule_states.forget(node)
        audit = self.state.audit(node.cluster, node.name, "resume", actor=actor, outcome="pending",
                                 detail=why, now=now)
        self.state.remember(HistoryRecord(node.cluster, node.name, now, "resume", "",
                                          ("vetd" if actor == "controller" else "operator",)))
        decisions.other.append(Resume(node.cluster, node.name, audit))


def failed_key(node: NodeRow) -> str:
    """The firing-alert key of a node's ``vetd-node-failed``."""
    return f"vetd-node-failed|{node.cluster}|{node.name}"

