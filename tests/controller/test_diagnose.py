"""The shipped ``xid31-twice-diagnose`` rule live: real Mosquitto, a real agent on a simulated GPU
node, the controller with the shipped rules; the diagnose command is signed end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.controller.test_end_to_end import RULES, start_agent, start_controller
from tests.controller.test_healing import keys
from tests.support.procs import run_vetd
from tests.support.services import Mosquitto
from tests.support.wait import wait_for


def node_view(config: Path, node: str) -> dict[str, Any]:
    done = run_vetd("node", node, "--config", str(config), "--json")
    return json.loads(done.stdout) if done.returncode == 0 else {}


def test_xid_31_twice_on_a_gpu_runs_the_full_profile_in_service(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    key, node_key = keys(tmp_path, cluster_name, "nid001")
    config = tmp_path / "controller.toml"
    config.write_text(f'cluster = "{cluster_name}"\nclient_id = "vetd-controller-{cluster_name}"\n'
                      f'rules = ["{RULES}"]\ncommand_key_file = "{key}"\n[store]\npath = "state/controller.db"\n')
    scenario = tmp_path / "xid31.yaml"
    # Two XID 31 on gpu1, more than the agent's 5 s de-duplication apart.
    scenario.write_text("gpus: 2\ntimeline:\n"
                        "  - {at: 1s, gpu: 1, xid: 31, message: MMU Fault}\n"
                        "  - {at: 8s, gpu: 1, xid: 31, message: MMU Fault}\n")
    controller = start_controller(tmp_path, config, mosquitto, {})
    agent = start_agent(tmp_path, mosquitto, cluster_name, "nid001",
                        f'[agent]\ninterval = "1h"\n[plugins.gpu_health]\nsource = "scenario"\n'
                        f'scenario = "{scenario}"\n[plugins.host]\nload_warn_per_core = 0.0\n'
                        f'[commands]\nkey_file = "{node_key}"\n')  # allow: the default (ping, revet, diagnose)
    try:
        def answered() -> list[dict[str, Any]]:
            audit = node_view(config, "nid001").get("audit", [])
            return [a for a in audit if a["action"] == "diagnose" and a["outcome"] in ("done", "failed")]

        [answer] = wait_for(answered, 60, "the node's answer to the diagnose command")
        view = node_view(config, "nid001")
        trail = [(a["action"], a["rule"], a["outcome"]) for a in reversed(view["audit"])]
        assert ("diagnose", "xid31-twice-diagnose", "sent") in trail
        assert answer["outcome"] == "done" and "checks of 'full' passed" in answer["detail"], answer
        # The full profile's results came back as results: gpu_gemm runs in prolog and full, never periodic.
        checks = {r["check_name"] for r in view["results"]}
        assert {"gpu_gemm", "gpu_memtest", "nccl_allreduce"} <= checks, checks
        kinds = [(h["kind"], h["entity"]) for h in view["node_history"]]
        assert ("diagnose", "gpu1") in kinds and kinds.count(("incident", "gpu1")) == 2, kinds
        assert view["state"] == "healthy"  # in service throughout: no drain
        assert '"event": "command_refused"' not in agent.output and "bad signature" not in agent.output
    finally:
        agent.stop(), controller.stop()
