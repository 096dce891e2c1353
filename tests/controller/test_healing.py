"""Fault → exclusion → healing step → probation → resume, with real agents, Mosquitto and Slurm."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.controller.test_end_to_end import start_agent, start_controller, vetd_json
from tests.support.procs import VetdProcess, run_vetd, vetd_env
from tests.support.services import Alertmanager, Mosquitto, Slurm
from tests.support.wait import wait_for


def keys(tmp_path: Path, cluster: str, node: str) -> tuple[Path, Path]:
    """The controller's master key and the node's key derived from it: commands are signed end to end."""
    key = tmp_path / "master.key"
    key.write_text("f" * 64 + "\n")
    key.chmod(0o600)
    node_key = tmp_path / f"{node}.key"
    derived = run_vetd("keys", "derive", "--master", str(key), "--cluster", cluster, "--node", node,
                       "--out", str(node_key))
    assert derived.returncode == 0, derived.stderr
    return key, node_key


def controller_toml(tmp_path: Path, cluster: str, key: Path, rules: str, healing: str = 'reply_timeout = "20s"\n',
                    alerts: str = "") -> Path:
    """``rules`` is the YAML of the rule file; ``healing`` the [healing] keys beside the probation profile."""
    path = tmp_path / "heal.yaml"
    path.write_text(rules)
    config = tmp_path / "controller.toml"
    config.write_text(
        f'cluster = "{cluster}"\nclient_id = "vetd-controller-{cluster}"\nrules = ["{path}"]\n'
        f'command_key_file = "{key}"\n'
        '[store]\npath = "state/controller.db"\n[scheduler]\nbackend = "slurm"\n'
        f'[healing]\nprobation_profile = "prolog"\n{healing}'
        + (f'[alerts]\nurls = ["{alerts}"]\n' if alerts else "")
    )
    return config


def setup(tmp_path: Path, cluster: str, node: str, fixer: str, ladder: str, healing: str = 'reply_timeout = "20s"\n',
          alerts: str = "") -> tuple[Path, str, Path]:
    marker, log = tmp_path / "healthy", tmp_path / "fixer.log"
    key, node_key = keys(tmp_path, cluster, node)
    config = controller_toml(tmp_path, cluster, key, (
        "rules:\n  - name: scratch-missing\n"
        "    when: result.check == 'host_paths' && result.status == 'fail'\n"
        f"    actions: [drain, heal, alert]\n    heal: [{ladder}]\n"), healing, alerts)
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


def test_a_step_that_overruns_its_timeout_fails_and_the_exhausted_ladder_alerts_node_failed(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, alertmanager: Alertmanager, cluster_name: str
) -> None:
    """The agent's restart_service hangs past [healing] reply_timeout: the step fails as timed out, the
    ladder is exhausted, the node is failed and ``vetd-node-failed`` is in the real Alertmanager; the
    command's late success changes nothing."""
    marker = tmp_path / "healthy"
    config, agent_config, _ = setup(tmp_path, cluster_name, "nid003", f"sleep 6; touch {marker}",
                                    "restart_service fixer", healing='reply_timeout = "2s"\n',
                                    alerts=alertmanager.alerts_url)
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid003", agent_config)
    try:
        wait_for(lambda: ("mark_failed", "failed") in audit(config, "nid003"), 40, "the node marked failed")
        detail = vetd_json("node", "nid003", "--config", str(config), "--json")["audit"]
        (step,) = [a for a in detail if a["action"] == "heal_step"]
        assert (step["outcome"], step["detail"]) == (
            "failed", "restart_service fixer (step 1/1): no answer from the node in time")
        assert not marker.exists()  # failed on the controller's clock, while the command still runs
        failed = wait_for(lambda: alertmanager.alerts(f'cluster="{cluster_name}"', 'alertname="vetd-node-failed"'),
                          15, "vetd-node-failed in Alertmanager")
        assert [(a["labels"]["node"], a["labels"]["severity"]) for a in failed] == [("nid003", "critical")]
        assert failed[0]["annotations"]["summary"] == "nid003 needs a person"
        assert "healing exhausted (restart_service fixer)" in failed[0]["annotations"]["description"]

        wait_for(lambda: '"event": "command_done"' in agent.output, 20, "the late answer sent")
        wait_for(lambda: any(n["node"] == "nid003" and n["online"] for n in
                             vetd_json("nodes", "--config", str(config), "--json")), 10, "the node seen")
        node = next(n for n in vetd_json("nodes", "--config", str(config), "--json") if n["node"] == "nid003")
        assert node["state"] == "failed" and "drain" in slurm.states()["nid003"]
        assert [a for a in audit(config, "nid003") if a[0] in ("healed", "resume")] == []
    finally:
        agent.stop(), controller.stop()
        slurm.resume("nid003")


