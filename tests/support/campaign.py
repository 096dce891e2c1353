"""A fleet for controller campaigns: namespaced nodes, a real agent in each, a real controller.

Each node of :class:`~tests.support.netns.NetNodes` runs ``vetd agent`` in its own network
namespace (``ip netns exec``: its own address, its hosts file naming the others); one Mosquitto
listens on 127.0.0.1 and on the bridge's host address, where the agents reach it; the
controller runs on the host with the default rules, a master key whose derived node keys the
agents hold (every campaign command is signed end to end) and ``[campaigns]`` as given. The
agents allow ``vet`` and run no checks of their own (``host`` and the GPU plugins off), so
nothing but a campaign's verdict can drain a node.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.netns import NetNodes
from tests.support.procs import STATE_DIR, VetdProcess, run_vetd, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.core.protocol import node_key

RULES = Path(__file__).resolve().parents[2] / "packaging" / "rules" / "default.yaml"
MASTER_KEY = b"c" * 64


@dataclass
class Fleet:
    nodes: NetNodes
    workdir: Path
    #: Lines of ``[campaigns]`` in the controller's config.
    campaigns: str = 'seconds = "0.5s"\ndeadline = "10s"\n'
    #: Lines of ``[scheduler]``.
    scheduler: str = 'backend = "none"\n'
    #: The controller's environment beyond vetd's (``SLURM_CONF``).
    env: dict[str, str] = field(default_factory=dict)
    #: Lines of the agents' config beyond what every one has.
    agent_extra: str = ""
    #: The controller's HTTP API on 127.0.0.1 at this port (0: off).
    http_port: int = 0
    cluster: str = field(default_factory=lambda: f"c{uuid.uuid4().hex[:10]}")
    broker: Mosquitto | None = None
    agents: dict[str, VetdProcess] = field(default_factory=dict)
    controller: VetdProcess | None = None

    @property
    def config(self) -> Path:
        return self.workdir / "controller.toml"

    @property
    def hostlist(self) -> str:
        return f"nid[001-{len(self.nodes.names):03d}]"

    def start(self) -> Fleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        key = self.workdir / "master.key"
        key.write_bytes(MASTER_KEY + b"\n")
        key.chmod(0o600)
        self.broker = Mosquitto(self.workdir / "mosquitto", also=(self.nodes.host_ip,)).start()
        for node in self.nodes.names:
            self.start_agent(node)
        listen = f"127.0.0.1:{self.http_port}" if self.http_port else ""
        self.config.write_text(
            f'cluster = "{self.cluster}"\nclient_id = "vetd-controller-{self.cluster}"\nrules = ["{RULES}"]\n'
            f'command_key_file = "{key}"\n[store]\npath = "state/controller.db"\n[http]\nlisten = "{listen}"\n'
            f"[scheduler]\n{self.scheduler}[campaigns]\n{self.campaigns}")
        self.start_controller()
        return self

    def start_controller(self) -> VetdProcess:
        """The controller (again, after a stop or a kill), once every node's agent is online at it."""
        assert self.broker is not None
        log = self.workdir / "controller.log"
        before = log.stat().st_size if log.exists() else 0  # one log for every run: this run's lines are after
        self.controller = controller = VetdProcess(
            ["controller", "--config", str(self.config)], log,
            vetd_env(VETD_BROKER=self.broker.url, VETD_ALLOW_UNSIGNED_COMMANDS="0", **self.env)).start()
        wait_for(lambda: '"broker_connected"' in controller.output[before:], 60, "the controller on the broker")
        wait_for(lambda: {n["node"] for n in self.node_states() if n["online"]} >= set(self.nodes.names), 60,
                 "every node's agent online at the controller")
        return self.controller

    def start_agent(self, node: str, allow: tuple[str, ...] = ("ping", "vet")) -> VetdProcess:
        assert self.broker is not None
        key = self.workdir / f"{node}.key"
        key.write_bytes(node_key(MASTER_KEY, self.cluster, node) + b"\n")
        key.chmod(0o600)
        config = self.workdir / f"{node}.toml"
        config.write_text('[agent]\ndisable_plugins = ["host", "gpu_health", "gpu_compute"]\n'
                          '[plugins.tcp_pairs]\nstreams = 2\n'
                          f'[commands]\nallow = {json.dumps(list(allow))}\nkey_file = "{key}"\n{self.agent_extra}')
        agent = VetdProcess(["agent", "--config", str(config)], self.workdir / f"{node}.log",
                            vetd_env(VETD_BROKER=f"mqtt://{self.nodes.host_ip}:{self.broker.port}",
                                     VETD_CLUSTER=self.cluster, VETD_NODE=node, VETD_ALLOW_UNSIGNED_COMMANDS="0",
                                     VETD_CONTROL_SOCKET=self.socket(node)),
                            prefix=self.nodes.argv(node, [])).start()
        self.agents[node] = agent
        return agent

    def socket(self, node: str) -> str:
        return f"{STATE_DIR}/{self.cluster}-{node}.sock"

    def vetd(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """A vetd command against the controller's config (``vet NODES``, ``nodes``, ``drain``…)."""
        return run_vetd(*args, "--config", str(self.config), timeout=timeout)

    def vet(self, *args: str, nodes: str = "") -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, Any]]]:
        """``vetd vet NODES --json``: its process and the verdicts by node."""
        done = self.vetd("vet", nodes or self.hostlist, "--json", *args)
        rows = {row["node"]: row for row in map(json.loads, done.stdout.splitlines())} if done.stdout else {}
        return done, rows

    def node_states(self) -> list[dict[str, Any]]:
        done = self.vetd("nodes", "--json", timeout=60)
        return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else []

    def node(self, name: str) -> dict[str, Any]:
        done = self.vetd("node", name, "--json", timeout=60)
        return json.loads(done.stdout) if done.returncode == 0 else {}

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        for agent in self.agents.values():
            try:
                agent.stop()
            except AssertionError:
                agent.kill()
        if self.broker is not None:
            self.broker.stop()
