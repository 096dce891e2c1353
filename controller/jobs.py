"""Jobs and their nodes (no I/O): each job's outcome tied to what its nodes showed while it ran.

Agents announce a job's start and end on their node: ``job_start`` and
``job_end`` events (``vetd slurm prolog``/``epilog``, or any tool on the
control socket; :mod:`vetd.core.jobs` is their contract). From them the
controller keeps each job: its user, its nodes and each node's GPUs, start,
end, exit state and code, and its *findings*: the failed results, the warning
and critical events and the XIDs each node reported while the job ran there.
A node's messages arrive in the order it sent them (its spool replays in
order), so what a node reported between its ``job_start`` and its ``job_end``
is what it saw during the job, however late it arrives.

A job is decided once every node that announced it has reported its end, or
``[jobs] settle`` after the first end (a node that died reports none): rules
that read ``job`` are then evaluated once per node of the job, each seeing
the job from that node (:class:`JobContext`), so that one node's verdict
weighs every node's findings. Open jobs are in the engine's model (at most
``[jobs] max_open``); decided ones only in the store, for ``vetd job`` and
``vetd jobs``, until ``[store] keep``.
"""

from __future__ import annotations

import msgspec

from vetd.controller.config import JobsSection
from vetd.controller.counters import Counters
from vetd.controller.model import AGENT_CHECK, Finding, FleetState, Job, JobKey, JobNode, NodeKey
from vetd.core.jobs import JOB_END, JOB_START, end_fields, reported_exit_code, reported_state
from vetd.core.protocol import Event, Result

#: Findings kept per node of a job (its count goes on), and codes.
MAX_FINDINGS = 32
MAX_CODES = 16
#: How often (controller time) open jobs are looked through for lost ones.
LOST_CHECK_S = 60.0


class JobContext(msgspec.Struct, kw_only=True):
    """What a rule sees as ``job``: the job, from the node the rule is evaluated for."""

    id: str
    user: str
    #: Upper case, as the epilog reported it; ``""``: not reported.
    state: str
    #: ``-1``: not reported.
    exit_code: int
    #: The state is one of ``[jobs] failed_states``, or there is none and the exit code is not 0.
    failed: bool
    #: Every node of the job, sorted; those that never reported its end.
    nodes: list[str]
    unreported: list[str]
    #: This node's GPUs, as its ``job_start`` gave them.
    gpus: str
    started: float
    ended: float
    runtime_s: float
    #: Failed results, warning/critical events and XIDs this node reported while the job ran there.
    findings: int
    #: Their codes (``xid_79``), or the check's or event's name when they had none.
    codes: list[str]
    #: The same count on the job's other nodes, and the nodes that had any (this one included).
    other_findings: int
    nodes_with_findings: list[str]


def is_finding(message: Result | Event) -> bool:
    """Whether ``message`` is something a node showed that a job's failure may be down to."""
    if isinstance(message, Result):
        return message.status == "fail" and message.check != AGENT_CHECK
    return message.name == "xid" or message.severity in ("warning", "critical")


