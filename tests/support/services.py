"""Start real Mosquitto, Slurm (munged, slurmctld, slurmd) and Alertmanager for tests.

Each service runs from a temp folder on free ports and is stopped at the end;
nothing touches the machine's own /etc or system services.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.wait import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def missing(*programs: str) -> list[str]:
    return [p for p in programs if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]


def _which(program: str) -> str:
    return shutil.which(program) or f"/usr/sbin/{program}"


@dataclass
class Mosquitto:
    """A Mosquitto broker of our own on 127.0.0.1 (and on ``also``: a bridge's address, for nodes in
    network namespaces)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    also: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            "".join(f"listener {self.port} {host}\n" for host in ("127.0.0.1", *self.also))
            # As root, mosquitto drops to user "mosquitto", which cannot write
            # the persistence file in our temp dir: sessions would not survive a restart.
            + ("user root\n" if os.geteuid() == 0 else "")
            + "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "max_queued_messages 100000\n"
            # as shipped: the controller PUBACKs a batch (up to 1000) after committing it
            "max_inflight_messages 1000\n"
            "log_type error\nlog_type warning\n"
        )
        log = (self.workdir / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([_which("mosquitto"), "-c", str(conf)], stdout=log, stderr=log)
        wait_for(lambda: port_open(self.port), 10, "mosquitto to listen")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


def munged(workdir: Path) -> tuple[list[str], Path]:
    """A new munge key in ``workdir/munge`` and the command line of a munged using it; returns that and
    the socket it will listen on (``AuthInfo=socket=…`` in slurm.conf)."""
    d = workdir / "munge"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o711)
    key = d / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    sock = d / "munge.sock"
    return [_which("munged"), "--force", "--foreground", f"--key-file={key}", f"--socket={sock}",
            f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/seed"], sock


def slurmd_spool(nodes: Iterable[str]) -> Path:
    """A new folder for the slurmds' spools, one sub-folder per node, at a short path of its own.

    slurmstepd listens on a Unix socket in its node's spool (``nid002_1.4294967291``), and a socket's
    path has at most 107 bytes: under pytest's temp folder (with xdist, ``…/popen-gw3/test_…/``) it
    would not fit. The caller removes it (:func:`shutil.rmtree`) when its cluster stops."""
    spool = Path(tempfile.mkdtemp(prefix="vetd-slurmd-"))
    for node in nodes:
        (spool / node).mkdir()
    return spool


def slurm_conf(workdir: Path, *, spool: Path, ctld_addr: str, ctld_port: int, auth_info: str, node_lines: str,
               extra: str = "") -> str:
    """The slurm.conf of a test cluster whose state, pid and log files are all in ``workdir`` and the
    slurmds' spools in ``spool`` (:func:`slurmd_spool`): slurmctld at ``ctld_addr:ctld_port``,
    ``node_lines`` (``NodeName=…`` lines), ``extra`` lines (``Prolog=``…) before them, every node in
    one default partition. The cluster's name is its own (``vetd`` and random hex), as several
    clusters run at once (xdist workers, other runs)."""
    d = workdir
    return f"""\
ClusterName=vetd{secrets.token_hex(4)}
SlurmctldHost={socket.gethostname().split('.')[0]}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo={auth_info}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/linear
ReturnToService=2
RebootProgram=/bin/true
SlurmctldTimeout=10
SlurmdTimeout=300
{extra}{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    """munged + slurmctld + one slurmd answering for nid[001-004]; or, with ``daemons``, one slurmd per
    node (``slurmd -N NAME`` on a port of its own), which is what jobs that run on one node and not
    another need."""

    workdir: Path
    nodes: str = "nid[001-004]"
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: Nodes that each get a slurmd of their own (then these are the cluster's nodes, not ``nodes``).
    daemons: tuple[str, ...] = ()
    #: Scheduling weights by node (lower is used first).
    weights: dict[str, int] = field(default_factory=dict)
    #: More slurm.conf lines (Prolog=, Epilog=, SchedulerParameters=…).
    extra: str = ""
    #: AuthInfo cred_expire: also how long a requeued job waits before it may start again (Slurm: 120 s).
    cred_expire: int = 0
    #: The slurmds' spools (:func:`slurmd_spool`), while the cluster runs.
    spool: Path | None = None

    @property
    def conf(self) -> Path:
        return self.workdir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> Slurm:
        d = self.workdir
        (d / "state").mkdir(parents=True, exist_ok=True)
        self.spool = slurmd_spool(self.daemons or ("nid001",))
        argv, socket_path = munged(d)
        self._spawn("munged", argv)
        wait_for(socket_path.exists, 10, "munged socket")
        ctld_port = free_port()
        if self.daemons:
            node_lines = "".join(f"NodeName={name} NodeAddr=127.0.0.1 Port={free_port()} CPUs=2 RealMemory=1000 "
                                 f"Weight={self.weights.get(name, 1)} State=UNKNOWN\n" for name in self.daemons)
        else:
            node_lines = f"NodeName={self.nodes} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN\n"
        auth = f"socket={socket_path}" + (f",cred_expire={self.cred_expire}" if self.cred_expire else "")
        self.conf.write_text(slurm_conf(d, spool=self.spool, ctld_addr="127.0.0.1", ctld_port=ctld_port, auth_info=auth,
                                        node_lines=node_lines, extra=self.extra))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        wait_for(lambda: port_open(ctld_port), 20, "slurmctld to listen")
        for name in self.daemons or ("nid001",):
            self._spawn(f"slurmd-{name}" if self.daemons else "slurmd", [_which("slurmd"), "-D", "-N", name, "-f",
                                                                          str(self.conf)])
        wait_for(lambda: self.states() and all(s == "idle" for s in self.states().values()), 60,
                 "Slurm nodes to register and go idle")
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.out").open("ab")
        self.processes.append(subprocess.Popen(argv, stdout=log, stderr=log, env=self.env))

    def run(self, *argv: str, check: bool = True) -> str:
        done = subprocess.run(argv, check=False, env=self.env, capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def states(self) -> dict[str, str]:
        """Node → compact state (``idle``, ``drain``, ``drng``…) from ``sinfo``."""
        try:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        except subprocess.TimeoutExpired:
            return {}
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def show(self, node: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "node", "-o", node).strip()
        head, _, reason = text.partition(" Reason=")
        fields = dict(part.split("=", 1) for part in head.split() if "=" in part)
        fields["Reason"] = reason
        return fields

    def drain(self, node: str, reason: str) -> None:
        self.run("scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}")

    def resume(self, node: str) -> None:
        self.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)
            self.spool = None


def flaky_scontrol(tmp_path: Path, fail_first: int = 0, lose_first_drain: bool = False) -> Path:
    """A stand-in for a flaky slurmctld, seen through scontrol; returns its folder (``scontrol`` in it).

    The first ``fail_first`` calls, and every call while the file ``down`` exists, fail as when
    slurmctld cannot be reached; with ``lose_first_drain`` the first drain is acknowledged and not
    applied. While the file ``hang`` exists, a call whose arguments contain its text never returns
    (as against a slurmctld that accepts and never answers); while ``refuse`` exists, a call whose
    arguments contain its text fails with the error slurmctld gives. Everything else is the real
    scontrol; each call's arguments go to ``argv``.
    """
    folder = tmp_path / "scontrol"
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f"""#!/bin/sh
d={folder}
n=$(($(cat $d/calls 2>/dev/null || echo 0) + 1)); echo $n > $d/calls
echo "$*" >> $d/argv
if [ -e $d/down ] || [ $n -le {fail_first} ]; then
    echo "slurm_load_node error: Unable to contact slurm controller (connect failure)" >&2; exit 1
fi
if [ -s $d/hang ]; then case "$*" in *"$(cat $d/hang)"*) exec sleep 3600;; esac; fi
if [ -s $d/refuse ]; then case "$*" in *"$(cat $d/refuse)"*)
    echo "scontrol_reboot_nodes error: Invalid node state specified" >&2; exit 1;; esac
