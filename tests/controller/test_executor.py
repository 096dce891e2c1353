"""The executor finishes what it decides: drains retried until the real slurmctld has them, across a
controller restart, visible in `vetd node`, and never stuck behind alerts (issue 12, findings 4 and 6)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controller.test_end_to_end import RULES, AlertReceiver, receiver, start_controller, vetd_json  # noqa: F401
from tests.support.procs import publish_raw, run_vetd
from tests.support.services import Mosquitto, Slurm, flaky_scontrol
from tests.support.wait import wait_for
from vetd.controller import actions
from vetd.controller.config import ControllerConfig, SchedulerSection, StoreSection
from vetd.controller.service import Controller
from vetd.core import protocol
from vetd.core.configfile import Duration
from vetd.core.protocol import Result


def config(tmp_path: Path, cluster: str, scontrol: Path, *, alert_url: str = "", extra: str = "",
           rules: str = str(RULES)) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(
        f'cluster = "{cluster}"\nclient_id = "vetd-controller-{cluster}"\nrules = ["{rules}"]\n'
        f'[store]\npath = "state/controller.db"\n'
        f'[scheduler]\nbackend = "slurm"\nscontrol = "{scontrol / "scontrol"}"\n'
        f'retry_base = "200ms"\nretry_max = "1s"\n{extra}'
        f'[alerts]\nurls = [{json.dumps(alert_url) if alert_url else ""}]\n'
    )
    return path


def drain(node: str, config_path: Path) -> None:
    done = run_vetd("drain", node, "--reason", "bad fan", "--config", str(config_path))
    assert done.returncode == 0, done.stderr


def drained(slurm: Slurm, node: str) -> bool:
    return "drain" in slurm.states().get(node, "")


def test_a_failed_drain_is_retried_until_slurm_confirms_it(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    scontrol = flaky_scontrol(tmp_path, fail_first=3, lose_first_drain=True)
    path = config(tmp_path, cluster_name, scontrol)
    controller = start_controller(tmp_path, path, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    try:
        drain("nid003", path)
        wait_for(lambda: drained(slurm, "nid003"), 30, "nid003 drained in the real slurmctld")
        assert slurm.show("nid003")["Reason"].startswith("vetd: operator ")
        (audit,) = wait_for(lambda: [a for a in vetd_json("node", "nid003", "--config", str(path), "--json")["audit"]
                                     if a["action"] == "drain" and a["outcome"] == "done"], 10, "the drain audited done")
        assert "(after 5 attempts)" in audit["detail"], audit  # 3 failed, 1 lost, 1 confirmed
        calls = (scontrol / "argv").read_text().splitlines()
        assert all(call.startswith("-- ") or call.startswith("-o -- ") for call in calls), calls
    finally:
        controller.stop()
        slurm.resume("nid003")


def test_a_pending_drain_survives_a_controller_restart(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    scontrol = flaky_scontrol(tmp_path)
    (scontrol / "down").touch()
    path = config(tmp_path, cluster_name, scontrol)
    controller = start_controller(tmp_path, path, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    second = None
    try:
        drain("nid004", path)
        wait_for(lambda: (vetd_json("node", "nid004", "--config", str(path), "--json")["pending"]
                          or {}).get("attempts", 0) >= 2, 30, "two failed attempts")
        controller.kill()  # no goodbye: what was pending is only in the database
        (scontrol / "down").unlink()
        assert not drained(slurm, "nid004")
        (tmp_path / "again").mkdir()
        second = start_controller(tmp_path / "again", path, mosquitto, {"SLURM_CONF": str(slurm.conf)})
        wait_for(lambda: drained(slurm, "nid004"), 30, "nid004 drained after the restart")
        assert '"drain_resumed_after_restart"' in second.output
        wait_for(lambda: vetd_json("node", "nid004", "--config", str(path), "--json")["pending"] is None, 10,
                 "nothing pending any more")
    finally:
        controller.kill()
        if second is not None:
            second.stop()
        slurm.resume("nid004")


def test_vetd_node_shows_a_pending_drain_and_an_alert_says_it_keeps_failing(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str, receiver: AlertReceiver  # noqa: F811
) -> None:
    scontrol = flaky_scontrol(tmp_path)
    (scontrol / "down").touch()
    path = config(tmp_path, cluster_name, scontrol, alert_url=receiver.url, extra="alert_after_attempts = 2\n")
    controller = start_controller(tmp_path, path, mosquitto, {"SLURM_CONF": str(slurm.conf)})

    def failing() -> list[dict[str, object]]:
        return [a for a in receiver.alerts if a["labels"]["alertname"] == "vetd_scheduler_action_failing"]

    try:
        drain("nid002", path)
        text = wait_for(lambda: (out := run_vetd("node", "nid002", "--config", str(path)).stdout)
                        and re.search(r"drain pending: ([2-9]|\d\d+) attempts", out) and out, 30,
                        "two failed attempts shown")
        assert "last error: scontrol show node: slurm_load_node error: Unable to contact slurm controller" in text
        assert "next try in " in text
        pending = vetd_json("node", "nid002", "--config", str(path), "--json")["pending"]
        assert pending["action"] == "drain" and pending["attempts"] >= 2 and "Unable to contact" in \
            pending["last_error"]
        (alert, *_) = wait_for(failing, 15, "vetd_scheduler_action_failing")
        assert alert["labels"]["node"] == "nid002" and alert["labels"]["action"] == "drain"
        assert alert["labels"]["severity"] == "critical" and "endsAt" not in alert
        assert not drained(slurm, "nid002")

        (scontrol / "down").unlink()
        wait_for(lambda: drained(slurm, "nid002"), 30, "nid002 drained once slurmctld answers")
        wait_for(lambda: "pending" not in run_vetd("node", "nid002", "--config", str(path)).stdout, 10,
                 "the pending drain gone from vetd node")
        wait_for(lambda: any("endsAt" in a for a in failing()), 15, "the alert resolved")
    finally:
        controller.stop()
        slurm.resume("nid002")


class Blackhole:
    """An Alertmanager stand-in that accepts connections and never answers."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/api/v2/alerts"
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        """Refuse new connections and reset the held ones, so no client waits out its timeout."""
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(5)
        for connection in self.connections:
            connection.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    server = Blackhole()
    yield server
    server.close()


