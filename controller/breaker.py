"""The circuit breaker: vetd never empties a partition (no I/O).

A rule's drain is allowed while the partition's excluded nodes stay within
``max(always_allow, max_fraction × nodes)`` and, with ``max_drains`` set,
within that many drains per ``window``. Beyond that the breaker opens and
stays open until an operator resets it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from vetd.controller.actions import alert_payload, resolved
from vetd.controller.config import BreakerSection
from vetd.controller.decisions import Alert, Decisions
from vetd.controller.fleet import Fleet
from vetd.controller.model import FleetState, NodeRow

log = structlog.get_logger("vetd.controller")

#: Node states in which the node is out of service.
OUT_OF_SERVICE = ("excluded", "failed", "healing", "probation")


def verdict(config: BreakerSection, partition: str, members: int, excluded: int,
            recent_drains: Callable[[], int]) -> str:
    """Why one more exclusion in ``partition`` is too many ("" if it is not).

    ``recent_drains`` counts the partition's drains within ``window``; it is
    asked only when ``max_drains`` limits them.
    """
    allowed = max(config.always_allow, int(config.max_fraction * members))
    if excluded + 1 > allowed:
        return (f"partition {partition!r} would have {excluded + 1} of {members} nodes excluded "
                f"(allowed {allowed})")
    if config.max_drains:
        recent = recent_drains()
        if recent + 1 > config.max_drains:
            return (f"partition {partition!r} would have {recent + 1} drains in "
                    f"{config.window:g}s (allowed {config.max_drains})")
    return ""


class Breaker:
    """Opens per partition when a drain would be one too many; remembers it in the model."""

    def __init__(self, config: BreakerSection, state: FleetState, fleet: Fleet, *, alerting: bool) -> None:
        self.config, self.state, self.fleet, self.alerting = config, state, fleet, alerting

    def blocks(self, node: NodeRow, now: float, decisions: Decisions) -> str:
        """Why the breaker forbids excluding ``node`` now ("" if it does not)."""
        partition = self.fleet.partition_of(node)
        already = self.state.breaker_open(partition)
        if already is not None:
            return f"open since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(already.since))}"
        members = [n for n in self.state.nodes.values() if self.fleet.partition_of(n) == partition]
        excluded = sum(1 for n in members if n.state in OUT_OF_SERVICE)
        why = verdict(self.config, partition, len(members), excluded, lambda: self.state.drains_since(
            now - self.config.window, {(n.cluster, n.name) for n in members}))
        if why:
            self.state.set_breaker(partition, True, why, now)
            self.state.audit(node.cluster, node.name, "breaker_open", outcome="open", detail=why, now=now)
            log.error("breaker_open", partition=partition, reason=why)
            if self.alerting:
                payload = alert_payload(
                    rule="vetd-circuit-breaker", cluster=node.cluster, node=node.name, severity="critical",
                    summary=f"vetd stopped excluding nodes in partition {partition}",
                    description=f"{why}; nothing more is drained there until `vetd breaker reset`",
                    starts_at=now, labels={"partition": partition})
                # Firing (re-sent) until an operator resets the breaker.
                self.state.save_firing_alert(breaker_key(partition), node.cluster, node.name, payload, now)
                decisions.alerts.append(Alert(node.cluster, node.name, "vetd-circuit-breaker", [payload]))
        return why

    def reset(self, partition: str, actor: str, now: float, decisions: Decisions) -> list[NodeRow]:
        """Close the breaker (its alert resolved); the nodes it held as ``suspect`` go back to healthy (returned)."""
        self.state.set_breaker(partition, False, "reset by operator", now)
        if (firing := self.state.end_firing_alert(breaker_key(partition), now)) is not None:
            decisions.alerts.append(resolved(firing, now))
        self.state.audit("", "", "breaker_reset", actor=actor, detail=partition, now=now)
        released = []
        for node in self.state.nodes.values():
            if node.state == "suspect" and self.fleet.partition_of(node) == partition:
                node.state, node.reason, node.state_since = "healthy", "", now
                self.state.save_node(node)
                released.append(node)
        return released


def breaker_key(partition: str) -> str:
    """The firing-alert key of a partition's ``vetd-circuit-breaker``."""
    return f"vetd-circuit-breaker|{partition}"
