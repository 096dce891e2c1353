"""Campaigns: the controller vets idle nodes across the network, bandwidth between them in pairs.

What ``vetd vet`` does inside a job (:mod:`vetd.agent.fabric`, :mod:`vetd.core.pairs`), run by
the controller on nodes no job holds, asked by an operator (``vetd vet NODES --config C``) or
every ``[campaigns] interval``:

1. **Who** (:func:`eligible`): of the nodes asked for, or of ``[campaigns] nodes`` those a
   campaign vetted longest ago, only the idle ones: an agent online, in service in vetd (not
   excluded, healing, probation or failed), no job its agent announced still running (the
   controller's open jobs), idle in the scheduler (Slurm ``State=IDLE``: nothing allocated, not
   draining; backend ``none`` has no say), in no other campaign. The others are ``skipped``,
   with why, and never measured.
2. **The rounds**: the :class:`~vetd.agent.fabric.Coordinator` of a job's rank 0 runs here, one
   member per node's agent, each over an :class:`AgentChannel`: every message to a node is a
   signed ``vet`` command, every message back is its reply (:mod:`vetd.agent.campaign`). Joining
   is the barrier, with a deadline: an agent not there within ``deadline`` is absent, one that
   refuses (``vet`` not allowed, a job running) is absent at once. The controller relays each
   node's probe port to the others (the rendezvous), then the rounds run as in a job.
3. **Verdicts**: localised by :func:`vetd.core.pairs.localise`. A node that got a job while it
   was measured is not judged (its figures may be the job's traffic). Every other node that took
   part gets one ``fabric_pairs`` result (its pairs' bandwidth and their median as metrics),
   which goes through the controller's own ingest like the results of its ``vetd_agent`` check:
   stored, in the history, judged by the rules (the default ``fabric-slow-node`` drains a node
   slow with every partner). An absent node gets none: its absence blames nobody.

This is the service side (MQTT through the link, the scheduler, the store); the engine stays pure.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from vetd.agent import campaign as wire
from vetd.agent.fabric import (
    OPEN_WAIT_S,
    SLACK_S,
    Coordinator,
    Final,
    Join,
    Late,
    Outcome,
    RendezvousLost,
    Settings,
)
from vetd.agent.pairtests import PairEndpoint, PairTest
from vetd.controller.actions import SlurmError, idle_states
from vetd.controller.breaker import OUT_OF_SERVICE
from vetd.controller.config import CampaignsSection
from vetd.controller.healing import signed_command
from vetd.controller.model import NodeRow
from vetd.controller.requests import REQUEST_TTL_S
from vetd.controller.store import Store, StoreUnavailable, unavailable
from vetd.core.pairs import CHECK, result_status
from vetd.core.protocol import Message, Reply, Result

if TYPE_CHECKING:
    from vetd.controller.service import Controller

log = structlog.get_logger("vetd.controller.campaigns")

#: How often operator requests for a campaign and the schedule are looked at.
POLL_S = 0.25
#: The fixed cost of one round of each pair test the controller knows (connects; a CUDA context and
#: a communicator), as the agents' defaults have it, and whether ``auto`` prefers it.
KNOWN_TESTS: dict[str, tuple[float, int]] = {"tcp_pairs": (15.0, 0), "nccl_pairs": (60.0, 10)}
#: The cost of a round of a pair test only the agents know (a plugin's).
OTHER_OVERHEAD_S = 30.0
#: The profile of a campaign's results (``result.profile`` in rules); a job's ``vetd vet`` has none.
PROFILE = "campaign"


class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What an operator's ``vetd vet NODES`` asks beyond ``[campaigns]`` (the request's params)."""

    test: str | None = None
    #: 0: every pair.
    rounds: int | None = None
    deadline: float | None = None
    slow_fraction: float | None = None
    min_gbps: float | None = None