@pytest.mark.xdist_group("timing")  # bounds a duration: beside no other such test (tests/conftest.py)
def test_an_scontrol_that_hangs_is_a_failed_attempt_and_holds_up_no_other_drain(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    """slurmctld accepts nid002's calls and never answers: each is killed at [scheduler] timeout and
    counts as a failed attempt, retried; nid003's drain meanwhile goes through at once."""
    scontrol = flaky_scontrol(tmp_path)
    (scontrol / "hang").write_text("nid002")
    path = config(tmp_path, cluster_name, scontrol, extra='timeout = "8s"\n')
    controller = start_controller(tmp_path, path, mosquitto, {"SLURM_CONF": str(slurm.conf)})

    def pending() -> dict[str, object]:
        return vetd_json("node", "nid002", "--config", str(path), "--json")["pending"] or {}

    try:
        drain("nid002", path)
        wait_for(lambda: "nid002" in (scontrol / "argv").read_text(), 10, "nid002's first scontrol call hanging")
        hung = time.monotonic()
        drain("nid003", path)
        wait_for(lambda: drained(slurm, "nid003"), 20, "nid003 drained")
        assert time.monotonic() - hung < 5, "nid003's drain waited behind nid002's hung scontrol"
        assert not drained(slurm, "nid002")
        failed = wait_for(lambda: (p := pending()).get("attempts", 0) >= 1 and p, 20, "a timed-out attempt")
        assert "did not finish within 8s" in str(failed["last_error"]), failed
        (scontrol / "hang").unlink()
        wait_for(lambda: drained(slurm, "nid002"), 30, "nid002 drained once slurmctld answers")
        (audit,) = wait_for(lambda: [a for a in vetd_json("node", "nid002", "--config", str(path), "--json")["audit"]
                                     if a["action"] == "drain" and a["outcome"] == "done"], 10, "the drain audited")
        assert re.search(r"\(after [2-9] attempts\)", audit["detail"]), audit
    finally:
        controller.stop()
        slurm.resume("nid002"), slurm.resume("nid003")


REBOOT_LADDER = """\
rules:
  - name: host-failed
    when: result.check == "host_env" && result.status == "fail"
    actions: [drain, heal]
    heal: [reboot]
"""


@pytest.mark.parametrize(("switch", "why"), [
    ("refuse", "reboot (step 1/1): scontrol reboot: scontrol_reboot_nodes error: Invalid node state specified"),
    ("hang", "reboot (step 1/1): scontrol reboot: "),
])
def test_a_reboot_that_slurm_refuses_or_never_answers_fails_its_healing_step(
    tmp_path: Path, slurm: Slurm, monkeypatch: pytest.MonkeyPatch, switch: str, why: str
) -> None:
    """The ladder's reboot step through a failing or hanging ``scontrol reboot``: the step fails with
    scontrol's reason in the audit, the ladder moves on (here: exhausted, so the node is failed)."""
    scontrol = flaky_scontrol(tmp_path)
    (scontrol / switch).write_text("reboot")
    rules = tmp_path / "rules.yaml"
    rules.write_text(REBOOT_LADDER)
    controller = in_process(tmp_path, scontrol, slurm, monkeypatch, rules=[str(rules)], timeout=1.0)
    store = controller.store
    now = time.time()
    try:
        for message in (protocol.State(cluster="alps", node="nid004", session="s", seq=0, ts=now, online=True,
                                       started=now),
                        Result(cluster="alps", node="nid004", session="s", seq=1, ts=now, check="host_env",
                               status="fail", message="LD_PRELOAD set")):
            controller.executor.enqueue(controller.process([(protocol.topic_for(message), protocol.encode(message))]))

        async def ladder() -> None:
            for _ in range(3):  # the drain; the reboot (decided by a tick); the next tick: the ladder exhausted
                await controller.executor.carry_out_queued()
                controller.heal_tick()

        asyncio.run(ladder())
        trail = list(reversed(store.audit_log("alps", "nid004")))
        steps = [(a["action"], a["outcome"]) for a in trail if a["action"] != "rule_fired"]
        assert steps == [("drain", "done"), ("heal_start", ""), ("heal_command", "failed"), ("heal_step", "failed"),
                         ("mark_failed", "failed")], trail
        (step,) = [a for a in trail if a["action"] == "heal_step"]
        assert step["detail"].startswith(why), step
        if switch == "hang":
            assert "did not finish within 1s" in step["detail"], step
        assert controller.engine.node_state("alps", "nid004") == "failed"
        assert "reboot" in (scontrol / "argv").read_text()
    finally:
        slurm.resume("nid004")


@pytest.mark.xdist_group("timing")  # bounds a duration: beside no other such test (tests/conftest.py)
def test_alerts_to_an_alertmanager_that_never_answers_do_not_delay_a_drain(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str, blackhole: Blackhole
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: gpu-warn\n    when: result.status == 'warn'\n    actions: [alert]\n")
    scontrol = flaky_scontrol(tmp_path)
    path = config(tmp_path, cluster_name, scontrol, alert_url=blackhole.url, rules=str(rules))
    path.write_text(path.read_text() + 'timeout = "60s"\n')  # [alerts] comes last
    controller = start_controller(tmp_path, path, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    try:
        for gpu in range(16):  # sixteen alerts, each a POST that will hang for a minute
            message = Result(cluster=cluster_name, node="nid001", session="s", seq=gpu + 1, ts=time.time(),
                             check="gpu_health", entity=f"gpu{gpu}", status="warn", message="hot")
            publish_raw(mosquitto.port, protocol.topic_for(message), protocol.encode(message))
        wait_for(lambda: len(blackhole.connections) >= 4, 20, "alert deliveries hanging")
        drain("nid003", path)
        decided = time.monotonic()
        wait_for(lambda: drained(slurm, "nid003"), 20, "nid003 drained")
        assert time.monotonic() - decided < 3, "the drain waited behind the alerts"
    finally:
        blackhole.close()
        controller.stop()
        slurm.resume("nid003")


def in_process(tmp_path: Path, scontrol: Path, slurm: Slurm, monkeypatch: pytest.MonkeyPatch,
               rules: list[str] | None = None, timeout: float = 30.0) -> Controller:
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    return Controller(ControllerConfig(
        cluster="alps", allow_unsigned_commands=True, store=StoreSection(path=str(tmp_path / "c.db")),
        rules=rules or [],
        scheduler=SchedulerSection(backend="slurm", scontrol=str(scontrol / "scontrol"), timeout=Duration(timeout),
                                   retry_base=Duration(0.05), retry_max=Duration(0.1))))


def test_a_resume_after_a_pending_drain_cancels_the_drain(
    tmp_path: Path, slurm: Slurm, monkeypatch: pytest.MonkeyPatch
) -> None:
    scontrol = flaky_scontrol(tmp_path)
    (scontrol / "down").touch()
    controller = in_process(tmp_path, scontrol, slurm, monkeypatch)
    store, executor = controller.store, controller.executor

    async def scenario() -> None:
        store.submit("ops", "drain", [("alps", "nid002")], "bad fan")
        controller.handle_requests()
        await executor.carry_out_queued()
        (pending,) = store.pending_actions()
        assert (pending.action, pending.attempts) == ("drain", 1)
        store.submit("ops", "resume", [("alps", "nid002")])
        controller.handle_requests()
        (pending,) = store.pending_actions()
        assert (pending.action, pending.attempts) == ("resume", 0)
        (scontrol / "down").unlink()
        await executor.carry_out_queued()

    asyncio.run(scenario())
    outcomes = [(a["action"], a["outcome"]) for a in reversed(store.audit_log("alps", "nid002"))]
    assert outcomes == [("drain", "superseded"), ("resume", "skipped")]
    assert store.pending_actions() == [] and not drained(slurm, "nid002")
    assert "DRAIN" not in (scontrol / "argv").read_text()  # the cancelled drain never reached Slurm


@pytest.mark.parametrize("name", ["-o", "--help", "nid001 nid002"])
def test_scontrol_never_sees_a_node_name_as_an_option(tmp_path: Path, slurm: Slurm, name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    scontrol = flaky_scontrol(tmp_path)
    backend = actions.Slurm(str(scontrol / "scontrol"))
    for outcome in (asyncio.run(backend.drain(name, "vetd: x")), asyncio.run(backend.resume(name)),
                    asyncio.run(backend.reboot(name, "vetd: x"))):
        assert outcome.outcome == "refused" and "not a valid node name" in outcome.detail
    assert not (scontrol / "argv").exists()
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    assert asyncio.run(backend.show("nid001"))["NodeName"] == "nid001"  # names after --, options before
    assert (scontrol / "argv").read_text() == "-o -- show node nid001\n"