class Jobs:
    """The open jobs of :attr:`FleetState.jobs`, and which of them run on each node."""

    def __init__(self, state: FleetState, config: JobsSection, counters: Counters) -> None:
        self.state, self.config, self.counters = state, config, counters
        self.failed_states = frozenset(s.strip().upper() for s in config.failed_states)
        #: Derived from the model, rebuilt when it is put back (:meth:`invalidate`): the open
        #: jobs running on each node, and the jobs waiting for their nodes' ends.
        self._running: dict[NodeKey, set[str]] | None = None
        self._ending: set[JobKey] = set()
        self._lost_checked = float("-inf")

    def invalidate(self) -> None:
        """The model was put back from the store: what is derived from it is worked out again."""
        self._running = None

    def _index(self) -> dict[NodeKey, set[str]]:
        if self._running is None:
            self._running, self._ending = {}, set()
            for job in self.state.jobs.values():
                for name, part in job.nodes.items():
                    if part.ended is None:
                        self._running.setdefault((job.cluster, name), set()).add(job.id)
                if job.phase == "ending":
                    self._ending.add((job.cluster, job.id))
        return self._running

    def running_on(self, cluster: str, node: str) -> set[str]:
        """The ids of the open jobs running on ``node`` (started there, their end not reported)."""
        return set(self._index().get((cluster, node), ()))

    # -- what arrives ---------------------------------------------------------

    def observe(self, message: Result | Event, history_id: int, now: float) -> Job | None:
        """A new result or event of a node: a job starts or ends there, or what the node showed
        goes to the jobs running there. Returns a job that has now ended on all its nodes."""
        if isinstance(message, Event) and message.name in (JOB_START, JOB_END):
            if not message.job_id:
                return None
            if message.name == JOB_START:
                self._start(message, now)
                return None
            return self._end(message, history_id, now)
        if is_finding(message):
            self._finding(message, history_id, now)
        return None

    def _open(self, cluster: str, job_id: str, ts: float, now: float) -> Job:
        key = (cluster, job_id)
        job = self.state.jobs.get(key)
        if job is None:
            self._make_room(now)
            job = self.state.jobs[key] = Job(cluster, job_id, started=ts, updated=now, opened=now)
            self.counters.count("jobs_started")
        return job

    def _start(self, message: Event, now: float) -> None:
        assert message.job_id
        job = self._open(message.cluster, message.job_id, message.ts, now)
        job.user = message.data.get("user", "") or job.user
        part = job.nodes.get(message.node)
        if part is None or part.ended is not None:  # new here, or again after its end (requeued)
            part = job.nodes[message.node] = JobNode(started=message.ts)
        part.gpus = message.data.get("gpus", "") or part.gpus
        job.started, job.updated = min(job.started, message.ts), now
        if job.phase == "ending":  # a node joins after others ended: wait for its end too
            job.phase, job.ending_since = "running", None
            self._ending.discard((job.cluster, job.id))
        self._index().setdefault((message.cluster, message.node), set()).add(job.id)
        self.state.save_job(job, message.node)

    def _end(self, message: Event, history_id: int, now: float) -> Job | None:
        assert message.job_id
        runtime = message.metrics.get("runtime_s")
        job = self._open(message.cluster, message.job_id,
                         message.ts - runtime if runtime is not None else message.ts, now)
        part = job.nodes.setdefault(message.node, JobNode())
        if part.ended is not None:
            return None  # its end again (a second epilog): the first one stands
        part.ended, part.end_event = message.ts, history_id
        part.state = reported_state(message.data, message.codes)
        part.exit_code = reported_exit_code(message.metrics)
        if part.started is None and runtime is not None:
            part.started = message.ts - runtime
        job.ended = max(job.ended or message.ts, message.ts)
        job.updated = now
        self._outcome(job)
        self._index().get((job.cluster, message.node), set()).discard(job.id)
        if job.phase == "running":
            job.phase, job.ending_since = "ending", now
            self._ending.add((job.cluster, job.id))
        self.state.save_job(job, message.node)
        if all(p.ended is not None for p in job.nodes.values()):
            return self.close(job, "done", now)
        return None

    def _outcome(self, job: Job) -> None:
        """The job's state, exit code and verdict from what its nodes reported."""
        states = [p.state for p in job.nodes.values() if p.state]
        failure = next((s for s in states if s in self.failed_states), "")
        job.state = failure or (states[0] if states else "")
        codes = [p.exit_code for p in job.nodes.values() if p.exit_code is not None]
        job.exit_code = next((c for c in codes if c != 0), codes[0] if codes else None)
        job.failed = bool(failure) or (not job.state and job.exit_code not in (None, 0))

    def _finding(self, message: Result | Event, history_id: int, now: float) -> None:
        running = self._index().get((message.cluster, message.node))
        if not running:
            return
        kind, name, status = (("result", message.check, message.status) if isinstance(message, Result)
                              else ("event", message.name, message.severity))
        for job_id in sorted(running):
            job = self.state.jobs[(message.cluster, job_id)]
            part = job.nodes[message.node]
            part.findings += 1
            for code in message.codes or [name]:
                if code not in part.codes and len(part.codes) < MAX_CODES:
                    part.codes.append(code)
            if part.findings <= MAX_FINDINGS:
                self.state.add_finding(Finding(message.cluster, job_id, message.node, message.ts, kind, name,
                                               message.entity, status, list(message.codes), message.message,
                                               history_id))
            job.updated = now
            self.state.save_job(job, message.node)

    # -- closing ----------------------------------------------------------------

    def close(self, job: Job, phase: str, now: float) -> Job:
        """Decided (``done``) or ``lost``: the job leaves the open ones (the store keeps it)."""
        key = (job.cluster, job.id)
        index = self._index()
        for name, part in job.nodes.items():
            if part.ended is None:
                index.get((job.cluster, name), set()).discard(job.id)
        self._ending.discard(key)
        job.phase, job.updated = phase, now
        self.state.save_job(job)
        self.counters.count("jobs_decided" if phase == "done" else "jobs_lost")
        return job

    def _make_room(self, now: float) -> None:
        """At ``[jobs] max_open``, the open job with the oldest news is closed as lost."""
        if len(self.state.jobs) >= self.config.max_open:
            oldest = min(self.state.jobs.values(), key=lambda j: j.updated)
            self.close(oldest, "lost", now)

    def settled(self, now: float) -> list[Job]:
        """Jobs some nodes ended ``[jobs] settle`` ago or longer: to decide on with what is known."""
        self._index()
        settle = float(self.config.settle)
        return [self.state.jobs[key] for key in sorted(self._ending)
                if key in self.state.jobs and now - (self.state.jobs[key].ending_since or now) >= settle]

    def lost(self, now: float) -> list[Job]:
        """Open jobs with no news for ``[jobs] lost_after`` (looked for once a minute)."""
        if now - self._lost_checked < LOST_CHECK_S:
            return []
        self._lost_checked = now
        after = float(self.config.lost_after)
        return [job for job in self.state.jobs.values() if now - job.updated >= after]

    def due(self, now: float) -> bool:
        """Whether :meth:`settled` or :meth:`lost` may have anything (cheap, asked often)."""
        self._index()
        return bool(self._ending) or now - self._lost_checked >= LOST_CHECK_S

    # -- what rules see -----------------------------------------------------------

    def context(self, job: Job, node: str) -> JobContext:
        part = job.nodes[node]
        with_findings = sorted(name for name, p in job.nodes.items() if p.findings)
        ended = job.ended if job.ended is not None else job.updated
        return JobContext(
            id=job.id, user=job.user, state=job.state, exit_code=-1 if job.exit_code is None else job.exit_code,
            failed=job.failed, nodes=sorted(job.nodes),
            unreported=sorted(name for name, p in job.nodes.items() if p.ended is None),
            gpus=part.gpus, started=job.started, ended=ended, runtime_s=round(max(0.0, ended - job.started), 3),
            findings=part.findings, codes=list(part.codes),
            other_findings=sum(p.findings for name, p in job.nodes.items() if name != node),
            nodes_with_findings=with_findings,
        )

    def end_event(self, job: Job, node: str, now: float) -> tuple[Event, int]:
        """The node's ``job_end`` as rules on the job see it, and the history id to cite: the
        node's own, or for a node that reported none, the job's latest end (made at ``now``)."""
        part = job.nodes[node]
        ts = part.ended if part.ended is not None else now
        runtime = ts - part.started if part.started is not None else None
        fields = end_fields(job.id, part.state or job.state, part.exit_code if part.ended is not None
                            else job.exit_code, runtime, announced=part.started is not None)
        if part.ended is None:
            fields["message"] += "; this node never reported the end"
        event = Event(cluster=job.cluster, node=node, session="", seq=0, ts=ts, job_id=job.id, **fields)
        evidence = part.end_event or max((p.end_event for p in job.nodes.values()), default=0)
        return event, evidence

