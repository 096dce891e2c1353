"""Controller configuration (``/etc/vetd/controller.toml``).

Relative paths (rule files, the database) are relative to the config file's
folder. ``VETD_BROKER`` overrides ``broker``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import msgspec

from vetd.core.configfile import ConfigError, Duration, convert, read_toml, where
from vetd.core.mqtt import BrokerAuth, parse_broker
from vetd.core.protocol import valid_name


class StoreSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The SQLite database (WAL) of fleet state, history and the audit log.
    path: str = "/var/lib/vetd/controller.db"
    #: History (by arrival), audit and operator requests older than this are deleted, a bounded
    #: number of rows a minute (drains not yet carried out and pending requests stay). At least
    #: ``[repeat] window``, which counts exclusions in the audit log. 0: keep everything.
    keep: Duration = Duration(30 * 86400.0)


class SchedulerSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: ``slurm`` drains and resumes through scontrol; ``none`` records exclusions
    #: in vetd only (``vetd excluded`` prints them for ``srun --exclude``); a
    #: plugin may add others (``vetd_scheduler_backends``).
    backend: str = "none"
    #: The scontrol executable (name on PATH or absolute path); it honours SLURM_CONF.
    scontrol: str = "scontrol"
    #: Deadline of one scontrol call.
    timeout: Duration = Duration(30.0)
    #: A drain or resume that fails (or that Slurm does not show once done) is tried again,
    #: across controller restarts, until Slurm confirms it, after a random wait (full jitter) of
    #: up to retry_base, doubling with each attempt up to retry_max (0 < retry_base <= retry_max).
    retry_base: Duration = Duration(1.0)
    retry_max: Duration = Duration(300.0)
    #: Alert (``vetd_scheduler_action_failing``) once a drain or resume has failed this many
    #: attempts, or has been pending for alert_after (more than 0), whichever comes first.
    alert_after_attempts: Annotated[int, msgspec.Meta(ge=1)] = 5
    alert_after: Duration = Duration(600.0)


class AlertsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Full URLs that receive Alertmanager API v2 alert lists, e.g.
    #: ``http://alertmanager:9093/api/v2/alerts`` or a webhook receiver.
    urls: list[str] = []
    #: Deadline of one POST to a receiver.
    timeout: Duration = Duration(10.0)
    #: Firing alerts are sent again this often (Alertmanager resolves alerts
    #: that are not re-sent within its resolve_timeout, 5 min by default).
    resend_interval: Duration = Duration(60.0)
    #: Alerts from events (instants) end by themselves after this long.
    event_alert_for: Duration = Duration(3600.0)
    #: A node whose agent has been offline (its Last Will, or a death) this long becomes an
    #: ``agent_offline`` event for the rules (the shipped rule ``agent-offline`` alerts on it);
    #: the agent's next birth is an ``agent_online`` event. 0: never.
    agent_offline_after: Duration = Duration(600.0)


#: A share of something, 0 to 1.
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class BreakerSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Stop excluding when a partition would lose too much of itself at once.

    A drain is allowed while the partition's nodes excluded by vetd stay within
    ``max(always_allow, max_fraction × partition size)`` and, if ``max_drains``
    is set, fewer than that many drains happened in ``window``. Beyond that the
    breaker opens: vetd records "would have drained", alerts, and drains
    nothing more in that partition until ``vetd breaker reset``.
    """

    #: Share of a partition vetd may have excluded at once.
    max_fraction: Fraction = 0.10
    #: Nodes any partition may lose, however small.
    always_allow: NonNegative = 1
    #: 0: no limit on the count of drains in ``window``.
    max_drains: NonNegative = 0
    #: The window ``max_drains`` counts in.
    window: Duration = Duration(3600.0)


class RepeatSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A node excluded ``count`` times within ``window`` is ``failed``: a person must look."""

    #: Exclusions by rules within ``window`` that make a node ``failed``.
    count: Annotated[int, msgspec.Meta(ge=1)] = 3
    window: Duration = Duration(7 * 86400.0)


class HealingSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Re-vetting after each healing step; all pass → the node is resumed.
    probation_profile: str = "prolog"
    #: How long a node may take to answer a command (a GPU reset, a service restart, a re-vet).
    reply_timeout: Duration = Duration(600.0)
    #: How long a rebooted node may take to come back (a new agent session).
    reboot_timeout: Duration = Duration(1800.0)
    #: The profile a rule's ``diagnose`` action asks a node in service to run now (not drained:
    #: its checks leave GPUs with compute processes alone). The agent must allow ``diagnose``.
    diagnose_profile: str = "full"


class HistorySection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What happened to each node (incidents, remediations, reboots, drains…), kept for
    ``history`` in rules (``history.gpu.incidents("24h", "xid_31")``): in memory and in the
    database, bounded by both keys."""

    #: Records older than this are forgotten: the longest window a rule may count in.
    keep: Duration = Duration(30 * 86400.0)
    #: Records of each kind (incidents, remediations, reboots…) kept per node, the newest: a flood of
    #: one kind never pushes out another. 10,000 nodes with 100 incidents each: about 120 MiB.
    per_kind: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100


class LimitsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A node that floods (a bug, or worse) cannot starve the others: beyond
    its rate (token bucket), its messages are dropped unread and counted.
    Agents pace their own catch-up below this (``[agent] max_publish_rate``)."""

    #: Messages per second one node may send, on average.
    per_node_rate: Annotated[float, msgspec.Meta(gt=0.0)] = 2000.0
    #: Messages one node may send at once before its rate applies.
    per_node_burst: Annotated[float, msgspec.Meta(gt=0.0)] = 20000.0
    #: Entities (``gpu3``, a NIC…) one node may report on. Beyond it, results and events about a
    #: new entity are kept under the entity ``overflow`` (counted ``entity_limit``): rules still
    #: see their status, so a failing one still drains the node, but as one subject.
    entities_per_node: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 256
    #: Check and event names one node may report. Beyond it, results and events with a new name
    #: are dropped (counted ``check_limit`` and logged): rules cannot see a check they cannot name.
    checks_per_node: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 256


class JobsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Jobs as the agents announce them on each node (``vetd slurm prolog``/``epilog``, or any
    tool on the control socket): ``vetd job``, ``vetd jobs`` and rules that read ``job``."""

    #: Job states (as the epilog reports them; any case) that count as a failure. A job that
    #: ended with no state counts as failed when its exit code is not 0.
    failed_states: list[str] = msgspec.field(default_factory=lambda: ["FAILED", "NODE_FAIL", "BOOT_FAIL"])
    #: Once one of a job's nodes reported the job's end, the others have this long to report
    #: theirs; then the job is decided on with what is known (rules that read `job` see it).
    settle: Duration = Duration(300.0)
    #: A job with no news for this long (its end never reported) is closed as lost; no rule sees it.
    lost_after: Duration = Duration(7 * 86400.0)
    #: Jobs kept open (running, or waiting for their nodes' ends) at once, in memory; beyond it the
    #: one with the oldest news is closed as lost. Ended jobs stay in the database for [store] keep.
    max_open: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000


class CampaignsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Campaigns: the controller measures bandwidth between idle nodes in pairs, as ``vetd vet`` does
    in a job, through signed ``vet`` commands to their agents (whose ``[commands] allow`` must list
    ``vet``), and stores one ``fabric_pairs`` result per node for the rules. ``vetd vet NODES`` runs
    one now; ``interval`` runs them on their own. A node with a job (Slurm not idle, or a job its
    agent announced and has not ended) or out of service in vetd is never in a campaign."""

    #: How often a campaign runs on its own, on the idle nodes of ``nodes``; 0: only when an
    #: operator asks (``vetd vet NODES``).
    interval: Duration = Duration(0.0)
    #: The nodes scheduled campaigns vet, a hostlist (``nid[001-128]``); empty: every node vetd knows.
    nodes: str = ""
    #: Most nodes in one scheduled campaign: those a campaign vetted longest ago come first.
    max_nodes: Annotated[int, msgspec.Meta(ge=2, le=1024)] = 64
    #: Fewest idle nodes a scheduled campaign runs on (otherwise it waits for the next interval). A
    #: node is only blamed when a partner of its was fast with someone else: 3 at least.
    min_nodes: Annotated[int, msgspec.Meta(ge=3, le=1024)] = 4
    #: The pair test: ``auto`` (``nccl_pairs`` where every node can run it, else ``tcp_pairs``),
    #: ``tcp_pairs``, ``nccl_pairs``, or one a plugin on the nodes provides.
    test: str = "auto"
    #: How long each direction of each pair is measured (a round lasts about this long).
    seconds: Duration = Duration(3.0)
    #: Rounds of pairs: 3 gives every node two ring neighbours and a node across the ring as partners.
    rounds: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 3
    #: The barrier: an agent that has not joined this long after the campaign started is absent.
    deadline: Duration = Duration(30.0)
    #: A pair below this share of the campaign's median is slow.
    slow_fraction: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.5
    #: A pair below this (decimal GB/s) is slow too; 0: no floor.
    min_gbps: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0


class HttpSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The API and ``/metrics`` (uvicorn + Starlette). The limits bound what one
    client, however hostile, can take from the controller: memory for a request,
    descriptors for connections, time."""

    #: ``host:port``; the default answers this host only. Empty: no HTTP at all.
    listen: str = "127.0.0.1:9464"
    #: A file holding the bearer token for state changes; without it, none over HTTP.
    token_file: str = ""
    #: KiB of a request line and headers together; a longer head is answered
    #: 400 and the connection closed, having held at most this much.
    max_header_kib: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    #: KiB of a request body; a larger one is answered 413, from its
    #: Content-Length before any of it is read, or as soon as a chunked body
    #: passes the limit.
    max_body_kib: Annotated[int, msgspec.Meta(ge=1, le=16384)] = 64
    #: Connections open at once; one more is closed as soon as it is accepted.
    #: Keep it well below the controller's open-file limit (the systemd unit sets
    #: LimitNOFILE=65536), so clients never take the descriptors its database,
    #: broker link and scontrol need.
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100
    #: Connections the kernel queues until the controller accepts them (listen backlog).
    backlog: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 128
    #: A connection that has not sent a whole request head this long after it
    #: opened (or after its previous answer) is closed: idle and trickling clients.
    header_timeout: Duration = Duration(10.0)
    #: An idle kept-alive connection is closed after this.
    keep_alive: Duration = Duration(5.0)
    #: Reading a request's body and answering must end within this: else 408
    #: and the connection is closed.
    request_timeout: Duration = Duration(10.0)


class TelemetrySection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The agents' telemetry windows (``[plugins.telemetry]``), kept in a database of their own:
    every window of a job in full, every node's history downsampled."""

    #: Keep telemetry (false: windows are counted and dropped; /metrics shows no GPU telemetry).
    enabled: bool = True
    #: The telemetry database (SQLite, WAL); empty: beside [store] path, ``NAME.telemetry.db``.
    path: str = ""
    #: Each node's history, downsampled to node_resolution, is kept this long.
    keep_nodes: Duration = Duration(7 * 86400.0)
    #: Windows of a job (tagged with its id) are kept in full this long.
    keep_jobs: Duration = Duration(90 * 86400.0)
    #: The step of the downsampled node history (a multiple of the agents' window).
    node_resolution: Duration = Duration(300.0)
    #: A node bucket is rolled up this long after it ends; windows arriving later than that stay
    #: only if they belong to a job.
    late: Duration = Duration(60.0)
    #: /metrics shows an entity's latest window for this long after it arrived.
    current_for: Duration = Duration(60.0)


Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]


class ReportSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What ``vetd job report`` flags; every flag shows the figures it was raised on. A GPU's
    activity is its SM activity where it has GPM, else its NVML utilisation."""

    #: A GPU whose mean activity over the job is below this percent is idle.
    idle_pct: Percent = 5.0
    #: A GPU (a node) whose activity is below this share of its peers' median…
    straggler_fraction: Fraction = 0.8
    #: …in at least this share of the job's windows is a straggler.
    straggler_windows: Fraction = 0.5
    #: Device memory used at or above this percent is nearly full.
    memory_full_pct: Percent = 95.0
    #: Thermal or HW slowdown for at least this share of the job's time is flagged.
    throttle_share: Fraction = 0.1


class ControllerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: The MQTT broker (env VETD_BROKER overrides): ``mqtts://`` (TLS, 8883, as the shipped
    #: Mosquitto config listens) or ``mqtt://`` (plain, 1883).
    broker: str = "mqtts://vetd-broker:8883"
    #: The one cluster this controller owns (as the agents' ``[agent] cluster``, default ``default``);
    #: messages of any other cluster are counted (``foreign_cluster``) and dropped before any state
    #: is made. The shipped ACL gives the controller's identity one cluster (packaging/mosquitto/vetd.acl).
    cluster: str = "default"
    #: MQTT client id; with a persistent session the broker keeps what arrives
    #: while the controller is down. Run one controller per id.
    client_id: str = "vetd-controller"
    #: The master key (mode 0600, at least 32 bytes: ``openssl rand -hex 32``). Each command is
    #: signed (HMAC-SHA256) with its node's key, derived from this one (``vetd keys derive``);
    #: agents refuse anything unsigned, forged, expired or replayed. Required unless
    #: allow_unsigned_commands. Rotating it revokes every node key at once.
    command_key_file: str = ""
    #: Send commands unsigned (tests and `vetd up` demos only; env VETD_ALLOW_UNSIGNED_COMMANDS=1).
    allow_unsigned_commands: bool = False
    #: Broker credentials and TLS: the controller's identity may publish commands.
    auth: BrokerAuth = msgspec.field(default_factory=BrokerAuth)
    #: Rule files, relative to this file's folder, e.g. ``["rules.d/default.yaml"]``
    #: (``vetd rules check`` validates them; the shipped rules are in packaging/rules/).
    rules: list[str] = []
    store: StoreSection = msgspec.field(default_factory=StoreSection)
    scheduler: SchedulerSection = msgspec.field(default_factory=SchedulerSection)
    alerts: AlertsSection = msgspec.field(default_factory=AlertsSection)
    breaker: BreakerSection = msgspec.field(default_factory=BreakerSection)
    repeat: RepeatSection = msgspec.field(default_factory=RepeatSection)
    healing: HealingSection = msgspec.field(default_factory=HealingSection)
    history: HistorySection = msgspec.field(default_factory=HistorySection)
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    http: HttpSection = msgspec.field(default_factory=HttpSection)
    jobs: JobsSection = msgspec.field(default_factory=JobsSection)
    telemetry: TelemetrySection = msgspec.field(default_factory=TelemetrySection)
    report: ReportSection = msgspec.field(default_factory=ReportSection)
    campaigns: CampaignsSection = msgspec.field(default_factory=CampaignsSection)
    #: Static node labels by hostlist: ``"nid[0001-2688]" = {partition = "normal", gpu = "GH200"}``;
    #: they override what agents report.
    labels: dict[str, dict[str, str]] = {}
    #: Where this config came from (for error messages), not a TOML key.
    source: str = "<defaults>"


_TEST_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def controller_sample() -> str:
    """The whole controller config at its defaults, commented (``vetd config --sample controller``)."""
    from vetd.agent.configsample import table

    lines = [
        "# /etc/vetd/controller.toml: every key at its default (`vetd config --sample controller` writes this",
        "# file from the config structs). Every key is optional; relative paths are relative to this file.",
        "",
    ]
    lines += table("", ControllerConfig, skip=("source",))
    return "\n".join(lines) + "\n"


def load_controller_config(path: Path | str, environ: dict[str, str] | None = None) -> ControllerConfig:
    env = os.environ if environ is None else environ
    path = Path(path)
    data: dict[str, Any]
    data, text = read_toml(path)
    data.pop("source", None)
    config = convert(data, ControllerConfig, path=path, text=text)
    base = path.parent
    broker = env.get("VETD_BROKER") or config.broker
    try:
        parse_broker(broker)
    except ValueError as exc:
        raise ConfigError(f"{path}: broker: {exc}") from exc
    from ClusterShell.NodeSet import NodeSet, NodeSetException

    for hostlist in config.labels:
        try:
            NodeSet(hostlist)
        except NodeSetException as exc:
            raise ConfigError(f"{where(path, text, 'labels')}: {hostlist!r} is not a hostlist: {exc}") from exc
    try:
        NodeSet(config.campaigns.nodes)
    except NodeSetException as exc:
        raise ConfigError(f"{where(path, text, 'campaigns.nodes')}: {config.campaigns.nodes!r} is not a hostlist: "
                          f"{exc}") from exc
    if not _TEST_NAME.match(config.campaigns.test):
        raise ConfigError(f"{where(path, text, 'campaigns.test')}: {config.campaigns.test!r} is not a pair test "
                          "name (auto, tcp_pairs, nccl_pairs, a plugin's)")
    if not config.campaigns.seconds > 0:
        raise ConfigError(f"{where(path, text, 'campaigns.seconds')}: must be more than 0")
    if config.campaigns.max_nodes < config.campaigns.min_nodes:
        raise ConfigError(f"{where(path, text, 'campaigns.max_nodes')}: max_nodes ({config.campaigns.max_nodes}) "
                          f"must be at least min_nodes ({config.campaigns.min_nodes})")
    if not config.campaigns.deadline > 0:
        raise ConfigError(f"{where(path, text, 'campaigns.deadline')}: must be more than 0")
    if config.http.listen:
        host, _, port = config.http.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{where(path, text, 'http.listen')}: expected host:port, got {config.http.listen!r}")
    for key in ("header_timeout", "keep_alive", "request_timeout"):
        if not getattr(config.http, key) > 0:
            raise ConfigError(f"{where(path, text, f'http.{key}')}: must be more than 0")
    scheduler = config.scheduler
    if not 0 < scheduler.retry_base <= scheduler.retry_max:
        raise ConfigError(f"{where(path, text, 'scheduler.retry_base')}: retry_base must be more than 0 and at "
                          f"most retry_max, got {scheduler.retry_base:g}s and {scheduler.retry_max:g}s")
    if not scheduler.alert_after > 0:
        raise ConfigError(f"{where(path, text, 'scheduler.alert_after')}: must be more than 0")
    if not valid_name(config.cluster):
        raise ConfigError(f"{where(path, text, 'cluster')}: {config.cluster!r} is not a cluster name (one cluster "
                          "per controller: a letter or digit, then letters, digits, `_.-`)")
    if config.store.keep and float(config.store.keep) < float(config.repeat.window):
        raise ConfigError(f"{where(path, text, 'store.keep')}: keep ({config.store.keep}) must be at least "
                          f"[repeat] window ({config.repeat.window}): repeat offences are counted in the audit log")
    if not config.history.keep > 0:
        raise ConfigError(f"{where(path, text, 'history.keep')}: must be more than 0 (the longest window "
                          "a rule's history may count in)")
    if not config.telemetry.node_resolution >= 1.0:
        raise ConfigError(f"{where(path, text, 'telemetry.node_resolution')}: must be at least 1s")
    if env.get("VETD_ALLOW_UNSIGNED_COMMANDS") == "1":
        config = msgspec.structs.replace(config, allow_unsigned_commands=True)
    return msgspec.structs.replace(
        config,
        broker=broker,
        rules=[str(base / rule) for rule in config.rules],
        store=msgspec.structs.replace(config.store, path=str(base / config.store.path)),
        telemetry=msgspec.structs.replace(config.telemetry, path=str(base / config.telemetry.path)) if
        config.telemetry.path else config.telemetry,
        source=str(path),
    )
