"""Operator requests (``vetd drain / resume / breaker reset / rules reload``, ``POST /api/v1/…``).

The CLI and the HTTP API queue a request in the store; the running
controller applies it here, audits it with the operator's name and answers
in the request's row.
"""

from __future__ import annotations

from typing import Any

import structlog

from vetd.controller.actions import REASON_PREFIX, clean_reason
from vetd.controller.decisions import Decisions
from vetd.controller.engine import Engine

log = structlog.get_logger("vetd.controller")

#: A request the controller did not pick up within this long expires unapplied.
REQUEST_TTL_S = 60.0


class OperatorRequests:
    def __init__(self, engine: Engine) -> None:
        self.engine, self.store = engine, engine.store

    def handle(self, now: float) -> Decisions:
        """Apply every pending request; the drains and resumes to carry out."""
        decisions = Decisions()
        for request in self.store.pending_requests():
            if now - request["ts"] > REQUEST_TTL_S:
                self.store.finish_request(request["id"], "expired", "the controller was not running in time")
                continue
            actor = f"operator:{request['actor']}"
            if request["action"] == "rules_reload":
                self._reload(request, actor, now)
                continue
            results: list[dict[str, Any]] = []
            if request["action"] == "breaker_reset":
                partitions = request["nodes"] or [b["partition"] for b in self.store.breakers()]
                for partition in partitions:
                    # Nodes held as "suspect" by the breaker go back to healthy; the
                    # rules will fire again for those still failing.
                    for node in self.engine.breaker.reset(partition, actor, now):
                        self.engine.rule_states.forget(node)
                    results.append({"partition": partition, "outcome": "closed"})
            elif request["action"] in ("drain", "resume"):
                for cluster, name in request["nodes"]:
                    results.append(self._node(request, cluster, name, actor, now, decisions))
            self.store.finish_request(request["id"], "done", results)
            log.info("operator_request", action=request["action"], actor=request["actor"], results=results)
        return decisions

    def _reload(self, request: dict[str, Any], actor: str, now: float) -> None:
        error = self.engine.reload_rules()
        count = len(self.engine.rules.rules)
        self.store.audit("", "", "rules_reload", actor=actor, outcome="failed" if error else "done",
                         detail=error or f"{count} rules", now=now)
        self.store.finish_request(request["id"], "failed" if error else "done", error or [{"rules": count}])

    def _node(self, request: dict[str, Any], cluster: str, name: str, actor: str, now: float,
              decisions: Decisions) -> dict[str, Any]:
        node = self.store.node(cluster, name, now)
        if request["action"] == "drain":
            reason = clean_reason(f"{REASON_PREFIX} operator {request['actor']}: {request['reason']}")
            self.engine.lifecycle.operator_drain(node, reason, actor, now, decisions)
            return {"node": name, "outcome": "draining"}
        previous = node.state
        self.store.end_healing(cluster, name)  # an operator's resume ends any ladder
        self.engine.lifecycle.return_to_service(node, f"was {previous}", now, decisions, actor=actor)
        return {"node": name, "outcome": "resuming", "was": previous}