@dataclass(frozen=True)
class Ask:
    """One campaign: its nodes, how to measure them, and who asked (``schedule``, ``operator:USER``)."""

    nodes: list[str]
    trigger: str
    test: str
    seconds: float
    rounds: int | None
    deadline: float
    slow_fraction: float
    min_gbps: float

    @classmethod
    def of(cls, section: CampaignsSection, nodes: Sequence[str], trigger: str, params: Params | None = None) -> Ask:
        p = params or Params()
        rounds = section.rounds if p.rounds is None else (p.rounds or None)
        return cls(nodes=list(nodes), trigger=trigger, test=p.test or section.test, seconds=float(section.seconds),
                   rounds=rounds, deadline=float(section.deadline if p.deadline is None else p.deadline),
                   slow_fraction=section.slow_fraction if p.slow_fraction is None else p.slow_fraction,
                   min_gbps=section.min_gbps if p.min_gbps is None else p.min_gbps)

    def expected_s(self) -> float:
        """How long it may take at most: the barrier, opening the probes, the rounds and as many again
        to measure slow links again (as the coordinator's plan says)."""
        overhead = KNOWN_TESTS.get(self.test, (OTHER_OVERHEAD_S, 0))[0]
        rounds = self.rounds if self.rounds is not None else max(1, len(self.nodes))
        return self.deadline + OPEN_WAIT_S + 2 * rounds * (self.seconds + overhead + SLACK_S) + 2 * SLACK_S


