"""The fleet as the engine knows it: plain records kept in memory (no I/O).

:meth:`Store.load_state <vetd.controller.store.Store.load_state>` builds a
:class:`FleetState` once at start. From then on the engine reads and changes
only this model; every change is also noted in :attr:`FleetState.changes`,
which the engine hands back inside its decisions and the store persists in one
call (:meth:`Store.apply <vetd.controller.store.Store.apply>`) inside the
batch's transaction. The model is therefore always what the store holds once
that transaction commits.
"""

from __future__ import annotations

import bisect
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from vetd.core.protocol import Event, Result, State

#: The controller's own check of each node's agent: ``timeout`` once the agent has been offline
#: ``[alerts] agent_offline_after``, ``pass`` when it is back (rules see it as a result).
AGENT_CHECK = "vetd_agent"

#: (rule, cluster, node, subject)
RuleKey = tuple[str, str, str, str]
#: (cluster, node)
NodeKey = tuple[str, str]


@dataclass
class RuleState:
    """Where a rule stands for one subject: ``pending`` (waiting out ``for``),
    ``firing``, or firing with the condition cleared at ``cleared_at``
    (waiting out ``keep_firing_for``)."""

    phase: str
    since: float
    cleared_at: float | None = None


@dataclass
class Healing:
    """One node's way back: the ladder, where it stands, what it waits for.

    ``phase``: ``next`` (start step ``step``), ``step`` (its command is out),
    ``rebooting`` (waiting for a new agent session), ``probation`` (re-vetting).
    """

    cluster: str
    node: str
    rule: str
    ladder: list[str]
    step: int
    phase: str
    started: float
    command_id: str = ""
    deadline: float = 0.0
    gpu: str = "all"
    session: str = ""


@dataclass
class NodeRow:
    cluster: str
    name: str
    state: str = "healthy"
    state_since: float = 0.0
    reason: str = ""
    online: bool = False
    session: str = ""
    session_started: float = 0.0
    first_seen: float = 0.0
    last_seen: float = 0.0
    agent_version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    #: The kernel boot id of the agent's latest birth (``""``: an agent that sends none).
    boot_id: str = ""


@dataclass
class Audit:
    """One audit-log row. ``id`` is 0 until the store writes the row and gives it one,
    before the executor sees the decision that refers to it; ``evidence`` holds history ids."""

    cluster: str
    node: str
    action: str
    ts: float
    actor: str = "controller"
    rule: str = ""
    outcome: str = ""
    detail: str = ""
    evidence: list[int] = field(default_factory=list)
    id: int = 0


@dataclass
class PendingAction:
    """A drain or resume decided and not yet confirmed by the scheduler: the executor's
    retry state, one per node (a newer decision for the node replaces it)."""

    cluster: str
    node: str
    #: ``drain`` or ``resume``.
    action: str
    #: The decision's audit row, where its outcome goes.
    audit_id: int
    since: float
    reason: str = ""
    rule: str = ""
    attempts: int = 0
    last_error: str = ""
    next_try: float = 0.0


@dataclass
class Breaker:
    """A partition's circuit breaker as last set (open, or reset by an operator)."""

    open: bool
    since: float
    reason: str = ""


@dataclass
class FiringAlert:
    cluster: str
    node: str
    #: ``None``: resolved, to be forgotten.
    payload: dict[str, Any] | None
    sent: float


#: (cluster, job id)
JobKey = tuple[str, str]


@dataclass
class JobNode:
    """One node's part in a job: what it announced and what it showed while the job ran there."""

    gpus: str = ""
    #: The node's ``job_start`` and ``job_end`` times (its own clock); None: not announced.
    started: float | None = None
    ended: float | None = None
    #: The state and exit code its ``job_end`` reported (state upper case, ``""``: none).
    state: str = ""
    exit_code: int | None = None
    #: Failed results, warning/critical events and XIDs the node reported while the job ran there.
    findings: int = 0
    #: What those showed: their codes (``xid_79``), or the check's or event's name when they had none.
    codes: list[str] = field(default_factory=list)
    #: History id of the node's ``job_end`` (the evidence a decision on the job cites).
    end_event: int = 0


