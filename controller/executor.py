"""The executor: carries decisions out through pluggable backends, off the ingest path.

Backends (protocols in :mod:`vetd.controller.actions`): a scheduler (Slurm,
or ``none``), an alert receiver (Alertmanager or any webhook) and a command
channel to agents (the MQTT link). Each outcome goes into the audit row of
its decision, so a slow ``scontrol`` or a dead Alertmanager never holds up
ingest and is still on record.

Each backend has a lane of its own (a queue and its workers, with its own
concurrency), so one kind of action never waits behind another: sixteen
alerts to an Alertmanager that never answers hold the alert lane only, and a
drain goes ahead on the scheduler lane.

A drain or resume is finished only when the scheduler confirms it. From the
moment it is taken on until then it is a row of the store's
``pending_actions`` (attempts, last error, next try), so it outlives a
controller restart; a failed attempt is tried again after a full-jitter
back-off, and one that keeps failing raises ``vetd_scheduler_action_failing``.
A newer decision for the same node supersedes a pending one (a resume cancels
a drain not yet done), and one node's attempts never overlap, so they reach
the scheduler in the order they were decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import structlog

from vetd.controller.actions import (
    ActionOutcome,
    AlertBackend,
    CommandBackend,
    SchedulerBackend,
    alert_payload,
    iso,
)
from vetd.controller.config import SchedulerSection
from vetd.controller.counters import Counters
from vetd.controller.decisions import Action, Alert, Decisions, Drain, Reboot, Resume, Send
from vetd.controller.model import Audit, NodeKey, PendingAction
from vetd.controller.silences import matches
from vetd.controller.store import Store
from vetd.core.mqtt import Backoff

log = structlog.get_logger("vetd.controller")

#: Scheduler actions (drains, resumes, reboots) carried out at once.
SCHEDULER_CONCURRENCY = 8
#: Alert deliveries at once (each waits up to ``[alerts] timeout`` per try).
ALERT_CONCURRENCY = 4
#: Commands published to agents at once.
COMMAND_CONCURRENCY = 8
#: The controller's alert for a drain or resume the scheduler keeps refusing or failing.
FAILING_ALERT = "vetd_scheduler_action_failing"


class _Item(Protocol):
    @property
    def node(self) -> str: ...


T = TypeVar("T", bound=_Item)


class Lane(Generic[T]):
    """A queue of one kind of action and the workers that carry it out, at most ``concurrency`` at once."""

    def __init__(self, name: str, concurrency: int, work: Callable[[T], Awaitable[None]]) -> None:
        self.name, self.concurrency, self.work = name, concurrency, work
        self.queue: asyncio.Queue[T] = asyncio.Queue()
        self.running = 0

    def put(self, item: T) -> None:
        self.queue.put_nowait(item)

    @property
    def idle(self) -> bool:
        return self.queue.empty() and not self.running

    async def run(self) -> None:
        """Take items as workers come free, until cancelled."""
        limit = asyncio.Semaphore(self.concurrency)
        async with asyncio.TaskGroup() as group:
            while True:
                await limit.acquire()
                item = await self.queue.get()
                self.running += 1
                group.create_task(self._one(item, limit),
                                  name=f"vetd.action.{self.name}.{type(item).__name__.lower()}.{item.node}")

    async def _one(self, item: T, limit: asyncio.Semaphore) -> None:
        try:
            await self.work(item)
        except Exception as exc:
            log.exception("action_failed", lane=self.name, node=item.node, error=str(exc))
        finally:
            self.running -= 1
            limit.release()


@dataclass
class Pending:
    """A drain or resume being carried out: its decision, its row in the store, its back-off."""

    action: Drain | Resume
    row: PendingAction
    backoff: Backoff
    #: Queued on or running in the scheduler lane (a node's attempts never overlap).
    busy: bool = False
    #: A newer decision for the node replaced this one (:meth:`Executor._adopt`).
    superseded: bool = False
    #: When ``vetd_scheduler_action_failing`` went out for it (0: it has not).
    alerted: float = 0.0

    @property
    def node(self) -> str:
        return self.row.node

    @property
    def kind(self) -> str:
        return self.row.action


class Executor:
    def __init__(self, store: Store, counters: Counters, *, scheduler: SchedulerBackend, alerts: AlertBackend,
                 commands: CommandBackend,
                 on_outcome: Callable[[Action, ActionOutcome, float], Decisions],
                 retry: SchedulerSection | None = None) -> None:
        self.store, self.counters = store, counters
        self.scheduler, self.alerts, self.commands = scheduler, alerts, commands
        #: The engine, told how a drain or reboot turned out (a failed reboot fails its healing step).
        self.on_outcome = on_outcome
        #: Back-off and alert thresholds of drains and resumes.
        self.retry = retry or SchedulerSection()
        self.scheduler_lane: Lane[Reboot | Pending] = Lane("scheduler", SCHEDULER_CONCURRENCY, self._schedule)
        self.alert_lane: Lane[Alert] = Lane("alerts", ALERT_CONCURRENCY, self._alert)
        self.command_lane: Lane[Send] = Lane("commands", COMMAND_CONCURRENCY, self._send)
        #: Drains and resumes not yet confirmed, by node.
        self.pending: dict[NodeKey, Pending] = {}
        self._wake = asyncio.Event()

    @property
    def lanes(self) -> tuple[Lane[Any], ...]:
        return self.scheduler_lane, self.alert_lane, self.command_lane

    @property
    def idle(self) -> bool:
        """Nothing queued or running (drains and resumes waiting out a back-off do not count)."""
        return all(lane.idle for lane in self.lanes)

    def enqueue(self, actions: Iterable[Action]) -> None:
        """Hand actions to their lanes; a drain or resume is first recorded as pending."""
        for action in actions:
            if isinstance(action, Drain | Resume):
                self._adopt(action, time.time())
            elif isinstance(action, Reboot):
                self.scheduler_lane.put(action)
            elif isinstance(action, Send):
                self.command_lane.put(action)
            else:
                self.alert_lane.put(action)

    def restore(self) -> list[PendingAction]:
        """Take on again, at start, the drains and resumes a previous run left unconfirmed: the store's
        pending rows, and decisions the controller died holding before it took them on; returns them."""
        now = time.time()
        rows = {row.audit_id: row for row in self.store.pending_actions()}
        for audit in self.store.undone_actions():
            drain = audit.action == "drain"
            rows.setdefault(audit.id, PendingAction(audit.cluster, audit.node, audit.action, audit.id, audit.ts,
                                                    reason=audit.detail if drain else "", rule=audit.rule))
        for audit_id in sorted(rows):  # in the order decided: a later one supersedes an earlier one
            row = rows[audit_id]
            row.next_try = now  # a restart is a good moment to try again
            audit = Audit(row.cluster, row.node, row.action, row.since, rule=row.rule, outcome="pending",
                          detail=row.reason, id=row.audit_id)
            action: Drain | Resume = (Drain(row.cluster, row.node, row.reason, row.rule, audit)
                                      if row.action == "drain" else Resume(row.cluster, row.node, audit))
            self._adopt(action, now, row)
        return [p.row for p in self.pending.values()]

    # -- drains and resumes: pending until the scheduler confirms ---------------

    def _adopt(self, action: Drain | Resume, now: float, row: PendingAction | None = None) -> None:
        key = (action.cluster, action.node)
        kind = "drain" if isinstance(action, Drain) else "resume"
        if row is None:
            row = PendingAction(action.cluster, action.node, kind, action.audit.id, now,
                                reason=action.reason if isinstance(action, Drain) else "",
                                rule=action.rule if isinstance(action, Drain) else "", next_try=now)
        old = self.pending.get(key)
        if old is not None and old.row.audit_id != row.audit_id:
            old.superseded = True
            if not old.busy:  # a running attempt records what it did when it ends
                self._settle(old, ActionOutcome(False, "superseded", f"superseded by a later {kind}"), now)
        self.store.save_pending(row)
        backoff = Backoff(float(self.retry.retry_base), float(self.retry.retry_max))
        backoff.attempt = min(row.attempts, 30)
        self.pending[key] = Pending(action, row, backoff)
        self._wake.set()

    def _queue_due(self, now: float) -> float | None:
        """Queue the attempts that are due; when the next one is (None: no other waits)."""
        soonest: float | None = None
        for pending in self.pending.values():
            if pending.busy:
                continue
            if pending.row.next_try <= now:
                pending.busy = True
                self.scheduler_lane.put(pending)
            elif soonest is None or pending.row.next_try < soonest:
                soonest = pending.row.next_try
        return soonest

    async def _retries(self) -> None:
        """Queue each pending drain or resume when it is due, until cancelled."""
        while True:
            self._wake.clear()
            soonest = self._queue_due(time.time())
            timeout = None if soonest is None else max(0.0, soonest - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _attempt(self, pending: Pending) -> None:
        try:
            if pending.superseded:
                self._settle(pending, ActionOutcome(False, "superseded", "superseded by a later decision"),
                             time.time())
                return
            action = pending.action
            if isinstance(action, Drain):
                result = await self.scheduler.drain(action.node, action.reason)
            else:
                result = await self.scheduler.resume(action.node)
            pending.row.attempts += 1
            self.counters.count(f"{pending.kind}_{result.outcome}")
            if result.outcome != "failed":
                self._settle(pending, result, time.time())
            elif pending.superseded:
                self._settle(pending, ActionOutcome(False, "superseded", f"{result.detail}; superseded by a "
                                                                         "later decision"), time.time())
            else:
                self._failed(pending, result, time.time())
        finally:
            pending.busy = False
            self._wake.set()

    def _failed(self, pending: Pending, result: ActionOutcome, now: float) -> None:
        """Try again after a back-off; alert once it has failed too often or too long."""
        row = pending.row
        delay = pending.backoff.next()
        row.last_error, row.next_try = result.detail, now + delay
        self.store.save_pending(row)
        log.warning(f"{pending.kind}_failed", node=row.node, attempt=row.attempts, detail=result.detail,
                    retry_in_s=round(delay, 2))
        if not pending.alerted and (row.attempts >= self.retry.alert_after_attempts
                                    or now - row.since >= self.retry.alert_after):
            pending.alerted = now
            self.counters.count("scheduler_actions_failing")
            log.error("scheduler_action_failing", node=row.node, action=pending.kind, attempts=row.attempts,
                      detail=result.detail)
            if self.alerts.enabled:
                self.alert_lane.put(Alert(row.cluster, row.node, FAILING_ALERT, [self._failing(pending)]))

    def _settle(self, pending: Pending, result: ActionOutcome, now: float) -> None:
        """The action is over (done, skipped, refused or superseded): audit it, drop its row, end its alert."""
        action, row = pending.action, pending.row
        tries = f" (after {row.attempts} attempts)" if row.attempts > 1 else ""
        if isinstance(action, Drain):
            self.store.record_outcome(row.audit_id, result.outcome,
                                      f"{action.reason} | {self.scheduler.name}: {result.detail}{tries}")
        else:
            self.store.record_outcome(row.audit_id, result.outcome,
                                      f" | {self.scheduler.name}: {result.detail}{tries}", append=True)
        (log.info if result.ok or result.outcome == "superseded" else log.error)(
            f"{pending.kind}_{result.outcome}", node=row.node, rule=row.rule, detail=result.detail,
            attempts=row.attempts)
        self.store.drop_pending(row)
        key = (row.cluster, row.node)
        if self.pending.get(key) is pending:
            del self.pending[key]
        if pending.alerted and self.alerts.enabled:
            self.alert_lane.put(Alert(row.cluster, row.node, FAILING_ALERT, [self._failing(pending, ended=now)]))
        if isinstance(action, Drain):
            self._told(action, result)

    def _failing(self, pending: Pending, ended: float | None = None) -> dict[str, Any]:
        row = pending.row
        drain = pending.kind == "drain"
        return alert_payload(
            rule=FAILING_ALERT, cluster=row.cluster, node=row.node, severity="critical" if drain else "warning",
            summary=f"vetd cannot {pending.kind} {row.node} in {self.scheduler.name}",
            description=(f"{row.attempts} attempts since {iso(row.since)}; last error: {row.last_error}. "
                         + ("The node stays in service in the scheduler" if drain else
                            "The node stays out of service")
                         + " while vetd keeps trying (`vetd node` shows the next try)."),
            starts_at=pending.alerted, ends_at=ended, labels={"action": pending.kind})

    def failing_alerts(self) -> list[dict[str, Any]]:
        """``vetd_scheduler_action_failing`` alerts still firing, for the re-send loop."""
        return [self._failing(p) for p in self.pending.values() if p.alerted]

    # -- the lanes' work ---------------------------------------------------------

    async def _schedule(self, item: Reboot | Pending) -> None:
        if isinstance(item, Pending):
            await self._attempt(item)
        else:
            result = await self.scheduler.reboot(item.node, item.reason)
            self.store.record_outcome(item.audit.id, result.outcome,
                                      f" | {self.scheduler.name}: {result.detail}", append=True)
            self._told(item, result)
        self._counted()

    async def _send(self, action: Send) -> None:
        await self.commands.publish(action.command)

    def _counted(self) -> None:
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
        self._counted()

    async def carry_out_queued(self) -> None:
        """Carry out, one at a time and without workers, what is queued and due now (tests)."""
        self._queue_due(time.time())
        for lane in self.lanes:
            while not lane.queue.empty():
                await lane.work(lane.queue.get_nowait())

    async def run(self) -> None:
        """Run every lane and the retries, until cancelled."""
        async with asyncio.TaskGroup() as group:
            for lane in self.lanes:
                group.create_task(lane.run(), name=f"vetd.controller.actions.{lane.name}")
            group.create_task(self._retries(), name="vetd.controller.actions.retries")

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
                self.alert_lane.put(Alert(cluster, node, "resend", payloads, resend=True))
