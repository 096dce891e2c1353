"""``vetd agent``: the node daemon.

One root TaskGroup holds every task, each named: the transport, the watchdog,
and a *schedule* (a TaskGroup of its own with one loop per check and per
telemetry source). SIGHUP builds a new schedule from the re-read config and
swaps it in; a bad config is logged and the running one kept. SIGTERM/SIGINT
stop new runs, give in-flight checks ``shutdown_grace`` to finish and be sent
(acknowledged by the controller), publish the retained offline state, and
return, within the grace period whether or not the broker is there: what was
not acknowledged stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from vetd.agent.campaign import CampaignMember
from vetd.agent.checks import (
    Check,
    CheckRun,
    CheckRunner,
    EventOutcome,
    EventSource,
    Outcome,
    SourceUnavailable,
    TelemetrySource,
    clip,
    in_thread,
)
from vetd.agent.commands import Answer, Commands, describe
from vetd.agent.config import AgentConfig, load_agent_config
from vetd.agent.control import ControlHost, ControlServer, NodeState
from vetd.agent.pluginhost import PluginError, PluginHost
from vetd.agent.spool import Spool
from vetd.agent.systemd import Notifier
from vetd.agent.telemetry import Windows
from vetd.agent.transport import Identity, Transport
from vetd.core.configfile import ConfigError, read_key
from vetd.core.logs import redact
from vetd.core.mqtt import client_options
from vetd.core.protocol import Command, Event, Reply, Result, ServiceNotice, State, Telemetry, verify_command
from vetd.core.signals import handle, release

log = structlog.get_logger("vetd.agent")

#: Longest a check waits before its first run after (re)start.
FIRST_RUN_SPREAD_S = 5.0
#: Least time between the starts of two runs of a check woken by events (an XID storm).
RECHECK_SPACING_S = 1.0
#: Of the shutdown grace, what is kept for the offline state and the goodbye to the broker.
STOP_RESERVE_S = 1.0


class Schedule:
    """What runs, built from one config: checks, telemetry and their timing."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.plugins = PluginHost(config)
        self.checks = self.plugins.register_checks()
        self.telemetry = self.plugins.register_telemetry()
        self.event_sources = self.plugins.register_event_sources()
        self.labels = {**self.plugins.node_labels(), **config.agent.labels}

    def periodic(self) -> list[tuple[Check, float, float]]:
        """``(check, interval, timeout)`` of every enabled periodic check."""
        selected = []
        for check in self.checks:
            override = self.config.checks.get(check.name)
            if "periodic" not in check.profiles or (override is not None and not override.enabled):
                continue
            interval = check.interval or self.config.agent.interval
            timeout = check.timeout
            if override is not None:
                interval = override.interval or interval
                timeout = override.timeout or timeout
            selected.append((check, float(interval), float(timeout)))
        return selected


