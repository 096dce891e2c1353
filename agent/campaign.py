"""A campaign the controller runs: the pair rounds of :mod:`vetd.agent.fabric` over signed commands.

The controller vets idle nodes by driving the same :class:`~vetd.agent.fabric.Coordinator`
as ``vetd vet`` in a job (:mod:`vetd.controller.campaigns`), with one member per node's
agent. Every message from the coordinator to a node is a signed command ``vet``
(``[commands] allow`` must list it), and every message back is the reply to one:

======  ===========================================  ==========================================
step    the command's ``body``                        the reply's ``body``
======  ===========================================  ==========================================
0       :class:`Invite` (rank, how long to wait)      :class:`~vetd.agent.fabric.Join`
1       :class:`~vetd.agent.fabric.Plan`              ``Opened`` (the probe's port), or empty
2       ``Peers`` (every member's port: the           empty
        rendezvous the controller relays)
3…      ``Go`` (a round's pairs)                      ``Report`` (this node's measurement)
last    ``Final`` (this node's verdict)               empty
======  ===========================================  ==========================================

``args`` carry the campaign's id and the step (``{"campaign": "…", "step": "3"}``); the
body is MessagePack, covered by the command's signature. Steps are handed to the member
in order whatever order their commands arrive in. One campaign at a time per node; an
invitation is refused while a job runs on the node (the agent knows its jobs from the
prolog), so even a controller that got it wrong never measures a node with a job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from vetd.agent.commands import Answer
from vetd.agent.fabric import (
    SLACK_S,
    Final,
    Go,
    Join,
    Late,
    Opened,
    Peers,
    Plan,
    RendezvousLost,
    Report,
    member,
)
from vetd.agent.pairtests import PairTest
from vetd.core.protocol import Command

log = structlog.get_logger("vetd.campaign")

#: The command of a campaign, as ``[commands] allow`` names it.
ACTION = "vet"


class Invite(msgspec.Struct, tag="invite", kw_only=True):
    """Step 0: take part in a campaign as ``rank``; give up if no plan comes within ``wait`` seconds."""

    rank: int
    wait: float


#: What a campaign's command or reply carries.
Body = Invite | Join | Late | Plan | Opened | Peers | Go | Report | Final
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Body)


def encode(message: Body) -> bytes:
    return _encoder.encode(message)


def decode(body: bytes) -> Body:
    """A body back into its message; :class:`RendezvousLost` when it is not one."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RendezvousLost(f"unreadable campaign message ({exc})") from exc


@dataclass(eq=False)
class CommandChannel:
    """The member's :class:`~vetd.agent.fabric.Channel`: each message it receives is a command, each it
    sends the answer to the command that prompted it (a command it had nothing to say to is answered
    empty when it moves on to the next)."""

    campaign: str
    #: Step → the message and the answer its command waits for.
    _inbox: dict[int, tuple[Body, asyncio.Future[Answer]]] = field(default_factory=dict)
    _next: int = 1
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: The answer the command being handled waits for.
    _pending: asyncio.Future[Answer] | None = None
    closed: bool = False

    def deliver(self, step: int, message: Body) -> asyncio.Future[Answer]:
        """A command's message for the member; the future is its answer."""
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        if self.closed:
            answer.set_result(_no(f"campaign {self.campaign} has ended here"))
        elif step < self._next or step in self._inbox:
            answer.set_result(_no(f"step {step} of campaign {self.campaign} was already received"))
        else:
            self._inbox[step] = (message, answer)
            self._arrived.set()
        return answer

    def _answer(self, answer: Answer) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_result(answer)
        self._pending = None

    async def send(self, message: Any) -> None:
        if self._pending is None:
            raise RendezvousLost(f"campaign {self.campaign}: nothing to answer with {type(message).__name__}")
        self._answer(Answer(True, type(message).__name__.lower(), {}, encode(message)))

    async def recv(self, timeout: float) -> Any:
        self._answer(Answer(True, "received", {}))
        try:
            async with asyncio.timeout(timeout):
                while self._next not in self._inbox:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise RendezvousLost(f"campaign {self.campaign}: the controller said nothing for {timeout:.0f}s") from None
        message, self._pending = self._inbox.pop(self._next)
        self._next += 1
        return message

    async def close(self, why: str = "") -> None:
        """The member is done (``why``: it gave up, and the command it was handling is answered so)."""
        self._answer(_no(why) if why else Answer(True, "done", {}))
        self.closed = True
        for _, answer in self._inbox.values():
            if not answer.done():
                answer.set_result(_no(f"campaign {self.campaign} has ended here"))
        self._inbox.clear()


def _no(why: str) -> Answer:
    return Answer(False, why, {})


@dataclass(eq=False)
class _Session:
    campaign: str
    channel: CommandChannel
    task: asyncio.Task[None] | None = None


class CampaignMember:
    """This agent's part in the controller's campaigns (the ``vet`` command)."""

    def __init__(self, node: Callable[[], str], tests: Callable[[], Mapping[str, PairTest]],
                 jobs: Callable[[], list[str]],
                 spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]) -> None:
        self.node, self.tests, self.jobs, self.spawn = node, tests, jobs, spawn
        self._session: _Session | None = None

    async def handle(self, command: Command) -> Answer:
        campaign = command.args.get("campaign", "")
        step = command.args.get("step", "")
        if not campaign or not step.isdigit():
            return _no("refused: a campaign command names its campaign and step")
        try:
            message = decode(command.body)
        except RendezvousLost as exc:
            return _no(f"refused: {exc}")
        if int(step) == 0:
            return await self._invited(campaign, message)
        session = self._session
        if session is None or session.campaign != campaign:
            return _no(f"no campaign {campaign} here (it ended, or never started)")
        return await session.channel.deliver(int(step), message)

    async def _invited(self, campaign: str, invite: Body) -> Answer:
        if not isinstance(invite, Invite):
            return _no(f"refused: step 0 is an invitation, not {type(invite).__name__}")
        if self._session is not None:
            return _no(f"refused: campaign {self._session.campaign} is running here")
        if jobs := self.jobs():
            return _no(f"refused: job {', '.join(jobs)} runs here")
        channel = CommandChannel(campaign)
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        channel._pending = answer
        session = self._session = _Session(campaign, channel)
        session.task = self.spawn(self._take_part(session, invite), f"vetd.campaign.{campaign}")
        return await answer

    async def _take_part(self, session: _Session, invite: Invite) -> None:
        node = self.node()
        why = ""
        try:
            tests = self.tests()
            available = await asyncio.gather(*(asyncio.to_thread(t.unavailable) for t in tests.values()))
            join = Join(rank=invite.rank, node=node, tests=dict(zip(tests, available, strict=True)))
            log.info("campaign_joined", campaign=session.campaign, rank=invite.rank)
            result = await member(session.channel, join, tests, invite.wait + SLACK_S)
            mine = next((v for v in result.final.verdicts if v.node == node), None) if result.final else None
            log.info("campaign_done", campaign=session.campaign, late=result.late,
                     verdict=mine.verdict if mine else "", reason=mine.reason if mine else "")
        except RendezvousLost as exc:
            why = f"gave up: {exc}"
            log.warning("campaign_lost", campaign=session.campaign, reason=str(exc))
        except Exception as exc:
            why = f"failed: {type(exc).__name__}: {exc}"
            log.exception("campaign_failed", campaign=session.campaign, error=f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await session.channel.close(why)
            if self._session is session:
                self._session = None
