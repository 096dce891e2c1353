"""Fleet state in SQLite (WAL): nodes, sessions, latest and historical results, audit.

One writer (the controller process); any number of readers (``vetd nodes`` and
friends open the same file read-only while the controller runs). The store owns
all SQL. For the controller it does three things per batch, in one transaction:
:meth:`Store.record` stores the batch's results and events and says which are
new (ingest is idempotent: ``(cluster, node, session, seq)`` is unique, so a
message delivered twice is counted as a duplicate and changes nothing); the
engine decides, in memory; :meth:`Store.apply` persists what it changed. The
engine's model is loaded once, at start, by :meth:`Store.load_state`.

The database failing (a full disk, an I/O error, a lock held too long, a
file gone bad: :func:`unavailable`) is not any one message's fault: the
controller then stores nothing of the batch, acknowledges none of it, and
tries again until the database takes it (see :mod:`~vetd.controller.service`).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from vetd.controller.model import (
    AGENT_CHECK,
    Audit,
    Breaker,
    Changes,
    FleetState,
    Healing,
    HistoryRecord,
    Job,
    JobNode,
    NodeHistory,
    NodeRow,
    PendingAction,
    RuleState,
)
from vetd.core.configfile import ConfigError
from vetd.core.files import create_private
from vetd.core.protocol import Event, Message, Result

#: The schema as first released (version 1): every table. Databases made before versions were
#: recorded (``PRAGMA user_version`` 0) have exactly these tables, so this step is a no-op for them.
SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    cluster TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'healthy',
    state_since REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    online INTEGER NOT NULL DEFAULT 0,
    session TEXT NOT NULL DEFAULT '',
    session_started REAL NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    agent_version TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (cluster, name)
);
CREATE TABLE IF NOT EXISTS sessions (
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    session TEXT NOT NULL,
    first_seen REAL NOT NULL,
    max_seq INTEGER NOT NULL DEFAULT 0,
    received INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, node, session)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    entity TEXT NOT NULL,
    status TEXT NOT NULL,
    codes TEXT NOT NULL,
    metrics TEXT NOT NULL,
    message TEXT NOT NULL,
    UNIQUE (cluster, node, session, seq)
);
CREATE INDEX IF NOT EXISTS history_node_ts ON history (cluster, node, ts);
CREATE TABLE IF NOT EXISTS latest (
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    check_name TEXT NOT NULL,
    entity TEXT NOT NULL,
    status TEXT NOT NULL,
    codes TEXT NOT NULL,
    metrics TEXT NOT NULL,
    message TEXT NOT NULL,
    ts REAL NOT NULL,
    history_id INTEGER,
    PRIMARY KEY (cluster, node, check_name, entity)
);
CREATE TABLE IF NOT EXISTS rule_state (
    rule TEXT NOT NULL,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    subject TEXT NOT NULL,
    phase TEXT NOT NULL,
    since REAL NOT NULL,
    cleared_at REAL,
    PRIMARY KEY (rule, cluster, node, subject)
);
CREATE TABLE IF NOT EXISTS rule_window (
    rule TEXT NOT NULL,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    subject TEXT NOT NULL,
    stamps TEXT NOT NULL,
    PRIMARY KEY (rule, cluster, node, subject)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    rule TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    evidence TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS audit_node ON audit (cluster, node, ts);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    nodes TEXT NOT NULL DEFAULT '[]',
    reason TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'pending',
    result TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS breaker (
    partition TEXT PRIMARY KEY,
    open INTEGER NOT NULL,
    since REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS healing (
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    rule TEXT NOT NULL,
    ladder TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    phase TEXT NOT NULL,
    command_id TEXT NOT NULL DEFAULT '',
    deadline REAL NOT NULL DEFAULT 0,
    gpu TEXT NOT NULL DEFAULT 'all',
    session TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    PRIMARY KEY (cluster, node)
);
CREATE TABLE IF NOT EXISTS alerts_firing (
    key TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    payload TEXT NOT NULL,
    last_sent REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS silences (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    until REAL NOT NULL,
    author TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    matchers TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_loss (
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    dropped TEXT NOT NULL,
    PRIMARY KEY (cluster, node)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

#: Drains and resumes not yet confirmed by the scheduler, with their retry state (issue 12).
#: Migration 3.
PENDING_ACTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_actions (
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    action TEXT NOT NULL,
    audit_id INTEGER NOT NULL,
    since REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    next_try REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, node)
);
"""


