"""The pair rounds: a coordinator and its members measure bandwidth between nodes, round by round.

Used by ``vetd vet`` inside a job (rank 0 is the coordinator, every task a
member, each member one TCP connection to it: :func:`serve`, :func:`connect`)
and written so a controller campaign can drive the same :class:`Coordinator`
over another channel: it only needs, per member, a :class:`Channel` that
sends and receives the messages below.

One run, as the coordinator sees it:

1. **join**: members send :class:`Join` (rank, node, whether their node-local
   checks passed, which pair tests they can run) until every rank has joined
   or the deadline passes; a rank that has not is ``absent``. Later joins get
   :class:`Late`.
2. **plan**: the coordinator picks the pair test (the one asked for, or with
   ``auto`` the best every member can run), leaves out members whose
   node-local checks failed, and sends every member the :class:`Plan`: the
   test, the nodes in the pairs and the rounds (:func:`vetd.core.pairs.schedule`).
3. **open**: each member opens its endpoint of the test and answers
   :class:`Opened` with what peers need (a port); the coordinator sends
   :class:`Peers` to all.
4. **rounds**: :class:`Go` starts round *r* with its pairs and the members
   still there; both nodes of each pair of the round measure at once, each
   its own direction, and answer :class:`Report`. After the planned rounds,
   pairs that look like slow links are measured again in extra rounds
   (:func:`vetd.core.pairs.confirm_rounds`, at most as many as planned). A member that does not report
   within the round's deadline, or whose connection closes, has left: it is
   ``absent`` from then on, and its pairs count for no one.
5. **final**: :func:`vetd.core.pairs.localise` names bad nodes and links; every
   member gets :class:`Final` with the verdicts and the exit status.

A member whose coordinator goes away cannot finish: :class:`RendezvousLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import structlog

from vetd.agent.pairtests import PairEndpoint, PairTest, Peer
from vetd.core.pairs import (
    DEFAULT_ROUNDS,
    SLOW_FRACTION,
    Localisation,
    Measurement,
    NodeVerdict,
    confirm_rounds,
    localise,
    schedule,
)

log = structlog.get_logger("vetd.fabric")

#: A frame is a 4-byte big-endian length and a MessagePack message; none is larger than this.
MAX_FRAME = 16 << 20
#: A connection must say who it is within this.
JOIN_WAIT_S = 10.0
#: Opening a test's endpoint (binding, starting a server) must take no longer than this.
OPEN_WAIT_S = 30.0
#: Added to every deadline a member waits on, for the coordinator's own work and the network.
SLACK_S = 10.0
_LENGTH = struct.Struct("!I")


class Join(msgspec.Struct, tag="join", kw_only=True):
    rank: int
    node: str
    #: Why the node-local checks say this node is bad (``""``: they passed).
    local_bad: str = ""
    #: Pair test → why it cannot run here (``""``: it can).
    tests: dict[str, str] = {}


class Late(msgspec.Struct, tag="late", kw_only=True):
    reason: str


class Plan(msgspec.Struct, tag="plan", kw_only=True):
    test: str
    seconds: float
    #: A round's deadline: ``seconds`` + the test's overhead.
    round_timeout: float
    #: The nodes in the pairs; ``rounds`` pairs are indices into it.
    nodes: list[str]
    rounds: list[list[tuple[int, int]]]
    #: Why no pair is measured (``""``: pairs run).
    skipped: str = ""
    #: How long the run may still take, for members that only wait for the end.
    expected_s: float = 0.0


class Opened(msgspec.Struct, tag="opened", kw_only=True):
    info: dict[str, Any] = {}
    error: str = ""


class Peers(msgspec.Struct, tag="peers", kw_only=True):
    info: dict[str, dict[str, Any]]


class Go(msgspec.Struct, tag="go", kw_only=True):
    round: int
    live: list[str]
    #: This round's pairs, indices into ``Plan.nodes`` (a planned round, or one measuring slow links again).
    pairs: list[tuple[int, int]] = []


class Report(msgspec.Struct, tag="report", kw_only=True):
    round: int
    samples: list[Measurement] = []


class Final(msgspec.Struct, tag="final", kw_only=True):
    exit_code: int
    verdicts: list[NodeVerdict]


Message = Join | Late | Plan | Opened | Peers | Go | Report | Final
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class RendezvousLost(Exception):
    """The coordinator (or the member) went away, or spoke out of turn."""


class Channel(Protocol):
    """One member's messages, in order, each way."""

    async def send(self, message: Message) -> None: ...

    async def recv(self, timeout: float) -> Message:
        """The next message; :class:`RendezvousLost` when the other side is gone or silent past ``timeout``."""
        ...

    async def close(self) -> None: ...


