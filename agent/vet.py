"""``vetd vet`` inside a job: each task vets its node, then the tasks measure bandwidth between nodes in pairs.

``srun --ntasks-per-node=1 vetd vet [--protocol FILE] [--need N] [--good-file F]
[--bad-file F] [--json] [--test auto|tcp_pairs|nccl_pairs] [--deadline 60s]``.

Every task:

1. runs the node-local checks (a ``--protocol`` file, else the ``prolog``
   profile), as ``vetd check`` does; a ``fail``, ``error`` or ``timeout``
   makes the node bad, and it takes no part in the pairs;
2. meets the others from the Slurm environment alone (``SLURM_PROCID``,
   ``SLURM_NTASKS``, ``SLURM_STEP_NODELIST`` or ``SLURM_JOB_NODELIST``
   through ClusterShell, ``SLURMD_NODENAME``): rank 0, on the first node of
   the list, serves the rendezvous over TCP (``--port``, by default one
   derived from the job and step ids); no controller, no broker;
3. takes part in the pair rounds (:mod:`vetd.agent.fabric`), localised by
   :func:`vetd.core.pairs.localise`.

Rank 0 prints the table (node, verdict, why) or ``--json`` (one object per
node), writes ``--good-file`` / ``--bad-file`` as folded hostlists; every task
whose node runs a vetd agent it may talk to hands its node's verdict to it
(:func:`report_to_agent`), which publishes it to the controller as check
``fabric_pairs`` tagged with the job; and every task exits with the same status: 0 when at least ``--need`` nodes (default:
all) are good, 1 otherwise, 2 when vetd itself could not run (a bad option,
no rendezvous with rank 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import structlog

from vetd.agent.fabric import (
    SLACK_S,
    Coordinator,
    Join,
    MemberResult,
    Outcome,
    RendezvousLost,
    Settings,
    connect,
    member,
    serve,
)
from vetd.agent.pairtests import PairTest
from vetd.core import pairs
from vetd.core.cli import EXIT_FAILED, EXIT_VETD
from vetd.core.configfile import ConfigError
from vetd.core.output import table
from vetd.core.pairs import DEFAULT_ROUNDS, SLOW_FRACTION, NodeVerdict

if TYPE_CHECKING:
    from vetd.agent.checks import Check
    from vetd.agent.pluginhost import PluginHost

log = structlog.get_logger("vetd.vet")
#: A job id the wire protocol takes (``vetd.core.protocol.JobId``).
JOB_ID = re.compile(r"\A[A-Za-z0-9_.:+-]{1,64}\Z")
#: Rendezvous ports derived from the job: ``PORT_BASE + (job × 16 + step) mod PORT_SPAN``,
#: below Linux's ephemeral range (32768–60999).
PORT_BASE, PORT_SPAN = 18000, 10000


#: What a job's ``vetd vet`` measures with unless told (a campaign's come from ``[campaigns]``).
JOB_DEFAULTS: dict[str, object] = {"test": "auto", "deadline": 60.0, "rounds": DEFAULT_ROUNDS,
                                   "slow_fraction": SLOW_FRACTION, "min_gbps": 0.0}


class VetError(ConfigError):
    """``vetd vet`` cannot run here (not in a job step, a bad option): one line, exit 2."""


@dataclass(frozen=True)
class Step:
    """This task's place in the job step, from the environment Slurm sets."""

    rank: int
    #: One node per task, in rank order (rank 0 serves the rendezvous on ``nodes[0]``).
    nodes: list[str]
    node: str
    job_id: str
    step_id: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Step:
        from ClusterShell.NodeSet import NodeSet, NodeSetException

        missing = [name for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURMD_NODENAME") if not env.get(name)]
        hostlist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        if not hostlist:
            missing.append("SLURM_JOB_NODELIST")
        if missing:
            raise VetError(f"vet runs in a job step (srun --ntasks-per-node=1 vetd vet): {', '.join(missing)} "
                           "not set")
        try:
            rank, ntasks = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        except ValueError:
            raise VetError(f"SLURM_PROCID={env['SLURM_PROCID']!r}, SLURM_NTASKS={env['SLURM_NTASKS']!r}: "
                           "not numbers") from None
        try:
            nodes = [str(n) for n in NodeSet(hostlist)]
        except NodeSetException as exc:
            raise VetError(f"node list {hostlist!r}: {exc}") from None
        if ntasks != len(nodes):
            raise VetError(f"{ntasks} tasks on {len(nodes)} nodes ({hostlist}): vet needs one task per node "
                           "(srun --ntasks-per-node=1)")
        if not 0 <= rank < ntasks:
            raise VetError(f"SLURM_PROCID={rank} is not in 0..{ntasks - 1}")
        node = env["SLURMD_NODENAME"]
        if node not in nodes:
            raise VetError(f"SLURMD_NODENAME={node} is not in the node list {hostlist}")
        return cls(rank=rank, nodes=nodes, node=node, job_id=env.get("SLURM_JOB_ID", ""),
                   step_id=env.get("SLURM_STEP_ID", ""))

    def default_port(self) -> int:
        job = int(self.job_id) if self.job_id.isdigit() else 0
        step = int(self.step_id) if self.step_id.isdigit() else 0
        return PORT_BASE + (job * 16 + step) % PORT_SPAN


def rounds_arg(value: str) -> int | None:
    """An argparse type: a number of rounds, or ``all`` (every pair)."""
    if value == "all":
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of rounds or 'all', got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"at least 1 round, got {number}")
    return number