@dataclass
class Job:
    """A job as its nodes announced it. ``phase``: ``running`` (no node reported its end),
    ``ending`` (some did; the others have ``[jobs] settle``), ``done`` (decided), ``lost``
    (closed without an end: no news for ``[jobs] lost_after``, or room made for newer jobs)."""

    cluster: str
    id: str
    #: Earliest start and latest end its nodes reported (their clocks).
    started: float
    #: The controller's time of the latest news of the job (``lost_after``, retention).
    updated: float
    user: str = ""
    phase: str = "running"
    nodes: dict[str, JobNode] = field(default_factory=dict)
    ended: float | None = None
    #: The job's state and exit code: the first failure any node reported, else the first reported.
    state: str = ""
    exit_code: int | None = None
    failed: bool = False
    #: The controller's time of the first end reported (``settle`` counts from it).
    ending_since: float | None = None
    #: The controller's time the job was first heard of: a job id heard of again once its job was
    #: closed (Slurm requeues a job under its id) is a new run, kept beside the earlier ones.
    opened: float = 0.0


@dataclass
class Finding:
    """One failed result, warning/critical event or XID a node reported while a job ran there."""

    cluster: str
    job_id: str
    node: str
    ts: float
    kind: str
    name: str
    entity: str
    status: str
    codes: list[str]
    message: str
    history_id: int


@dataclass
class Changes:
    """What the store must persist of a set of decisions, applied in one call.

    Keyed tables hold the final value of each key (``None``: delete the row);
    audit rows keep the order they were written in.
    """

    nodes: dict[NodeKey, NodeRow] = field(default_factory=dict)
    rule_states: dict[RuleKey, RuleState | None] = field(default_factory=dict)
    rule_windows: dict[RuleKey, list[float]] = field(default_factory=dict)
    firing_alerts: dict[str, FiringAlert] = field(default_factory=dict)
    healings: dict[NodeKey, Healing | None] = field(default_factory=dict)
    breakers: dict[str, Breaker] = field(default_factory=dict)
    agent_loss: dict[NodeKey, dict[str, int]] = field(default_factory=dict)
    audit: list[Audit] = field(default_factory=list)
    #: Jobs (their own row) and their nodes' parts whose values changed, and findings to add.
    jobs: dict[JobKey, Job] = field(default_factory=dict)
    job_nodes: dict[tuple[str, str, str], JobNode] = field(default_factory=dict)
    job_findings: list[Finding] = field(default_factory=list)
    #: What happened to nodes, for ``history`` in rules: records to add, in order.
    history: list[HistoryRecord] = field(default_factory=list)

    def update(self, other: Changes) -> None:
        """Add ``other``'s changes, which come after these."""
        for name, theirs in vars(other).items():
            mine = getattr(self, name)
            if isinstance(mine, list):
                mine.extend(theirs)
            else:
                mine.update(theirs)