class StreamChannel:
    """A :class:`Channel` over a TCP connection: length-prefixed MessagePack frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, who: str) -> None:
        self.reader, self.writer, self.who = reader, writer, who

    async def send(self, message: Message) -> None:
        data = _encoder.encode(message)
        try:
            self.writer.write(_LENGTH.pack(len(data)) + data)
            await self.writer.drain()
        except (OSError, RuntimeError) as exc:
            raise RendezvousLost(f"{self.who}: connection lost ({exc})") from exc

    async def recv(self, timeout: float) -> Message:
        try:
            async with asyncio.timeout(timeout):
                (length,) = _LENGTH.unpack(await self.reader.readexactly(_LENGTH.size))
                if length > MAX_FRAME:
                    raise RendezvousLost(f"{self.who}: a message of {length} bytes")
                return _decoder.decode(await self.reader.readexactly(length))
        except TimeoutError:
            raise RendezvousLost(f"{self.who}: nothing heard for {timeout:.0f}s") from None
        except (asyncio.IncompleteReadError, OSError) as exc:
            raise RendezvousLost(f"{self.who}: connection closed") from exc
        except msgspec.DecodeError as exc:
            raise RendezvousLost(f"{self.who}: unreadable message ({exc})") from exc

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


# -- the coordinator -----------------------------------------------------------------

@dataclass
class Settings:
    """What a run is asked to do."""

    #: A pair test's name, or ``auto``: the highest-priority test every member can run.
    test: str = "auto"
    #: Rounds of pairs (None: until every pair is measured).
    rounds: int | None = DEFAULT_ROUNDS
    #: Seconds from the coordinator's start until a rank that has not joined is absent.
    deadline: float = 60.0
    slow_fraction: float = SLOW_FRACTION
    min_gbps: float = 0.0
    #: Good nodes needed for exit status 0 (None: every rank).
    need: int | None = None
    #: What a member is, in the reasons of absent nodes: a job's ``task``, a campaign's ``agent``.
    member: str = "task"


@dataclass
class Outcome:
    """What the coordinator decided, for the one that prints it."""

    localisation: Localisation
    exit_code: int
    test: str
    skipped: str
    rounds: int
    #: Rounds that measured slow links again.
    confirm_rounds: int
    #: Seconds the rounds took (open included), and the whole run from the coordinator's start.
    rounds_s: float
    total_s: float
    good: int
    need: int


@dataclass(eq=False)
class _Member:
    rank: int
    node: str
    join: Join
    channel: Channel
    #: Why the member is gone (``""``: it is here).
    left: str = ""


@dataclass
class Coordinator:
    """Runs the pair rounds for ``nodes`` (one member each), with ``tests`` to choose from."""

    nodes: Sequence[str]
    tests: Mapping[str, PairTest]
    settings: Settings = field(default_factory=Settings)
    #: Node → its member, once joined.
    _members: dict[str, _Member] = field(default_factory=dict)
    _closed: bool = False
    _all_joined: asyncio.Event = field(default_factory=asyncio.Event)
    _started: float = field(default_factory=time.monotonic)
    #: Node → why it will not join (:meth:`turned_away`).
    _away: dict[str, str] = field(default_factory=dict)

    def turned_away(self, node: str, why: str) -> None:
        """``node`` will not join (a campaign's agent refused it): absent with ``why`` now, not at the deadline."""
        if node in self.nodes and node not in self._members:
            self._away[node] = why
            self._joined_or_away()

    def _joined_or_away(self) -> None:
        if len(self._members) + len(set(self._away) - set(self._members)) >= len(self.nodes):
            self._all_joined.set()

    async def add(self, channel: Channel, wait: float = JOIN_WAIT_S) -> None:
        """A new member's channel: its :class:`Join` is read here, within ``wait`` (or it is turned away)."""
        try:
            join = await channel.recv(wait)
        except RendezvousLost:
            await channel.close()
            return
        problem = ""
        if not isinstance(join, Join):
            problem = f"expected a join, got {type(join).__name__}"
        elif not 0 <= join.rank < len(self.nodes):
            problem = f"rank {join.rank} is not in 0..{len(self.nodes) - 1}"
        elif join.node not in self.nodes:
            problem = f"{join.node!r} (rank {join.rank}) is not one of the run's nodes"
        elif join.node in self._members or any(m.rank == join.rank for m in self._members.values()):
            problem = f"{join.node} (rank {join.rank}) joined twice: one task per node"
        elif self._closed:
            problem = (f"rank {join.rank} ({join.node}) arrived after the {self.settings.deadline:g}s deadline: "
                       "reported absent")
        if problem or not isinstance(join, Join):
            log.warning("vet_join_refused", reason=problem)
            with contextlib.suppress(RendezvousLost):
                await channel.send(Late(reason=problem))
            await channel.close()
            return
        self._members[join.node] = _Member(join.rank, join.node, join, channel)
        log.debug("vet_joined", rank=join.rank, node=join.node, joined=len(self._members), of=len(self.nodes))
        self._joined_or_away()

    async def run(self) -> Outcome:
        remaining = self.settings.deadline - (time.monotonic() - self._started)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, remaining)):
                await self._all_joined.wait()
        self._closed = True
        absent = {node: self._away.get(node)
                  or f"its {self.settings.member} never arrived within the {self.settings.deadline:g}s deadline"
                  for node in self.nodes if node not in self._members}
        members = [self._members[node] for node in self.nodes if node in self._members]
        excluded = {m.node: f"node-local checks: {m.join.local_bad}" for m in members if m.join.local_bad}
        pairing = [m for m in members if not m.join.local_bad]
        test, skipped = self._choose(pairing)
        began = time.monotonic()
        chosen = self.tests.get(test)
        seconds = chosen.seconds if chosen else 0.0
        round_timeout = (chosen.seconds + chosen.overhead_s) if chosen else 0.0
        plan_rounds = [] if skipped else schedule(len(pairing), self.settings.rounds)
        # the planned rounds, as many again at most to measure slow links again, and the opening
        expected = OPEN_WAIT_S + 2 * len(plan_rounds) * (round_timeout + SLACK_S) + SLACK_S
        plan = Plan(test=test, seconds=seconds, round_timeout=round_timeout, nodes=[m.node for m in pairing],
                    rounds=[list(r) for r in plan_rounds], skipped=skipped, expected_s=expected)
        await self._each(members, lambda m: m.channel.send(plan))

        samples: list[Measurement] = []
        if plan_rounds:
            opened = await self._collect(pairing, Opened, OPEN_WAIT_S, "opening the pair test")
            for member, answer in opened.items():
                if answer.error:
                    excluded[member.node] = f"its {test} endpoint did not open: {answer.error}"
            pairing = [m for m in pairing if m.node not in excluded]
            info = {m.node: opened[m].info for m in pairing if m in opened}
            await self._each(self._here(pairing), lambda m: m.channel.send(Peers(info=info)))
            for index, pairs in enumerate(plan_rounds):
                samples += await self._round(pairing, plan, index, pairs)
            # a slow link is named only if it is slow again (module docstring of vetd.core.pairs)
            first = self._localise(members, absent, excluded, samples)
            suspects = [(plan.nodes.index(link.a), plan.nodes.index(link.b)) for link in first.links]
            confirm = confirm_rounds(suspects)[:len(plan_rounds)]
            for index, pairs in enumerate(confirm, len(plan_rounds)):
                samples += await self._round(pairing, plan, index, pairs)
            extra = len(confirm)
            candidates: set[frozenset[str]] | None = {frozenset((link.a, link.b)) for link in first.links}
        else:
            extra, candidates = 0, None
        rounds_s = time.monotonic() - began
        result = self._localise(members, absent, excluded, samples, candidates)
        if skipped:
            for verdict in result.nodes:
                if verdict.verdict == "good":
                    own = self._members[verdict.node].join.tests.get(test, "not installed")
                    verdict.reason = (f"node-local checks passed; no pair measured ({test} "
                                      f"{'cannot run here: ' + own if own else 'cannot run on every node'})")
                    verdict.codes = ["pairs_skipped"]
        good = sum(v.verdict == "good" for v in result.nodes)
        need = len(self.nodes) if self.settings.need is None else self.settings.need
        log.debug("vet_done", test=test, skipped=skipped, nodes=len(self.nodes), rounds=len(plan_rounds),
                  confirm_rounds=extra, rounds_s=round(rounds_s, 3), good=good, need=need,
                  reference_gbps=result.reference_gbps, links=[f"{k.a}-{k.b}" for k in result.links])
        exit_code = 0 if good >= need else 1
        final = Final(exit_code=exit_code, verdicts=result.nodes)
        here = self._here(members)
        await self._each(here, lambda m: m.channel.send(final))
        for member in members:
            await member.channel.close()
        return Outcome(localisation=result, exit_code=exit_code, test=test, skipped=skipped,
                       rounds=len(plan_rounds), confirm_rounds=extra, rounds_s=rounds_s, total_s=time.monotonic() - self._started,
                       good=good, need=need)

    async def _round(self, pairing: Sequence[_Member], plan: Plan, index: int,
                     pairs: Sequence[tuple[int, int]]) -> list[Measurement]:
        here = self._here(pairing)
        go = Go(round=index, live=[m.node for m in here], pairs=list(pairs))
        await self._each(here, lambda m: m.channel.send(go))
        reports = await self._collect(here, Report, plan.round_timeout + SLACK_S, f"round {index + 1}")
        return [s for report in reports.values() if report.round == index for s in report.samples]

    def _localise(self, members: Sequence[_Member], absent: Mapping[str, str], excluded: Mapping[str, str],
                  samples: Sequence[Measurement], candidates: set[frozenset[str]] | None = None) -> Localisation:
        gone = {**absent, **{m.node: m.left for m in members if m.left}}
        return localise(list(self.nodes), samples, absent=gone, excluded=excluded,
                        slow_fraction=self.settings.slow_fraction, min_gbps=self.settings.min_gbps,
                        links_among=candidates)

    def _choose(self, members: Sequence[_Member]) -> tuple[str, str]:
        """The test to run and, when it cannot run, why (``""``: it can)."""
        wanted = self.settings.test
        if wanted != "auto":
            if wanted not in self.tests:
                return wanted, f"no pair test {wanted!r} here (tests: {', '.join(sorted(self.tests))})"
            by_reason: dict[str, list[str]] = {}
            for m in members:
                if why := m.join.tests.get(wanted, "not installed"):
                    by_reason.setdefault(why, []).append(m.node)
            return wanted, "; ".join(f"{wanted} cannot run on {_fold(nodes)}: {why}"
                                     for why, nodes in by_reason.items())
        usable = [t for t in self.tests.values() if all(m.join.tests.get(t.name, "not installed") == ""
                                                        for m in members)]
        if not usable:
            return "none", "no pair test can run on every node"
        best = max(usable, key=lambda t: (t.priority, t.name == "tcp_pairs"))
        return best.name, ""

    def _here(self, members: Sequence[_Member]) -> list[_Member]:
        return [m for m in members if not m.left]

    async def _each(self, members: Sequence[_Member], send: Callable[[_Member], Any]) -> None:
        async def one(member: _Member) -> None:
            if member.left:
                return
            try:
                await send(member)
            except RendezvousLost as exc:
                self._leave(member, f"its {self.settings.member} left ({exc})")

        await asyncio.gather(*(one(m) for m in members))

    async def _collect(self, members: Sequence[_Member], kind: type[Any], timeout: float,
                       during: str) -> dict[Any, Any]:
        """Each member's next message, of ``kind``; a member that sends none in time has left."""
        answers: dict[Any, Any] = {}

        async def one(member: _Member) -> None:
            try:
                message = await member.channel.recv(timeout)
            except RendezvousLost as exc:
                self._leave(member, f"its {self.settings.member} left during {during} "
                                    f"({exc.args[0].split(': ', 1)[-1]})")
                return
            if isinstance(message, kind):
                answers[member] = message
            else:
                self._leave(member, f"its {self.settings.member} answered {type(message).__name__} during {during}")

        await asyncio.gather(*(one(m) for m in members if not m.left))
        return answers

    def _leave(self, member: _Member, why: str) -> None:
        if not member.left:
            member.left = why
            log.warning("vet_member_left", rank=member.rank, node=member.node, reason=why)