def fraction_arg(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fraction such as 0.5, got {value!r}") from None
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1], got {value!r}")
    return number


def main(args: argparse.Namespace) -> int:
    from vetd.agent.cli import agent_config_path
    from vetd.agent.config import load_agent_config
    from vetd.agent.pluginhost import PluginHost

    for name, default in JOB_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    step = Step.from_env(os.environ)
    if args.need is not None and not 0 <= args.need <= len(step.nodes):
        raise VetError(f"--need {args.need}: the step has {len(step.nodes)} nodes")
    if args.min_gbps < 0 or not math.isfinite(args.min_gbps):
        raise VetError(f"--min-gbps {args.min_gbps}: a bandwidth >= 0")
    config = load_agent_config(agent_config_path(args.config))
    host = PluginHost(config)
    tests = {test.name: test for test in host.register_pair_tests()}
    if args.test != "auto" and args.test not in tests:
        raise VetError(f"--test {args.test}: no such pair test (auto, {', '.join(sorted(tests))})")
    names: list[str] = []
    profile: str | None = "prolog"
    if args.protocol:
        from vetd.agent.vetting import load_protocol

        check_plugins = {check.name: check.plugin for check in host.register_checks()}
        protocol = load_protocol(Path(args.protocol), check_plugins, host.config_tables(), config.plugins)
        for table_name, keys in protocol.overrides.items():
            config.plugins.setdefault(table_name, {}).update(keys)
        host = PluginHost(config)
        names, profile = protocol.checks, protocol.profile
    from vetd.agent.oneshot import SelectionError, select

    try:
        checks = select(config, host, names, profile)
    except SelectionError as exc:
        raise VetError(str(exc)) from None
    settings = Settings(test=args.test, rounds=args.rounds, deadline=args.deadline,
                        slow_fraction=args.slow_fraction, min_gbps=args.min_gbps, need=args.need)
    port = args.port if args.port is not None else step.default_port()
    return asyncio.run(_run(step, port, settings, host, tests, checks, profile, args))


async def _run(step: Step, port: int, settings: Settings, host: PluginHost, tests: Mapping[str, PairTest],
               checks: Sequence[Check], profile: str | None, args: argparse.Namespace) -> int:
    started = time.monotonic()
    coordinator: Coordinator | None = None
    server = None
    if step.rank == 0:
        if step.node != step.nodes[0]:
            raise VetError(f"rank 0 runs on {step.node}, not on the first node of the list ({step.nodes[0]}), "
                           "where the others look for it: use the default (block) task distribution")
        coordinator = Coordinator(step.nodes, tests, settings)
        try:
            server = await serve(coordinator, port)
        except OSError as exc:
            raise VetError(f"rank 0 cannot serve the rendezvous on port {port}: {exc.strerror or exc} "
                           "(--port chooses another)") from None
    lost: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            led = group.create_task(coordinator.run(), name="vetd[vet].coordinator") if coordinator else None
            mine = group.create_task(_member(step, port, settings, host, tests, checks, profile, started),
                                     name="vetd[vet].member")
    except* RendezvousLost as group_error:
        lost = group_error.exceptions[0]
    finally:
        if server is not None:
            server.close()
    if lost is not None:
        print(f"vetd: vet on {step.node}: {lost}", file=sys.stderr)
        return EXIT_VETD
    if led is not None:
        outcome = led.result()
        report(outcome, args.json, sys.stdout)
        write_lists(outcome, args.good_file, args.bad_file)
    result = mine.result()
    if result.final is not None:
        mine_verdict = next((v for v in result.final.verdicts if v.node == step.node), None)
        if mine_verdict is not None:
            await asyncio.to_thread(report_to_agent, step, mine_verdict, time.monotonic() - started)
    if led is not None:
        return outcome.exit_code
    if result.final is None:
        print(f"vetd: vet on {step.node}: {result.late}", file=sys.stderr)
        return EXIT_FAILED
    return result.final.exit_code