@dataclass
class FleetState:
    """Nodes, rule states, firing alerts, ladders, breakers and recent drains, in memory."""

    nodes: dict[NodeKey, NodeRow] = field(default_factory=dict)
    rule_states: dict[RuleKey, RuleState] = field(default_factory=dict)
    rule_windows: dict[RuleKey, list[float]] = field(default_factory=dict)
    #: Alerts of result rules still firing, re-sent until they resolve.
    firing_alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    healings: dict[NodeKey, Healing] = field(default_factory=dict)
    breakers: dict[str, Breaker] = field(default_factory=dict)
    #: The controller's own drain decisions (audit rows), for repeat offences and the
    #: breaker's drain rate; their outcome follows the executor's (:meth:`drain_carried_out`).
    drains: list[Audit] = field(default_factory=list)
    #: Nodes whose agent the controller's own check (``vetd_agent``) last found offline too long.
    agents_late: set[NodeKey] = field(default_factory=set)
    #: Jobs still open (running, or waiting for their nodes' ends); decided ones are in the store only.
    jobs: dict[JobKey, Job] = field(default_factory=dict)
    #: What happened to each node (incidents, remediations, reboots…), for ``history`` in rules.
    history: NodeHistory = field(default_factory=lambda: NodeHistory())  # noqa: PLW0108 - defined below
    #: What changed since the last :meth:`take_changes`.
    changes: Changes = field(default_factory=Changes)

    def take_changes(self) -> Changes:
        """The changes noted so far; the next ones start afresh."""
        changes, self.changes = self.changes, Changes()
        return changes

    # -- nodes -------------------------------------------------------------

    def node(self, cluster: str, name: str, now: float) -> NodeRow:
        """The node's row, created (healthy, offline) on first sight."""
        row = self.nodes.get((cluster, name))
        if row is None:
            row = self.nodes[(cluster, name)] = NodeRow(cluster, name, state_since=now, first_seen=now,
                                                         last_seen=now)
            self.changes.nodes[(cluster, name)] = row
        return row

    def save_node(self, row: NodeRow) -> None:
        self.changes.nodes[(row.cluster, row.name)] = row

    def apply_state(self, message: State, now: float) -> bool:
        """Apply a birth or death; returns False for a stale one that was ignored."""
        row = self.node(message.cluster, message.node, now)
        if message.online:
            if message.session != row.session and message.started < row.session_started:
                return False  # a retained birth older than the session we know
            row.online = True
            row.session = message.session
            row.session_started = message.started
            row.agent_version = message.agent_version
            row.labels = dict(message.labels)
            row.boot_id = message.boot_id or row.boot_id
        else:
            if message.session != row.session and message.started <= row.session_started:
                return False  # death of an older session: never overrides a newer birth
            row.online = False
            row.session = message.session
            row.session_started = max(row.session_started, message.started)
        row.last_seen = max(row.last_seen, now)
        self.save_node(row)
        return True

    def heard_from(self, message: Result | Event, now: float) -> NodeRow:
        """A result or event (duplicate or not) says the node's agent is there."""
        row = self.node(message.cluster, message.node, now)
        row.last_seen = max(row.last_seen, now)
        if not row.session:
            row.session = message.session
        if message.session == row.session:
            row.online = True
        self.save_node(row)
        return row

    def set_agent_loss(self, cluster: str, node: str, dropped: dict[str, int]) -> None:
        self.changes.agent_loss[(cluster, node)] = dict(dropped)

    # -- rule states and count windows ---------------------------------------

    def save_rule_state(self, key: RuleKey, state: RuleState | None) -> None:
        if state is None:
            self.rule_states.pop(key, None)
        else:
            self.rule_states[key] = state
        self.changes.rule_states[key] = state

    def save_rule_window(self, key: RuleKey, stamps: list[float]) -> None:
        self.rule_windows[key] = stamps
        self.changes.rule_windows[key] = stamps

    def save_firing_alert(self, key: str, cluster: str, node: str, payload: dict[str, Any] | None,
                          now: float) -> None:
        if payload is None:
            self.firing_alerts.pop(key, None)
        else:
            self.firing_alerts[key] = payload
        self.changes.firing_alerts[key] = FiringAlert(cluster, node, payload, now)

    def end_firing_alert(self, key: str, now: float) -> dict[str, Any] | None:
        """Stop re-sending one of the controller's own alerts; the payload it had (None: it was not firing)."""
        payload = self.firing_alerts.get(key)
        if payload is not None:
            labels = payload.get("labels", {})
            self.save_firing_alert(key, labels.get("cluster", ""), labels.get("node", ""), None, now)
        return payload

    # -- audit and the controller's drains ----------------------------------

    def audit(self, cluster: str, node: str, action: str, *, now: float, actor: str = "controller",
              rule: str = "", outcome: str = "", detail: str = "", evidence: list[int] | None = None) -> Audit:
        record = Audit(cluster, node, action, now, actor, rule, outcome, detail, evidence or [])
        self.changes.audit.append(record)
        if action == "drain" and actor == "controller":
            self.drains.append(record)
        return record

    def drain_carried_out(self, audit_id: int, outcome: str) -> None:
        """The executor's outcome of a drain decision (the store has it already)."""
        for record in reversed(self.drains):
            if record.id == audit_id:
                record.outcome = outcome
                return

    def exclusions_since(self, cluster: str, node: str, since: float) -> int:
        """Times rules excluded this node since ``since`` (operator drains not counted)."""
        return sum(1 for d in self.drains if d.rule and d.outcome in ("pending", "done", "skipped")
                   and d.cluster == cluster and d.node == node and d.ts >= since)

    def drains_since(self, since: float, partition_nodes: set[NodeKey]) -> int:
        """The controller's drains of these nodes since ``since`` that were (or will be) carried out."""
        return sum(1 for d in self.drains if d.ts >= since and d.outcome in ("pending", "done")
                   and (d.cluster, d.node) in partition_nodes)

    # -- history: what happened to each node, for rules ------------------------

    def remember(self, record: HistoryRecord) -> None:
        """Add to a node's history (``history`` in rules); the store keeps it too."""
        self.history.add(record)
        self.changes.history.append(record)

    # -- healing ladders and breakers -----------------------------------------

    def ladders(self) -> list[Healing]:
        """Every ladder, oldest first."""
        return sorted(self.healings.values(), key=lambda h: h.started)

    def save_healing(self, healing: Healing) -> None:
        self.healings[(healing.cluster, healing.node)] = healing
        self.changes.healings[(healing.cluster, healing.node)] = healing

    def end_healing(self, cluster: str, node: str) -> None:
        self.healings.pop((cluster, node), None)
        self.changes.healings[(cluster, node)] = None

    def breaker_open(self, partition: str) -> Breaker | None:
        breaker = self.breakers.get(partition)
        return breaker if breaker is not None and breaker.open else None

    def set_breaker(self, partition: str, open_: bool, reason: str, now: float) -> None:
        self.breakers[partition] = self.changes.breakers[partition] = Breaker(open_, now, reason)

    # -- jobs -------------------------------------------------------------------

    def save_job(self, job: Job, *nodes: str) -> None:
        """Note the job's row changed, and the parts of ``nodes``; a closed job leaves the open ones."""
        self.changes.jobs[(job.cluster, job.id)] = job
        for name in nodes:
            self.changes.job_nodes[(job.cluster, job.id, name)] = job.nodes[name]
        if job.phase in ("done", "lost"):
            self.jobs.pop((job.cluster, job.id), None)

    def add_finding(self, finding: Finding) -> None:
        self.changes.job_findings.append(finding)


