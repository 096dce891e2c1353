"""Crash scenarios with real processes, counted from the agents' sequence numbers to the store.

Shared by ``tests/test_crash.py`` (small sizes) and ``bench/crash.py`` (the
sizes of issue 13). Every scenario runs the shipped Mosquitto config and ACL
(:class:`~tests.support.services.SecureMosquitto`: TLS, a password per node),
a real ``vetd controller`` process and simulated nodes
(:mod:`tests.support.simnodes`: the agent's own transport and spool) or real
``vetd agent`` processes, breaks something with a signal, and returns a
:class:`Row`: results sent, stored, duplicates dropped, lost, stored out of
order, and how often the one failing result's rule drained its node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import REPO, VetdProcess, vetd_env
from tests.support.services import SecureMosquitto
from tests.support.simnodes import node_name
from tests.support.wait import wait_for

CLUSTER = "alps"  # the cluster SecureMosquitto installs the shipped ACL for
RULES = ("rules:\n  - name: crash-fail\n    when: result.check == 'crashtest' && result.status == 'fail'\n"
         "    actions: [drain]\n")


@dataclass
class Row:
    scenario: str
    sent: int
    stored: int
    duplicates: int
    lost: int
    out_of_order: int
    drains: int
    seconds: float
    note: str = ""
    #: How often the drain rule should have fired (once: one failing result; 0 where none is sent).
    drains_expected: int = 1
    #: What went wrong besides the counts (a process that should have kept running died); empty: nothing.
    problem: str = ""

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.out_of_order == 0 and self.stored == self.sent
                and self.drains == self.drains_expected and not self.problem)

    def line(self) -> str:
        return (f"{self.scenario:<28} {self.sent:>8} {self.stored:>8} {self.duplicates:>10} {self.lost:>5} "
                f"{self.out_of_order:>6} {self.drains:>6} {self.seconds:>7.1f}  {self.note}"
                + (f"  PROBLEM: {self.problem}" if self.problem else ""))


HEADER = (f"{'scenario':<28} {'sent':>8} {'stored':>8} {'duplicates':>10} {'lost':>5} {'unord':>6} "
          f"{'drains':>6} {'secs':>7}")


def broker_users(nodes: int) -> dict[str, str]:
    users = {"vetd-controller": "controller-secret", "test-observer": "observer-secret"}
    users.update({node_name(i): f"{node_name(i)}-secret" for i in range(nodes)})
    return users


@dataclass
class Rig:
    """One broker, one controller store, one set of simulated nodes, in ``work``."""

    work: Path
    nodes: int
    per_node: int
    store_dir: Path | None = None
    broker: SecureMosquitto = field(init=False)
    controller: VetdProcess | None = None
    sim: subprocess.Popen[bytes] | None = None
    sims: list[Path] = field(default_factory=list)
    #: (node, session) → results it made.
    expected: dict[tuple[str, str], int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.broker = SecureMosquitto(self.work / "broker", passwords=broker_users(self.nodes))
        self.broker.start()
        self.store_dir = self.store_dir or self.work / "state"
        (self.work / "rules.yaml").write_text(RULES)
        d = self.broker.workdir
        (self.work / "controller.toml").write_text(
            f'cluster = "{CLUSTER}"\nclient_id = "vetd-controller-crash"\nrules = ["{self.work / "rules.yaml"}"]\n'
            f'[store]\npath = "{self.store_dir / "controller.db"}"\n[http]\nlisten = ""\n'
            f'[auth]\nusername = "vetd-controller"\npassword_file = "{d / "vetd-controller.password"}"\n'
            f'ca_file = "{self.broker.ca}"\n')

    # -- processes ---------------------------------------------------------

    def start_controller(self) -> VetdProcess:
        n = len(list(self.work.glob("controller*.log")))
        self.controller = VetdProcess(["controller", "--config", str(self.work / "controller.toml")],
                                      self.work / f"controller{n}.log",
                                      vetd_env(VETD_BROKER=self.broker.url, VETD_LOG_LEVEL="info")).start()
        wait_for(lambda: "broker_connected" in self.controller.output if self.controller else False, 30,
                 "controller connected")
        return self.controller

    def kill_controller(self) -> None:
        assert self.controller is not None and self.controller.process is not None
        self.controller.signal(signal.SIGKILL)
        self.controller.process.wait(10)

    def start_sim(self, *, drain_only: bool = False, ack_timeout: float = 10.0) -> None:
        log = self.work / f"sim{len(self.sims)}.log"
        self.sims.append(log)
        argv = [sys.executable, "-m", "tests.support.simnodes", "--broker", self.broker.url, "--cluster", CLUSTER,
                "--nodes", str(self.nodes), "--per-node", str(self.per_node), "--state-dir",
                str(self.work / "nodes"), "--password-dir", str(self.broker.workdir), "--ca", str(self.broker.ca),
                "--ack-timeout", str(ack_timeout), *(["--drain-only"] if drain_only else [])]
        env = {**vetd_env(VETD_LOG_LEVEL="warning"), "PYTHONPATH": str(REPO)}
        self.sim = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
        produced = wait_for(lambda: self._event(log, "produced"), 120, "simulated nodes to spool their results")
        for node, session in produced["sessions"].items():
            if produced["per_node"]:
                self.expected[(node, session)] = produced["per_node"]

    def sim_delivered(self) -> bool:
        return bool(self.sims) and self._event(self.sims[-1], "delivered") is not None

    def stop_sim(self, sig: int = signal.SIGTERM) -> None:
        if self.sim is not None and self.sim.poll() is None:
            self.sim.send_signal(sig)
            try:
                self.sim.wait(30)
            except subprocess.TimeoutExpired:
                self.sim.kill()
                self.sim.wait()

    @staticmethod
    def _event(log: Path, name: str) -> dict[str, object] | None:
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{") and f'"event": "{name}"' in line:
                    return json.loads(line)  # type: ignore[no-any-return]
        return None

    def kill_broker(self, *, lose_store: bool = False) -> None:
        assert self.broker.process is not None
        self.broker.process.kill()
        self.broker.process.wait(10)
        self.broker.process = None
        if lose_store:
            with contextlib.suppress(FileNotFoundError):
                (self.broker.workdir / "mosquitto.db").unlink()
        self.broker.start()

    def close(self) -> None:
        self.stop_sim()
        if self.controller is not None:
            with contextlib.suppress(AssertionError):
                self.controller.stop(30)
        self.broker.stop()

    # -- counting ----------------------------------------------------------

    @property
    def total(self) -> int:
        return sum(self.expected.values())

    def _read(self) -> tuple[list[tuple[str, str, int]], int, int]:
        path = self.store_dir / "controller.db" if self.store_dir else None
        if path is None or not path.exists():
            return [], 0, 0
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
            rows = db.execute("SELECT node, session, seq FROM history WHERE kind='result' AND cluster=? "
                              "ORDER BY id", (CLUSTER,)).fetchall()
            duplicates = db.execute("SELECT coalesce(sum(duplicates), 0) FROM sessions").fetchone()[0]
            drains = db.execute("SELECT count(*) FROM audit WHERE action='drain'").fetchone()[0]
        return rows, int(duplicates), int(drains)

    def stored(self) -> int:
        with contextlib.suppress(sqlite3.Error):
            return len(self._read()[0])
        return 0

    def wait_stored(self, fraction: float, timeout: float) -> None:
        target = int(self.total * fraction)
        wait_for(lambda: self.stored() >= target, timeout, f"{target} of {self.total} results stored", interval=0.2)

    def finish(self, scenario: str, timeout: float, note: str = "") -> Row:
        """Wait until every result is stored and every spool acknowledged; count."""
        with contextlib.suppress(AssertionError):
            wait_for(lambda: self.stored() >= self.total and self.sim_delivered(), timeout,
                     "every result stored and acknowledged", interval=0.5)
        rows, duplicates, drains = self._read()
        seen: dict[tuple[str, str], list[int]] = {}
        for node, session, seq in rows:
            seen.setdefault((node, session), []).append(seq)
        rows = [row for row in rows if (row[0], row[1]) in self.expected]  # not a later run's own results
        lost = sum(n - len(set(seen.get(key, []))) for key, n in self.expected.items())
        out_of_order = sum(1 for seqs in seen.values() for a, b in zip(seqs, seqs[1:], strict=False) if b <= a)
        return Row(scenario, self.total, len(rows), duplicates, lost, out_of_order, drains,
                   time.monotonic() - self.started, note)


@contextlib.contextmanager
def rig(work: Path, nodes: int, per_node: int, store_dir: Path | None = None) -> Iterator[Rig]:
    r = Rig(work, nodes, per_node, store_dir)
    try:
        yield r
    finally:
        r.close()


# -- the scenarios -----------------------------------------------------------


def controller_killed(work: Path, nodes: int, per_node: int, kills: int = 3, timeout: float = 300) -> Row:
    """A backlog queued while the controller was away; SIGKILL it ``kills`` times while it drains."""
    with rig(work, nodes, per_node) as r:
        r.start_controller()
        r.controller.stop()  # type: ignore[union-attr]  # its persistent session exists: the broker queues
        r.start_sim()
        time.sleep(2)
        for k in range(kills):
            r.start_controller()
            r.wait_stored((k + 1) / (kills + 1), timeout)
            r.kill_controller()
        r.start_controller()
        return r.finish(f"controller SIGKILL x{kills}", timeout)


def broker_killed(work: Path, nodes: int, per_node: int, lose_store: bool = False, timeout: float = 300) -> Row:
    """SIGKILL the broker mid-stream and start it again (with its store, or with it deleted)."""
    with rig(work, nodes, per_node) as r:
        r.start_controller()
        r.start_sim()
        r.wait_stored(0.3, timeout)
        r.kill_broker(lose_store=lose_store)
        return r.finish("broker SIGKILL, store gone" if lose_store else "broker SIGKILL", timeout)


def agent_killed(work: Path, nodes: int, per_node: int, timeout: float = 300) -> Row:
    """SIGKILL the (simulated) agents mid-spool; restarted, they deliver the old spools."""
    with rig(work, nodes, per_node) as r:
        r.start_controller()
        r.start_sim()
        r.wait_stored(0.3, timeout)
        r.stop_sim(signal.SIGKILL)
        r.start_sim(drain_only=True)
        return r.finish("agent SIGKILL mid-spool", timeout)


def disk_full(work: Path, nodes: int, per_node: int, mount: Callable[[Path], contextlib.AbstractContextManager[Path]],
              timeout: float = 300) -> Row:
    """The controller's store on a small file system (``mount``: 16 MiB or more) filled up mid-stream,
    then freed. The controller must keep running: it stores and acknowledges nothing while full, and
    goes on by itself once there is room (nobody restarts it here).

    The file system must hold SQLite's write-ahead log as it grows before its first checkpoint
    (1000 pages, 4 MiB): on a 4 MiB one the log itself filled the disk, and freeing the filler
    freed nothing (stored 525 of 2000, then nothing)."""
    with mount(work / "ctl-disk") as disk, rig(work, nodes, per_node, store_dir=disk) as r:
        controller = r.start_controller()
        r.start_sim()
        r.wait_stored(0.2, timeout)
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as out:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
                os.fsync(out.fileno())
        full_at = r.stored()
        with contextlib.suppress(AssertionError):  # the rest of the stream may fit in the log's room
            wait_for(lambda: '"store_unwritable"' in controller.output or r.stored() >= r.total, timeout,
                     "the controller to meet the full disk", interval=0.2)
        met = '"store_unwritable"' in controller.output
        stalled_at = r.stored()
        time.sleep(3)  # full: nothing is stored, the broker and the agents keep it
        while_full = r.stored() - stalled_at
        filler.unlink()
        row = r.finish("controller disk full", timeout,
                       note=f"full at {full_at} stored, {stalled_at} when the controller met it, "
                            f"+{while_full} in 3 s full; {'freed' if met else 'never met: the rest fit'}")
        assert controller.process is not None
        if controller.process.poll() is not None:
            row.problem = f"the controller exited ({controller.process.returncode}) on the full disk"
        elif not met:
            row.problem = "the controller never met the full disk (a bigger stream or a smaller disk)"
        return row


def agent_and_broker_sigterm(work: Path, trials: int, grace: float = 3.0, timeout: float = 120) -> tuple[Row, list[float]]:
    """SIGTERM a real ``vetd agent`` and the broker at the same moment, ``trials`` times: the agent
    exits within its grace period, its spool intact (everything it made is stored in the end)."""
    exits: list[float] = []
    with rig(work, 1, 0) as r:
        r.start_controller()
        agent_conf = work / "agent.toml"
        agent_conf.write_text(
            f'[agent]\nload_plugins = ["vetd_testplugin"]\ndisable_plugins = ["host", "gpu_health"]\n'
            f'shutdown_grace = "{grace}s"\n[agent.auth]\nusername = "{node_name(0)}"\n'
            f'password_file = "{r.broker.workdir / (node_name(0) + ".password")}"\nca_file = "{r.broker.ca}"\n'
            '[plugins.testplugin]\ninterval = "100ms"\nonly = ["steady"]\n')
        env = vetd_env(VETD_BROKER=r.broker.url, VETD_CLUSTER=CLUSTER, VETD_NODE=node_name(0),
                       VETD_STATE_DIR=str(work / "agent-state"), VETD_LOG_LEVEL="info")
        for trial in range(trials):
            agent = VetdProcess(["agent", "--config", str(agent_conf)], work / f"agent{trial}.log", env).start()
            wait_for(lambda: '"broker_connected"' in agent.output, 30, "agent connected")  # noqa: B023
            time.sleep(1.0)
            assert agent.process is not None and r.broker.process is not None
            agent.signal(signal.SIGTERM)
            r.broker.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            try:
                agent.process.wait(grace + 10)
            except subprocess.TimeoutExpired:
                agent.kill()
            exits.append(time.monotonic() - started)
            r.broker.process.wait(10)
            r.broker.process = None
            stopped = next(json.loads(line) for line in agent.output.splitlines() if '"agent_stopped"' in line)
            r.expected[(node_name(0), stopped["session"])] = stopped["last_seq"]
            r.broker.start()
        # one last run, left alone, delivers what the stopped ones left in the spool
        last = VetdProcess(["agent", "--config", str(agent_conf)], work / "agent-last.log", env).start()
        with contextlib.suppress(AssertionError):
            wait_for(lambda: r.stored() >= r.total, timeout, "the spools of every trial delivered", interval=0.5)
        last.stop(30)
        row = r.finish(f"agent+broker SIGTERM x{trials}", 1,
                       note=f"agent exit s max {max(exits):.2f} (grace {grace:g})")
        row.drains_expected = 0  # no failing result in this scenario: nothing to drain
        return row, exits
