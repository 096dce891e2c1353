"""``vetd controller``: the parts wired together and run in one task group.

Along the data flow:

* :mod:`~vetd.controller.ingest`: MQTT → admitted, decoded batches;
* :mod:`~vetd.controller.engine`: message + state → decisions, pure: it works
  on an in-memory model (:mod:`~vetd.controller.model`) loaded from the store
  at start (rule state, fleet view, breaker, healing ladder and node lifecycle
  in their own modules, none of them doing I/O);
* :mod:`~vetd.controller.store`: all SQL. Per batch, one transaction
  (:meth:`Controller.process`): the store records the batch and marks its
  duplicates, the engine decides, the store applies the changes it made
  (node rows, rule states, ladders, audit rows, …) and the counters commit
  with them;
* :mod:`~vetd.controller.executor`: decisions → the world, through the
  scheduler, alert and command backends, each in its own lane, off the ingest
  path, after commit; drains and resumes are retried until the scheduler
  confirms them;
* :mod:`~vetd.controller.requests`: operator requests; the read views are
  :mod:`~vetd.controller.cli` and :mod:`~vetd.controller.http`;
* :mod:`~vetd.controller.notices`: after each commit, a retained notice to each
  node whose service state changed (in service, excluded, drained), read by
  its agent;
* :mod:`~vetd.controller.campaigns`: bandwidth between idle nodes in pairs,
  through signed commands to their agents (their replies are taken out of
  ingest's batches), the verdicts stored through ingest as results.

Decisions are audited when taken and carried out afterwards, so a slow
``scontrol`` or a dead Alertmanager never holds up ingest, and a drain or
resume decided but not yet confirmed when the controller died is carried out
after restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from vetd.controller.acks import Acks
from vetd.controller.actions import ActionOutcome, AlertBackend, CommandBackend, SchedulerBackend
from vetd.controller.campaigns import Campaigns
from vetd.controller.config import ControllerConfig
from vetd.controller.counters import Counters
from vetd.controller.decisions import Action, Decisions
from vetd.controller.engine import Checkpoint, Engine
from vetd.controller.executor import Executor
from vetd.controller.ingest import BrokerLink, NameBounds, decode, malformed
from vetd.controller.model import Changes, NodeHistory, NodeRow
from vetd.controller.notices import ServiceNotices
from vetd.controller.plugins import plugins
from vetd.controller.requests import OperatorRequests
from vetd.controller.rules import RuleSet, healing_steps, load_rules
from vetd.controller.store import Store, StoreUnavailable, unavailable
from vetd.controller.telemetry import Current, TelemetryStore, default_path
from vetd.core.configfile import ConfigError, read_key
from vetd.core.protocol import Message, State, channel_of
from vetd.core.signals import handle, release

log = structlog.get_logger("vetd.controller")

#: How often operator requests and healing deadlines are looked at.
HOUSEKEEPING_S = 0.25
#: How often agents offline too long are looked for (``[alerts] agent_offline_after``).
AGENT_CHECK_S = 5.0
#: How often rows beyond ``[store] keep`` are pruned, and at most how many of each table at a time.
PRUNE_S = 60.0
PRUNE_ROWS = 10_000


class Controller:
    """Ingest, engine and executor over one store; backends may be injected
    (``vetd rules test`` decides alerts without sending them)."""

    def __init__(self, config: ControllerConfig, *, store: Store | None = None,
                 scheduler: SchedulerBackend | None = None, alerts: AlertBackend | None = None,
                 commands: CommandBackend | None = None) -> None:
        self.config = config
        self.store = store or Store(config.store.path)
        self.counters = Counters()
        #: This controller run, as the session of the commands it sends.
        self.session = uuid.uuid4().hex[:16]
        self.backend = scheduler or plugins().scheduler_backend(config.scheduler)
        self.alerts = alerts or plugins().alert_sinks(config)
        self.link = BrokerLink(config, self.counters)
        self.bounds = NameBounds(config.limits, self.counters, self.store.known_names())
        #: The master key commands are signed with (each node's key derived from it); empty: unsigned.
        self.command_key = command_key = (read_key(config.command_key_file, f"{config.source}: command_key_file")
                                          if config.command_key_file else b"")
        history = NodeHistory(float(config.history.keep), config.history.per_kind)
        self.engine = Engine(config, self.store.load_state(history), self.counters,
                             rules=functools.partial(load_rules, config.rules), steps=healing_steps(),
                             alerting=self.alerts.enabled, session=self.session, command_key=command_key)
        #: Retained notices to agents: whether their node is in service (issue 17).
        self.notices = ServiceNotices(self.session, self.engine.state, self.engine.fleet,
                                      scheduler=self.backend.name)
        self.executor = Executor(self.store, self.counters, scheduler=self.backend, alerts=self.alerts,
                                 commands=commands or self.link, on_outcome=self._on_outcome,
                                 retry=config.scheduler)
        self.requests = OperatorRequests(self.engine, self.store)
        #: Acknowledgements to agents of what each batch committed (issue 13: end-to-end delivery).
        self.acks = Acks(self.session)
        #: Bandwidth between idle nodes in pairs, through their agents (issue 19).
        self.campaigns = Campaigns(self)
        self.connected = self.link.connected
        self.stop = asyncio.Event()
        #: While batches fail to commit (a full disk): since when (monotonic) and how many tries.
        self._store_failed_at = 0.0
        self._store_tries = 0
        #: The agents' telemetry windows (issue 18), in a database of their own; None: ``[telemetry] enabled = false``.
        self.telemetry = TelemetryStore(config.telemetry.path or default_path(str(self.store.path)),
                                        counters=self.counters) if config.telemetry.enabled else None

    @property
    def rules(self) -> RuleSet:
        return self.engine.rules

    def process(self, batch: Sequence[tuple[str, bytes]], now: float | None = None) -> Decisions:
        """Ingest a batch of ``(topic, payload)`` in one transaction; returns what was decided.

        A message that fails anywhere (store, engine) is dropped, counted as ``malformed`` and
        logged with its node and the reason; the rest of the batch goes on (:meth:`_isolated`).
        The database failing is no message's fault: :class:`StoreUnavailable`, and nothing of
        the batch is kept, counted or acknowledged (the same batch may be given again).
        """
        now = time.time() if now is None else now
        checkpoint = self.engine.checkpoint()  # before decoding: its counts are undone too
        messages = self.bounds.admit(decode(batch, self.counters, self.config.cluster))
        messages = self.campaigns.take_replies(messages)  # a campaign's own replies go to it
        decisions = self._commit(messages, now, checkpoint)
        self.store_telemetry(messages, now)  # only once the batch is committed (else it comes again)
        return decisions

    def store_telemetry(self, messages: Sequence[Message], now: float) -> None:
        """The batch's telemetry windows into the telemetry database, after (and apart from) its
        decisions: telemetry is best effort, and a failure to keep it never holds up the rest."""
        if self.telemetry is None:
            return
        try:
            self.telemetry.add(messages, now)
        except sqlite3.Error as exc:
            self.counters.count("telemetry_failed")
            log.error("telemetry_store_failed", error=str(exc), path=str(self.telemetry.path))

    def process_messages(self, messages: Sequence[Message], now: float) -> Decisions:
        """Decoded messages (of this cluster, within bounds) in one transaction."""
        return self._commit(messages, now, self.engine.checkpoint())

    def _commit(self, messages: Sequence[Message], now: float, checkpoint: Checkpoint) -> Decisions:
        decisions = Decisions()
        try:
            with self.store.transaction():
                self._isolated(messages, now, decisions)
                self.counters.write(self.store)
        except Exception as exc:
            if not unavailable(exc):
                raise
            self._undo(checkpoint, decisions.changes, messages)
            raise StoreUnavailable(str(exc)) from exc
        self.counters.written()
        self.acks.committed(messages)  # after COMMIT: only now may the agents forget them
        self.notices.decided(decisions)
        return decisions

    def _undo(self, checkpoint: Checkpoint, changes: Changes, messages: Sequence[Message]) -> None:
        """Put the engine's model back as the store holds it, after a transaction was rolled back."""
        changes.update(self.engine.state.take_changes())
        nodes = {(m.cluster, m.node) for m in messages} | set(changes.nodes) | set(changes.healings)
        self.store.reload(self.engine.state, changes, nodes)
        self.engine.restore(checkpoint, nodes)

    def _isolated(self, messages: Sequence[Message], now: float, decisions: Decisions) -> None:
        """The batch at once (the usual case, as fast as ever); if any message fails, again one
        message at a time, each on its own, leaving out the ones that fail. What is decided goes
        into ``decisions`` as it is (the caller undoes it if the transaction fails after all)."""
        decided = self._attempt(messages, now)
        if isinstance(decided, Decisions):
            decisions.extend(decided)
            return
        for message in messages:
            one = self._attempt([message], now)
            if isinstance(one, Decisions):
                decisions.extend(one)
            else:
                self.counters.count("failed_in_processing")
                malformed(self.counters, f"{one.__class__.__name__}: {one}", cluster=message.cluster,
                          node=message.node, kind=channel_of(message))

    def _attempt(self, messages: Sequence[Message], now: float) -> Decisions | Exception:
        """Record, decide and apply ``messages`` under a savepoint; on any error, undo all of it.

        Undoing: SQLite rolls the savepoint back; the engine's in-memory model is put back from
        the store for every key the failed work's changes name, and for the messages' nodes
        (whose rows and ladders the engine may change in place before noting it). Snapshotting
        the whole model per message would cost as much as the work; validating every handler
        before it mutates could never be shown complete; the changes already name what was touched.
        """
        checkpoint = self.engine.checkpoint()
        decisions: Decisions | None = None
        try:
            with self.store.savepoint():
                history_ids = self.store.record(messages, now)  # None: a duplicate
                decisions = self.engine.process(zip(messages, history_ids, strict=True), now)
                self.store.apply(decisions.changes)
        except Exception as exc:  # any failure of one message is isolated, whatever it is (the database: not)
            touched = self.engine.state.take_changes()
            if decisions is not None:
                touched.update(decisions.changes)
            nodes = {(m.cluster, m.node) for m in messages}
            self.store.reload(self.engine.state, touched, nodes)
            self.engine.restore(checkpoint, nodes)
            if unavailable(exc):
                raise  # the database, not this message: the whole batch waits (:meth:`_commit`)
            return exc
        return decisions

    def handle_requests(self, now: float | None = None) -> None:
        """Carry out what operators asked for through the CLI or HTTP."""
        decisions = self.requests.handle(time.time() if now is None else now)
        self.notices.decided(decisions)
        self.executor.enqueue(decisions)

    def heal_tick(self, now: float | None = None, *, carry_out: bool = True) -> Decisions:
        """Advance every healing ladder that waits on time (start, deadline, reboot); ``carry_out``
        False only decides (``vetd rules test``)."""
        decisions = self._ticked(self.engine.heal_tick, time.time() if now is None else now)
        if carry_out:
            self.notices.decided(decisions)
            self.executor.enqueue(decisions)
        return decisions

    def job_tick(self, now: float | None = None) -> Decisions:
        """Decide on jobs whose nodes had ``[jobs] settle`` to report their ends, close lost ones;
        returns what was decided (for the executor)."""
        now = time.time() if now is None else now
        if not self.engine.jobs.due(now):
            return Decisions()
        decisions = self._ticked(self.engine.job_tick, now)
        self.notices.decided(decisions)
        return decisions

    def _ticked(self, tick: Callable[[float], Decisions], now: float) -> Decisions:
        """One of the engine's timed steps in its own transaction; on a store that cannot be
        written, nothing of it is kept (the engine's model put back) and :class:`StoreUnavailable`."""
        checkpoint = self.engine.checkpoint()
        decisions = Decisions()
        try:
            with self.store.transaction():
                decisions = tick(now)
                self.store.apply(decisions.changes)
                self.counters.write(self.store)
        except Exception as exc:
            if not unavailable(exc):
                raise
            self._undo(checkpoint, decisions.changes, ())
            raise StoreUnavailable(str(exc)) from exc
        self.counters.written()
        return decisions

    def agent_tick(self, now: float | None = None) -> Decisions:
        """The controller's own check of every node's agent (``vetd_agent``), through ingest."""
        now = time.time() if now is None else now
        checks = self.engine.agent_checks(now)
        return self.process_messages(checks, now) if checks else Decisions()

    def prune(self, now: float | None = None) -> dict[str, int]:
        """Delete history, audit and requests beyond ``[store] keep``, and node history records
        beyond ``[history] keep``: bounded work, one transaction."""
        now = time.time() if now is None else now
        keep = float(self.config.store.keep)
        with self.store.transaction():
            pruned = self.store.prune(now - keep, PRUNE_ROWS) if keep else {}
            pruned["node_history"] = self.store.prune_node_history(now - float(self.config.history.keep),
                                                                   PRUNE_ROWS)
        if any(pruned.values()):
            log.info("store_pruned", keep=self.config.store.keep, **pruned)
        return pruned

    def _on_outcome(self, action: Action, outcome: ActionOutcome, now: float) -> Decisions:
        """The engine hears how an action turned out; the node's service notice follows it
        (the executor commits what this returns, and notices go out after that)."""
        decisions = self.engine.on_outcome(action, outcome, now)
        self.notices.outcome(action, outcome)
        self.notices.decided(decisions)
        return decisions

    def telemetry_tick(self, now: float | None = None) -> dict[str, int]:
        """Roll the telemetry windows up into the node history and delete what is past its keep."""
        if self.telemetry is None:
            return {}
        section = self.config.telemetry
        done = self.telemetry.tick(time.time() if now is None else now, keep_nodes=float(section.keep_nodes),
                                   keep_jobs=float(section.keep_jobs), resolution=float(section.node_resolution),
                                   late=float(section.late))
        if any(done.values()):
            log.info("telemetry_pruned", **done)
        return done

    def fleet_of(self, node: NodeRow) -> dict[str, Any]:
        return self.engine.fleet.of(node)

    def reload_rules(self) -> str:
        return self.engine.reload_rules()

    def _firing_alerts(self) -> list[dict[str, Any]]:
        """The rules' alerts still firing and the executor's own (a drain that keeps failing)."""
        return [*self.engine.firing_alerts.values(), *self.executor.failing_alerts()]

    def _on_batch(self, batch: Sequence[tuple[str, bytes]]) -> bool:
        """Ingest a batch from the broker; False when the store would not take it (try again)."""
        try:
            decisions = self.process(batch)
        except StoreUnavailable as exc:
            self._store_failing(exc)
            return False
        if self._store_failed_at:
            log.warning("store_writable_again", store=str(self.store.path), tries=self._store_tries,
                        seconds=round(time.monotonic() - self._store_failed_at, 1))
            self._store_failed_at, self._store_tries = 0.0, 0
        self.executor.enqueue(decisions)
        return True

    def _store_failing(self, exc: StoreUnavailable) -> None:
        """Log a store that fails to take a batch: once as it starts, then every 100th try."""
        self._store_tries += 1
        if not self._store_failed_at:
            self._store_failed_at = time.monotonic()
            log.error("store_unwritable", store=str(self.store.path), error=str(exc),
                      hint="ingest waits, nothing acknowledged: the broker and the agents keep the results; "
                           "free space on the store's disk and it goes on by itself")
        elif self._store_tries % 100 == 0:
            log.error("store_still_unwritable", store=str(self.store.path), error=str(exc), tries=self._store_tries)

    def _on_retained_birth(self, state: State) -> None:
        """A node was online before this subscription: what it published meanwhile may have gone
        to a broker with no subscriber for it; ask it to send again what is not acknowledged."""
        self.acks.resend(state.cluster, state.node)

    async def _housekeeping(self) -> None:
        agents_checked = pruned = 0.0
        while True:
            try:
                self.handle_requests()
                self.heal_tick()
                self.executor.enqueue(self.job_tick())
                if (now := time.monotonic()) - agents_checked >= AGENT_CHECK_S:
                    agents_checked = now
                    self.executor.enqueue(self.agent_tick())
                if now - pruned >= PRUNE_S:
                    pruned = now
                    self.prune()
                    self.telemetry_tick()
            except Exception as exc:
                if unavailable(exc):  # a full disk: ingest logs it; this tries again next round
                    log.debug("housekeeping_store_unavailable", error=str(exc))
                else:
                    log.exception("housekeeping_failed", error=str(exc))
            await asyncio.sleep(HOUSEKEEPING_S)

    def _http(self, group: asyncio.TaskGroup) -> asyncio.Task[None] | None:
        if not self.config.http.listen:
            return None
        from vetd.controller.http import HttpApi
        from vetd.controller.views import node_summaries

        token = read_key(self.config.http.token_file, f"{self.config.source}: http.token_file").decode() \
            if self.config.http.token_file else ""
        host, _, port = self.config.http.listen.rpartition(":")
        api = HttpApi(self.store, lambda: node_summaries(self.store), token, self.config.cluster,
                      self.config.http, telemetry=self._current_telemetry)
        return group.create_task(api.serve(host.strip("[]"), int(port)), name="vetd.controller.http")

    def _current_telemetry(self) -> list[Current]:
        if self.telemetry is None:
            return []
        return self.telemetry.current(time.time(), float(self.config.telemetry.current_for))

    async def run(self, *, signals: bool = True) -> int:
        """Run until ``stop`` is set (by SIGTERM/SIGINT when ``signals``)."""
        if not self.config.command_key_file and not self.config.allow_unsigned_commands:
            raise ConfigError(f"{self.config.source}: command_key_file: no master key to sign commands with; "
                              "create one (`openssl rand -hex 32 > FILE; chmod 600 FILE`) or set "
                              "allow_unsigned_commands = true (tests and demos only)")
        loop = asyncio.get_running_loop()
        if signals:
            handle(loop, stop=self.stop.set, reload=self.reload_rules)
        restored = self.executor.restore()
        for pending in restored:
            log.info(f"{pending.action}_resumed_after_restart", node=pending.node, rule=pending.rule,
                     attempts=pending.attempts)
        self.notices.restore((p.cluster, p.node) for p in restored if p.action == "drain")
        log.info("controller_starting", store=str(self.store.path), backend=self.backend.name,
                 rules=[rule.name for rule in self.rules.rules])
        try:
            async with asyncio.TaskGroup() as group:
                ingest = group.create_task(self.link.receive(self._on_batch, self._on_retained_birth),
                                           name="vetd.controller.ingest")
                tasks = [
                    group.create_task(self.executor.run(), name="vetd.controller.actions"),
                    group.create_task(self._housekeeping(), name="vetd.controller.requests"),
                    group.create_task(self.acks.run(self.link.send), name="vetd.controller.acks"),
                    group.create_task(self.notices.run(self.link.send, self.link.connected,
                                                                        lambda: self.link.connects),
                                      name="vetd.controller.notices"),
                    group.create_task(self.executor.resend(float(self.config.alerts.resend_interval),
                                                           self._firing_alerts),
                                      name="vetd.controller.alerts.resend"),
                    group.create_task(self.campaigns.run(), name="vetd.controller.campaigns"),
                ]
                if (http := self._http(group)) is not None:
                    tasks.append(http)
                await self.stop.wait()
                ingest.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ingest
                deadline = time.monotonic() + 5
                while not self.executor.idle and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                for task in tasks:
                    task.cancel()
        finally:
            if signals:
                release(loop)
            self.store.close()
            if self.telemetry is not None:
                self.telemetry.close()
        log.info("controller_stopped", **dict(self.counters))
        return 0