def _fold(nodes: Sequence[str]) -> str:
    from ClusterShell.NodeSet import NodeSet

    return str(NodeSet.fromlist(list(nodes)))


# -- a member --------------------------------------------------------------------------

@dataclass
class MemberResult:
    final: Final | None
    #: Why the run ended without a verdict for this member (late, or the coordinator went away).
    late: str = ""


async def member(channel: Channel, join: Join, tests: Mapping[str, PairTest], wait_plan: float) -> MemberResult:
    """Take part in a run: join, measure this node's pair of each round, return the final verdicts."""
    await channel.send(join)
    plan = await channel.recv(wait_plan)
    if isinstance(plan, Late):
        return MemberResult(final=None, late=plan.reason)
    if not isinstance(plan, Plan):
        raise RendezvousLost(f"expected a plan, got {type(plan).__name__}")
    me = plan.nodes.index(join.node) if join.node in plan.nodes and not plan.skipped else -1
    if me < 0 or not plan.rounds:
        return MemberResult(final=await _expect(channel, Final, plan.expected_s + SLACK_S))
    test = tests[plan.test]
    try:
        endpoint: PairEndpoint | None = await asyncio.wait_for(asyncio.to_thread(test.open), OPEN_WAIT_S)
        assert endpoint is not None
        await channel.send(Opened(info=endpoint.announce()))
    except Exception as exc:  # noqa: BLE001 - any failure to open is reported, never a hang
        endpoint = None
        await channel.send(Opened(error=f"{type(exc).__name__}: {exc}"))
    try:
        message = await channel.recv(OPEN_WAIT_S + SLACK_S)
        if isinstance(message, Final):
            return MemberResult(final=message)
        if not isinstance(message, Peers):
            raise RendezvousLost(f"expected the peers, got {type(message).__name__}")
        peers = message.info
        while True:
            message = await channel.recv(plan.round_timeout + 3 * SLACK_S)
            if isinstance(message, Final):
                return MemberResult(final=message)
            if not isinstance(message, Go):
                raise RendezvousLost(f"expected a round, got {type(message).__name__}")
            samples = []
            log.debug("vet_round", node=join.node, round=message.round, of=len(plan.rounds))
            if endpoint is not None:
                samples = await _measure(endpoint, plan, me, message, peers)
            await channel.send(Report(round=message.round, samples=samples))
    finally:
        if endpoint is not None:
            await asyncio.to_thread(endpoint.close)


