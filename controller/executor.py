"""The executor: carries decisions out through pluggable backends, off the ingest path.

Backends (protocols in :mod:`vetd.controller.actions`): a scheduler (Slurm,
or ``none``), an alert receiver (Alertmanager or any webhook) and a command
channel to agents (the MQTT link). Each outcome goes into the audit row of
its decision, so a slow ``scontrol`` or a dead Alertmanager never holds up
ingest and is still on record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from vetd.controller.actions import ActionOutcome, AlertBackend, CommandBackend, SchedulerBackend
from vetd.controller.counters import Counters
from vetd.controller.decisions import Action, Alert, Decisions, Drain, Reboot, Resume, Send
from vetd.controller.silences import matches
from vetd.controller.store import Store

log = structlog.get_logger("vetd.controller")

#: Actions carried out at once.
CONCURRENCY = 8


class Executor:
    def __init__(self, store: Store, counters: Counters, *, scheduler: SchedulerBackend, alerts: AlertBackend,
                 commands: CommandBackend,
                 on_outcome: Callable[[Action, ActionOutcome, float], Decisions]) -> None:
        self.store, self.counters = store, counters
        self.scheduler, self.alerts, self.commands = scheduler, alerts, commands
        #: The engine, told how a drain or reboot turned out (a failed reboot fails its healing step).
        self.on_outcome = on_outcome
        self.queue: asyncio.Queue[Action] = asyncio.Queue()

    def enqueue(self, actions: Iterable[Action]) -> None:
        for action in actions:
            self.queue.put_nowait(action)

    async def carry_out(self, action: Action) -> None:
        if isinstance(action, Send):
            await self.commands.publish(action.command)
        elif isinstance(action, Reboot):
            result = await self.scheduler.reboot(action.node, action.reason)
            self.store.record_outcome(action.audit.id, result.outcome,
                                      f" | {self.scheduler.name}: {result.detail}", append=True)
            self._told(action, result)
        elif isinstance(action, Resume):
            result = await self.scheduler.resume(action.node)
            self.store.record_outcome(action.audit.id, result.outcome,
                                      f" | {self.scheduler.name}: {result.detail}", append=True)
            self.counters.count(f"resume_{result.outcome}")
            (log.info if result.ok else log.error)("resume_" + result.outcome, node=action.node,
                                                   detail=result.detail)
        elif isinstance(action, Drain):
            result = await self.scheduler.drain(action.node, action.reason)
            self.store.record_outcome(action.audit.id, result.outcome,
                                      f"{action.reason} | {self.scheduler.name}: {result.detail}")
            self.counters.count(f"drain_{result.outcome}")
            (log.info if result.ok else log.error)(
                "drain_" + result.outcome, node=action.node, rule=action.rule, detail=result.detail
            )
            self._told(action, result)
        else:
            await self._alert(action)
        self.counters.write(self.store)
        self.counters.written()

    def _told(self, action: Action, result: ActionOutcome) -> None:
        """Tell the engine how ``action`` turned out; persist what that changed, carry out what it decided."""
        with self.store.transaction():
            decisions = self.on_outcome(action, result, time.time())
            self.store.apply(decisions.changes)
        self.enqueue(decisions)

    async def _alert(self, action: Alert) -> None:
        """Send what no silence holds; audit the outcome (re-sends only when they fail)."""
        silences = self.store.silences(time.time())
        loud = []
        for payload in action.alerts:
            silence = next((s for s in silences if matches(s["matchers"], payload["labels"])), None)
            if silence is None:
                loud.append(payload)
                continue
            self.counters.count("alerts_silenced")
            if not action.resend:
                self.store.audit(action.cluster, action.node, "alert", rule=action.rule, outcome="silenced",
                                 detail=f"silence {silence['id']} by {silence['author']}: {silence['comment']}")
        for result in await self.alerts.send(loud) if loud else []:
            self.counters.count(f"alert_{result.outcome}")
            if not action.resend or not result.ok:
                self.store.audit(action.cluster, action.node, "alert", rule=action.rule,
                                 outcome=result.outcome, detail=result.detail)

    async def run(self) -> None:
        """Carry out queued actions, at most :data:`CONCURRENCY` at a time, until cancelled."""
        async with asyncio.TaskGroup() as group:
            limit = asyncio.Semaphore(CONCURRENCY)
            while True:
                action = await self.queue.get()

                async def run(action: Action = action) -> None:
                    async with limit:
                        try:
                            await self.carry_out(action)
                        except Exception as exc:
                            log.exception("action_failed", node=action.node, error=str(exc))

                group.create_task(run(), name=f"vetd.action.{type(action).__name__.lower()}.{action.node}")

    async def resend(self, interval: float, firing: Callable[[], Iterable[dict[str, Any]]]) -> None:
        """Alertmanager forgets an alert not re-sent within its resolve_timeout: keep firing ones alive."""
        while True:
            await asyncio.sleep(interval)
            if not self.alerts.enabled:
                continue
            by_node: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for payload in firing():
                key = (payload["labels"].get("cluster", ""), payload["labels"].get("node", ""))
                by_node.setdefault(key, []).append(payload)
            for (cluster, node), payloads in by_node.items():
                self.queue.put_nowait(Alert(cluster, node, "resend", payloads, resend=True))
