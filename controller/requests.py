"""Operator requests (``vetd drain / resume / breaker reset / rules reload``, ``POST /api/v1/…``).

The CLI and the HTTP API queue a request in the store; the running
controller hands it to the engine (:meth:`Engine.operator_drain
<vetd.controller.engine.Engine.operator_drain>` and friends), persists what the
engine changed, audited with the operator's name, and answers in the request's
row, in one transaction per request.
"""

from __future__ import annotations

from typing import Any

import structlog

from vetd.controller.actions import REASON_PREFIX, clean_reason
from vetd.controller.decisions import Decisions
from vetd.controller.engine import Engine
from vetd.controller.store import Store

log = structlog.get_logger("vetd.controller")

#: A request the controller did not pick up within this long expires unapplied.
REQUEST_TTL_S = 60.0


class OperatorRequests:
    def __init__(self, engine: Engine, store: Store) -> None:
        self.engine, self.store = engine, store

    def handle(self, now: float) -> Decisions:
        """Apply every pending request; the drains and resumes to carry out, request by request
        (and what the engine changed, already persisted).

        Each request is one transaction: what the engine changed and the request's answer.
        """
        actions = Decisions()
        for request in self.store.pending_requests():
            if now - request["ts"] > REQUEST_TTL_S:
                self.store.finish_request(request["id"], "expired", "the controller was not running in time")
                continue
            if request["action"] == "vet":
                continue  # a campaign: the campaigns' runner takes it (vetd.controller.campaigns)
            with self.store.transaction():
                decided, status, results = self._apply(request, f"operator:{request['actor']}", now)
                self.store.apply(decided.changes)
                self.store.finish_request(request["id"], status, results)
            actions.extend(decided)
            if request["action"] != "rules_reload":
                log.info("operator_request", action=request["action"], actor=request["actor"], results=results)
        return actions

    def _apply(self, request: dict[str, Any], actor: str, now: float) -> tuple[Decisions, str, Any]:
        """What the engine decides on ``request``, the request's status and its answer."""
        decisions = Decisions()
        results: list[dict[str, Any]] = []
        if request["action"] == "rules_reload":
            error = self.engine.reload_rules()
            count = len(self.engine.rules.rules)
            self.store.audit("", "", "rules_reload", actor=actor, outcome="failed" if error else "done",
                             detail=error or f"{count} rules", now=now)
            return decisions, "failed" if error else "done", error or [{"rules": count}]
        if request["action"] == "breaker_reset":
            for partition in request["nodes"] or [b["partition"] for b in self.store.breakers()]:
                decisions.extend(self.engine.breaker_reset(partition, actor, now))
                results.append({"partition": partition, "outcome": "closed"})
        elif request["action"] == "drain":
            reason = clean_reason(f"{REASON_PREFIX} operator {request['actor']}: {request['reason']}")
            for cluster, name in request["nodes"]:
                decisions.extend(self.engine.operator_drain(cluster, name, reason, actor, now))
                results.append({"node": name, "outcome": "draining"})
        elif request["action"] == "resume":
            for cluster, name in request["nodes"]:
                previous = self.engine.node_state(cluster, name)
                decisions.extend(self.engine.operator_resume(cluster, name, actor, now))
                results.append({"node": name, "outcome": "resuming", "was": previous})
        return decisions, "done", results
