"""Which service notices the controller sends, and when (the model only; the wire is tests/test_service_notice.py)."""

from __future__ import annotations

from vetd.controller.actions import ActionOutcome
from vetd.controller.decisions import Drain
from vetd.controller.fleet import Fleet
from vetd.controller.model import Audit, Breaker, FleetState, NodeRow
from vetd.controller.notices import ServiceNotices


def fleet_of(*nodes: NodeRow) -> tuple[FleetState, Fleet]:
    state = FleetState(nodes={(n.cluster, n.name): n for n in nodes})
    return state, Fleet({}, nodes)


def said(notices: ServiceNotices) -> dict[str, tuple[str, str, str, bool]]:
    taken = notices.take(100.0)
    for notice in taken:  # as run() does once the broker took them
        notices._told[(notice.cluster, notice.node)] = (notice.service, notice.state, notice.reason,
                                                        notice.breaker_open)
    return {n.node: (n.service, n.state, n.reason, n.breaker_open) for n in taken}


def drain(node: NodeRow) -> Drain:
    return Drain(node.cluster, node.name, node.reason, "check-failed", Audit(node.cluster, node.name, "drain", 1.0))


def test_every_node_at_start_then_only_what_changed() -> None:
    ok = NodeRow("alps", "nid001", labels={"partition": "gpu"})
    bad = NodeRow("alps", "nid002", state="excluded", reason="vetd: check-failed: gpu_health",
                  labels={"partition": "gpu"})
    state, fleet = fleet_of(ok, bad)
    notices = ServiceNotices("ctl", state, fleet, scheduler="slurm")
    assert said(notices) == {"nid001": ("in_service", "healthy", "", False),
                             "nid002": ("excluded", "excluded", "vetd: check-failed: gpu_health", False)}
    notices.changed([("alps", "nid001"), ("alps", "nid002")])
    assert said(notices) == {}  # nothing new to say
    # Slurm confirmed the drain: drained
    notices.outcome(drain(bad), ActionOutcome(True, "done", "drained in Slurm"))
    assert said(notices) == {"nid002": ("drained", "excluded", "vetd: check-failed: gpu_health", False)}
    # the partition's breaker opened (a batch's changes name it): every node hears of it
    state.breakers["gpu"] = Breaker(True, 5.0, "too many")
    notices.everything()
    assert {node: told[3] for node, told in said(notices).items()} == {"nid001": True, "nid002": True}
    # back in service: no longer drained, whatever comes next
    bad.state, bad.reason = "healthy", ""
    notices.changed([("alps", "nid002")])
    assert said(notices) == {"nid002": ("in_service", "healthy", "", True)}
    assert notices.drained == set()


def test_without_a_scheduler_nothing_is_ever_drained_and_a_restart_knows_what_was() -> None:
    bad = NodeRow("alps", "nid002", state="excluded", reason="vetd: x")
    state, fleet = fleet_of(bad)
    notices = ServiceNotices("ctl", state, fleet, scheduler="none")
    notices.outcome(drain(bad), ActionOutcome(True, "done", "recorded in vetd only"))
    assert said(notices)["nid002"][0] == "excluded"
    # a restarted controller: a drain still pending is not confirmed; one no longer pending was
    healing = NodeRow("alps", "nid003", state="healing", reason="vetd: y")
    state, fleet = fleet_of(bad, healing)
    restarted = ServiceNotices("ctl2", state, fleet, scheduler="slurm")
    restarted.restore([("alps", "nid002")])
    assert {node: told[0] for node, told in said(restarted).items()} == {"nid002": "excluded", "nid003": "drained"}