fi
case "$*" in *State=DRAIN*)
    if [ {int(lose_first_drain)} = 1 ] && [ ! -e $d/lost ]; then touch $d/lost; exit 0; fi;;
esac
exec {shutil.which("scontrol")} "$@"
""")
    script.chmod(0o755)
    return folder


REPO = Path(__file__).resolve().parents[2]


@dataclass
class SecureMosquitto(Mosquitto):
    """Mosquitto running packaging/mosquitto/vetd.conf and vetd.acl: TLS, passwords, ACL."""

    passwords: dict[str, str] = field(default_factory=lambda: {
        "vetd-controller": "controller-secret", "nid001": "nid001-secret", "nid002": "nid002-secret",
        "test-observer": "observer-secret"})
    #: The cluster the shipped ACL is installed for.
    cluster: str = "alps"

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.workdir / "ca.crt"

    def _certificates(self) -> None:
        d = self.workdir
        if self.ca.exists():
            return
        run = lambda *argv: subprocess.run(argv, check=True, capture_output=True)  # noqa: E731
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=vetd test CA",
            "-keyout", str(d / "ca.key"), "-out", str(self.ca))
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", str(d / "broker.key"), "-out", str(d / "broker.csr"))
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("openssl", "x509", "-req", "-in", str(d / "broker.csr"), "-CA", str(self.ca), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"), "-out", str(d / "broker.crt"))
        for user, password in self.passwords.items():
            run("mosquitto_passwd", "-b", *(["-c"] if user == "vetd-controller" else []),
                str(d / "vetd.passwd"), user, password)
            (d / f"{user}.password").write_text(password + "\n")
            (d / f"{user}.password").chmod(0o600)  # vetd refuses a secret others can read
        (d / "vetd.passwd").chmod(0o600)

    def start(self) -> SecureMosquitto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._certificates()
        text = (REPO / "packaging" / "mosquitto" / "vetd.conf").read_text()
        acl = self.workdir / "vetd.acl"  # the shipped ACL for cluster alps, installed as its header says
        acl.write_text((REPO / "packaging" / "mosquitto" / "vetd.acl").read_text().replace("CLUSTER", self.cluster)
                       # tests only: an identity that may read every cluster, to see what got through
                       + "\nuser test-observer\ntopic read vetd/v1/#\n")
        for old, new in [("/etc/mosquitto/vetd.passwd", str(self.workdir / "vetd.passwd")),
                         ("/etc/mosquitto/vetd.acl", str(acl)),
                         ("/etc/mosquitto/certs/", f"{self.workdir}/"),
                         ("/var/lib/mosquitto/", f"{self.workdir}/"),
                         ("listener 8883", f"listener {self.port} 127.0.0.1")]:
            assert old in text, old
            text = text.replace(old, new)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(("user root\n" if os.geteuid() == 0 else "") + text + "log_type error\nlog_type warning\n")
        log = (self.workdir / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([_which("mosquitto"), "-c", str(conf)], stdout=log, stderr=log)
        wait_for(lambda: port_open(self.port), 10, "secure mosquitto to listen")
        return self


@dataclass
class Alertmanager:
    """Prometheus Alertmanager (Debian ``prometheus-alertmanager``) of our own on 127.0.0.1.

    No clustering, its storage in the temp folder (kept across ``stop``/``start``, as a
    restarted Alertmanager keeps its silences and notification log), one receiver that
    sends nothing: tests read what arrived through its API v2.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alerts_url(self) -> str:
        """Where vetd posts alerts (``[alerts] urls``)."""
        return f"{self.url}/api/v2/alerts"

    def start(self) -> Alertmanager:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        conf = self.workdir / "alertmanager.yml"
        conf.write_text('route:\n  receiver: "null"\n  group_wait: 1h\nreceivers:\n  - name: "null"\n')
        log = (self.workdir / "alertmanager.log").open("ab")
        self.process = subprocess.Popen(
            [_which("prometheus-alertmanager"), f"--config.file={conf}", f"--storage.path={self.workdir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"],
            stdout=log, stderr=log)
        wait_for(self.ready, 20, "alertmanager to be ready")
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def alerts(self, *matchers: str, active: bool = True) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts``, filtered by label matchers such as ``cluster="x"``."""
        query = urllib.parse.urlencode([("filter", m) for m in matchers] + [("active", str(active).lower())])
        with urllib.request.urlopen(f"{self.alerts_url}?{query}", timeout=5) as response:
            alerts: list[dict[str, Any]] = json.load(response)
        return alerts

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