async def _measure(endpoint: PairEndpoint, plan: Plan, me: int, go: Go,
                   peers: Mapping[str, Mapping[str, Any]]) -> list[Measurement]:
    pair = next((p for p in go.pairs if me in p), None)
    if pair is None or not all(0 <= i < len(plan.nodes) for i in pair):
        return []
    other = plan.nodes[pair[1] if pair[0] == me else pair[0]]
    mine = plan.nodes[me]
    if other not in go.live or other not in peers:
        return []
    peer = Peer(node=other, host=other, info=peers[other])
    key = f"r{go.round}-{plan.nodes[pair[0]]}-{plan.nodes[pair[1]]}"
    try:
        sample = await asyncio.wait_for(
            asyncio.to_thread(endpoint.measure, peer, plan.seconds, pair[0] == me, key), plan.round_timeout)
    except TimeoutError:
        return [Measurement(src=mine, dst=other, round=go.round, error=f"no result within {plan.round_timeout:g}s")]
    except Exception as exc:  # noqa: BLE001 - a test that raises is a failed measurement, not a dead member
        return [Measurement(src=mine, dst=other, round=go.round, error=f"{type(exc).__name__}: {exc}")]
    return [Measurement(src=mine, dst=other, round=go.round, gbps=sample.gbps, error=sample.error,
                        detail=dict(sample.detail))]


async def _expect(channel: Channel, kind: type[Any], timeout: float) -> Any:
    message = await channel.recv(timeout)
    if not isinstance(message, kind):
        raise RendezvousLost(f"expected {kind.__name__}, got {type(message).__name__}")
    return message


# -- over TCP, rank 0 serving ---------------------------------------------------------

async def serve(coordinator: Coordinator, port: int) -> asyncio.Server:
    """Listen for members on ``port`` (every address); each connection is handed to the coordinator."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        await coordinator.add(StreamChannel(reader, writer, f"member at {peer[0] if peer else '?'}"))

    return await asyncio.start_server(handle, host=None, port=port, reuse_address=True)


async def connect(host: str, port: int, give_up_at: float) -> StreamChannel:
    """Connect to the coordinator, trying again until ``give_up_at`` (monotonic): it may start later."""
    delay = 0.1
    last = ""
    while True:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
            return StreamChannel(reader, writer, f"rank 0 ({host}:{port})")
        except (OSError, TimeoutError) as exc:
            last = str(exc) or type(exc).__name__
        if time.monotonic() + delay > give_up_at:
            raise RendezvousLost(f"no rendezvous with rank 0 at {host}:{port}: {last}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
