"""Acknowledgements to agents: what each node sent is now in the store.

After every batch commits, :meth:`Acks.committed` notes the (session, seq)
of its results and events per node, duplicates included (the agent that
sent a duplicate is waiting for an ack that was lost). :meth:`Acks.run`
publishes them, one :class:`~vetd.core.protocol.Ack` per node on
``vetd/v1/<cluster>/ack/<node>`` at QoS 1, with consecutive sequence
numbers folded into ranges. While it publishes, later commits pile up and go
out merged in the next round, so under a backlog the acks cost about one
message per node per round rather than one per batch.

:meth:`Acks.resend` asks a node to send again, at once, all it has not had
acknowledged (an ack with ``resend`` set). The controller asks it, when the
broker held no session for it, of every node whose retained birth reaches it
as it subscribes: a node online before that subscription published into a
broker that had no subscriber for it (the controller's first start, a broker
that lost its store), and the broker dropped those messages unseen; without
the request the node would wait ``ack_timeout`` to send them again. It costs
one ack and one resent message per node (the agent resends one message first
and the rest only once that one is acknowledged).

Nothing here is durable, and nothing needs to be: an ack lost (the broker
away, the controller killed between commit and publish) only makes the
agent send those messages again, which the store drops as duplicates and
this acknowledges again.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog

from vetd.core import protocol
from vetd.core.protocol import MAX_ACK_RANGES, Ack, AckRange, Event, Message, Result

log = structlog.get_logger("vetd.controller.acks")

#: Acks published at the same time (each waits for its PUBACK).
CONCURRENCY = 1000

Publish = Callable[[str, bytes], Awaitable[bool]]


class Acks:
    """Per node, the ranges committed and not yet acknowledged."""

    def __init__(self, session: str) -> None:
        self.session = session
        #: ``VETD_CONTROLLER_ACKS=0`` turns acks off: only for bench/ack_cost.py's baseline (agents
        #: would keep every result and resend it after each ack timeout).
        self.enabled = os.environ.get("VETD_CONTROLLER_ACKS", "1") != "0"
        #: (cluster, node) → session → [[first, last], …] in arrival order.
        self._pending: dict[tuple[str, str], dict[str, list[list[int]]]] = {}
        #: (cluster, node) asked to send again what is not acknowledged (:meth:`resend`).
        self._resend: set[tuple[str, str]] = set()
        self._ready = asyncio.Event()
        self.published = 0
        self.failed = 0

    def committed(self, messages: Iterable[Message]) -> None:
        """Call after the transaction that stored ``messages`` committed (never before)."""
        if not self.enabled:
            return
        for message in messages:
            if not isinstance(message, Result | Event) or not message.seq:
                continue
            ranges = self._pending.setdefault((message.cluster, message.node), {}).setdefault(message.session, [])
            seq = message.seq
            if ranges and ranges[-1][0] <= seq <= ranges[-1][1] + 1:
                ranges[-1][1] = max(ranges[-1][1], seq)
            else:
                ranges.append([seq, seq])
        if self._pending:
            self._ready.set()

    def resend(self, cluster: str, node: str) -> None:
        """Ask ``node`` to send again, now, whatever it has not had acknowledged."""
        if not self.enabled:
            return
        self._resend.add((cluster, node))
        self._ready.set()

    def take(self) -> list[Ack]:
        """The acks for everything noted so far (and forget it)."""
        pending, self._pending = self._pending, {}
        resend, self._resend = self._resend, set()
        now = time.time()
        acks = []
        for key in resend.difference(pending):
            pending[key] = {}
        for (cluster, node), sessions in pending.items():
            ranges = [AckRange(session, first, last) for session, spans in sessions.items() for first, last in spans]
            for i in range(0, max(1, len(ranges)), MAX_ACK_RANGES):
                acks.append(Ack(cluster=cluster, node=node, session=self.session, seq=0, ts=now,
                                ranges=ranges[i:i + MAX_ACK_RANGES], resend=not i and (cluster, node) in resend))
        return acks

    async def run(self, publish: Publish) -> None:
        """Publish what :meth:`committed` noted, round after round, until cancelled."""
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(ack: Ack) -> bool:
            async with limit:
                return await publish(protocol.ack_topic(ack.cluster, ack.node), protocol.encode(ack))

        while True:
            await self._ready.wait()
            self._ready.clear()
            acks = self.take()
            sent = await asyncio.gather(*(one(ack) for ack in acks))
            self.published += sum(sent)
            failed = len(sent) - sum(sent)
            if failed:
                self.failed += failed
                log.warning("acks_not_sent", count=failed, total_failed=self.failed,
                            hint="the agents send those messages again; duplicates are dropped and re-acked")