# -- history: what happened to each node, as rules count it --------------------------

#: The kinds of :class:`HistoryRecord`, each counted by the ``history`` function of the same plural
#: name (``incident`` → ``history.node.incidents(window)``).
HISTORY_KINDS = ("incident", "remediation", "reboot", "session", "drain", "resume", "diagnose")


@dataclass(slots=True)
class HistoryRecord:
    """One thing that happened to a node (or one of its GPUs), kept for rules to count.

    ``kind`` is one of :data:`HISTORY_KINDS`; ``entity`` is the GPU (``gpu3``) or other
    entity it was about, ``""`` for the whole node; ``tags`` are what a rule may count it
    by (for an incident: the rules that fired, the check or event name and the codes).
    """

    cluster: str
    node: str
    ts: float
    kind: str
    entity: str = ""
    tags: tuple[str, ...] = ()


class NodeHistory:
    """Every node's history records, oldest first, in memory and bounded: at most ``per_kind``
    records of each kind per node (a flood of incidents cannot push out the node's reboots) and
    none older than ``keep`` seconds before the newest one added (``[history]`` in the
    controller config; the store prunes its table alike). Equal tag tuples are shared."""

    __slots__ = ("keep", "per_kind", "by_node", "_tags")

    #: Distinct tag tuples shared at most (codes come from nodes: a hostile one cannot grow it).
    MAX_SHARED_TAGS = 4096

    def __init__(self, keep: float = 30 * 86400.0, per_kind: int = 100) -> None:
        self.keep, self.per_kind = keep, per_kind
        self.by_node: dict[NodeKey, list[HistoryRecord]] = {}
        self._tags: dict[tuple[str, ...], tuple[str, ...]] = {}

    def add(self, record: HistoryRecord) -> None:
        record.cluster, record.node = sys.intern(record.cluster), sys.intern(record.node)
        record.kind = sys.intern(record.kind)
        record.entity = sys.intern("" if record.entity == "node" else record.entity)
        record.tags = self._shared(record.tags)
        records = self.by_node.setdefault((record.cluster, record.node), [])
        if records and record.ts < records[-1].ts:
            bisect.insort(records, record, key=lambda r: r.ts)  # a node's message from before the last record
        else:
            records.append(record)
        horizon = records[-1].ts - self.keep
        old = 0
        while old < len(records) and records[old].ts < horizon:
            old += 1
        if old:
            del records[:old]
        if sum(1 for r in records if r.kind is record.kind) > self.per_kind:
            records.remove(next(r for r in records if r.kind is record.kind))  # the oldest of its kind

    def _shared(self, tags: tuple[str, ...]) -> tuple[str, ...]:
        shared = self._tags.get(tags)
        if shared is None:
            shared = tuple(sys.intern(tag) for tag in tags)
            if len(self._tags) < self.MAX_SHARED_TAGS:
                self._tags[shared] = shared
        return shared

    def of(self, key: NodeKey) -> list[HistoryRecord]:
        """The node's records, oldest first (the list itself: do not change it)."""
        return self.by_node.get(key, [])

    def drop(self, records: list[HistoryRecord]) -> None:
        """Forget these records (work undone after a failure: :meth:`Store.reload`)."""
        gone = {id(record) for record in records}
        for key in {(r.cluster, r.node) for r in records}:
            kept = [r for r in self.by_node.get(key, []) if id(r) not in gone]
            if kept:
                self.by_node[key] = kept
            else:
                self.by_node.pop(key, None)

    def __len__(self) -> int:
        return sum(map(len, self.by_node.values()))


# -- peer metrics: the numbers fleet-relative rules compare -------------------------

#: A peer group: (cluster, partition, GPU model); nodes in one compare with each other.
PeerGroup = tuple[str, str, str]
#: Most metrics kept per check (those a rule names, first seen first).
MAX_METRICS_PER_CHECK = 16


