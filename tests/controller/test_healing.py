"""Fault → exclusion → healing step → probation → resume, with real agents, Mosquitto and Slurm."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.controller.test_end_to_end import start_agent, start_controller, vetd_json
from tests.support.procs import VetdProcess, run_vetd, vetd_env
from tests.support.services import Mosquitto, Slurm
from tests.support.wait import wait_for


def setup(tmp_path: Path, cluster: str, node: str, fixer: str, ladder: str) -> tuple[Path, str, Path]:
    marker, log = tmp_path / "healthy", tmp_path / "fixer.log"
    key = tmp_path / "master.key"  # commands are signed end to end, with the node's own key
    key.write_text("f" * 64 + "\n")
    key.chmod(0o600)
    node_key = tmp_path / f"{node}.key"
    derived = run_vetd("keys", "derive", "--master", str(key), "--cluster", cluster, "--node", node,
                       "--out", str(node_key))
    assert derived.returncode == 0, derived.stderr
    rules = tmp_path / "heal.yaml"
    rules.write_text(
        "rules:\n  - name: scratch-missing\n"
        "    when: result.check == 'host_paths' && result.status == 'fail'\n"
        f"    actions: [drain, heal, alert]\n    heal: [{ladder}]\n"
    )
    config = tmp_path / "controller.toml"
    config.write_text(
        f'cluster = "{cluster}"\nclient_id = "vetd-controller-{cluster}"\nrules = ["{rules}"]\n'
        f'command_key_file = "{key}"\n'
        '[store]\npath = "state/controller.db"\n[scheduler]\nbackend = "slurm"\n'
        '[healing]\nprobation_profile = "prolog"\nreply_timeout = "20s"\n'
    )
    agent = (
        f'[agent]\ninterval = "1s"\n[plugins.host]\nrequired_paths = ["{marker}"]\nload_warn_per_core = 0.0\n'
        f'[commands]\nallow = ["ping", "revet", "restart_service"]\nservices = ["fixer"]\nkey_file = "{node_key}"\n'
        f'restart_service = ["/bin/sh", "-c", {fixer!r}]\n'.replace("'", '"')
    )
    return config, agent, log


def audit(config: Path, node: str) -> list[tuple[str, str]]:
    """The node's audit trail, oldest first ([] until the controller has seen the node)."""
    done = run_vetd("node", node, "--config", str(config), "--json")
    if done.returncode != 0:
        return []
    return [(a["action"], a["outcome"]) for a in reversed(json.loads(done.stdout)["audit"])]


def test_a_healing_step_then_probation_brings_the_node_back(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    marker, log = tmp_path / "healthy", tmp_path / "fixer.log"
    config, agent_config, _ = setup(tmp_path, cluster_name, "nid002",
                                    f"echo restarted {{service}} >> {log} && touch {marker}", "restart_service fixer")
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid002", agent_config)
    try:
        wait_for(lambda: ("healed", "done") in audit(config, "nid002"), 40, "the node healed")
        wait_for(lambda: slurm.states().get("nid002") == "idle", 20, "nid002 resumed in Slurm")
        assert log.read_text() == "restarted fixer\n"  # the step ran once
        steps = [a for a in audit(config, "nid002") if a[0] in
                 ("drain", "heal_start", "heal_command", "heal_step", "healed", "resume")]
        assert steps == [("drain", "done"), ("heal_start", ""), ("heal_command", "sent"), ("heal_step", "done"),
                         ("heal_command", "sent"), ("healed", "done"), ("resume", "done")]
        node = next(n for n in vetd_json("nodes", "--config", str(config), "--json") if n["node"] == "nid002")
        assert node["state"] == "healthy" and node["reason"] == ""
    finally:
        agent.stop(), controller.stop()
        slurm.resume("nid002")


def test_an_exhausted_ladder_leaves_the_node_failed_and_drained(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    config, agent_config, _ = setup(tmp_path, cluster_name, "nid003", "echo no luck; exit 3",
                                    "restart_service fixer, revet prolog")
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid003", agent_config)
    try:
        wait_for(lambda: ("mark_failed", "failed") in audit(config, "nid003"), 40, "the node marked failed")
        failed_steps = [a for a in audit(config, "nid003") if a == ("heal_step", "failed")]
        assert len(failed_steps) == 2
        node = next(n for n in vetd_json("nodes", "--config", str(config), "--json") if n["node"] == "nid003")
        assert node["state"] == "failed" and "healing exhausted" in node["reason"]
        assert "drain" in slurm.states()["nid003"]
        detail = vetd_json("node", "nid003", "--config", str(config), "--json")["audit"]
        assert any("exited 3: no luck" in a["detail"] for a in detail if a["action"] == "heal_step")
    finally:
        agent.stop(), controller.stop()
        slurm.resume("nid003")


def test_a_controller_restart_mid_ladder_does_not_repeat_the_step(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    marker, log = tmp_path / "healthy", tmp_path / "fixer.log"
    config, agent_config, _ = setup(tmp_path, cluster_name, "nid004",
                                    f"sleep 3; echo restarted >> {log}; touch {marker}", "restart_service fixer")
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid004", agent_config)
    try:
        wait_for(lambda: '"event": "command_sent"' in controller.output, 30, "the step's command sent")
        controller.signal(signal.SIGKILL)
        controller.process.wait(10)  # type: ignore[union-attr]
        wait_for(log.exists, 15, "the step done on the node while the controller is down")
        second = VetdProcess(["controller", "--config", str(config)], tmp_path / "controller2.log",
                             vetd_env(VETD_BROKER=mosquitto.url, SLURM_CONF=str(slurm.conf))).start()
        try:
            wait_for(lambda: ("healed", "done") in audit(config, "nid004"), 40, "healed after the restart")
            wait_for(lambda: slurm.states().get("nid004") == "idle", 20, "nid004 resumed")
        finally:
            second.stop()
        assert log.read_text() == "restarted\n"  # once, although the controller died mid-step
        assert [a for a in audit(config, "nid004") if a[0] == "heal_command"].count(("heal_command", "sent")) == 2
    finally:
        agent.stop()
        controller.kill()
        slurm.resume("nid004")


def test_a_reboot_step_waits_for_the_node_to_come_back_then_resumes_it(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    marker = tmp_path / "healthy"
    config, agent_config, _ = setup(tmp_path, cluster_name, "nid001", "exit 1", "reboot")
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid001", agent_config)
    try:
        wait_for(lambda: ("heal_command", "done") in audit(config, "nid001"), 30, "scontrol reboot issued")
        detail = vetd_json("node", "nid001", "--config", str(config), "--json")["audit"]
        assert any("reboot requested (ASAP, next state DOWN)" in a["detail"] for a in detail)
        # "the reboot": the agent goes away and comes back, healthy, with a new session
        agent.stop()
        marker.touch()
        agent = start_agent(tmp_path, mosquitto, cluster_name, "nid001", agent_config)
        wait_for(lambda: ("healed", "done") in audit(config, "nid001"), 40, "healed after the reboot")
        steps = [a for a in audit(config, "nid001") if a[0] in ("heal_step", "healed", "resume")]
        assert steps == [("heal_step", "done"), ("healed", "done"), ("resume", "done")]
        wait_for(lambda: slurm.show("nid001")["Reason"] == "", 20, "vetd's reason gone in Slurm")
    finally:
        agent.stop(), controller.stop()
        slurm.resume("nid001")
