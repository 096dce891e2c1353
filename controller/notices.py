"""Service notices to agents: whether the controller has each node in service.

A node's agent cannot see the controller's decisions (a drain goes to Slurm,
not to the node); local tools on the node (``vetd-oci-hook``, the Slurm
prolog) ask the agent. So the controller tells it: per node, a retained
:class:`~vetd.core.protocol.ServiceNotice` on ``vetd/v1/<cluster>/service/<node>``
(QoS 1) saying ``in_service``, ``excluded`` (out of service in vetd, the
scheduler has not confirmed a drain) or ``drained`` (the scheduler confirmed
it), with the node's state, reason and whether its partition's circuit
breaker is open.

A notice goes out when what it says changes: the nodes a committed batch,
a healing tick, an operator request or an action's outcome touched are
looked at again (:meth:`ServiceNotices.changed`), and every node every
:data:`SCAN_S` (a breaker reset changes a whole partition). Every node is
published again at start and after each reconnect to the broker (a broker
that lost its store lost the retained notices too). Nothing here is
durable, and nothing needs to be: the notice is derived from the store's
state, and ``drained`` from the pending drains the executor restores.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import structlog

from vetd.controller.actions import ActionOutcome
from vetd.controller.breaker import OUT_OF_SERVICE
from vetd.controller.decisions import Action, Decisions, Drain
from vetd.controller.fleet import Fleet
from vetd.controller.model import FleetState, NodeKey
from vetd.core import protocol
from vetd.core.protocol import ServiceNotice

log = structlog.get_logger("vetd.controller.notices")

#: Every node is looked at again this often (what no change names: a breaker reset).
SCAN_S = 5.0
#: Notices published at the same time (each waits for its PUBACK).
CONCURRENCY = 1000

class Publish(Protocol):
    """The link's QoS 1 publish (:meth:`BrokerLink.send <vetd.controller.ingest.BrokerLink.send>`)."""

    def __call__(self, topic_name: str, payload: bytes, *, retain: bool = False) -> Awaitable[bool]: ...


#: What a notice says, without its timestamps: published again only when this changes.
_Said = tuple[str, str, str, bool]


class ServiceNotices:
    """Which nodes to tell, what was last told, and which drains the scheduler confirmed."""

    def __init__(self, session: str, state: FleetState, fleet: Fleet, *, scheduler: str) -> None:
        self.session, self.state, self.fleet = session, state, fleet
        #: Only a real scheduler confirms a drain (backend ``none`` keeps exclusions in vetd).
        self.confirms = scheduler != "none"
        #: Nodes whose drain the scheduler confirmed (or found drained already), while out of service.
        self.drained: set[NodeKey] = set()
        self._told: dict[NodeKey, _Said] = {}
        self._dirty: set[NodeKey] = set()
        self._everything = True
        self._ready = asyncio.Event()
        self.published = 0
        self.failed = 0

    # -- what to look at again ---------------------------------------------

    def changed(self, keys: Iterable[NodeKey]) -> None:
        """These nodes' rows changed (after the commit that changed them)."""
        before = len(self._dirty)
        self._dirty.update(keys)
        if len(self._dirty) != before:
            self._ready.set()

    def decided(self, decisions: Decisions) -> None:
        """What a committed set of decisions changed: its nodes, and every node when a breaker moved."""
        self.changed(decisions.changes.nodes)
        if decisions.changes.breakers:
            self.everything()

    def everything(self, *, again: bool = False) -> None:
        """Look at every node; ``again``: publish each even if unchanged (the broker may have lost them)."""
        self._everything = True
        if again:
            self._told.clear()
        self._ready.set()

    def outcome(self, action: Action, outcome: ActionOutcome) -> None:
        """A drain the scheduler carried out (or found done already) makes the node ``drained``; it stops
        being so when the node is back in service (:meth:`notice`)."""
        if isinstance(action, Drain) and outcome.outcome in ("done", "skipped") and self.confirms:
            self.drained.add((action.cluster, action.node))
            self.changed([(action.cluster, action.node)])

    def restore(self, pending: Iterable[NodeKey]) -> None:
        """At start: a node out of service whose drain is not pending any more had it confirmed."""
        if not self.confirms:
            return
        waiting = set(pending)
        self.drained = {key for key, node in self.state.nodes.items()
                        if node.state in OUT_OF_SERVICE and key not in waiting}

    # -- what to say ---------------------------------------------------------

    def notice(self, key: NodeKey, now: float) -> ServiceNotice | None:
        node = self.state.nodes.get(key)
        if node is None:
            return None
        if node.state in OUT_OF_SERVICE:
            service: protocol.ServiceState = "drained" if key in self.drained else "excluded"
            reason = node.reason
        else:
            self.drained.discard(key)
            service, reason = "in_service", ""
        breaker = self.state.breaker_open(self.fleet.partition_of(node)) is not None
        return ServiceNotice(cluster=node.cluster, node=node.name, session=self.session, seq=0, ts=now,
                             service=service, state=node.state, reason=reason[:4096], since=node.state_since,
                             breaker_open=breaker)

    def take(self, now: float) -> list[ServiceNotice]:
        """The notices that say something new since the last ones published."""
        keys: Iterable[NodeKey] = list(self.state.nodes) if self._everything else self._dirty
        self._everything, self._dirty = False, set()
        notices = []
        for key in keys:
            notice = self.notice(key, now)
            if notice is not None and self._told.get(key) != _said(notice):
                notices.append(notice)
        return notices

    async def run(self, publish: Publish, connected: asyncio.Event, connects: Callable[[], int]) -> None:
        """Publish what :meth:`take` finds, round after round, while ``connected``, until cancelled.

        ``connects`` counts the link's connections: after each new one every node is told again.
        """
        limit = asyncio.Semaphore(CONCURRENCY)
        seen_connects = 0

        async def one(notice: ServiceNotice) -> bool:
            async with limit:
                sent = await publish(protocol.service_topic(notice.cluster, notice.node), protocol.encode(notice),
                                     retain=True)
            key = (notice.cluster, notice.node)
            if sent:
                self._told[key] = _said(notice)
            else:
                self._dirty.add(key)  # tried again at the next round
            return sent

        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), SCAN_S)
            self._ready.clear()
            await connected.wait()
            if connects() != seen_connects:
                seen_connects = connects()
                self.everything(again=True)
                self._ready.clear()
            elif not self._dirty and not self._everything:
                self._everything = True  # the periodic look at every node
            notices = self.take(time.time())
            if not notices:
                continue
            sent = await asyncio.gather(*(one(notice) for notice in notices))
            self.published += sum(sent)
            failed = len(sent) - sum(sent)
            if failed:
                self.failed += failed
                log.warning("service_notices_not_sent", count=failed, total_failed=self.failed,
                            hint="sent again at the next round")
                await asyncio.sleep(1.0)  # the broker is away: do not spin
            if len(notices) <= 20:
                for notice in notices:
                    log.info("service_notice", node=notice.node, service=notice.service, state=notice.state,
                             breaker_open=notice.breaker_open)
            else:
                log.info("service_notices", count=len(notices), sent=sum(sent))


def _said(notice: ServiceNotice) -> _Said:
    return (notice.service, notice.state, notice.reason, notice.breaker_open)