class PeerSeries:
    """The latest value of one (check, metric) for each (node, entity) of a peer group,
    also held sorted so that a median, with any one value left out, is a bisection away."""

    __slots__ = ("by_subject", "ordered")

    def __init__(self) -> None:
        self.by_subject: dict[tuple[str, str], float] = {}
        self.ordered: list[float] = []

    def put(self, subject: tuple[str, str], value: float) -> None:
        old = self.by_subject.get(subject)
        if old == value:
            return
        if old is not None:
            del self.ordered[bisect.bisect_left(self.ordered, old)]
        self.by_subject[subject] = value
        bisect.insort(self.ordered, value)

    def drop(self, subject: tuple[str, str]) -> None:
        old = self.by_subject.pop(subject, None)
        if old is not None:
            del self.ordered[bisect.bisect_left(self.ordered, old)]

    def median_without(self, subject: tuple[str, str]) -> tuple[float | None, int]:
        """The median of the values of every subject but ``subject``, and how many there are."""
        values = self.ordered
        own = self.by_subject.get(subject)
        skip = len(values) if own is None else bisect.bisect_left(values, own)
        count = len(values) - (own is not None)
        if count == 0:
            return None, 0

        def at(k: int) -> float:  # the k-th of the values with ``skip`` left out
            return values[k if k < skip else k + 1]

        return (at((count - 1) // 2) + at(count // 2)) / 2, count


class PeerMetrics:
    """The numbers behind ``fleet.median`` and ``fleet.peers``: kept in memory only.

    Bounded: only results of checks a rule names (see
    :attr:`~vetd.controller.rules.RuleSet.fleet_metrics`), only the metrics it
    names, at most :data:`MAX_METRICS_PER_CHECK` per check, one value per
    (node, entity): nodes × entities × named (check, metric) pairs floats.
    Not persisted: after a restart the peers are counted again as results come
    in (a rule that asks for enough peers is quiet until then).
    """

    def __init__(self) -> None:
        #: group → check → metric → series
        self.groups: dict[PeerGroup, dict[str, dict[str, PeerSeries]]] = {}
        #: (cluster, node) → its group and the entities it holds values for there.
        self.held: dict[NodeKey, tuple[PeerGroup, set[str]]] = {}
        #: Every check values were kept for: ``fleet.median[check]`` is there for each, if empty.
        self.checks: set[str] = set()

    def record(self, group: PeerGroup, node: NodeKey, entity: str, check: str, metrics: dict[str, float],
               names: frozenset[str]) -> None:
        """Keep the ``names`` among ``metrics`` as ``node``'s latest for ``entity``."""
        self._move(node, group)
        _, entities = self.held.setdefault(node, (group, set()))
        entity = sys.intern(entity)  # one string and one key for every metric of every result of a GPU
        entities.add(entity)
        subject = (node[1], entity)
        series = self.groups.setdefault(group, {}).setdefault(check, {})
        self.checks.add(check)
        for metric, value in metrics.items():
            if metric not in names or not math.isfinite(value):
                continue
            one = series.get(metric)
            if one is None:
                if len(series) >= MAX_METRICS_PER_CHECK:
                    continue
                one = series[metric] = PeerSeries()
            one.put(subject, float(value))

    def _move(self, node: NodeKey, group: PeerGroup) -> None:
        """A node whose partition or GPU model changed takes its values to its new peers."""
        held = self.held.get(node)
        if held is None or held[0] == group:
            return
        old, entities = held
        moved = self.groups.setdefault(group, {})
        for check, metrics in self.groups.get(old, {}).items():
            for metric, series in metrics.items():
                for entity in entities:
                    value = series.by_subject.get((node[1], entity))
                    if value is not None:
                        series.drop((node[1], entity))
                        moved.setdefault(check, {}).setdefault(metric, PeerSeries()).put((node[1], entity), value)
        self.held[node] = (group, entities)

    def view(self, group: PeerGroup, node: str, entity: str,
             ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
        """``fleet.median`` and ``fleet.peers`` for ``entity`` of ``node``: per check kept (anywhere),
        per metric the group has, the median of the values other than this (node, entity)'s and
        their count (a median only where there is one)."""
        medians: dict[str, dict[str, float]] = {check: {} for check in self.checks}
        peers: dict[str, dict[str, int]] = {check: {} for check in self.checks}
        for check, metrics in self.groups.get(group, {}).items():
            for metric, series in metrics.items():
                median, count = series.median_without((node, entity))
                peers[check][metric] = count
                if median is not None:
                    medians[check][metric] = median
        return medians, peers