async def _member(step: Step, port: int, settings: Settings, host: PluginHost, tests: Mapping[str, PairTest],
                  checks: Sequence[Check], profile: str | None, started: float) -> MemberResult:
    from vetd.agent import oneshot

    results = await oneshot.collect(host.config, host, checks, profile)
    bad = [r for r in results if r["status"] in ("fail", "error", "timeout")]
    local_bad = "; ".join(f"{r['check']}[{r['entity']}] {r['status']}: {r['message']}" for r in bad[:3])
    if len(bad) > 3:
        local_bad += f"; and {len(bad) - 3} more"
    availability = dict(zip(tests, await asyncio.gather(*(asyncio.to_thread(t.unavailable) for t in tests.values())),
                            strict=True))
    target = "127.0.0.1" if step.rank == 0 else step.nodes[0]
    channel = await connect(target, port, started + settings.deadline)
    join = Join(rank=step.rank, node=step.node, local_bad=local_bad, tests=availability)
    try:
        return await member(channel, join, tests, settings.deadline + SLACK_S)
    finally:
        await channel.close()


#: The check name of ``vetd vet``'s verdict on a node, as the agent publishes it (a campaign's too).
CHECK = pairs.CHECK


def report_to_agent(step: Step, verdict: NodeVerdict, duration: float) -> bool:
    """Hand this node's verdict to the node's agent, if one runs and lets us in, to publish to the
    controller tagged with the job (``report`` on the control socket). Never fails the run."""
    from vetd.agent.controlclient import ControlError, ask, local_settings

    settings = local_settings()
    if not settings.socket_path or not Path(settings.socket_path).exists():
        return False
    status = pairs.result_status(verdict)
    request = {"op": "report", "check": CHECK, "job_id": step.job_id if JOB_ID.match(step.job_id) else "",
               "duration_s": round(duration, 3),
               "results": [{"status": status, "codes": verdict.codes[:32], "message": verdict.reason[:4000],
                            "metrics": {k: v for k, v in list(verdict.metrics.items())[:256] if math.isfinite(v)}}]}
    try:
        answer = ask(settings.socket_path, request, settings.deadline)
    except ControlError as exc:
        log.debug("vet_report_not_sent", reason=str(exc))
        return False
    if not answer.get("ok"):
        log.warning("vet_report_refused", error=answer.get("error", ""))
    return bool(answer.get("ok"))


def rows(outcome: Outcome) -> list[dict[str, object]]:
    return [{"node": v.node, "verdict": v.verdict, "reason": v.reason, "codes": list(v.codes),
             "metrics": {k: val for k, val in v.metrics.items() if math.isfinite(val)},
             "slow_links": list(v.slow_links)} for v in outcome.localisation.nodes]


def report(outcome: Outcome, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.writelines(json.dumps(row) + "\n" for row in rows(outcome))
        return
    result = outcome.localisation
    nodes = len(result.nodes)
    if outcome.skipped:
        out.write(f"{nodes} nodes; pairs not measured: {outcome.skipped}\n")
    else:
        again = f" (+{outcome.confirm_rounds} measuring slow links again)" if outcome.confirm_rounds else ""
        out.write(f"{nodes} nodes, {outcome.test}, {outcome.rounds} round{'s' * (outcome.rounds != 1)}{again} in "
                  f"{outcome.rounds_s:.1f}s; median {result.reference_gbps:.3g} GB/s, slow below "
                  f"{result.threshold_gbps:.3g} GB/s\n")
    out.write(table(("NODE", "VERDICT", "WHY"), [(v.node, v.verdict.upper(), v.reason) for v in result.nodes]))
    for link in result.links:
        out.write(f"bad link {link.a} <-> {link.b}: {link.reason}\n")
    out.write(f"{outcome.good} of {nodes} nodes good, {outcome.need} needed\n")


def write_lists(outcome: Outcome, good_file: str | None, bad_file: str | None) -> None:
    """Folded hostlists (``nid[001-004,007]``) for ``srun --nodelist`` / ``--exclude``; empty when none."""
    for path, verdict in ((good_file, "good"), (bad_file, "bad")):
        write_list(path, [v.node for v in outcome.localisation.nodes if v.verdict == verdict])


def write_list(path: str | None, nodes: Sequence[str]) -> None:
    """``nodes`` as a folded hostlist in ``path`` (nothing when there is no path; empty when no node)."""
    from ClusterShell.NodeSet import NodeSet

    if path:
        Path(path).write_text(f"{NodeSet.fromlist(list(nodes))}\n" if nodes else "")
