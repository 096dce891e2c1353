"""Campaigns without a broker: who is measured, the controller's channel to an agent, the agent's
member, and the two wired together in one process (real signing, real TCP probes on loopback
addresses). The whole thing with real networks, agents and a controller: ``tests/test_campaigns.py``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from tests.support.procs import run_vetd
from vetd.agent import campaign as wire
from vetd.agent.campaign import CampaignMember, CommandChannel, Invite
from vetd.agent.fabric import Coordinator, Final, Go, Join, Late, Peers, Plan, RendezvousLost, Settings
from vetd.agent.pairtests import PairTest
from vetd.controller.campaigns import AgentChannel, Ask, catalog, eligible
from vetd.controller.config import CampaignsSection
from vetd.controller.healing import signed_command
from vetd.controller.model import NodeRow
from vetd.core.pairs import NodeVerdict
from vetd.core.protocol import Command, Reply, node_key, verify_command
from vetd.plugins.tcp_pairs.config import TcpPairsConfig
from vetd.plugins.tcp_pairs.probe import TcpEndpoint

DATA = Path(__file__).resolve().parents[1] / "data" / "fabric"
MASTER = b"m" * 64


def row(name: str, **fields: object) -> NodeRow:
    return NodeRow("c", name, **{"online": True, "session": "s1", **fields})  # type: ignore[arg-type]


def test_only_idle_nodes_in_service_with_an_agent_are_measured() -> None:
    rows = {"n1": row("n1"), "n2": row("n2", online=False), "n3": row("n3", state="excluded"),
            "n4": row("n4"), "n5": row("n5"), "n6": row("n6"), "n7": row("n7", state="suspect"), "n9": row("n9")}
    chosen, skipped = eligible(["n9", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n1"], rows,
                               {"n4": {"77"}}, {"n5": "ALLOCATED", "n9": "", "n1": ""}, {"n6": "abc"})
    assert chosen == ["n9", "n1"]  # in the order asked; the scheduler did not say n7 is idle
    assert skipped == {"n2": "its agent is offline", "n3": "out of service in vetd (excluded)",
                       "n4": "job 77 runs there (announced by its agent)",
                       "n5": "not idle in the scheduler (ALLOCATED)", "n6": "not idle in the scheduler "
                       "(unknown to the scheduler)", "n7": "not idle in the scheduler (unknown to the scheduler)",
                       "n8": "vetd has never heard from its agent"}
    # backend none cannot tell: the controller's own jobs and states decide
    chosen, skipped = eligible(["n1", "n4", "n6", "n7"], rows, {"n4": {"77"}}, None, {"n6": "abc"})
    assert chosen == ["n1", "n7"] and skipped["n6"] == "in campaign abc, still running"


def test_an_operators_ask_overrides_the_config() -> None:
    section = CampaignsSection()
    ask = Ask.of(section, ["n1"], "operator:ann")
    assert (ask.test, ask.rounds, ask.deadline, ask.seconds) == ("auto", 3, 30.0, 3.0)
    from vetd.controller.campaigns import Params

    ask = Ask.of(section, ["n1"], "operator:ann", Params(test="tcp_pairs", rounds=0, deadline=5.0))
    assert (ask.test, ask.rounds, ask.deadline) == ("tcp_pairs", None, 5.0)
    assert set(catalog(1.0, "ib_pairs")) == {"tcp_pairs", "nccl_pairs", "ib_pairs"}  # a plugin's, run by the agents


class Sent:
    def __init__(self) -> None:
        self.commands: list[Command] = []

    async def __call__(self, node: NodeRow, args: dict[str, str], command_id: str, body: bytes) -> None:
        self.commands.append(signed_command(node, "vet", args, time.time(), session="ctl", master_key=MASTER,
                                            expires_in=60, command_id=command_id, body=body))


def reply(command: Command, ok: bool = True, body: bytes = b"", message: str = "") -> Reply:
    return Reply(cluster=command.cluster, node=command.node, session="agent", seq=0, ts=time.time(), id=command.id,
                 ok=ok, message=message, body=body)


def test_the_controllers_channel_signs_each_step_and_reads_the_replies() -> None:
    async def main() -> None:
        sent = Sent()
        channel = AgentChannel("abc", row("n1"), sent)
        await channel.invite(0, 5.0)
        [invite] = sent.commands
        assert (invite.id, invite.args) == ("vet-abc-0", {"campaign": "abc", "step": "0"})
        assert verify_command(invite, node_key(MASTER, "c", "n1"), time.time()) is None
        assert wire.decode(invite.body) == Invite(rank=0, wait=5.0)
        join = Join(rank=0, node="n1", tests={"tcp_pairs": ""})
        channel.put(reply(invite, body=wire.encode(join)))
        channel.put(reply(invite, body=wire.encode(join)))  # the same reply again (redelivered) counts once
        assert await channel.recv(1) == join
        await channel.send(Peers(info={"n1": {"port": 1}}))
        channel.put(reply(sent.commands[-1]))  # an empty answer only says it arrived
        with pytest.raises(RendezvousLost, match="nothing heard"):
            await channel.recv(0.05)
        # a node learns its own verdict only
        verdicts = [NodeVerdict(node=n, verdict="good", reason="") for n in ("n0", "n1", "n2")]
        await channel.send(Final(exit_code=0, verdicts=verdicts))
        final = wire.decode(sent.commands[-1].body)
        assert isinstance(final, Final) and [v.node for v in final.verdicts] == ["n1"] and channel.finished
        await channel.dismiss("over")
        assert len(sent.commands) == 3  # it had its verdict: nothing more to say

        other = AgentChannel("abc", row("n2"), sent)
        await other.invite(1, 5.0)
        other.put(reply(sent.commands[-1], ok=False, message="refused: 'vet' is not allowed on this node"))
        with pytest.raises(RendezvousLost):
            await other.recv(1)
        assert other.refused == "'vet' is not allowed on this node"

        third = AgentChannel("abc", row("n3"), sent)
        await third.invite(2, 5.0)
        third.put(reply(sent.commands[-1], body=wire.encode(Join(rank=2, node="n9"))))
        with pytest.raises(RendezvousLost, match="joined as 'n9'"):
            await third.recv(1)
        await third.dismiss("over")  # never finished: told the campaign is over
        assert isinstance(wire.decode(sent.commands[-1].body), Late)

    asyncio.run(main())


def test_the_agent_takes_the_steps_in_order_whatever_order_they_arrive_in() -> None:
    async def main() -> None:
        channel = CommandChannel("abc")
        plan = Plan(test="tcp_pairs", seconds=1.0, round_timeout=5.0, nodes=["a", "b"], rounds=[[(0, 1)]])
        go = Go(round=0, live=["a", "b"], pairs=[(0, 1)])
        second = channel.deliver(2, go)
        first = channel.deliver(1, plan)
        assert await channel.recv(1) == plan
        assert await channel.recv(1) == go
        assert first.result().ok and not first.result().body  # answered empty: the member moved on
        assert channel.deliver(1, plan).result().message.endswith("was already received")
        await channel.close("gave up: test")
        assert second.result() == wire_answer(False, "gave up: test")

    asyncio.run(main())


def wire_answer(ok: bool, message: str) -> object:
    from vetd.agent.commands import Answer

    return Answer(ok, message, {})


def command(step: int, message: wire.Body, campaign: str = "abc", node: str = "n1") -> Command:
    return Command(cluster="c", node=node, session="ctl", seq=0, ts=time.time(), id=f"vet-{campaign}-{step}",
                   action="vet", args={"campaign": campaign, "step": str(step)}, body=wire.encode(message))


def test_the_agent_refuses_while_a_job_runs_and_a_second_campaign() -> None:
    async def main() -> None:
        tasks: list[asyncio.Task[None]] = []
        jobs: list[str] = ["4242"]

        def spawn(work: object, name: str) -> asyncio.Task[None]:
            task = asyncio.get_running_loop().create_task(work, name=name)  # type: ignore[arg-type]
            tasks.append(task)
            return task

        member = CampaignMember(lambda: "n1", lambda: {}, lambda: jobs, spawn)
        answer = await member.handle(command(0, Invite(rank=0, wait=1.0)))
        assert not answer.ok and answer.message == "refused: job 4242 runs here"
        jobs.clear()
        answer = await member.handle(command(0, Invite(rank=0, wait=1.0)))
        assert answer.ok and wire.decode(answer.body) == Join(rank=0, node="n1", tests={})
        answer = await member.handle(command(0, Invite(rank=0, wait=1.0), campaign="def"))
        assert not answer.ok and answer.message == "refused: campaign abc is running here"
        answer = await member.handle(command(1, Plan(test="x", seconds=1, round_timeout=1, nodes=[], rounds=[]),
                                             campaign="def"))
        assert not answer.ok and "no campaign def here" in answer.message
        bad = Command(cluster="c", node="n1", session="ctl", seq=0, ts=time.time(), id="vet-abc-1", action="vet",
                      args={"campaign": "abc", "step": "1"}, body=b"\xc1")
        assert (await member.handle(bad)).message.startswith("refused: unreadable campaign message")
        # the controller ends it (it was absent in the end): the member stops and the next one may come
        answer = await member.handle(command(1, Late(reason="campaign abc is over without this node")))
        assert answer.ok
        await asyncio.gather(*tasks)
        assert member._session is None

    asyncio.run(main())


def test_a_campaign_over_signed_commands_in_one_process() -> None:
    """The controller's coordinator and channels, three agents' members, real TCP probes between
    loopback addresses (node names that are addresses): the wire, signing and order, end to end."""
    nodes = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]

    async def main() -> None:
        tasks: set[asyncio.Task[None]] = set()

        def spawn(work: object, name: str) -> asyncio.Task[None]:
            task = asyncio.get_running_loop().create_task(work, name=name)  # type: ignore[arg-type]
            tasks.add(task)
            return task

        probe = PairTest("tcp_pairs", lambda: TcpEndpoint(TcpPairsConfig(streams=1)), seconds=0.2, overhead_s=5.0)
        members = {n: CampaignMember(lambda n=n: n, lambda: {"tcp_pairs": probe}, lambda: [], spawn) for n in nodes}
        channels: dict[str, AgentChannel] = {}

        async def deliver(command: Command) -> None:
            assert verify_command(command, node_key(MASTER, "c", command.node), time.time()) is None
            answer = await members[command.node].handle(command)
            channels[command.node].put(Reply(cluster="c", node=command.node, session="a", seq=0, ts=time.time(),
                                             id=command.id, ok=answer.ok, message=answer.message, body=answer.body))

        async def publish(node: NodeRow, args: dict[str, str], command_id: str, body: bytes) -> None:
            command = signed_command(node, "vet", args, time.time(), session="ctl", master_key=MASTER, expires_in=60,
                                     command_id=command_id, body=body)
            spawn(deliver(command), f"deliver {command_id}")

        coordinator = Coordinator(nodes, catalog(0.2, "tcp_pairs"), Settings(test="tcp_pairs", deadline=10.0,
                                                                               member="agent"))
        channels.update({n: AgentChannel("abc", row(n), publish) for n in nodes})

        async def join(rank: int, name: str) -> None:
            await channels[name].invite(rank, 10.0)
            await coordinator.add(channels[name], wait=10.0)

        outcome, *_ = await asyncio.gather(coordinator.run(), *(join(i, n) for i, n in enumerate(nodes)))
        while tasks:
            await asyncio.gather(*list(tasks))
            tasks.difference_update([t for t in tasks if t.done()])
        verdicts = {v.node: v for v in outcome.localisation.nodes}
        assert {n: v.verdict for n, v in verdicts.items()} == dict.fromkeys(nodes, "good"), verdicts
        assert all(v.metrics["pairs"] == 2 and v.metrics["pair_gbps_median"] > 0 for v in verdicts.values())
        assert outcome.test == "tcp_pairs" and outcome.rounds == 3
        assert all(m._session is None for m in members.values())  # every member ended with its verdict

    asyncio.run(main())


def decisions(events: Path) -> list[tuple[str, str, str]]:
    done = run_vetd("rules", "test", "--events", str(events), "--json")
    assert done.returncode == 0, done.stderr
    return [(d["node"], d["action"], d["rule"]) for d in map(json.loads, done.stdout.splitlines())
            if d["action"] in ("drain", "mark_failed", "suspect") or d["rule"] == "fabric-slow-node"]


def test_the_default_rule_drains_a_node_slow_with_every_partner() -> None:
    assert decisions(DATA / "slow-node.jsonl") == [("nid003", "rule_fired", "fabric-slow-node"),
                                                   ("nid003", "drain", "fabric-slow-node"),
                                                   ("nid003", "alert", "fabric-slow-node")]


def test_the_default_rule_drains_nobody_for_a_slow_link_between_good_nodes() -> None:
    assert decisions(DATA / "slow-link.jsonl") == []


def test_campaign_options_that_belong_to_a_job_are_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text('[store]\npath = "c.db"\n')
    for option, value in (("--protocol", "p.yaml"), ("--port", "1")):
        done = run_vetd("vet", "nid[001-004]", "--config", str(config), option, value)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and f"{option} is for a job" in done.stderr
    done = run_vetd("vet", "nid[001-004", "--config", str(config))
    assert done.returncode == 2 and "is not a hostlist" in done.stderr and "Traceback" not in done.stderr
    done = run_vetd("vet", "nid[001-004]", "--config", str(config), "--need", "5")
    assert done.returncode == 2 and "--need 5: NODES has 4 nodes" in done.stderr


def test_campaigns_stored_before_verdicts_and_one_a_stopped_controller_left_are_listed(tmp_path: Path) -> None:
    """A database of schema 6 (campaigns without their verdicts): `vetd campaigns` reads it as it is,
    the migration brings each node's verdict back from the audit trail; a campaign left running by a
    controller that stopped is failed, with why, when the next one starts."""
    import sqlite3

    from vetd.controller.config import ControllerConfig, StoreSection
    from vetd.controller.service import Controller
    from vetd.controller.store import MIGRATIONS, Store

    path = tmp_path / "c.db"
    db = sqlite3.connect(path)
    for step in MIGRATIONS[:6]:
        db.executescript(step)
    db.execute("PRAGMA user_version = 6")
    summary = {"test": "tcp_pairs", "rounds": 3, "confirm_rounds": 0, "rounds_s": 6.3, "total_s": 6.5,
               "reference_gbps": 0.6, "threshold_gbps": 0.3, "links": [], "good": ["nid001", "nid002"],
               "bad": ["nid003"], "absent": [], "skipped": ["nid004"]}
    db.execute("INSERT INTO campaigns (id, cluster, started, ended, trigger, test, nodes, summary) VALUES "
               "('c0ffee000001', 'alps', 1000.0, 1006.5, 'schedule', 'tcp_pairs', ?, ?)",
               (json.dumps(["nid001", "nid002", "nid003", "nid004"]), json.dumps(summary)))
    for node, verdict, reason in (("nid001", "good", "2 pairs: nid002 0.61 GB/s, nid003 0.002 GB/s"),
                                  ("nid003", "bad", "slow with every partner (nid001 0.002 GB/s)")):
        db.execute("INSERT INTO audit (ts, cluster, node, actor, action, outcome, detail) VALUES "
                   "(1006.5, 'alps', ?, 'schedule', 'campaign', ?, ?)", (node, verdict, f"c0ffee000001: {reason}"))
    db.commit()
    db.close()
    config = tmp_path / "controller.toml"
    config.write_text('cluster = "alps"\n[store]\npath = "c.db"\n')

    def show(*args: str) -> dict[str, object]:
        done = run_vetd("campaigns", "show", "c0ffee000001", "--config", str(config), "--json", *args)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    # before the controller migrated it: the verdicts of the summary, no reasons
    before = show()
    assert (before["state"], before["bad"], before["hostlist"]) == ("done", ["nid003"], "nid[001-004]")
    assert [(v["node"], v["verdict"], v["reason"]) for v in before["verdicts"]] == [  # type: ignore[attr-defined]
        ("nid001", "good", ""), ("nid002", "good", ""), ("nid003", "bad", ""), ("nid004", "skipped", "")]
    # `--since` on that database (no state column yet): ended after it, so listed; ended before it, not
    for when, listed in (("1970-01-01T00:16:00Z", ["c0ffee000001"]), ("1970-01-01T00:17:00Z", [])):
        done = run_vetd("campaigns", "--config", str(config), "--json", "--since", when)
        assert done.returncode == 0, done.stderr
        assert [c["campaign"] for c in json.loads(done.stdout)] == listed
    Store(path).close()
    after = show()
    assert [(v["node"], v["verdict"], v["reason"], v["median_gbps"]) for v in after["verdicts"]] == [  # type: ignore[attr-defined]
        ("nid001", "good", "2 pairs: nid002 0.61 GB/s, nid003 0.002 GB/s", None), ("nid002", "good", "", None),
        ("nid003", "bad", "slow with every partner (nid001 0.002 GB/s)", None), ("nid004", "skipped", "", None)]
    text = run_vetd("campaigns", "show", "c0ffee000001", "--config", str(config)).stdout.splitlines()
    assert text[1] == "  3 nodes, tcp_pairs, 3 rounds in 6.3s; median 0.6 GB/s, slow below 0.3 GB/s"
    assert text[5].split() == ["nid003", "BAD", "-", "slow", "with", "every", "partner", "(nid001", "0.002", "GB/s)"]

    # a controller stopped mid-campaign left it running; the next start fails it
    store = Store(path)
    store.start_campaign("c0ffee000002", "alps", 2000.0, "operator:ann", "auto", ["nid001", "nid002"])
    store.close()
    assert run_vetd("campaigns", "--config", str(config)).stdout.splitlines()[1].split()[3:] == [
        "operator:ann", "running", "auto", "nid[001-002]", "-", "-"]
    controller = Controller(ControllerConfig(cluster="alps", store=StoreSection(path=str(path))))

    async def start() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(controller.campaigns.run(), 1.0)

    asyncio.run(start())
    controller.store.close()
    listed = json.loads(run_vetd("campaigns", "--config", str(config), "--json").stdout)
    assert [(c["campaign"], c["state"], c["error"]) for c in listed] == [
        ("c0ffee000002", "failed", "the controller stopped while the campaign ran"), ("c0ffee000001", "done", "")]
    recent = json.loads(run_vetd("campaigns", "--config", str(config), "--json", "--since", "1h").stdout)
    assert [c["campaign"] for c in recent] == ["c0ffee000002"]  # failed just now; the other ended in 1970