def eligible(nodes: Iterable[str], rows: Mapping[str, NodeRow], jobs: Mapping[str, Iterable[str]],
             scheduler: Mapping[str, str] | None, busy: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The nodes a campaign may measure, in the order given, and why each other one is skipped.

    ``jobs``: node → ids of the jobs the controller has running there; ``scheduler``: node →
    ``""`` when the scheduler has it idle, else its state (None: the scheduler cannot tell);
    ``busy``: node → the campaign measuring it now.
    """
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(nodes):
        row = rows.get(name)
        running = sorted(jobs.get(name, ()))
        state = scheduler.get(name, "unknown to the scheduler") if scheduler is not None else ""
        if row is None or not row.session:
            skipped[name] = "vetd has never heard from its agent"
        elif not row.online:
            skipped[name] = "its agent is offline"
        elif row.state in OUT_OF_SERVICE:
            skipped[name] = f"out of service in vetd ({row.state})"
        elif running:
            skipped[name] = f"job {', '.join(running)} runs there (announced by its agent)"
        elif state:
            skipped[name] = f"not idle in the scheduler ({state})"
        elif name in busy:
            skipped[name] = f"in campaign {busy[name]}, still running"
        else:
            chosen.append(name)
    return chosen, skipped


def _remote() -> PairEndpoint:
    raise RuntimeError("a campaign's pair tests run on the nodes, not on the controller")


def catalog(seconds: float, wanted: str) -> dict[str, PairTest]:
    """The pair tests a campaign's coordinator chooses from: names, priority and the cost of a round
    (the agents run them; each node says in its join which it can run)."""
    known = {name: (overhead, priority) for name, (overhead, priority) in KNOWN_TESTS.items()}
    if wanted != "auto" and wanted not in known:
        known[wanted] = (OTHER_OVERHEAD_S, 0)
    return {name: PairTest(name, _remote, seconds=seconds, overhead_s=overhead, priority=priority)
            for name, (overhead, priority) in known.items()}


Publish = Callable[[NodeRow, dict[str, str], str, bytes], Awaitable[None]]


@dataclass(eq=False)
class AgentChannel:
    """One node's member of a campaign (:class:`~vetd.agent.fabric.Channel`): each message sent is a
    signed ``vet`` command (step 0, 1, 2…), each received the body of the agent's reply to one.

    A reply that is a refusal ends the channel (:class:`RendezvousLost`, :attr:`refused` says
    why); an empty reply only says the command arrived; a reply seen twice counts once.
    """

    campaign: str
    node: NodeRow
    publish: Publish
    refused: str = ""
    #: The node was sent its verdict (the coordinator's ``Final``).
    finished: bool = False
    _step: int = 0
    _replies: asyncio.Queue[Reply] = field(default_factory=asyncio.Queue)
    _seen: set[str] = field(default_factory=set)

    def command_id(self, step: int) -> str:
        return f"vet-{self.campaign}-{step}"

    async def invite(self, rank: int, wait: float) -> None:
        await self._send(wire.Invite(rank=rank, wait=wait))

    async def send(self, message: wire.Body) -> None:
        if isinstance(message, Final):  # a node needs its own verdict only (and 1,000 would not fit)
            message = Final(exit_code=message.exit_code, verdicts=[v for v in message.verdicts
                                                                   if v.node == self.node.name])
            self.finished = True
        await self._send(message)

    async def dismiss(self, why: str) -> None:
        """Tell an agent that was invited and is not in the end (it never joined, or left) that the
        campaign is over: one that wakes up late (a stopped process, a backlog) ends its part at once
        instead of waiting for steps that never come, and can join the next campaign."""
        if not self.finished and not self.refused:
            await self._send(Late(reason=why))

    async def _send(self, message: wire.Body) -> None:
        step, self._step = self._step, self._step + 1
        await self.publish(self.node, {"campaign": self.campaign, "step": str(step)}, self.command_id(step),
                           wire.encode(message))

    def put(self, reply: Reply) -> None:
        if reply.id not in self._seen:
            self._seen.add(reply.id)
            self._replies.put_nowait(reply)

    async def recv(self, timeout: float) -> Any:
        until = time.monotonic() + timeout
        while True:
            try:
                reply = await asyncio.wait_for(self._replies.get(), max(0.0, until - time.monotonic()))
            except TimeoutError:
                raise RendezvousLost(f"{self.node.name}: nothing heard for {timeout:.0f}s") from None
            if not reply.ok:
                self.refused = reply.message.removeprefix("refused: ")
                raise RendezvousLost(f"{self.node.name}: {reply.message}")
            if not reply.body:
                continue
            message = wire.decode(reply.body)
            if isinstance(message, Join) and message.node != self.node.name:
                raise RendezvousLost(f"{self.node.name}: its agent joined as {message.node!r}")
            return message

    async def close(self) -> None:
        return None


class Campaigns:
    """Runs campaigns for the controller: asked by operators, or on ``[campaigns] interval``."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.config = controller.config.campaigns
        self.cluster = controller.config.cluster
        #: The session of the results campaigns store (the controller's run; sequence numbers per node).
        self.session = f"{controller.session}-campaigns"
        self._seq: dict[str, int] = {}
        #: (node, campaign) → its channel, while the campaign runs: where the node's replies go.
        self._channels: dict[tuple[str, str], AgentChannel] = {}
        #: Node → the campaign measuring it now.
        self.busy: dict[str, str] = {}
        self._next_scheduled = 0.0
        self._scheduled: asyncio.Task[None] | None = None

    # -- replies, from ingest ---------------------------------------------------

    def take_replies(self, messages: Sequence[Message]) -> list[Message]:
        """``messages`` less the replies of running campaigns, which go to their channels."""
        if not self._channels:
            return list(messages)
        rest: list[Message] = []
        for message in messages:
            if isinstance(message, Reply) and message.id.startswith("vet-"):
                channel = self._channels.get((message.node, message.id.split("-")[1]))
                if channel is not None:
                    channel.put(message)
                    continue
            rest.append(message)
        return rest

    # -- the loop: operator requests and the schedule ----------------------------

    async def run(self) -> None:
        store = self.controller.store
        if abandoned := store.abandon_requests("the controller stopped while the campaign ran"):
            log.warning("campaign_requests_abandoned", count=abandoned)
        if abandoned := store.abandon_campaigns("the controller stopped while the campaign ran", time.time()):
            log.warning("campaigns_abandoned", count=abandoned)
        if self.config.interval:
            last = store.last_campaign(self.cluster, "schedule")
            self._next_scheduled = (last or time.time()) + float(self.config.interval)
        async with asyncio.TaskGroup() as group:
            while True:
                try:
                    self._tick(group, time.time())
                except Exception as exc:
                    if unavailable(exc):
                        log.debug("campaigns_store_unavailable", error=str(exc))
                    else:
                        log.exception("campaigns_tick_failed", error=str(exc))
                await asyncio.sleep(POLL_S)

    def _tick(self, group: asyncio.TaskGroup, now: float) -> None:
        store = self.controller.store
        for request in store.pending_requests("vet"):
            if now - request["ts"] > REQUEST_TTL_S:
                continue  # the operator requests' handler expires it
            nodes = [name for cluster, name in request["nodes"] if cluster == self.cluster]
            try:
                params = msgspec.convert(request["params"], Params)
            except msgspec.ValidationError as exc:
                store.finish_request(request["id"], "failed", f"bad request: {exc}")
                continue
            ask = Ask.of(self.config, nodes, f"operator:{request['actor']}", params)
            store.take_request(request["id"], {"expected_s": round(ask.expected_s(), 1)})
            group.create_task(self._requested(request["id"], ask), name=f"vetd.campaign.request.{request['id']}")
        if self.config.interval and now >= self._next_scheduled and (
                self._scheduled is None or self._scheduled.done()):
            self._next_scheduled = now + float(self.config.interval)
            self._scheduled = group.create_task(self._on_schedule(), name="vetd.campaign.scheduled")

    async def _requested(self, request_id: int, ask: Ask) -> None:
        try:
            report = await self.vet(ask)
        except Exception as exc:  # a campaign that breaks is the request's answer, not a dead loop
            log.exception("campaign_failed", trigger=ask.trigger, error=str(exc))
            self._finish(request_id, "failed", f"{type(exc).__name__}: {exc}")
            return
        self._finish(request_id, "done", report)

    def _finish(self, request_id: int, status: str, result: Any) -> None:
        try:
            self.controller.store.finish_request(request_id, status, result)
        except Exception as exc:
            if not unavailable(exc):
                raise
            log.error("campaign_request_not_answered", request=request_id, error=str(exc))

    async def _on_schedule(self) -> None:
        """A scheduled campaign on the idle nodes of ``[campaigns] nodes`` vetted longest ago."""
        try:
            names = self._scheduled_nodes()
            chosen, skipped = await self.choose(names)
            if len(chosen) < self.config.min_nodes:
                log.info("campaign_not_started", idle=len(chosen), needed=self.config.min_nodes,
                         skipped=len(skipped), next_in=float(self.config.interval))
                return
            vetted = self.controller.store.latest_times(self.cluster, CHECK)
            chosen.sort(key=lambda name: vetted.get(name, 0.0))
            await self.vet(Ask.of(self.config, chosen[:self.config.max_nodes], "schedule"), skipped)
        except Exception as exc:  # the next interval tries again
            log.exception("scheduled_campaign_failed", error=f"{type(exc).__name__}: {exc}")

    def _scheduled_nodes(self) -> list[str]:
        known = sorted(name for cluster, name in self.controller.engine.state.nodes if cluster == self.cluster)
        if not self.config.nodes:
            return known
        from ClusterShell.NodeSet import NodeSet

        wanted = set(NodeSet(self.config.nodes))
        return [name for name in known if name in wanted]

    # -- one campaign ------------------------------------------------------------

    async def choose(self, names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """The nodes of ``names`` a campaign may measure now, and why the others may not (:func:`eligible`)."""
        state = self.controller.engine.state
        rows = {name: row for (cluster, name), row in state.nodes.items() if cluster == self.cluster}
        jobs, scheduler = await self._jobs(names)
        return eligible(names, rows, jobs, scheduler, self.busy)

    async def _jobs(self, names: Sequence[str]) -> tuple[dict[str, set[str]], dict[str, str] | None]:
        """The jobs the controller has running on each node, and the scheduler's word on whether it is idle."""
        jobs = {name: self.controller.engine.jobs.running_on(self.cluster, name) for name in names}
        try:
            scheduler = await idle_states(self.controller.backend, names)
        except SlurmError as exc:  # never measure a node whose scheduler cannot say it is idle
            scheduler = dict.fromkeys(names, f"cannot ask: {exc}")
        return jobs, scheduler

    async def _held(self, names: Sequence[str]) -> dict[str, str]:
        """Of ``names``, those a job holds now (one the scheduler started during the campaign), and why."""
        jobs, scheduler = await self._jobs(names)
        held = {}
        for name in names:
            if running := sorted(jobs[name]):
                held[name] = f"job {', '.join(running)} runs there"
            elif scheduler is not None and (state := scheduler.get(name, "unknown to the scheduler")):
                held[name] = f"not idle in the scheduler ({state})"
        return held

    async def vet(self, ask: Ask, skipped_before: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Run one campaign on the idle nodes of ``ask``; store a result for each node that took part;
        the report (what ``vetd vet NODES --json`` prints and the campaigns table keeps).
        ``skipped_before``: nodes a scheduled campaign left out already, and why (in the report too)."""
        campaign = uuid.uuid4().hex[:12]
        started = time.time()
        self._store(campaign, lambda store: store.start_campaign(campaign, self.cluster, started, ask.trigger,
                                                                 ask.test, ask.nodes))
        try:
            chosen, skipped = await self.choose(ask.nodes)
            skipped = {**(skipped_before or {}), **skipped}
            log.info("campaign_started", campaign=campaign, trigger=ask.trigger, nodes=len(chosen),
                     skipped=len(skipped), test=ask.test)
            outcome: Outcome | None = None
            for name in chosen:
                self.busy[name] = campaign
            try:
                if chosen:
                    outcome = await self._rounds(campaign, chosen, ask)
            finally:
                for name in chosen:
                    self.busy.pop(name, None)
            # a job that started meanwhile (the scheduler does not wait for us) makes the node's figures its traffic
            took_part = [v.node for v in outcome.localisation.nodes if v.verdict != "absent"] if outcome else []
            not_judged = await self._held(took_part)
            report = self._report(campaign, ask, outcome, skipped, not_judged, time.time() - started)
            self._record(campaign, ask, outcome, not_judged, started, report)
        except BaseException as exc:  # cancelled too: `vetd campaigns` must not show it running for ever
            error = f"{type(exc).__name__}: {exc}" if isinstance(exc, Exception) else "cancelled"
            try:
                self._store(campaign, lambda store: store.fail_campaign(campaign, time.time(), error))
            except Exception as lost:  # noqa: BLE001 - a store closed at shutdown: the next start abandons it
                log.error("campaign_not_stored", campaign=campaign, error=str(lost))
            raise
        log.info("campaign_done", campaign=campaign, trigger=ask.trigger, good=len(report["good"]),
                 bad=report["bad"], absent=report["absent"], links=[f"{k['a']}-{k['b']}" for k in report["links"]],
                 seconds=report["total_s"])
        return report

    async def _rounds(self, campaign: str, nodes: list[str], ask: Ask) -> Outcome:
        state = self.controller.engine.state
        settings = Settings(test=ask.test, rounds=ask.rounds, deadline=ask.deadline, slow_fraction=ask.slow_fraction,
                            min_gbps=ask.min_gbps, member="agent")
        coordinator = Coordinator(nodes, catalog(ask.seconds, ask.test), settings)
        began = time.monotonic()
        channels = {name: AgentChannel(campaign, state.nodes[(self.cluster, name)], self._publish) for name in nodes}
        for name, channel in channels.items():
            self._channels[(name, campaign)] = channel

        async def join(rank: int, name: str) -> None:
            channel = channels[name]
            await channel.invite(rank, ask.deadline)
            await coordinator.add(channel, wait=max(0.0, ask.deadline - (time.monotonic() - began)))
            if channel.refused:
                coordinator.turned_away(name, f"its agent refused: {channel.refused}")

        try:
            async with asyncio.TaskGroup() as group:
                for rank, name in enumerate(nodes):
                    group.create_task(join(rank, name), name=f"vetd.campaign.{campaign}.join.{name}")
                rounds = group.create_task(coordinator.run(), name=f"vetd.campaign.{campaign}.rounds")
            outcome = rounds.result()
        finally:
            for name in nodes:
                self._channels.pop((name, campaign), None)
        await asyncio.gather(*(channel.dismiss(f"campaign {campaign} is over without this node")
                               for channel in channels.values()))
        return outcome

    async def _publish(self, node: NodeRow, args: dict[str, str], command_id: str, body: bytes) -> None:
        controller = self.controller
        command = signed_command(node, wire.ACTION, args, time.time(), session=controller.session,
                                 master_key=controller.command_key, command_id=command_id, body=body,
                                 expires_in=float(controller.config.healing.reply_timeout))
        await controller.link.publish(command)

    # -- what it found -------------------------------------------------------------

    def _report(self, campaign: str, ask: Ask, outcome: Outcome | None, skipped: Mapping[str, str],
                not_judged: Mapping[str, str], seconds: float) -> dict[str, Any]:
        nodes: list[dict[str, Any]] = []
        links: list[dict[str, Any]] = []
        if outcome is not None:
            for v in outcome.localisation.nodes:
                row: dict[str, Any] = {"node": v.node, "verdict": v.verdict, "reason": v.reason, "codes": list(v.codes),
                                       "metrics": {k: x for k, x in v.metrics.items() if math.isfinite(x)},
                                       "slow_links": list(v.slow_links)}
                if v.node in not_judged:
                    row["not_judged"] = f"not stored: {not_judged[v.node]} since it was measured"
                nodes.append(row)
            links = [{"a": k.a, "b": k.b, "gbps": k.gbps, "reason": k.reason} for k in outcome.localisation.links]
        nodes += [{"node": name, "verdict": "skipped", "reason": why, "codes": ["skipped"], "metrics": {},
                   "slow_links": []} for name, why in skipped.items()]
        order = {name: i for i, name in enumerate(ask.nodes)}
        nodes.sort(key=lambda row: order.get(row["node"], len(order)))
        by = {verdict: [r["node"] for r in nodes if r["verdict"] == verdict]
              for verdict in ("good", "bad", "absent", "skipped")}
        return {"campaign": campaign, "trigger": ask.trigger, "test": outcome.test if outcome else ask.test,
                "pairs_skipped": outcome.skipped if outcome else "",
                "rounds": outcome.rounds if outcome else 0, "confirm_rounds": outcome.confirm_rounds if outcome else 0,
                "rounds_s": round(outcome.rounds_s, 3) if outcome else 0.0, "total_s": round(seconds, 3),
                "reference_gbps": outcome.localisation.reference_gbps if outcome else 0.0,
                "threshold_gbps": outcome.localisation.threshold_gbps if outcome else 0.0,
                "nodes": nodes, "links": links, **by}

    def _record(self, campaign: str, ask: Ask, outcome: Outcome | None, not_judged: Mapping[str, str],
                started: float, report: Mapping[str, Any]) -> None:
        """One ``fabric_pairs`` result per node that took part, through ingest (the rules judge them);
        the campaign and each node's verdict in the store (the campaigns table, the audit log)."""
        controller = self.controller
        now = time.time()
        results = []
        for v in outcome.localisation.nodes if outcome else []:
            if v.verdict == "absent" or v.node in not_judged:
                continue
            self._seq[v.node] = seq = self._seq.get(v.node, 0) + 1
            metrics = {k: x for k, x in list(v.metrics.items())[:256] if math.isfinite(x)}
            results.append(Result(cluster=self.cluster, node=v.node, session=self.session, seq=seq, ts=now,
                                  check=CHECK, status=result_status(v), codes=v.codes[:64],  # type: ignore[arg-type]
                                  metrics=metrics, message=f"campaign {campaign}: {v.reason}"[:4096],
                                  duration_s=round(outcome.total_s, 3) if outcome else 0.0, profile=PROFILE))
        try:
            if results:
                controller.executor.enqueue(controller.process_messages(results, now))
            with controller.store.transaction():
                for row in report["nodes"]:
                    if row["verdict"] != "skipped":
                        controller.store.audit(self.cluster, row["node"], "campaign", actor=ask.trigger,
                                               outcome=row["verdict"], detail=f"{campaign}: {row['reason']}"[:2000],
                                               now=now)
                summary = {k: report[k] for k in ("test", "pairs_skipped", "rounds", "confirm_rounds", "rounds_s",
                                                  "total_s", "reference_gbps", "threshold_gbps", "links", "good",
                                                  "bad", "absent", "skipped")}
                controller.store.save_campaign(campaign, self.cluster, started, now, ask.trigger, report["test"],
                                               [r["node"] for r in report["nodes"]], summary, report["nodes"])
        except StoreUnavailable as exc:
            log.error("campaign_not_stored", campaign=campaign, error=str(exc))
        except Exception as exc:
            if not unavailable(exc):
                raise
            log.error("campaign_not_stored", campaign=campaign, error=str(exc))

    def _store(self, campaign: str, write: Callable[[Store], None]) -> None:
        """A write of the campaign's row; a database that cannot take it is logged, the campaign goes on."""
        try:
            write(self.controller.store)
        except Exception as exc:
            if not unavailable(exc):
                raise
            log.error("campaign_not_stored", campaign=campaign, error=str(exc))