#: Jobs as the agents announce them, each node's part, and what the nodes showed while they ran
#: (issue 17). Migration 4. ``run`` 0 is a job id's latest run; a requeued job's earlier runs are
#: 1, 2… (the newest first).
JOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    cluster TEXT NOT NULL,
    id TEXT NOT NULL,
    user TEXT NOT NULL DEFAULT '',
    phase TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    state TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    failed INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    ending_since REAL,
    opened REAL NOT NULL DEFAULT 0,
    run INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, id, run)
);
CREATE INDEX IF NOT EXISTS jobs_started ON jobs (started);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (phase) WHERE phase IN ('running', 'ending');
CREATE TABLE IF NOT EXISTS job_nodes (
    cluster TEXT NOT NULL,
    job_id TEXT NOT NULL,
    node TEXT NOT NULL,
    gpus TEXT NOT NULL DEFAULT '',
    started REAL,
    ended REAL,
    state TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    findings INTEGER NOT NULL DEFAULT 0,
    codes TEXT NOT NULL DEFAULT '[]',
    end_event INTEGER NOT NULL DEFAULT 0,
    run INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, job_id, run, node)
);
CREATE INDEX IF NOT EXISTS job_nodes_node ON job_nodes (cluster, node);
CREATE TABLE IF NOT EXISTS job_findings (
    id INTEGER PRIMARY KEY,
    cluster TEXT NOT NULL,
    job_id TEXT NOT NULL,
    node TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    entity TEXT NOT NULL,
    status TEXT NOT NULL,
    codes TEXT NOT NULL,
    message TEXT NOT NULL,
    history_id INTEGER NOT NULL,
    run INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS job_findings_job ON job_findings (cluster, job_id, run);
"""


#: What happened to each node (incidents, remediations, reboots, drains…) that rules count
#: (``history.node.incidents("7d")``), and the boot id of each node's latest birth. Migration 5.
HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS node_history (
    id INTEGER PRIMARY KEY,
    cluster TEXT NOT NULL,
    node TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    entity TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS node_history_node ON node_history (cluster, node, ts);
CREATE INDEX IF NOT EXISTS node_history_ts ON node_history (ts);
ALTER TABLE nodes ADD COLUMN boot_id TEXT NOT NULL DEFAULT ''
"""


CAMPAIGNS_SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    id TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    trigger TEXT NOT NULL,
    test TEXT NOT NULL DEFAULT '',
    nodes TEXT NOT NULL DEFAULT '[]',
    summary TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS campaigns_started ON campaigns (started);
ALTER TABLE requests ADD COLUMN params TEXT NOT NULL DEFAULT '{}'
"""


#: A campaign is stored when it starts (``running``) and again when it ends (``done``, or ``failed``
#: with why), with every node's verdict (the rows of its report). Campaigns stored before only ever
#: stored finished ones; their verdicts come back from the audit trail (action ``campaign``, detail
#: ``ID: reason``) where retention kept it: one pass over the audit trail into a temporary table
#: indexed by campaign (a subquery per campaign scanned the whole trail for each, at controller start).
CAMPAIGN_VERDICTS_SCHEMA = """
ALTER TABLE campaigns ADD COLUMN state TEXT NOT NULL DEFAULT 'done';
ALTER TABLE campaigns ADD COLUMN error TEXT NOT NULL DEFAULT '';
ALTER TABLE campaigns ADD COLUMN verdicts TEXT NOT NULL DEFAULT '[]';
CREATE TEMP TABLE campaign_audit AS
    SELECT substr(detail, 1, instr(detail, ': ') - 1) AS campaign, cluster, node, outcome,
           substr(detail, instr(detail, ': ') + 2) AS reason
    FROM audit WHERE action = 'campaign' AND instr(detail, ': ') > 0 ORDER BY id;
CREATE INDEX temp.campaign_audit_id ON campaign_audit (campaign, cluster);
UPDATE campaigns SET verdicts = coalesce((
    SELECT json_group_array(json_object('node', a.node, 'verdict', a.outcome, 'reason', a.reason))
    FROM campaign_audit a WHERE a.campaign = campaigns.id AND a.cluster = campaigns.cluster), '[]');
DROP TABLE temp.campaign_audit
"""


#: Ordered schema steps: entry ``i`` takes a database from version ``i`` to ``i + 1`` (``PRAGMA
#: user_version``). Each runs in its own transaction on start; a change to the schema is one more
#: entry at the end, never an edit of an entry already released.
MIGRATIONS: tuple[str, ...] = (
    SCHEMA,
    # 2: retention prunes by arrival time (history) and by time (audit, requests).
    """
    CREATE INDEX IF NOT EXISTS history_received ON history (received_at);
    CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
    CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
    """,
    # 3: drains and resumes the executor retries until the scheduler confirms them.
    PENDING_ACTIONS_SCHEMA,
    # 4: jobs, their nodes and what those showed while the job ran.
    JOBS_SCHEMA,
    # 5: what happened to each node, for `history` in rules (issue 14), and its boot id.
    HISTORY_SCHEMA,
    # 6: campaigns across nodes (issue 19), and what an operator request asks beyond nodes and reason.
    CAMPAIGNS_SCHEMA,
    # 7: a campaign's state while it runs (or why it failed), and each node's verdict (vetd campaigns).
    CAMPAIGN_VERDICTS_SCHEMA,
)
#: The version this code writes and reads.
SCHEMA_VERSION = len(MIGRATIONS)


class StoreUnavailable(Exception):
    """The database could not take a write (a full disk, an I/O error…); nothing of it was kept."""


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is the database failing rather than what it was given: SQLite's operational
    and internal errors (``database or disk is full``, ``disk I/O error``, ``database is locked``…)
    and a database that is not one (``file is not a database``, ``disk image is malformed``)."""
    return (isinstance(exc, StoreUnavailable | sqlite3.OperationalError | sqlite3.InternalError)
            or type(exc) is sqlite3.DatabaseError)


class SchemaError(ConfigError):
    """A database this vetd cannot use (made by a newer one)."""


def migrate(db: sqlite3.Connection, path: object) -> int:
    """Bring ``db`` to :data:`SCHEMA_VERSION`, one transaction per step; returns the version found.

    A database newer than this code knows is refused rather than half-understood.
    """
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise SchemaError(f"{path}: database schema version {found} is newer than this vetd knows "
                          f"({SCHEMA_VERSION}); run the vetd that wrote it, or a newer one")
    for version in range(found, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[version]):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return found


def _statements(script: str) -> list[str]:
    """The statements of a schema script (``executescript`` would commit the step's transaction)."""
    return [part.strip() for part in script.split(";") if part.strip()]


class Store:
    """The controller's database."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no vetd state database at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
            if (found := int(self.db.execute("PRAGMA user_version").fetchone()[0])) > SCHEMA_VERSION:
                self.db.close()
                raise SchemaError(f"{self.path}: database schema version {found} is newer than this vetd "
                                  f"knows ({SCHEMA_VERSION}); use the vetd that wrote it, or a newer one")
        else:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
                create_private(self.path)  # 0600 before SQLite makes it (and its -wal, -shm) 0644
            self.db = sqlite3.connect(str(path), timeout=10, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            migrate(self.db, self.path)
        self.db.row_factory = sqlite3.Row
        #: The node rows as committed (the engine's own, once :meth:`apply` wrote them).
        self.nodes: dict[tuple[str, str], NodeRow] = {} if readonly else self._load_nodes()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction. SQLite may have rolled it back already when a statement failed
        (``SQLITE_FULL``, ``SQLITE_IOERR``): then there is nothing left to roll back."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        try:
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside a transaction: what the block wrote is undone if it raises (the transaction goes on).

        Raises :class:`StoreUnavailable` when the transaction itself is gone (SQLite rolled all of
        it back on a full disk or an I/O error): what went before in it is lost as well."""
        self.db.execute("SAVEPOINT message")
        try:
            yield
        except BaseException as exc:
            if not self.db.in_transaction:
                raise StoreUnavailable(f"the transaction was rolled back: {exc}") from exc
            self.db.execute("ROLLBACK TO message")
            self.db.execute("RELEASE message")
            raise
        self.db.execute("RELEASE message")

    # -- the engine's model: loaded once, changed by apply -------------------

    def load_state(self, history: NodeHistory | None = None) -> FleetState:
        """Everything the engine decides on, as committed; ``history`` (empty, with its bounds)
        gets each node's latest records."""
        db = self.db
        rule_states = {(r["rule"], r["cluster"], r["node"], r["subject"]): RuleState(r["phase"], r["since"],
                                                                                     r["cleared_at"])
                       for r in db.execute("SELECT * FROM rule_state")}
        rule_windows = {(r["rule"], r["cluster"], r["node"], r["subject"]): json.loads(r["stamps"])
                        for r in db.execute("SELECT * FROM rule_window")}
        healings = [_healing_from_row(r) for r in db.execute("SELECT * FROM healing ORDER BY started")]
        breakers = {r["partition"]: Breaker(bool(r["open"]), r["since"], r["reason"])
                    for r in db.execute("SELECT * FROM breaker")}
        drains = [_audit_from_row(r) for r in db.execute(
            "SELECT * FROM audit WHERE action='drain' AND actor='controller' ORDER BY id")]
        return FleetState(nodes=dict(self.nodes), rule_states=rule_states, rule_windows=rule_windows,
                          firing_alerts=self.firing_alerts(), healings={(h.cluster, h.node): h for h in healings},
                          breakers=breakers, drains=drains, agents_late=self._agents_late(),
                          jobs=self._open_jobs(),
                          history=self._load_history(NodeHistory() if history is None else history))

    def _load_history(self, history: NodeHistory) -> NodeHistory:
        """Each node's latest ``history.per_kind`` records of each kind into ``history`` (which
        drops those older than its ``keep`` before the node's newest)."""
        rows = self.db.execute(
            """SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY cluster, node, kind
                                                           ORDER BY ts DESC, id DESC) AS newest FROM node_history)
               WHERE newest <= ? ORDER BY cluster, node, ts, id""", (history.per_kind,))
        for r in rows:
            history.add(HistoryRecord(r["cluster"], r["node"], r["ts"], r["kind"], r["entity"],
                                      tuple(json.loads(r["tags"]))))
        return history

    def _agents_late(self, node: tuple[str, str] | None = None) -> set[tuple[str, str]]:
        """Nodes the controller's own ``vetd_agent`` check last found offline too long (of ``node`` only)."""
        rows = self.db.execute(
            "SELECT cluster, node FROM latest WHERE check_name=? AND status='timeout' "
            "AND (? IS NULL OR (cluster=? AND node=?))",
            (AGENT_CHECK, node and node[0], node and node[0], node and node[1]))
        return {(r[0], r[1]) for r in rows}

    def reload(self, state: FleetState, changes: Changes, nodes: Iterable[tuple[str, str]]) -> None:
        """Put back into ``state`` what the store holds for every key ``changes`` names and for ``nodes``.

        After a savepoint was rolled back, this undoes in memory what the failed work changed: the
        store is the truth, and the model's changes name every key it touched (a node row or a
        ladder may also have been changed in place before it was noted: the caller names those nodes).
        """
        db = self.db
        nodes = set(nodes)
        for key in {*changes.nodes, *nodes}:
            row = db.execute("SELECT * FROM nodes WHERE cluster=? AND name=?", key).fetchone()
            if row is None:
                state.nodes.pop(key, None)
                self.nodes.pop(key, None)
            else:
                state.nodes[key] = self.nodes[key] = _node_from_row(row)
            healing = db.execute("SELECT * FROM healing WHERE cluster=? AND node=?", key).fetchone()
            if healing is None:
                state.healings.pop(key, None)
            else:
                state.healings[key] = _healing_from_row(healing)
            state.agents_late.discard(key)
            state.agents_late |= self._agents_late(key)
        for key in changes.healings:
            healing = db.execute("SELECT * FROM healing WHERE cluster=? AND node=?", key).fetchone()
            if healing is None:
                state.healings.pop(key, None)
            else:
                state.healings[key] = _healing_from_row(healing)
        for rule_key in changes.rule_states:
            r = db.execute("SELECT * FROM rule_state WHERE rule=? AND cluster=? AND node=? AND subject=?",
                           rule_key).fetchone()
            if r is None:
                state.rule_states.pop(rule_key, None)
            else:
                state.rule_states[rule_key] = RuleState(r["phase"], r["since"], r["cleared_at"])
        for rule_key in changes.rule_windows:
            r = db.execute("SELECT stamps FROM rule_window WHERE rule=? AND cluster=? AND node=? AND subject=?",
                           rule_key).fetchone()
            if r is None:
                state.rule_windows.pop(rule_key, None)
            else:
                state.rule_windows[rule_key] = json.loads(r["stamps"])
        for name in changes.firing_alerts:
            r = db.execute("SELECT payload FROM alerts_firing WHERE key=?", (name,)).fetchone()
            if r is None:
                state.firing_alerts.pop(name, None)
            else:
                state.firing_alerts[name] = json.loads(r["payload"])
        for partition in changes.breakers:
            r = db.execute("SELECT * FROM breaker WHERE partition=?", (partition,)).fetchone()
            if r is None:
                state.breakers.pop(partition, None)
            else:
                state.breakers[partition] = Breaker(bool(r["open"]), r["since"], r["reason"])
        undone = {id(record) for record in changes.audit}
        state.drains[:] = [record for record in state.drains if id(record) not in undone]
        # Jobs the failed work changed, and those with a part on its nodes (changed in place first).
        touched = {*changes.jobs, *((c, j) for c, j, _ in changes.job_nodes)}
        touched |= {key for key, job in state.jobs.items() if any((job.cluster, n) in nodes for n in job.nodes)}
        for job_key in touched:
            state.jobs.pop(job_key, None)
            state.jobs.update(self._open_jobs(job_key))
        state.history.drop(changes.history)

    def apply(self, changes: Changes) -> None:
        """Persist what the engine changed, inside the caller's transaction.

        Audit rows get their ids here, before any action that refers to one is carried out.
        """
        db = self.db
        if changes.nodes:
            db.executemany(
                """INSERT INTO nodes (cluster, name, state, state_since, reason, online, session,
                       session_started, first_seen, last_seen, agent_version, labels, boot_id)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT (cluster, name) DO UPDATE SET state=excluded.state,
                       state_since=excluded.state_since, reason=excluded.reason,
                       online=excluded.online, session=excluded.session,
                       session_started=excluded.session_started, last_seen=excluded.last_seen,
                       agent_version=excluded.agent_version, labels=excluded.labels,
                       boot_id=excluded.boot_id""",
                [_node_values(row) for row in changes.nodes.values()],
            )
            self.nodes.update(changes.nodes)
        for key, state in changes.rule_states.items():
            if state is None:
                db.execute("DELETE FROM rule_state WHERE rule=? AND cluster=? AND node=? AND subject=?", key)
            else:
                db.execute("INSERT OR REPLACE INTO rule_state (rule, cluster, node, subject, phase, since, "
                           "cleared_at) VALUES (?,?,?,?,?,?,?)", (*key, state.phase, state.since, state.cleared_at))
        db.executemany("INSERT OR REPLACE INTO rule_window (rule, cluster, node, subject, stamps) VALUES (?,?,?,?,?)",
                       [(*key, json.dumps(stamps)) for key, stamps in changes.rule_windows.items()])
        for name, alert in changes.firing_alerts.items():
            if alert.payload is None:
                db.execute("DELETE FROM alerts_firing WHERE key=?", (name,))
            else:
                db.execute("INSERT OR REPLACE INTO alerts_firing (key, cluster, node, payload, last_sent) "
                           "VALUES (?,?,?,?,?)", (name, alert.cluster, alert.node, json.dumps(alert.payload),
                                                   alert.sent))
        for (cluster, node), healing in changes.healings.items():
            if healing is None:
                db.execute("DELETE FROM healing WHERE cluster=? AND node=?", (cluster, node))
            else:
                db.execute(
                    """INSERT OR REPLACE INTO healing (cluster, node, rule, ladder, step, phase, command_id,
                           deadline, gpu, session, started) VALUES (?,?,?,?,?,?,?,?,?,?,?)""",
                    (healing.cluster, healing.node, healing.rule, json.dumps(healing.ladder), healing.step,
                     healing.phase, healing.command_id, healing.deadline, healing.gpu, healing.session,
                     healing.started))
        db.executemany("INSERT OR REPLACE INTO breaker (partition, open, since, reason) VALUES (?,?,?,?)",
                       [(p, int(b.open), b.since, b.reason) for p, b in changes.breakers.items()])
        db.executemany("INSERT OR REPLACE INTO agent_loss (cluster, node, dropped) VALUES (?,?,?)",
                       [(*key, json.dumps(dropped)) for key, dropped in changes.agent_loss.items()])
        db.executemany("INSERT INTO node_history (cluster, node, ts, kind, entity, tags) VALUES (?,?,?,?,?,?)",
                       [(r.cluster, r.node, r.ts, r.kind, r.entity, json.dumps(list(r.tags)))
                        for r in changes.history])
        for record in changes.audit:
            record.id = self.audit(record.cluster, record.node, record.action, actor=record.actor,
                                   rule=record.rule, outcome=record.outcome, detail=record.detail,
                                   evidence=record.evidence, now=record.ts)
        self._apply_jobs(changes)

    # -- jobs ------------------------------------------------------------------

    def _apply_jobs(self, changes: Changes) -> None:
        db = self.db
        for job in changes.jobs.values():
            # A job id whose latest run in the store is another (closed) one: that run becomes run 1.
            row = db.execute("SELECT opened FROM jobs WHERE cluster=? AND id=? AND run=0", (job.cluster, job.id))
            if (found := row.fetchone()) is not None and found[0] != job.opened:
                for table, column in (("jobs", "id"), ("job_nodes", "job_id"), ("job_findings", "job_id")):
                    db.execute(f"UPDATE {table} SET run = -run - 1 WHERE cluster=? AND {column}=?",
                               (job.cluster, job.id))
                    db.execute(f"UPDATE {table} SET run = -run WHERE cluster=? AND {column}=? AND run < 0",
                               (job.cluster, job.id))
        db.executemany(
            """INSERT INTO jobs (cluster, id, run, user, phase, started, ended, state, exit_code, failed, updated,
                   ending_since, opened) VALUES (?,?,0,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT (cluster, id, run) DO UPDATE SET user=excluded.user, phase=excluded.phase,
                   started=excluded.started, ended=excluded.ended, state=excluded.state,
                   exit_code=excluded.exit_code, failed=excluded.failed, updated=excluded.updated,
                   ending_since=excluded.ending_since""",
            [(j.cluster, j.id, j.user, j.phase, j.started, j.ended, j.state, j.exit_code, int(j.failed), j.updated,
              j.ending_since, j.opened) for j in changes.jobs.values()])
        db.executemany(
            """INSERT OR REPLACE INTO job_nodes (cluster, job_id, node, run, gpus, started, ended, state, exit_code,
                   findings, codes, end_event) VALUES (?,?,?,0,?,?,?,?,?,?,?,?)""",
            [(*key, p.gpus, p.started, p.ended, p.state, p.exit_code, p.findings, _json(p.codes), p.end_event)
             for key, p in changes.job_nodes.items()])
        db.executemany(
            """INSERT INTO job_findings (cluster, job_id, node, run, ts, kind, name, entity, status, codes, message,
                   history_id) VALUES (?,?,?,0,?,?,?,?,?,?,?,?)""",
            [(f.cluster, f.job_id, f.node, f.ts, f.kind, f.name, f.entity, f.status, _json(f.codes), f.message,
              f.history_id) for f in changes.job_findings])

    def _open_jobs(self, key: tuple[str, str] | None = None) -> dict[tuple[str, str], Job]:
        """The open jobs (running, or waiting for their nodes' ends), or ``key`` if it is one."""
        where = "WHERE j.run = 0 AND j.phase IN ('running', 'ending')" + (
            "" if key is None else " AND j.cluster=? AND j.id=?")
        params = key or ()
        jobs = {(r["cluster"], r["id"]): _job_from_row(r)
                for r in self.db.execute(f"SELECT j.* FROM jobs j {where}", params)}
        if jobs:
            for r in self.db.execute("SELECT n.* FROM job_nodes n JOIN jobs j ON j.cluster = n.cluster "
                                     f"AND j.id = n.job_id AND j.run = n.run {where}", params):
                jobs[(r["cluster"], r["job_id"])].nodes[r["node"]] = _job_node_from_row(r)
        return jobs

    # -- nodes -------------------------------------------------------------

    def _load_nodes(self) -> dict[tuple[str, str], NodeRow]:
        rows = self.db.execute("SELECT * FROM nodes").fetchall()
        return {(r["cluster"], r["name"]): _node_from_row(r) for r in rows}

    def save_node(self, row: NodeRow) -> None:
        """Write one node row now (outside the engine: tests and tools that set a state)."""
        self.apply(Changes(nodes={(row.cluster, row.name): row}))

    # -- results and events ------------------------------------------------

    def record(self, messages: Sequence[Message], now: float) -> list[int | None]:
        """Store the batch's results and events; per message, its history id, or None
        for a duplicate (and for a message of another kind).

        Done once per batch before the engine sees it: the engine drops what is
        None here as a duplicate, and cites the history ids as evidence in the
        audit rows it writes. Deduplication stays on the history table's unique
        key rather than in memory: it holds across restarts and covers every
        session ever seen without the controller keeping them all.
        """
        ids: list[int | None] = []
        #: (cluster, node, session) → [first seen, max seq, received, duplicates]
        sessions: dict[tuple[str, str, str], list[float]] = {}
        for message in messages:
            if not isinstance(message, Result | Event):
                ids.append(None)
                continue
            status: str
            if isinstance(message, Result):
                kind, name, status = "result", message.check, message.status
            else:
                kind, name, status = "event", message.name, message.severity
            codes = _json(message.codes)
            metrics = _json(_finite(message.metrics))
            cursor = self.db.execute(
                """INSERT OR IGNORE INTO history (cluster, node, session, seq, ts, received_at, kind,
                       name, entity, status, codes, metrics, message)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                (message.cluster, message.node, message.session, message.seq, message.ts, now, kind,
                 name, message.entity, status, codes, metrics, message.message),
            )
            duplicate = cursor.rowcount == 0
            tally = sessions.setdefault((message.cluster, message.node, message.session), [now, 0, 0, 0])
            tally[1] = max(tally[1], message.seq)
            tally[3 if duplicate else 2] += 1
            history_id = None if duplicate else cursor.lastrowid
            ids.append(history_id)
            if history_id is not None and isinstance(message, Result):
                self.db.execute(
                    """INSERT INTO latest (cluster, node, check_name, entity, status, codes, metrics,
                           message, ts, history_id) VALUES (?,?,?,?,?,?,?,?,?,?)
                       ON CONFLICT (cluster, node, check_name, entity) DO UPDATE SET
                           status=excluded.status, codes=excluded.codes, metrics=excluded.metrics,
                           message=excluded.message, ts=excluded.ts, history_id=excluded.history_id
                       WHERE excluded.ts >= latest.ts""",
                    (message.cluster, message.node, message.check, message.entity, message.status,
                     codes, metrics, message.message, message.ts, history_id),
                )
        self.db.executemany(
            """INSERT INTO sessions (cluster, node, session, first_seen, max_seq, received, duplicates)
               VALUES (?,?,?,?,?,?,?)
               ON CONFLICT (cluster, node, session) DO UPDATE SET
                   max_seq=max(max_seq, excluded.max_seq),
                   received=received + excluded.received,
                   duplicates=duplicates + excluded.duplicates""",
            [(*key, first, int(max_seq), int(received), int(dups))
             for key, (first, max_seq, received, dups) in sessions.items()],
        )
        return ids

    def known_names(self) -> dict[tuple[str, str], tuple[set[str], set[str]]]:
        """Per node, the check names and entities the store keeps state for (``[limits]`` counts on from these)."""
        known: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
        for r in self.db.execute("SELECT DISTINCT cluster, node, check_name, entity FROM latest"):
            names, entities = known.setdefault((r[0], r[1]), (set(), set()))
            names.add(r[2])
            entities.add(r[3])
        for r in self.db.execute("SELECT DISTINCT cluster, node, subject FROM rule_window"):
            per = str(r[2]).removeprefix("count:")
            if per != "*":
                known.setdefault((r[0], r[1]), (set(), set()))[1].add(per)
        return known

    def prune(self, before: float, limit: int) -> dict[str, int]:
        """Delete history, audit and request rows and closed jobs from before ``before``, at most
        ``limit`` of each (the oldest), inside the caller's transaction; returns how many went, by table.

        Drains not yet carried out and pending requests stay whatever their age.
        """
        queries = {
            "history": "DELETE FROM history WHERE id IN (SELECT id FROM history WHERE received_at < ? "
                       "ORDER BY received_at LIMIT ?)",
            "audit": "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE ts < ? AND outcome != 'pending' "
                     "ORDER BY ts LIMIT ?)",
            "requests": "DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE ts < ? "
                        "AND status != 'pending' ORDER BY ts LIMIT ?)",
            "campaigns": "DELETE FROM campaigns WHERE id IN (SELECT id FROM campaigns WHERE started < ? "
                         "AND state != 'running' ORDER BY started LIMIT ?)",
        }
        pruned = {table: self.db.execute(query, (before, limit)).rowcount for table, query in queries.items()}
        # Jobs closed before ``before`` (open ones belong to the engine), with their nodes and findings.
        jobs = self.db.execute("SELECT cluster, id, run FROM jobs WHERE updated < ? AND phase IN ('done', 'lost') "
                               "ORDER BY updated LIMIT ?", (before, limit)).fetchall()
        for table, column in (("job_findings", "job_id"), ("job_nodes", "job_id"), ("jobs", "id")):
            self.db.executemany(f"DELETE FROM {table} WHERE cluster=? AND {column}=? AND run=?",
                                [tuple(r) for r in jobs])
        pruned["jobs"] = len(jobs)
        return pruned

    def prune_node_history(self, before: float, limit: int) -> int:
        """Delete at most ``limit`` of the oldest node history records from before ``before``
        (``[history] keep``), inside the caller's transaction; returns how many went."""
        return self.db.execute("DELETE FROM node_history WHERE id IN (SELECT id FROM node_history WHERE ts < ? "
                               "ORDER BY ts LIMIT ?)", (before, limit)).rowcount

    def node_history(self, cluster: str, node: str, limit: int = 50) -> list[dict[str, Any]]:
        """A node's latest history records (what ``history`` in rules counts), newest first."""
        try:
            rows = self.db.execute("SELECT * FROM node_history WHERE cluster=? AND node=? ORDER BY ts DESC, id DESC "
                                   "LIMIT ?", (cluster, node, limit)).fetchall()
        except sqlite3.OperationalError:  # read-only, from a controller that never had the table
            return []
        return [{**dict(r), "tags": json.loads(r["tags"])} for r in rows]

    # -- audit and counters ------------------------------------------------

    def audit(
        self,
        cluster: str,
        node: str,
        action: str,
        *,
        actor: str = "controller",
        rule: str = "",
        outcome: str = "",
        detail: str = "",
        evidence: Sequence[int] = (),
        now: float | None = None,
    ) -> int:
        cursor = self.db.execute(
            """INSERT INTO audit (ts, cluster, node, actor, action, rule, outcome, detail, evidence)
               VALUES (?,?,?,?,?,?,?,?,?)""",
            (time.time() if now is None else now, cluster, node, actor, action, rule, outcome,
             detail, json.dumps(list(evidence))),
        )
        return int(cursor.lastrowid or 0)

    def record_outcome(self, audit_id: int, outcome: str, detail: str, *, append: bool = False) -> None:
        """Set how a decided action turned out; ``append`` adds ``detail`` to the decision's own."""
        self.db.execute("UPDATE audit SET outcome=?, detail=" + ("detail || ?" if append else "?") + " WHERE id=?",
                        (outcome, detail, audit_id))

    def undone_actions(self) -> list[Audit]:
        """Drain and resume decisions whose outcome is still pending, oldest first (the controller
        died before they were carried out, or before the executor took them on)."""
        rows = self.db.execute("SELECT * FROM audit WHERE action IN ('drain', 'resume') AND outcome='pending' "
                               "ORDER BY id")
        return [_audit_from_row(r) for r in rows]

    # -- scheduler actions not yet confirmed (the executor's retries) --------------

    def save_pending(self, pending: PendingAction) -> None:
        """Write the node's pending drain or resume, replacing any older one of the node."""
        self.db.execute(
            """INSERT OR REPLACE INTO pending_actions (cluster, node, action, audit_id, since, reason, rule,
                   attempts, last_error, next_try) VALUES (?,?,?,?,?,?,?,?,?,?)""",
            (pending.cluster, pending.node, pending.action, pending.audit_id, pending.since, pending.reason,
             pending.rule, pending.attempts, pending.last_error, pending.next_try))

    def drop_pending(self, pending: PendingAction) -> None:
        """The action is settled: forget it, unless a newer one of the node has replaced it."""
        self.db.execute("DELETE FROM pending_actions WHERE cluster=? AND node=? AND audit_id=?",
                        (pending.cluster, pending.node, pending.audit_id))

    def pending_actions(self) -> list[PendingAction]:
        """Every pending drain and resume, oldest decision first (none in a database older than the table)."""
        try:
            rows = self.db.execute("SELECT * FROM pending_actions ORDER BY audit_id").fetchall()
        except sqlite3.OperationalError:  # read-only, from a controller that never had the table
            return []
        return [PendingAction(**dict(r)) for r in rows]

    def audit_after(self, audit_id: int) -> list[dict[str, Any]]:
        """Audit rows written after ``audit_id``, oldest first."""
        return [dict(r) for r in self.db.execute("SELECT * FROM audit WHERE id > ? ORDER BY id", (audit_id,))]

    def add_counters(self, counts: Mapping[str, int]) -> None:
        self.db.executemany(
            """INSERT INTO counters (name, value) VALUES (?, ?)
               ON CONFLICT (name) DO UPDATE SET value = value + excluded.value""",
            [(name, value) for name, value in counts.items() if value],
        )

    # -- alerts: firing ones (re-sent until resolved) and silences ----------------

    def firing_alerts(self) -> dict[str, dict[str, Any]]:
        rows = self.db.execute("SELECT key, payload FROM alerts_firing").fetchall()
        return {r["key"]: json.loads(r["payload"]) for r in rows}

    def add_silence(self, matchers: Sequence[str], until: float, author: str, comment: str) -> int:
        cursor = self.db.execute(
            "INSERT INTO silences (created, until, author, comment, matchers) VALUES (?,?,?,?,?)",
            (time.time(), until, author, comment, json.dumps(list(matchers))),
        )
        return int(cursor.lastrowid or 0)

    def silences(self, now: float | None = None) -> list[dict[str, Any]]:
        """Active silences (all of them with ``now`` None)."""
        query = "SELECT * FROM silences" + ("" if now is None else " WHERE until > ?") + " ORDER BY id"
        rows = self.db.execute(query, () if now is None else (now,)).fetchall()
        return [{**dict(r), "matchers": json.loads(r["matchers"])} for r in rows]

    def expire_silence(self, silence_id: int) -> bool:
        cursor = self.db.execute("UPDATE silences SET until=? WHERE id=? AND until > ?",
                                 (time.time(), silence_id, time.time()))
        return cursor.rowcount > 0

    # -- operator requests and the circuit breaker ---------------------------

    def submit(self, actor: str, action: str, nodes: Sequence[object] = (), reason: str = "",
               now: float | None = None, params: Mapping[str, Any] | None = None) -> int:
        """Queue an operator request for the running controller (``now``: a replay's clock).

        ``nodes`` are ``(cluster, node)`` pairs, or partition names for a breaker reset; ``params``
        what else it asks (a campaign's test and rounds).
        """
        cursor = self.db.execute(
            "INSERT INTO requests (ts, actor, action, nodes, reason, params) VALUES (?,?,?,?,?,?)",
            (time.time() if now is None else now, actor, action, json.dumps(list(nodes)), reason,
             json.dumps(dict(params or {}))),
        )
        return int(cursor.lastrowid or 0)

    def request(self, request_id: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM requests WHERE id=?", (request_id,)).fetchone()
        return None if row is None else _request(row)

    def pending_requests(self, action: str | None = None) -> list[dict[str, Any]]:
        """Requests not yet taken, oldest first; ``action``: only those (a campaign's ``vet``)."""
        if action is None:
            rows = self.db.execute("SELECT * FROM requests WHERE status='pending' ORDER BY id").fetchall()
        else:
            rows = self.db.execute("SELECT * FROM requests WHERE status='pending' AND action=? ORDER BY id",
                                   (action,)).fetchall()
        return [_request(r) for r in rows]

    def take_request(self, request_id: int, result: Any) -> None:
        """A request the controller is carrying out (a campaign: seconds): ``running`` until finished."""
        self.db.execute("UPDATE requests SET status='running', result=? WHERE id=? AND status='pending'",
                        (json.dumps(result), request_id))

    def abandon_requests(self, why: str) -> int:
        """Requests left ``running`` by a controller that stopped: failed, saying ``why``."""
        return self.db.execute("UPDATE requests SET status='failed', result=? WHERE status='running'",
                               (json.dumps(why),)).rowcount

    # -- campaigns across nodes (issue 19) --------------------------------------

    def start_campaign(self, campaign_id: str, cluster: str, started: float, trigger: str, test: str,
                       nodes: Sequence[str]) -> None:
        """A campaign that starts: ``running`` (the nodes asked for) until :meth:`save_campaign` or
        :meth:`fail_campaign`."""
        self.db.execute("INSERT OR REPLACE INTO campaigns (id, cluster, started, ended, trigger, test, nodes, state) "
                        "VALUES (?,?,?,?,?,?,?, 'running')", (campaign_id, cluster, started, started, trigger, test,
                                                              json.dumps(list(nodes))))

    def save_campaign(self, campaign_id: str, cluster: str, started: float, ended: float, trigger: str,
                      test: str, nodes: Sequence[str], summary: Mapping[str, Any],
                      verdicts: Sequence[Mapping[str, Any]] = ()) -> None:
        """A campaign that ended with its verdicts: ``done``."""
        self.db.execute("INSERT OR REPLACE INTO campaigns (id, cluster, started, ended, trigger, test, nodes, summary, "
                        "state, verdicts) VALUES (?,?,?,?,?,?,?,?, 'done', ?)",
                        (campaign_id, cluster, started, ended, trigger, test, json.dumps(list(nodes)),
                         json.dumps(dict(summary)), json.dumps([dict(v) for v in verdicts])))

    def fail_campaign(self, campaign_id: str, ended: float, error: str) -> None:
        """A campaign that broke before its verdicts (stored as far as it got)."""
        self.db.execute("UPDATE campaigns SET state='failed', ended=?, error=? WHERE id=? AND state='running'",
                        (ended, error, campaign_id))

    def abandon_campaigns(self, why: str, now: float) -> int:
        """Campaigns left ``running`` by a controller that stopped: failed, saying ``why``."""
        return self.db.execute("UPDATE campaigns SET state='failed', ended=?, error=? WHERE state='running'",
                               (now, why)).rowcount

    def last_campaign(self, cluster: str, trigger: str) -> float:
        """When the latest campaign started by ``trigger`` (``schedule``) started; 0 when none did."""
        row = self.db.execute("SELECT max(started) FROM campaigns WHERE cluster=? AND trigger=?",
                              (cluster, trigger)).fetchone()
        return float(row[0] or 0.0)

    def campaigns(self, cluster: str | None = None, *, since: float | None = None,
                  limit: int = 200) -> list[dict[str, Any]]:
        """Campaigns newest first (by start), without their verdicts: those running or ended since
        ``since``; none in a database older than campaigns."""
        query = "SELECT * FROM campaigns WHERE (? IS NULL OR cluster = ?)"
        params: list[Any] = [cluster, cluster]
        if since is not None:
            # before schema 7 (read-only, beside an older controller) there is no state: all are done
            state = self.db.execute("SELECT 1 FROM pragma_table_info('campaigns') WHERE name = 'state'").fetchone()
            query += " AND (state = 'running' OR ended >= ?)" if state else " AND ended >= ?"
            params.append(since)
        try:
            rows = self.db.execute(query + " ORDER BY started DESC, id LIMIT ?", (*params, limit)).fetchall()
        except sqlite3.OperationalError:  # read-only, from a controller that never had the table
            return []
        return [_campaign(r, verdicts=False) for r in rows]

    def campaign(self, cluster: str | None, campaign_id: str) -> dict[str, Any] | None:
        """One campaign with its nodes' verdicts (None: unknown), of any cluster when ``cluster`` is None."""
        try:
            row = self.db.execute("SELECT * FROM campaigns WHERE (? IS NULL OR cluster = ?) AND id = ?",
                                  (cluster, cluster, campaign_id)).fetchone()
        except sqlite3.OperationalError:
            return None
        return None if row is None else _campaign(row, verdicts=True)

    def latest_times(self, cluster: str, check: str) -> dict[str, float]:
        """Node → the time of its latest result of ``check`` (when a campaign last vetted it)."""
        rows = self.db.execute("SELECT node, ts FROM latest WHERE cluster=? AND check_name=?", (cluster, check))
        return {str(r[0]): float(r[1]) for r in rows}

    def finish_request(self, request_id: int, status: str, result: Any) -> None:
        """The request's outcome: ``done`` (its answer), ``failed`` or ``expired`` (why)."""
        self.db.execute("UPDATE requests SET status=?, result=? WHERE id=?",
                        (status, json.dumps(result), request_id))

    def resolve_nodes(self, names: Sequence[str], cluster: str) -> tuple[list[tuple[str, str]], list[str]]:
        """``(cluster, node)`` for each name, and what stops that: a node vetd has
        not seen, or one known in several clusters, when ``cluster`` is not given."""
        known: dict[str, list[str]] = {}
        for row in self.node_rows():
            known.setdefault(row.name, []).append(row.cluster)
        targets, problems = [], []
        for name in names:
            clusters = [cluster] if cluster else known.get(name, [])
            if len(clusters) == 1:
                targets.append((clusters[0], name))
            else:
                problems.append(f"node {name} is "
                                + ("unknown to vetd" if not clusters else f"in several clusters ({', '.join(clusters)})"))
        return targets, problems

    def breaker_open(self, partition: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM breaker WHERE partition=? AND open=1", (partition,)).fetchone()
        return None if row is None else dict(row)

    def breakers(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM breaker ORDER BY partition")]

    # -- read side (CLI views) ---------------------------------------------

    def counters(self) -> dict[str, int]:
        return {r["name"]: r["value"] for r in self.db.execute("SELECT name, value FROM counters")}

    def node_rows(self) -> list[NodeRow]:
        rows = self.db.execute("SELECT * FROM nodes ORDER BY cluster, name").fetchall()
        return [_node_from_row(r) for r in rows]

    def latest(self, cluster: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM latest WHERE (? IS NULL OR cluster=?) AND (? IS NULL OR node=?)"
        rows = self.db.execute(query + " ORDER BY cluster, node, check_name, entity",
                               (cluster, cluster, node, node))
        return [_decoded(dict(r)) for r in rows]

    def history(self, cluster: str, node: str, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM history WHERE cluster=? AND node=? ORDER BY ts DESC, id DESC LIMIT ?",
            (cluster, node, limit),
        )
        return [_decoded(dict(r)) for r in rows]

    def audit_log(self, cluster: str | None = None, node: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.db.execute(
            """SELECT * FROM audit WHERE (? IS NULL OR cluster=?) AND (? IS NULL OR node=?)
               ORDER BY id DESC LIMIT ?""",
            (cluster, cluster, node, node, limit),
        )
        return [{**dict(r), "evidence": json.loads(r["evidence"])} for r in rows]

    def first_history_ts(self, cluster: str, node: str, since: float) -> float | None:
        row = self.db.execute("SELECT min(ts) FROM history WHERE cluster=? AND node=? AND ts>=?",
                              (cluster, node, since)).fetchone()
        return None if row[0] is None else float(row[0])

    def history_since(self, since: float, node: str | None = None) -> Iterator[dict[str, Any]]:
        """Stored results and events from ``since`` on (of ``node`` only, if given), oldest first."""
        query = "SELECT * FROM history WHERE ts >= ? AND (? IS NULL OR node = ?) ORDER BY ts, id"
        for row in self.db.execute(query, (since, node, node)):
            yield _decoded(dict(row))

    def delivery(self, cluster: str, node: str) -> dict[str, Any]:
        """Received, duplicate and missing (sequence gaps) results+events of a node,
        and what the agent itself reported dropping (spool full)."""
        row = self.db.execute(
            # total(), not sum(): two sessions near seq 2**63 overflow an integer sum.
            """SELECT CAST(total(received) AS INTEGER), CAST(total(duplicates) AS INTEGER),
                      CAST(total(max(max_seq - received, 0)) AS INTEGER)
               FROM sessions WHERE cluster=? AND node=?""",
            (cluster, node),
        ).fetchone()
        loss = self.db.execute("SELECT dropped FROM agent_loss WHERE cluster=? AND node=?",
                               (cluster, node)).fetchone()
        return {"received": row[0], "duplicates": row[1], "gaps": row[2],
                "agent_dropped": json.loads(loss[0]) if loss else {}}

    # -- jobs: the read side (vetd job, vetd jobs, the HTTP API) ---------------------

    def jobs(self, cluster: str | None = None, *, node: str | None = None, failed: bool = False,
             since: float | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Job runs newest first (by start), each with its ``nodes`` (their parts): of ``node`` only,
        failed ones only, those running or ended since ``since``; none in a database older than jobs."""
        query = "SELECT * FROM jobs j WHERE (? IS NULL OR j.cluster = ?)"
        params: list[Any] = [cluster, cluster]
        if node is not None:
            query += " AND EXISTS (SELECT 1 FROM job_nodes n WHERE n.cluster = j.cluster AND n.job_id = j.id " \
                     "AND n.run = j.run AND n.node = ?)"
            params.append(node)
        if failed:
            query += " AND j.failed = 1"
        if since is not None:  # open ones, and closed ones that ended (or were lost) since
            query += " AND (j.phase IN ('running', 'ending') OR coalesce(j.ended, j.updated) >= ?)"
            params.append(since)
        try:
            rows = [dict(r) for r in self.db.execute(query + " ORDER BY j.started DESC, j.id, j.run LIMIT ?",
                                                     (*params, limit))]
        except sqlite3.OperationalError:  # read-only, from a controller that never had the table
            return []
        for row in rows:
            row["failed"] = bool(row["failed"])
            row["nodes"] = self.job_parts(row["cluster"], row["id"], row["run"])
        return rows

    def job(self, cluster: str | None, job_id: str, run: int = 0) -> dict[str, Any] | None:
        """One run of a job (0: the latest) with its nodes' parts, its findings and how many runs the
        job id has had (``runs``); None: unknown. Of any cluster when ``cluster`` is None."""
        try:
            row = self.db.execute("SELECT * FROM jobs WHERE (? IS NULL OR cluster = ?) AND id = ? AND run = ? "
                                  "ORDER BY updated DESC", (cluster, cluster, job_id, run)).fetchone()
        except sqlite3.OperationalError:
            return None
        if row is None:
            return None
        job = {**dict(row), "failed": bool(row["failed"])}
        job["runs"] = self.db.execute("SELECT count(*) FROM jobs WHERE cluster = ? AND id = ?",
                                      (job["cluster"], job_id)).fetchone()[0]
        job["nodes"] = self.job_parts(job["cluster"], job_id, run)
        job["findings"] = [_decoded(dict(r)) for r in self.db.execute(
            "SELECT node, ts, kind, name, entity, status, codes, message, history_id FROM job_findings "
            "WHERE cluster = ? AND job_id = ? AND run = ? ORDER BY ts, id", (job["cluster"], job_id, run))]
        return job

    def job_parts(self, cluster: str, job_id: str, run: int = 0) -> list[dict[str, Any]]:
        return [{**dict(r), "codes": json.loads(r["codes"])} for r in self.db.execute(
            "SELECT node, gpus, started, ended, state, exit_code, findings, codes FROM job_nodes "
            "WHERE cluster = ? AND job_id = ? AND run = ? ORDER BY node", (cluster, job_id, run))]

    def job_decisions(self, cluster: str, job_id: str, nodes: Sequence[str], since: float,
                      until: float) -> list[dict[str, Any]]:
        """Rules that fired on the job (their audit rows name it ``job:ID``) on ``nodes``, between
        ``since`` and ``until`` (the controller's times the run was opened and last heard of)."""
        rows = []
        for node in nodes:
            rows += self.db.execute("SELECT * FROM audit WHERE cluster = ? AND node = ? AND ts >= ? AND ts <= ? "
                                    "AND detail = ?", (cluster, node, since, until, f"job:{job_id}")).fetchall()
        return [{**dict(r), "evidence": json.loads(r["evidence"])} for r in sorted(rows, key=lambda r: r["id"])]

    def job_parts_between(self, since: float, node: str | None = None) -> list[dict[str, Any]]:
        """Every node's part in a job that started or ended since ``since`` (of ``node`` only), with
        the job's user: what ``vetd export`` writes as ``job`` lines."""
        try:
            rows = self.db.execute(
                "SELECT n.*, j.user FROM job_nodes n JOIN jobs j ON j.cluster = n.cluster AND j.id = n.job_id "
                "AND j.run = n.run WHERE (n.started >= ? OR n.ended >= ?) AND (? IS NULL OR n.node = ?) "
                "ORDER BY n.started",
                (since, since, node, node))
        except sqlite3.OperationalError:
            return []
        return [{**dict(r), "codes": json.loads(r["codes"])} for r in rows]


_json_encoder = msgspec.json.Encoder()


def _json(value: object) -> str:
    return _json_encoder.encode(value).decode()


def _finite(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("codes", "metrics"):
        if key in row:
            row[key] = json.loads(row[key])
    return row


def _node_values(row: NodeRow) -> tuple[Any, ...]:
    return (row.cluster, row.name, row.state, row.state_since, row.reason, int(row.online), row.session,
            row.session_started, row.first_seen, row.last_seen, row.agent_version, _json(row.labels), row.boot_id)


def _audit_from_row(r: sqlite3.Row) -> Audit:
    return Audit(r["cluster"], r["node"], r["action"], r["ts"], r["actor"], r["rule"], r["outcome"], r["detail"],
                 json.loads(r["evidence"]), r["id"])


def _healing_from_row(r: sqlite3.Row) -> Healing:
    return Healing(**{**dict(r), "ladder": json.loads(r["ladder"])})


def _node_from_row(r: sqlite3.Row) -> NodeRow:
    return NodeRow(
        cluster=r["cluster"],
        name=r["name"],
        state=r["state"],
        state_since=r["state_since"],
        reason=r["reason"],
        online=bool(r["online"]),
        session=r["session"],
        session_started=r["session_started"],
        first_seen=r["first_seen"],
        last_seen=r["last_seen"],
        agent_version=r["agent_version"],
        labels=json.loads(r["labels"]),
        # A read-only look at an older database has no boot_id (a Row's `in` looks at values, not keys).
        boot_id=r["boot_id"] if "boot_id" in r.keys() else "",  # noqa: SIM118
    )


def _job_from_row(r: sqlite3.Row) -> Job:
    return Job(cluster=r["cluster"], id=r["id"], started=r["started"], updated=r["updated"], user=r["user"],
               phase=r["phase"], ended=r["ended"], state=r["state"], exit_code=r["exit_code"],
               failed=bool(r["failed"]), ending_since=r["ending_since"], opened=r["opened"])


def _job_node_from_row(r: sqlite3.Row) -> JobNode:
    return JobNode(gpus=r["gpus"], started=r["started"], ended=r["ended"], state=r["state"],
                   exit_code=r["exit_code"], findings=r["findings"], codes=json.loads(r["codes"]),
                   end_event=r["end_event"])


def _request(row: sqlite3.Row) -> dict[str, Any]:
    """An operator request's row, its JSON columns read (``params``: none in a read-only older database)."""
    request = {**dict(row), "nodes": json.loads(row["nodes"])}
    request["params"] = json.loads(request.get("params") or "{}")
    return request


def _campaign(row: sqlite3.Row, *, verdicts: bool) -> dict[str, Any]:
    """A campaign row decoded; a database not yet migrated to 7 (read-only) has every campaign ``done``."""
    found = dict(row)
    campaign = {**found, "state": found.get("state", "done"), "error": found.get("error", ""),
                "nodes": json.loads(found["nodes"]), "summary": json.loads(found["summary"])}
    campaign.pop("verdicts", None)
    if verdicts:
        campaign["verdicts"] = json.loads(found.get("verdicts", "[]"))
    return campaign
