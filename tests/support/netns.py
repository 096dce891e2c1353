"""Several nodes' network on one machine: a network namespace per node, veth pairs to a bridge, ``tc``.

Each node ``nid001``… gets its own namespace (``vetd-TAG-nid001``) with
``eth0`` (one end of a veth pair whose other end is on the bridge ``vbTAG``),
its own address in a private /24 (the bridge has ``.254`` on the host, so
processes outside, slurmctld for one, reach the nodes) and
``/etc/netns/NAMESPACE/hosts`` naming every node, which ``ip netns exec``
mounts over ``/etc/hosts``: node names resolve through the system resolver,
as on a cluster. Traffic between nodes crosses two veth pairs and the
bridge, through the kernel's real TCP stack, and ``tc`` on a node's ``eth0``
shapes what it sends (:meth:`NetNodes.throttle`: ``tbf``) or only what it
sends to one peer (:meth:`NetNodes.throttle_link`: ``htb`` and a ``u32``
filter on the peer's address; ``netem`` and ``prio`` are missing from some
kernels, this machine's included).

Needs root (CAP_NET_ADMIN) and iproute2. :meth:`NetNodes.stop` removes the
namespaces, the bridge and the hosts files.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.services import _which, free_port, munged, port_open, slurm_conf, slurmd_spool
from tests.support.wait import wait_for

NETNS_ETC = Path("/etc/netns")


def unavailable() -> str:
    """Why namespaced nodes cannot be built here (``""``: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [p for p in ("ip", "tc") if shutil.which(p) is None]
    return f"missing {', '.join(missing)} (iproute2)" if missing else ""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def node_nice() -> list[str]:
    """The prefix that runs a command at niceness 0, whatever this process's.

    What runs on a namespaced node (agents, ``vetd vet`` tasks, probes, iperf3, slurmd and its jobs)
    measures throughput between nodes, on the CPUs the rest of the suite shares: under parallel
    workers a good pair's 0.5 s measurement was once starved to 0.035 GB/s, below a campaign's
    slow threshold. The workers run at :data:`tests.conftest.WORKER_NICE`; the nodes come back to 0,
    as a real node has its CPUs to itself. (Not below 0: at -10 the nodes outranked the kernel's
    softirq threads that move their packets, and a throttled node's figures changed.)
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    return ["nice", "-n", str(-current)] if current > 0 else []

#: How many distinct tags (and subnets, one for each) there are: 10.192.0.0/24 to 10.255.255.0/24.
TAGS = 1 << 14


def _random_tag() -> str:
    return f"{secrets.randbelow(TAGS):04x}"


@dataclass
class NetNodes:
    """``count`` nodes ``nid001``…, each in its own network namespace on one bridge.

    Several sets may live at once, in one test run (xdist workers) or in several runs on the
    machine: each has a tag of its own, claimed by creating its bridge (``ip link add`` fails on a
    name that exists, whoever made it; then another tag is drawn), and its subnet follows from the
    tag alone, so two sets never share a namespace, an interface name or a route.
    """

    count: int
    tag: str = field(default_factory=_random_tag)
    names: list[str] = field(default_factory=list)
    _subnet: str = ""
    _built: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = [f"nid{i:03d}" for i in range(1, self.count + 1)]
        self._retag(self.tag)

    def _retag(self, tag: str) -> None:
        seed = int(tag, 16)
        assert 0 <= seed < TAGS, tag
        self.tag = tag
        self._subnet = f"10.{192 + seed // 256}.{seed % 256}"

    def namespace(self, node: str) -> str:
        return f"vetd-{self.tag}-{node}"

    def ip(self, node: str) -> str:
        return f"{self._subnet}.{self.names.index(node) + 1}"

    @property
    def bridge(self) -> str:
        return f"vb{self.tag}"

    @property
    def host_ip(self) -> str:
        """The bridge's address on the host: what a node reaches the host (slurmctld) at."""
        return f"{self._subnet}.254"

    def start(self) -> NetNodes:
        for attempt in range(20):
            done = subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], capture_output=True,
                                  text=True, check=False, timeout=30)
            if done.returncode == 0:
                break
            if "exists" not in done.stderr or attempt == 19:
                raise RuntimeError(f"ip link add {self.bridge} type bridge: {done.stderr.strip()}")
            self._retag(_random_tag())  # another set's tag (another worker's, another run's): draw again
        self._built.append("bridge")
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(f"{self.ip(n)} {n}\n" for n in self.names)
        for index, node in enumerate(self.names, 1):
            ns, outside = self.namespace(node), f"vh{self.tag}{index:02d}"
            _ip("netns", "add", ns)
            self._built.append(ns)
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts)
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(node)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def argv(self, node: str, argv: list[str]) -> list[str]:
        """``argv`` run in ``node``'s namespace (its /etc/hosts too), at niceness 0 (:func:`node_nice`)."""
        return ["ip", "netns", "exec", self.namespace(node), *node_nice(), *argv]

    def run(self, node: str, *argv: str) -> str:
        done = subprocess.run(self.argv(node, list(argv)), capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {node}: {done.stderr.strip()}")
        return done.stdout

    def throttle(self, node: str, rate: str, burst: str = "32kb") -> None:
        """Everything ``node`` sends leaves at ``rate`` (``"20mbit"``): a node with a bad NIC or cable.

        ``burst`` must hold at least a timer tick's worth of ``rate`` (1 Gbit/s: 1mb), or tbf
        lets less through than ``rate``."""
        self.run(node, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                 "burst", burst, "latency", "50ms")

    def throttle_link(self, node: str, peer: str, rate: str) -> None:
        """Only what ``node`` sends to ``peer`` is held to ``rate``: a bad path between two good nodes.

        An HTB class for the peer's address (a ``u32`` filter) beside an unlimited
        default class: ``prio`` and ``netem`` are not in every kernel, HTB is.
        """
        self.run(node, "tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10")
        self.run(node, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb",
                 "rate", "100gbit", "quantum", "200000")
        self.run(node, "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:30", "htb",
                 "rate", rate, "ceil", rate)
        self.run(node, "tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1",
                 "u32", "match", "ip", "dst", f"{self.ip(peer)}/32", "flowid", "1:30")

    def unthrottle(self, node: str) -> None:
        subprocess.run(self.argv(node, ["tc", "qdisc", "del", "dev", "eth0", "root"]), capture_output=True,
                       check=False, timeout=30)

    def stop(self) -> None:
        """Remove what :meth:`start` built. Processes still in a node's namespace are this test's (a
        slurmstepd outliving its slurmd, a task) and are killed: alive, they would keep the namespace
        and its veth pair after ``ip netns del``."""
        for built in reversed(self._built):
            if built == "bridge":
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False, timeout=30)
                continue
            pids = subprocess.run(["ip", "netns", "pids", built], capture_output=True, text=True, check=False,
                                  timeout=30).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", built], capture_output=True, check=False, timeout=30)
            shutil.rmtree(NETNS_ETC / built, ignore_errors=True)
        for index in range(1, self.count + 1):  # gone with their namespaces, unless one is still held
            subprocess.run(["ip", "link", "del", f"vh{self.tag}{index:02d}"], capture_output=True, check=False,
                           timeout=30)
        self._built.clear()


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class VetJob:
    """``vetd vet`` on every node as ``srun --ntasks-per-node=1`` would start it: one task per
    namespace, with the environment Slurm sets (``SLURM_PROCID``, ``SLURM_NTASKS``,
    ``SLURM_JOB_NODELIST``, ``SLURMD_NODENAME``, ``SLURM_JOB_ID``, ``SLURM_STEP_ID``)."""

    nodes: NetNodes
    args: list[str]
    workdir: Path
    env: dict[str, str]
    #: Nodes whose task is never started (it "never arrives").
    skip: tuple[str, ...] = ()
    #: Extra environment per node.
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    job_id: str = "4242"
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> VetJob:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes.names:
            if node not in self.skip:
                self.start_one(node)
        return self

    def start_one(self, node: str) -> None:
        """Start ``node``'s task (a skipped one, late)."""
        from tests.support.procs import vetd_argv

        env = {**self.env, "SLURM_PROCID": str(self.nodes.names.index(node)),
               "SLURM_NTASKS": str(len(self.nodes.names)),
               "SLURM_JOB_NODELIST": f"nid[001-{len(self.nodes.names):03d}]", "SLURMD_NODENAME": node,
               "SLURM_JOB_ID": self.job_id, "SLURM_STEP_ID": "0", **self.node_env.get(node, {})}
        with (self.workdir / f"{node}.out").open("wb") as out, (self.workdir / f"{node}.err").open("wb") as err:
            self.processes[node] = subprocess.Popen(self.nodes.argv(node, vetd_argv("vet", *self.args)),
                                                    stdout=out, stderr=err, env=env, cwd=self.workdir)

    def stderr(self, node: str) -> str:
        return (self.workdir / f"{node}.err").read_text(errors="replace")

    def kill(self, node: str) -> None:
        self.processes[node].kill()

    def wait(self, timeout: float = 120) -> dict[str, Finished]:
        done = {}
        for node, process in self.processes.items():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            done[node] = Finished(process.returncode, (self.workdir / f"{node}.out").read_text(errors="replace"),
                                  self.stderr(node))
        return done

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@dataclass
class SlurmOnNodes:
    """munged, slurmctld and one real slurmd per namespaced node: ``srun`` starts tasks inside the nodes.

    Unlike :class:`tests.support.services.Slurm` (one slurmd answering for
    every node on 127.0.0.1), each node here has its own slurmd at its own
    address (``NodeAddr``), slurmctld listens on the bridge's host address,
    and srun's tasks run in their node's network namespace with the
    environment Slurm sets. Each slurmd enters only the namespace's network
    (``nsenter --net``) and a private mount namespace where the node's hosts
    file is bound over ``/etc/hosts``: ``ip netns exec`` would also remount
    ``/sys``, hiding the cgroup file systems slurmd needs.
    """

    nodes: NetNodes
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: The slurmds' spools (:func:`~tests.support.services.slurmd_spool`), while the cluster runs.
    spool: Path | None = None

    @property
    def conf(self) -> Path:
        return self.workdir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> SlurmOnNodes:
        d = self.workdir
        (d / "state").mkdir(parents=True, exist_ok=True)
        self.spool = slurmd_spool(self.nodes.names)
        argv, sock = munged(d)
        self._spawn(argv)
        wait_for(sock.exists, 10, "munged socket")
        ctld_port = free_port()
        nodes = "".join(f"NodeName={n} NodeAddr={self.nodes.ip(n)} CPUs=2 RealMemory=1000 State=UNKNOWN\n"
                        for n in self.nodes.names)
        self.conf.write_text(slurm_conf(d, spool=self.spool, ctld_addr=self.nodes.host_ip, ctld_port=ctld_port,
                                        auth_info=f"socket={sock}", node_lines=nodes))
        self._spawn([_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        wait_for(lambda: port_open(ctld_port), 20, "slurmctld to listen")
        for node in self.nodes.names:
            ns = self.nodes.namespace(node)
            self._spawn(["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--propagation", "private",
                         "sh", "-c", f"mount --bind {NETNS_ETC / ns / 'hosts'} /etc/hosts && "
                         f"exec {' '.join(node_nice())} {_which('slurmd')} -D -N {node} -f {self.conf}"])
        wait_for(lambda: (s := self.states()) and set(s.values()) == {"idle"}, 60, "the slurmds to register, idle")
        return self

    def _spawn(self, argv: list[str]) -> None:
        with (self.workdir / "daemons.log").open("ab") as log:
            self.processes.append(subprocess.Popen(argv, stdout=log, stderr=log, env=self.env))

    def states(self) -> dict[str, str]:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True,
                              check=False, timeout=30)
        return dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)
            self.spool = None