class Agent:
    def __init__(self, config: AgentConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.identity = Identity(config.agent.cluster, config.agent.node)
        try:
            self.spool = Spool(config.spool_path, config.agent.spool_limit, sync=config.agent.spool_sync,
                               memory_limit=config.agent.spool_memory_limit)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"{config.source}: agent.state_dir: cannot keep a spool at {config.spool_path}: "
                              f"{exc} (set state_dir, or VETD_STATE_DIR, to a writable folder)") from exc
        self.schedule = Schedule(config)
        self.runner = CheckRunner()
        self.transport = Transport(
            config.broker,
            self.identity,
            self.spool,
            keepalive=config.agent.keepalive,
            ack_timeout=float(config.agent.ack_timeout),
            max_rate=config.agent.max_publish_rate,
            client_options=client_options(config.broker, config.agent.auth, f"{config.source}: agent.auth"),
            birth=self._birth,
            on_command=self._on_command,
            on_service=self._on_service,
        )
        self.spool.on_unwritable = self._spool_unwritable
        self.notifier = Notifier()
        self.stop = asyncio.Event()
        self.reload = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inflight = 0
        self._group: asyncio.TaskGroup | None = None
        self._running: set[str] = set()
        #: Check name → set when an event asks for that check to run now (``EventSource.recheck``).
        self._wakes: dict[str, asyncio.Event] = {}
        self._command_tasks: set[asyncio.Task[None]] = set()
        if not config.commands.key_file and not config.commands.allow_unsigned:
            raise ConfigError(f"{config.source}: commands.key_file: no command key; write this node's with "
                              f"`vetd keys derive --cluster {config.agent.cluster} --node {config.agent.node} "
                              "--master MASTER --out FILE` on the controller host, or set [commands] "
                              "allow_unsigned = true (tests and demos only)")
        self._command_key = (read_key(config.commands.key_file, f"{config.source}: commands.key_file")
                             if config.commands.key_file else b"")
        self._warned_unsigned = False
        self._answered: OrderedDict[str, Answer] = OrderedDict()
        #: Latest verdicts, running jobs and containers: what the control socket reports.
        self.state = NodeState()
        self.commands = Commands(
            config=lambda: self.config.commands,
            plugins=lambda: self.schedule.plugins,
            checks=lambda: list(self.schedule.checks),
            publish=lambda run, profile: self.emit_result(run.check, run.outcomes, run.started,
                                                          run.duration_s, profile),
            campaigns=CampaignMember(
                node=lambda: self.identity.node,
                tests=lambda: {test.name: test for test in self.schedule.plugins.register_pair_tests()},
                jobs=lambda: list(self.state.jobs),
                spawn=self._spawn,
            ),
        )
        self.control = ControlServer(ControlHost(
            config=lambda: self.config,
            checks=lambda: list(self.schedule.checks),
            runner=self.runner,
            state=self.state,
            publish=lambda run, profile: self.emit_result(run.check, run.outcomes, run.started,
                                                          run.duration_s, profile),
            event=self.emit_event,
            identity=lambda: (self.identity.cluster, self.identity.node, self.identity.session),
            connected=self.transport.connected.is_set,
            report=lambda run, job_id: self.emit_result(run.check, run.outcomes, run.started, run.duration_s,
                                                        "", job_id=job_id, record=False),
        )) if config.agent.control_socket else None

    def _birth(self) -> State:
        return self.identity.state(
            True,
            labels=self.schedule.labels,
            checks=self.schedule.checks.names(),
            dropped=dict(self.spool.dropped),
        )

    def _on_service(self, notice: ServiceNotice | None) -> None:
        """The controller's retained word on whether this node is in service (for the control socket)."""
        before = self.state.controller
        self.state.heard(notice)
        if notice is None:
            if before is not None:
                log.info("service_notice_cleared")
        elif before is None or (before.service, before.state, before.reason) != (notice.service, notice.state,
                                                                                 notice.reason):
            log.info("service_notice", service=notice.service, state=notice.state, reason=notice.reason,
                     breaker_open=notice.breaker_open)

    def _spool_unwritable(self, error: str) -> None:
        """The spool file stopped taking writes: say so on the wire (it is held in memory meanwhile)."""
        self.emit_event(EventOutcome(
            name="spool_unwritable", severity="warning", entity="spool", codes=["spool_write_failed"],
            metrics={"held": float(self.spool.held), "memory_limit": float(self.spool.memory_limit)},
            message=clip(f"spool {self.spool.path} cannot be written ({error}); holding results in memory "
                         f"(up to {self.spool.memory_limit}) and retrying"),
        ))

    def emit_result(self, check: Check, outcome_list: list[Outcome], started: float, duration: float,
                    profile: str = "periodic", *, job_id: str | None = None, record: bool = True) -> None:
        """Publish a check's outcomes, tagged with ``job_id`` (default: the one job running); ``record``:
        they are also the node's latest verdicts (not for results a local tool reported)."""
        job_id = job_id or self.state.job_id()
        if record:
            self.state.record(CheckRun(check, outcome_list, started, duration), profile, job_id)
        for outcome in outcome_list:
            self.transport.send(
                Result(
                    **self.identity.stamp(ts=started),
                    check=check.name,
                    status=outcome.status,
                    entity=outcome.entity,
                    codes=outcome.codes,
                    metrics={k: v for k, v in outcome.metrics.items() if math.isfinite(v)},  # no NaN on the wire
                    message=outcome.message,
                    duration_s=round(duration, 6),
                    profile=profile,
                    job_id=job_id,
                )
            )

    # -- lifecycle ---------------------------------------------------------

    async def run(self, *, signals: bool = True) -> int:
        """Run until ``stop`` is set (by SIGTERM/SIGINT when ``signals``)."""
        loop = asyncio.get_running_loop()
        if signals:
            handle(loop, stop=self.stop.set, reload=self.reload.set)
        structlog.contextvars.bind_contextvars(node=self.identity.node)
        log.info("agent_starting", cluster=self.identity.cluster, session=self.identity.session,
                 broker=redact(self.config.agent.broker), plugins=self.schedule.plugins.names(),
                 checks=self.schedule.checks.names())
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                transport = group.create_task(self.transport.run(), name="vetd.transport")
                watchdog = None
                if self.notifier.watchdog_s:
                    watchdog = group.create_task(self._watchdog(), name="vetd.watchdog")
                control = None
                if self.control is not None:
                    control = group.create_task(self.control.run_supervised(), name="vetd.control")
                deadline = await self._main(group)
                if await self.transport.publish_offline(
                        "agent stopped", timeout=max(0.1, min(2.0, (deadline - time.monotonic()) / 2))):
                    log.info("offline_published")
                for task in list(self._command_tasks):
                    task.cancel()  # unanswered: the controller's deadline takes over
                if watchdog is not None:
                    watchdog.cancel()
                if control is not None:
                    control.cancel()
                # The client says goodbye to the broker; one that is gone without a word (network
                # down) would keep it waiting for its timeout: cancelled again, it stops at once.
                transport.cancel()
                await asyncio.wait({transport}, timeout=max(0.1, deadline - time.monotonic()))
                transport.cancel()
        finally:
            if signals:
                release(loop)
        log.info("agent_stopped", unsent=len(self.spool), session=self.identity.session,
                 last_seq=self.identity.last_seq)
        self.spool.close()
        return 0

    async def _main(self, group: asyncio.TaskGroup) -> float:
        """Run the schedule until told to stop; returns the ``time.monotonic()`` by which to be gone."""
        schedule_task = group.create_task(self._run_schedule(self.schedule), name="vetd.schedule")
        self.notifier.notify("READY=1")
        while True:
            stop = asyncio.create_task(self.stop.wait(), name="vetd.wait_stop")
            reload = asyncio.create_task(self.reload.wait(), name="vetd.wait_reload")
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            reload.cancel()
            if self.stop.is_set():
                break
            self.reload.clear()
            # Building a schedule imports plugins and may query the GPU driver
            # (node labels): keep that off the event loop and the watchdog.
            new = await asyncio.to_thread(self._reloaded)
            if new is not None:
                self._stopping.set()
                schedule_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await schedule_task
                self._stopping.clear()
                self.schedule = new
                self.config = new.config
                schedule_task = group.create_task(self._run_schedule(new), name="vetd.schedule")
                self.notifier.notify("READY=1")
        self.notifier.notify("STOPPING=1")
        log.info("agent_stopping", inflight=self._inflight, grace_s=self.config.agent.shutdown_grace)
        self._stopping.set()
        grace = float(self.config.agent.shutdown_grace)
        deadline = time.monotonic() + grace
        while self._inflight and time.monotonic() < deadline - STOP_RESERVE_S:
            await asyncio.sleep(0.02)
        schedule_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await schedule_task
        # What the last checks produced (and any backlog) has until the grace period ends to be
        # acknowledged by the controller; what is not stays in the spool for the next start.
        while (len(self.spool) and self.transport.connected.is_set()
               and time.monotonic() < deadline - STOP_RESERVE_S):
            await asyncio.sleep(0.05)
        return max(deadline, time.monotonic() + STOP_RESERVE_S)

    def _reloaded(self) -> Schedule | None:
        self.notifier.notify("RELOADING=1")
        try:
            config = load_agent_config(self.config_path)
            schedule = Schedule(config)
        except (ConfigError, PluginError) as exc:
            log.error("reload_failed", error=str(exc))
            self.notifier.notify("READY=1")
            return None
        for key in ("broker", "cluster", "node"):
            if getattr(config.agent, key) != getattr(self.config.agent, key):
                log.warning("reload_needs_restart", key=key,
                            running=getattr(self.config.agent, key), configured=getattr(config.agent, key))
        log.info("config_reloaded", checks=schedule.checks.names())
        return schedule

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_s
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(self.notifier.watchdog_s / 2)

    # -- scheduling --------------------------------------------------------

    async def _run_schedule(self, schedule: Schedule) -> None:
        for plugin, error in schedule.plugins.broken.items():
            self.transport.send(
                Result(
                    **self.identity.stamp(),
                    check="plugin_load",
                    entity=plugin,
                    status="error",
                    codes=["plugin_broken"],
                    message=clip(error),
                )
            )
        stop_sources = threading.Event()
        loop = asyncio.get_running_loop()
        for source in schedule.event_sources:
            threading.Thread(
                target=self._event_thread,
                args=(source, loop, stop_sources),
                name=f"vetd[{source.plugin}].events.{source.name}",
                daemon=True,
            ).start()
        try:
            await self._run_periodic(schedule)
        finally:
            stop_sources.set()

    async def _run_periodic(self, schedule: Schedule) -> None:
        async with asyncio.TaskGroup() as group:
            for check, interval, timeout in schedule.periodic():
                group.create_task(
                    self._check_loop(check, interval, timeout),
                    name=f"vetd[{check.plugin}].check.{check.name}",
                )
            for source in schedule.telemetry:
                interval = float(source.interval or schedule.config.agent.telemetry_interval)
                group.create_task(
                    self._telemetry_loop(source, interval),
                    name=f"vetd[{source.plugin}].telemetry.{source.name}",
                )

    def emit_event(self, event: EventOutcome, job_id: str | None = None) -> None:
        """Publish an event now (call from the event loop); it carries ``job_id``, else the running job's."""
        self.state.saw(event)
        self.transport.send(
            Event(
                **self.identity.stamp(),
                name=event.name,
                severity=event.severity,
                entity=event.entity,
                codes=list(event.codes),
                metrics={k: float(v) for k, v in event.metrics.items() if math.isfinite(v)},
                message=clip(event.message),
                job_id=job_id or self.state.job_id(),
                data={key[:128]: clip(value) for key, value in list(event.data.items())[:32]},
            )
        )
        log.warning("event", name=event.name, severity=event.severity, entity=event.entity,
                    codes=event.codes, message=event.message)

    def _on_event(self, source: EventSource, event: EventOutcome) -> None:
        self.emit_event(event)
        if event.severity == "info":
            return
        for name in source.recheck:
            wake = self._wakes.get(name)
            if wake is not None and not wake.is_set():
                log.info("recheck", check=name, after=event.name, codes=event.codes, entity=event.entity)
                wake.set()

    def _event_thread(self, source: EventSource, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        """Run one event source, restarting it with backoff when it raises."""

        def emit(event: EventOutcome) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the agent is exiting
                loop.call_soon_threadsafe(self._on_event, source, event)

        delay = 1.0
        while not stop.is_set():
            try:
                source.run(emit, stop)
            except SourceUnavailable as exc:
                log.info("event_source_unavailable", source=source.name, reason=str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - a watcher's bug must not end the agent
                log.error("event_source_failed", source=source.name, error=f"{type(exc).__name__}: {exc}",
                          retry_in_s=delay)
            if stop.wait(random.uniform(delay / 2, delay)):
                return
            delay = min(delay * 2, 60.0)

    async def _pause(self, seconds: float, wake: asyncio.Event | None = None) -> bool:
        """Sleep until ``seconds`` pass or ``wake`` is set; return True at once when stopping."""
        waits = {asyncio.ensure_future(self._stopping.wait())}
        if wake is not None:
            waits.add(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return self._stopping.is_set()

    def _next_delay(self, interval: float, started: float) -> float:
        jitter = self.config.agent.jitter
        target = started + interval * (1 + random.uniform(-jitter, jitter))
        return target - time.monotonic()

    async def _check_loop(self, check: Check, interval: float, timeout: float) -> None:
        structlog.contextvars.bind_contextvars(check=check.name)
        wake = self._wakes[check.name] = asyncio.Event()
        if await self._pause(random.uniform(0, min(interval, FIRST_RUN_SPREAD_S)), wake):
            return
        started = -RECHECK_SPACING_S
        while True:
            # woken by an event: run now, but not back to back
            if wake.is_set() and await self._pause(started + RECHECK_SPACING_S - time.monotonic()):
                return
            wake.clear()  # this run answers every event so far; one during it wakes the loop again
            started = time.monotonic()
            self._inflight += 1
            try:
                run = await self.runner.run(check, timeout)
            finally:
                self._inflight -= 1
            self.emit_result(check, run.outcomes, run.started, run.duration_s)
            for outcome in run.outcomes:
                if outcome.status not in ("pass", "skip"):
                    log.warning("check_" + outcome.status, entity=outcome.entity, codes=outcome.codes,
                                message=outcome.message)
            if all(o.status == "skip" and "not_applicable" in o.codes for o in run.outcomes):
                log.info("check_not_applicable", message=run.outcomes[0].message)
                return  # reported once; runs again only after a reload
            if await self._pause(self._next_delay(interval, started), wake):
                return

    async def _telemetry_loop(self, source: TelemetrySource, interval: float) -> None:
        windows = Windows(float(source.window), self.state.job_on) if source.window else None
        try:
            while True:
                started = time.monotonic()
                try:
                    sample = await in_thread(source.func, source.timeout, name=f"vetd.telemetry.{source.name}")
                    now = time.time()
                    if windows is None:
                        for entity, metrics in sample.items():
                            self.transport.send(
                                Telemetry(
                                    **self.identity.stamp(reliable=False, ts=now),
                                    source=source.name,
                                    entity=entity,
                                    metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
                                )
                            )
                    else:
                        if windows.due(now):
                            self._send_windows(source, windows)
                        windows.add(sample, now)
                except Exception as exc:  # noqa: BLE001 - a failing sampler is logged, then retried
                    log.warning("telemetry_failed", source=source.name, error=f"{type(exc).__name__}: {exc}")
                if await self._pause(self._next_delay(interval, started)):
                    return
        finally:
            if windows is not None:  # stopping or reloading: what the open window holds still goes
                self._send_windows(source, windows)

    def _send_windows(self, source: TelemetrySource, windows: Windows) -> None:
        """Publish each entity's summary of the window that just closed (QoS 0, best effort)."""
        for window in windows.close():
            self.transport.send(
                Telemetry(
                    **self.identity.stamp(reliable=False, ts=window.started),
                    source=source.name,
                    entity=window.entity,
                    metrics=window.mean,
                    window_s=window.length,
                    samples=window.samples,
                    min=window.minimum,
                    max=window.maximum,
                    job_id=window.job_id,
                )
            )

    # -- commands ----------------------------------------------------------

    async def _on_command(self, command: Command) -> None:
        """Start a command without holding up the command stream (a reset takes minutes)."""
        if command.id in self._answered:  # redelivered: answer again, do not run twice
            self._reply(command, self._answered[command.id])
            return
        if command.id in self._running or self._group is None:
            return
        refusal = self._refusal(command)
        if refusal:
            log.warning("command_refused", id=command.id, action=command.action, reason=refusal)
            self._reply(command, Answer(False, f"refused: {refusal}", {}))
            return
        self._running.add(command.id)
        task = self._group.create_task(self._command(command), name=f"vetd.command.{command.action}.{command.id}")
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task of a command that outlives it (a campaign's member), cancelled at shutdown as commands are."""
        if self._group is None:
            work.close()
            raise RuntimeError("the agent is not running")
        task = self._group.create_task(work, name=name)
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)
        return task

    def _refusal(self, command: Command) -> str | None:
        """Signature, expiry and replay checks; None when the command may run."""
        if self._command_key:
            problem = verify_command(command, self._command_key, time.time())
            if problem:
                return problem
        elif not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("commands_not_signed", hint="set [commands] key_file on agents and "
                        "command_key_file on the controller")
        if not self.spool.first_sight(command.id, command.expires or time.time() + 86400):
            return "replayed (this command id was already received)"
        return None

    async def _command(self, command: Command) -> None:
        log.info("command_started", id=command.id, action=command.action, args=describe(command.args))
        try:
            answer = await self.commands.handle(command)
        except Exception as exc:  # noqa: BLE001 - a failed command is an answer
            answer = Answer(False, f"error: {type(exc).__name__}: {exc}", {})
        finally:
            self._running.discard(command.id)
        (log.info if answer.ok else log.warning)("command_done", id=command.id, action=command.action,
                                                 ok=answer.ok, message=answer.message)
        self._answered[command.id] = answer
        while len(self._answered) > 256:
            self._answered.popitem(last=False)
        self._reply(command, answer)

    def _reply(self, command: Command, answer: Answer) -> None:
        self.transport.send(
            Reply(
                **self.identity.stamp(reliable=False),
                id=command.id,
                ok=answer.ok,
                message=clip(answer.message),
                data=answer.data,
                body=answer.body,
            )
        )


def run_agent(config_path: Path | None) -> int:
    config = load_agent_config(config_path)
    return asyncio.run(_amain(config, config_path))


async def _amain(config: AgentConfig, config_path: Path | None) -> int:
    agent = Agent(config, config_path)
    return await agent.run()