def test_a_reboot_that_never_completes_times_out_and_the_ladder_moves_on(
    tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str
) -> None:
    """Slurm takes the reboot, the node never comes back (no new agent session) within reboot_timeout:
    the step fails as such and the next step (a service restart) heals the node."""
    marker, log = tmp_path / "healthy", tmp_path / "fixer.log"
    config, agent_config, _ = setup(tmp_path, cluster_name, "nid001", f"echo restarted >> {log} && touch {marker}",
                                    "reboot, restart_service fixer",
                                    healing='reply_timeout = "20s"\nreboot_timeout = "3s"\n')
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid001", agent_config)
    try:
        wait_for(lambda: ("healed", "done") in audit(config, "nid001"), 60, "healed by the second step")
        detail = vetd_json("node", "nid001", "--config", str(config), "--json")["audit"]
        steps = [(a["outcome"], a["detail"]) for a in reversed(detail) if a["action"] == "heal_step"]
        assert steps[0] == ("failed", "reboot (step 1/2): the node did not come back in time"), steps
        assert steps[1][0] == "done" and steps[1][1].startswith("restart_service")
        assert log.read_text() == "restarted\n"
        wait_for(lambda: slurm.show("nid001")["Reason"] == "", 20, "vetd's reason gone in Slurm")
    finally:
        agent.stop(), controller.stop()
        slurm.resume("nid001")


NVIDIA_SMI = """#!/bin/sh
# nvidia-smi stand-in: `nvidia-smi -r -i N` as the driver answers a reset; calls go to the log.
echo "$*" >> {log}
[ "$1" = "-r" ] || exit 2
echo "GPU 00000000:0$3:00.0 was successfully reset."
echo "All done."
"""


def test_the_gpu_reset_step_end_to_end(tmp_path: Path, mosquitto: Mosquitto, slurm: Slurm, cluster_name: str) -> None:
    """An XID 79 on gpu5 (scenario) → drain → the signed gpu_reset command → the agent's default
    ``nvidia-smi -r -i {gpu}`` (a stand-in on PATH) for that GPU → probation (prolog) → resume."""
    calls = tmp_path / "nvidia-smi.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI.format(log=calls))
    (bin_dir / "nvidia-smi").chmod(0o755)
    scenario = tmp_path / "xid.yaml"
    scenario.write_text("gpus: 8\ntimeline:\n  - {at: 2s, gpu: 5, xid: 79, message: GPU has fallen off the bus.}\n")
    key, node_key = keys(tmp_path, cluster_name, "nid002")
    config = controller_toml(tmp_path, cluster_name, key, (
        "rules:\n  - name: gpu-fatal\n"
        "    when: event.name == 'xid' && event.severity == 'critical'\n"
        "    actions: [drain, heal]\n    heal: [gpu_reset]\n"))
    agent_config = (
        f'[agent]\ninterval = "1s"\n[plugins.host]\nload_warn_per_core = 0.0\n'
        f'[plugins.gpu_health]\nsource = "scenario"\nscenario = "{scenario}"\nkmsg = false\ntelemetry = false\n'
        f'[commands]\nallow = ["ping", "revet", "gpu_reset"]\nkey_file = "{node_key}"\n'
    )
    controller = start_controller(tmp_path, config, mosquitto, {"SLURM_CONF": str(slurm.conf)})
    path = tmp_path / "nid002.toml"
    path.write_text(agent_config)
    agent = VetdProcess(["agent", "--config", str(path)], tmp_path / "nid002.log",
                        vetd_env(VETD_BROKER=mosquitto.url, VETD_CLUSTER=cluster_name, VETD_NODE="nid002",
                                 PATH=f"{bin_dir}:{os.environ['PATH']}",
                                 VETD_ALLOW_UNSIGNED_COMMANDS="0")).start()  # only signed commands run
    try:
        wait_for(lambda: ("healed", "done") in audit(config, "nid002"), 60, "the node healed")
        assert calls.read_text() == "-r -i 5\n"  # that GPU, once
        detail = vetd_json("node", "nid002", "--config", str(config), "--json")["audit"]
        (sent, _revet) = [a["detail"] for a in reversed(detail) if a["action"] == "heal_command"]
        assert sent.startswith("gpu_reset gpu=5 (id ")
        (step,) = [a["detail"] for a in detail if a["action"] == "heal_step"]
        assert step == "gpu_reset: GPU 00000000:05:00.0 was successfully reset.\nAll done.", step
        steps = [a for a in audit(config, "nid002") if a[0] in
                 ("drain", "heal_start", "heal_command", "heal_step", "healed", "resume")]
        assert steps == [("drain", "done"), ("heal_start", ""), ("heal_command", "sent"), ("heal_step", "done"),
                         ("heal_command", "sent"), ("healed", "done"), ("resume", "done")]
        wait_for(lambda: slurm.states().get("nid002") == "idle", 20, "nid002 resumed in Slurm")
    finally:
        agent.stop(), controller.stop()
        slurm.resume("nid002")
